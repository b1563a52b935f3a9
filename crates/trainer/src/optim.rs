//! AdamW with global gradient-norm clipping and a saveable state (candle's AdamW keeps its moments private, so a
//! run could not resume from a checkpoint with it).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Global gradient L2 norm above which gradients are scaled down.
    pub clip_norm: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.01, clip_norm: 1.0 }
    }
}

struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
    /// Norm weights are not decayed.
    decay: bool,
}

pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    pub step: u64,
}

impl AdamW {
    /// `vars` by name; the order is fixed by sorting so saved states line up.
    pub fn new(vars: &HashMap<String, Var>, cfg: AdamWConfig) -> Result<Self> {
        let mut names: Vec<&String> = vars.keys().collect();
        names.sort();
        let slots = names
            .into_iter()
            .map(|name| {
                let var = vars[name].clone();
                let zeros = var.zeros_like()?;
                Ok(Slot { name: name.clone(), decay: !name.contains("norm"), m: zeros.clone(), v: zeros, var })
            })
            .collect::<Result<_>>()?;
        Ok(Self { cfg, slots, step: 0 })
    }

    /// One update at learning rate `lr`. Returns the gradient norm before clipping.
    pub fn update(&mut self, grads: &GradStore, lr: f64) -> Result<f64> {
        let mut sq = 0.0f64;
        for s in &self.slots {
            if let Some(g) = grads.get(&s.var) {
                sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            }
        }
        let norm = sq.sqrt();
        let clip = if norm > self.cfg.clip_norm { self.cfg.clip_norm / norm } else { 1.0 };
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        for s in &mut self.slots {
            let Some(g) = grads.get(&s.var) else { continue };
            let g = (g * clip)?;
            s.m = ((&s.m * b1)? + (&g * (1.0 - b1))?)?;
            s.v = ((&s.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let update = ((&s.m / c1)? / ((&s.v / c2)?.sqrt()? + self.cfg.eps)?)?;
            let decayed = if s.decay {
                (s.var.as_tensor() * (1.0 - lr * self.cfg.weight_decay))?
            } else {
                s.var.as_tensor().clone()
            };
            s.var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(norm)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let mut map = HashMap::new();
        for s in &self.slots {
            map.insert(format!("m.{}", s.name), s.m.clone());
            map.insert(format!("v.{}", s.name), s.v.clone());
        }
        candle_core::safetensors::save(&map, path)?;
        Ok(())
    }

    pub fn load(&mut self, path: &Path, step: u64) -> Result<()> {
        let map = candle_core::safetensors::load(path, &Device::Cpu)?;
        for s in &mut self.slots {
            s.m =
                map.get(&format!("m.{}", s.name)).with_context(|| format!("optimizer state lacks {}", s.name))?.clone();
            s.v =
                map.get(&format!("v.{}", s.name)).with_context(|| format!("optimizer state lacks {}", s.name))?.clone();
        }
        self.step = step;
        Ok(())
    }
}
