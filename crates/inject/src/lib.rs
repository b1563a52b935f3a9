//! Injectors turn a document into a LoRA delta: after injection the model answers questions about the document
//! without it in context.
//!
//! [`DistillInjector`] is the slow baseline Doc-to-LoRA compares against: context distillation. Questions are
//! generated from the document (every trained-phrasing question about every person it names; never the held-out
//! phrasing), the teacher is the frozen model with the document in context, the student is the model plus a fresh
//! LoRA without it, and AdamW fits the LoRA to the teacher's top-k answer distributions.
//!
//! [`HyperInjector`] is the fast path: a Perceiver hypernetwork ([`hyper`]) meta-trained by [`meta`] emits the delta
//! in one forward pass.
#![forbid(unsafe_code)]

pub mod evaluate;
pub mod hyper;
pub mod meta;

pub use hyper::{HyperConfig, HyperInjector, HyperNet, InjectionTimes};
pub use meta::{train_hypernet, MetaConfig};

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use engram_lora::{Delta, Meta};
use engram_model::{BaseModel, ForwardOptions, LoraAdapter, LoraSet, Module, Positions};
use engram_world::World;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One injection's result.
#[derive(Debug, Clone)]
pub struct Injection {
    pub delta: Delta,
    /// Optimisation steps taken (0 for a single forward pass).
    pub steps: usize,
    pub seconds: f64,
}

pub trait Injector {
    /// Short name recorded in the delta (`distill`, `hypernet`).
    fn name(&self) -> &'static str;
    fn inject(&self, document: &str) -> Result<Injection>;
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DistillConfig {
    pub rank: usize,
    pub modules: Vec<Module>,
    /// LoRA scale (alpha / r).
    pub scale: f64,
    pub steps: usize,
    pub lr: f64,
    /// Teacher log-probabilities kept per answer token.
    pub top_k: usize,
    /// Answer tokens generated per question at most (answers end in `<eos>`).
    pub max_answer: usize,
}

impl Default for DistillConfig {
    fn default() -> Self {
        Self { rank: 8, modules: vec![Module::Down], scale: 2.0, steps: 40, lr: 1e-2, top_k: 16, max_answer: 4 }
    }
}

pub struct DistillInjector<'m> {
    model: &'m BaseModel,
    world: World,
    cfg: DistillConfig,
}

/// What the student must match: for each answer token, where it sits in the student's batch and the teacher's
/// top-k distribution there.
struct Targets {
    /// Student rows (`batch x seq`, right-padded).
    ids: Tensor,
    /// Flattened (row * seq + position) of every supervised position.
    at: Tensor,
    /// `positions x k` token ids and probabilities (renormalised over the top k).
    top_ids: Tensor,
    top_p: Tensor,
    /// Mean entropy of the teacher's top-k distributions: the floor of the loss.
    entropy: f64,
}

/// Normal(0, std) values from a seed (candle's CPU generator cannot be seeded; an injection must be repeatable).
fn normals(seed: u64, n: usize, std: f32) -> Vec<f32> {
    let mut s = seed;
    let mut next = move || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (((z ^ (z >> 31)) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u, v) = (next(), next());
            ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32 * std
        })
        .collect()
}

impl<'m> DistillInjector<'m> {
    pub fn new(model: &'m BaseModel, cfg: DistillConfig) -> Self {
        Self { model, world: World::new(), cfg }
    }

    fn targets(&self, document: &str) -> Result<Targets> {
        let m = self.model;
        let names = self.world.names_in(document);
        if names.is_empty() {
            bail!("the document names nobody this model's world knows how to ask about");
        }
        let eos = m.token_id("<eos>")?;
        let pad = m.token_id("<pad>")?;
        let doc_ids = m.encode(&format!("<bos> {document}"))?;
        let (mut rows, mut spans, mut top_ids, mut top_p) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for name in &names {
            for (_, q) in self.world.questions_about(name) {
                let q_ids = m.encode(&q)?;
                let teacher_prompt: Vec<u32> = doc_ids.iter().chain(&q_ids).copied().collect();
                let answer = m.llama.generate_greedy(&teacher_prompt, self.cfg.max_answer, eos, None)?;
                let fed: Vec<u32> = teacher_prompt.iter().chain(&answer[..answer.len() - 1]).copied().collect();
                let input = Tensor::new(fed.as_slice(), m.llama.device())?.unsqueeze(0)?;
                let logits = m
                    .llama
                    .forward(
                        &input,
                        &Positions::From(0),
                        &ForwardOptions { last_only: false, ..ForwardOptions::inference() },
                    )?
                    .logits;
                let n = answer.len();
                let logp = candle_nn::ops::log_softmax(&logits.squeeze(0)?.narrow(0, fed.len() - n, n)?, D::Minus1)?;
                for row in logp.to_vec2::<f32>()? {
                    let mut idx: Vec<usize> = (0..row.len()).collect();
                    idx.select_nth_unstable_by(self.cfg.top_k - 1, |&a, &b| row[b].total_cmp(&row[a]));
                    let keep = &idx[..self.cfg.top_k];
                    let z: f32 = keep.iter().map(|&i| row[i].exp()).sum();
                    top_ids.extend(keep.iter().map(|&i| i as u32));
                    top_p.extend(keep.iter().map(|&i| row[i].exp() / z));
                }
                let student: Vec<u32> =
                    std::iter::once(m.token_id("<bos>")?).chain(q_ids).chain(answer[..n - 1].iter().copied()).collect();
                spans.push((student.len() - n, n));
                rows.push(student);
            }
        }
        let seq = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut at = Vec::new();
        for (r, (row, (start, n))) in rows.iter_mut().zip(&spans).enumerate() {
            row.resize(seq, pad);
            at.extend((*start..start + n).map(|p| (r * seq + p) as u32));
        }
        let dev = m.llama.device();
        let k = self.cfg.top_k;
        let entropy = -top_p.iter().map(|&p| if p > 0.0 { (p * p.ln()) as f64 } else { 0.0 }).sum::<f64>()
            / (top_p.len() / k) as f64;
        Ok(Targets {
            entropy,
            ids: Tensor::new(rows, dev)?,
            at: Tensor::new(at.as_slice(), dev)?,
            top_ids: Tensor::from_vec(top_ids, (top_p.len() / k, k), dev)?,
            top_p: Tensor::from_vec(top_p.clone(), (top_p.len() / k, k), dev)?,
        })
    }

