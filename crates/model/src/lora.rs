//! LoRA adapters as the forward pass sees them: `y = x W^T + scale * (x A^T) B^T`.
//!
//! An adapter is either shared by the whole batch (A: `r x in`, B: `out x r`) or one per example (A: `batch x r x
//! in`, B: `batch x out x r`): the hypernetwork emits a different delta for every document in a batch. A and B are
//! ordinary tensors, so gradients flow into them when they are `Var`s or depend on `Var`s.

use std::collections::BTreeMap;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::{LlamaConfig, ModelError, Result};

/// A linear module of a decoder layer, named as in the Hugging Face layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Module {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Module {
    pub const ALL: [Module; 7] = [Self::Q, Self::K, Self::V, Self::O, Self::Gate, Self::Up, Self::Down];

    /// The tensor path inside a layer, e.g. `mlp.down_proj`.
    pub fn path(self) -> &'static str {
        match self {
            Self::Q => "self_attn.q_proj",
            Self::K => "self_attn.k_proj",
            Self::V => "self_attn.v_proj",
            Self::O => "self_attn.o_proj",
            Self::Gate => "mlp.gate_proj",
            Self::Up => "mlp.up_proj",
            Self::Down => "mlp.down_proj",
        }
    }

    /// `(in_features, out_features)` of this module under `cfg`.
    pub fn dims(self, cfg: &LlamaConfig) -> (usize, usize) {
        let d = cfg.hidden_size;
        let q = cfg.num_attention_heads * cfg.head_dim();
        let kv = cfg.kv_heads() * cfg.head_dim();
        match self {
            Self::Q => (d, q),
            Self::K | Self::V => (d, kv),
            Self::O => (q, d),
            Self::Gate | Self::Up => (d, cfg.intermediate_size),
            Self::Down => (cfg.intermediate_size, d),
        }
    }
}

#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// `r x in`, or `batch x r x in`.
    pub a: Tensor,
    /// `out x r`, or `batch x out x r`.
    pub b: Tensor,
    pub scale: f64,
}

impl LoraAdapter {
    pub fn new(a: Tensor, b: Tensor, scale: f64) -> Self {
        Self { a, b, scale }
    }

    pub fn rank(&self) -> usize {
        self.a.dims()[self.a.rank() - 2]
    }

    /// `None` for a batch-shared adapter, `Some(batch)` for a per-example one.
    pub fn batch(&self) -> Option<usize> {
        (self.a.rank() == 3).then(|| self.a.dims()[0])
    }

    /// The low-rank term for `x` (`batch x seq x in`).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, i) = x.dims3()?;
        let y = if self.a.rank() == 2 {
            let h = x.reshape((b * t, i))?.matmul(&self.a.t()?)?;
            h.matmul(&self.b.t()?)?.reshape((b, t, ()))?
        } else {
            x.matmul(&self.a.transpose(1, 2)?)?.matmul(&self.b.transpose(1, 2)?)?
        };
        Ok((y * self.scale)?)
    }

    fn check(&self, layer: usize, module: Module, cfg: &LlamaConfig, batch: Option<usize>) -> Result<()> {
        let (fan_in, fan_out) = module.dims(cfg);
        let bad = |msg: String| Err(ModelError::Lora(format!("layer {layer} {}: {msg}", module.path())));
        let (ar, br) = (self.a.rank(), self.b.rank());
        if !(ar == br && (ar == 2 || ar == 3)) {
            return bad(format!(
                "A and B must both be 2-d or both 3-d, got {:?} and {:?}",
                self.a.dims(),
                self.b.dims()
            ));
        }
        let (ad, bd) = (self.a.dims(), self.b.dims());
        let r = ad[ar - 2];
        if ad[ar - 1] != fan_in || bd[br - 2] != fan_out || bd[br - 1] != r || r == 0 {
            return bad(format!("expected A [.., r, {fan_in}] and B [.., {fan_out}, r], got A {ad:?} and B {bd:?}"));
        }
        if ar == 3 {
            if ad[0] != bd[0] {
                return bad(format!("A has batch {} but B has batch {}", ad[0], bd[0]));
            }
            if let Some(n) = batch.filter(|&n| n != ad[0]) {
                return bad(format!("per-example adapter for {} examples applied to a batch of {n}", ad[0]));
            }
        }
        if !self.scale.is_finite() {
            return bad(format!("scale {} is not finite", self.scale));
        }
        Ok(())
    }
}

/// Adapters keyed by `(layer, module)`; any subset of modules may be adapted.
#[derive(Debug, Clone, Default)]
pub struct LoraSet {
    adapters: BTreeMap<(usize, Module), LoraAdapter>,
}

impl LoraSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, layer: usize, module: Module, adapter: LoraAdapter) -> &mut Self {
        self.adapters.insert((layer, module), adapter);
        self
    }

    pub fn get(&self, layer: usize, module: Module) -> Option<&LoraAdapter> {
        self.adapters.get(&(layer, module))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&(usize, Module), &LoraAdapter)> {
        self.adapters.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.adapters.is_empty()
    }

    /// Shapes against the model and the batch it is about to run on; errors name the layer and module.
    pub fn validate(&self, cfg: &LlamaConfig, batch: Option<usize>) -> Result<()> {
        for (&(layer, module), adapter) in &self.adapters {
            if layer >= cfg.num_hidden_layers {
                return Err(ModelError::Lora(format!(
                    "adapter for layer {layer} but the model has {} layers",
                    cfg.num_hidden_layers
                )));
            }
            adapter.check(layer, module, cfg, batch)?;
        }
        Ok(())
    }
}

impl Module {
    /// The module at a Hugging Face path such as `mlp.down_proj`.
    pub fn from_path(path: &str) -> Option<Module> {
        Self::ALL.into_iter().find(|m| m.path() == path)
    }
}

impl LoraSet {
    /// The adapters of a stored delta, as tensors on `device` (batch-shared). A delta that carries side-memory
    /// entries is refused: adapters alone would serve it without its memory; merge it with `Llama::merged`.
    pub fn from_delta(delta: &engram_lora::Delta, device: &candle_core::Device) -> Result<Self> {
        if let Some(m) = &delta.memory {
            return Err(ModelError::Lora(format!(
                "this delta carries {} side-memory entries, which per-request adapters cannot apply; merge it into \
                 the model instead",
                m.entries()
            )));
        }
        Self::from_adapters(delta, device)
    }

    /// The adapters of a stored delta, ignoring any side memory (which `Llama::merged` handles).
    pub(crate) fn from_adapters(delta: &engram_lora::Delta, device: &candle_core::Device) -> Result<Self> {
        let mut set = Self::new();
        for ((layer, path), f) in &delta.adapters {
            let module = Module::from_path(path)
                .ok_or_else(|| ModelError::Lora(format!("layer {layer}: unknown module {path:?}")))?;
            let a = Tensor::from_vec(f.a.clone(), (f.rank, f.in_dim), device)?;
            let b = Tensor::from_vec(f.b.clone(), (f.out_dim, f.rank), device)?;
            set.insert(*layer, module, LoraAdapter::new(a, b, delta.meta.scale as f64));
        }
        Ok(set)
    }

    /// A stored delta of these (batch-shared) adapters. Every adapter must share `meta.scale`; factors are copied
    /// to the CPU as f32.
    pub fn to_delta(&self, meta: engram_lora::Meta) -> Result<engram_lora::Delta> {
        let mut adapters = BTreeMap::new();
        for (&(layer, module), ad) in &self.adapters {
            if ad.batch().is_some() {
                return Err(ModelError::Lora(format!(
                    "layer {layer} {}: a per-example adapter is not one delta",
                    module.path()
                )));
            }
            if (ad.scale - meta.scale as f64).abs() > 1e-6 * ad.scale.abs().max(1.0) {
                return Err(ModelError::Lora(format!(
                    "layer {layer} {}: scale {} differs from {}",
                    module.path(),
                    ad.scale,
                    meta.scale
                )));
            }
            let (r, i) = ad.a.dims2()?;
            let o = ad.b.dims2()?.0;
            let a = ad.a.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let b = ad.b.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let f = engram_lora::Factors::new(r, i, o, a, b).map_err(|e| ModelError::Lora(e.to_string()))?;
            adapters.insert((layer, module.path().to_string()), f);
        }
        Ok(engram_lora::Delta { meta, adapters, memory: None })
    }
}