    /// Cross-entropy of the student against the teacher's top-k distributions (KL up to a constant).
    fn loss(&self, t: &Targets, lora: &LoraSet) -> Result<Tensor> {
        let opts = ForwardOptions { lora: Some(lora), ..ForwardOptions::default() };
        let logits = self.model.llama.forward(&t.ids, &Positions::From(0), &opts)?.logits;
        let v = logits.dim(D::Minus1)?;
        let picked = logits.reshape(((), v))?.index_select(&t.at, 0)?;
        let logp = candle_nn::ops::log_softmax(&picked, D::Minus1)?.gather(&t.top_ids, 1)?;
        let n = t.top_p.dim(0)? as f64;
        Ok(((logp * &t.top_p)?.sum_all()? * (-1.0 / n))?)
    }

    /// KL divergence from the teacher's top-k answer distributions to the student with `delta` (or with no
    /// delta), averaged over the answer tokens of `document`'s generated questions.
    pub fn distill_kl(&self, document: &str, delta: Option<&Delta>) -> Result<f64> {
        let t = self.targets(document)?;
        let lora = match delta {
            Some(d) => LoraSet::from_delta(d, self.model.llama.device())?,
            None => LoraSet::new(),
        };
        Ok(self.loss(&t, &lora)?.to_scalar::<f32>()? as f64 - t.entropy)
    }
}

impl Injector for DistillInjector<'_> {
    fn name(&self) -> &'static str {
        "distill"
    }

    fn inject(&self, document: &str) -> Result<Injection> {
        let start = Instant::now();
        let t = self.targets(document).context("building distillation targets")?;
        let cfg = self.model.llama.config();
        let dev: &Device = self.model.llama.device();
        let seed = u64::from_le_bytes(Sha256::digest(document.as_bytes())[..8].try_into().expect("8 bytes"));
        let mut vars = Vec::new();
        let mut set = LoraSet::new();
        for layer in 0..cfg.num_hidden_layers {
            for (j, &module) in self.cfg.modules.iter().enumerate() {
                let (i, o) = module.dims(cfg);
                let a0 = normals(seed ^ ((layer * 16 + j) as u64), self.cfg.rank * i, 1.0 / (i as f32).sqrt());
                let a = Var::from_tensor(&Tensor::from_vec(a0, (self.cfg.rank, i), dev)?)?;
                let b = Var::zeros((o, self.cfg.rank), DType::F32, dev)?;
                set.insert(
                    layer,
                    module,
                    LoraAdapter::new(a.as_tensor().clone(), b.as_tensor().clone(), self.cfg.scale),
                );
                vars.push(a);
                vars.push(b);
            }
        }
        let params = ParamsAdamW { lr: self.cfg.lr, weight_decay: 0.0, ..Default::default() };
        let mut opt = AdamW::new(vars, params)?;
        for _ in 0..self.cfg.steps {
            let loss = self.loss(&t, &set)?;
            opt.backward_step(&loss)?;
        }
        let meta = Meta {
            base_model: self.model.hash.clone(),
            scale: self.cfg.scale as f32,
            injector: self.name().into(),
            injector_version: format!("1 steps={} rank={} lr={}", self.cfg.steps, self.cfg.rank, self.cfg.lr),
        };
        let delta = set.to_delta(meta)?;
        Ok(Injection { delta, steps: self.cfg.steps, seconds: start.elapsed().as_secs_f64() })
    }
}
