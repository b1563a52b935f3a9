//! The Doc-to-LoRA hypernetwork: one forward pass turns a document into a LoRA delta.
//!
//! The frozen base model reads a chunk of the document; the residual stream entering every layer, plus the final
//! residual, is captured at every position. The sources are RMS-normalised and concatenated along features, and
//! one projection to the hypernetwork's width makes one key per token for a Perceiver (learned latent queries,
//! cross-attention blocks with an MLP, no self-attention). The latents are L2-normalised; `rank`
//! consecutive latents belong to each adapted (layer, module), and per-target heads turn each latent into one row
//! of A and one column of B (rank 1 per latent). Per-rank scalers start at 1 for A and 0 for B, so an untrained
//! hypernetwork emits an exact zero delta.
//!
//! With `pointers` on, each latent also points into the document (a softmax over its positions, from the latent
//! and the keys), once for A and once for B. This is the MLP-as-key-value-memory view of ROME/MEMIT made
//! learnable: A gains the base model's own `down_proj` input (MLP hidden activation) at the pointed position, the
//! "key" under which the model will look the fact up; B gains the output direction (LM head row times the final
//! norm gain) of the pointed token, the "value" to write. Reading a fact becomes choosing where to point rather than
//! synthesising 704- and 256-dimensional vectors from scratch.
//!
//! Documents longer than a chunk are cut at sentence ends; every chunk is encoded on its own, one at a time (memory
//! stays that of one chunk), and the chunks' factors are concatenated along the rank: the delta is their sum.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Init, Linear, Module as _, VarBuilder, VarMap};
use engram_lora::{Delta, Factors, Meta};
use engram_model::{BaseModel, ForwardOptions, Kernels, Llama, Module, Positions};
use serde::{Deserialize, Serialize};

use crate::{Injection, Injector};

pub const CONFIG_FILE: &str = "hypernet.json";
pub const WEIGHTS_FILE: &str = "hypernet.safetensors";

/// The hypernetwork's shape, stored beside its weights.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HyperConfig {
    /// Rank emitted per chunk and target.
    pub rank: usize,
    pub modules: Vec<Module>,
    /// LoRA scale (alpha / r) of the emitted deltas.
    pub scale: f64,
    /// Perceiver width, attention heads, cross-attention blocks, MLP hidden size.
    pub width: usize,
    pub heads: usize,
    pub blocks: usize,
    pub mlp_hidden: usize,
    pub latent_init_std: f64,
    /// Pointer paths: A from the pointed position's `down_proj` input, B from the pointed token's output direction.
    pub pointers: bool,
    /// Tokens per chunk, `<bos> <doc> ... </doc>` included.
    pub chunk_tokens: usize,
    /// A learned per-chunk gate on B (`2 sigmoid(w . mean latent + b)`, 1 at initialisation): lets a chunk with
    /// nothing to teach (distractors in a long document) write nothing, instead of its small delta adding up
    /// over tens of chunks.
    #[serde(default)]
    pub chunk_gate: bool,
    /// SHA-256 of the base model the hypernetwork reads and writes for.
    pub base_model: String,
    /// Filled from the base model: layers and hidden size.
    pub layers: usize,
    pub hidden: usize,
}

impl HyperConfig {
    pub fn for_base(base: &BaseModel) -> Self {
        let c = base.llama.config();
        Self {
            rank: 8,
            modules: vec![Module::Down],
            scale: 2.0,
            width: 128,
            heads: 4,
            blocks: 2,
            mlp_hidden: 256,
            latent_init_std: 0.05,
            pointers: true,
            chunk_tokens: 96,
            chunk_gate: true,
            base_model: base.hash.clone(),
            layers: c.num_hidden_layers,
            hidden: c.hidden_size,
        }
    }

    /// Adapted (layer, module) pairs in latent order.
    pub fn targets(&self) -> Vec<(usize, Module)> {
        (0..self.layers).flat_map(|l| self.modules.iter().map(move |&m| (l, m))).collect()
    }

    pub fn latents(&self) -> usize {
        self.targets().len() * self.rank
    }

    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 || self.width == 0 || self.blocks == 0 || self.heads == 0 || self.modules.is_empty() {
            bail!("hypernet config: rank, width, blocks, heads and modules must be non-zero");
        }
        if !self.width.is_multiple_of(self.heads) {
            bail!("hypernet config: width {} is not a multiple of heads {}", self.width, self.heads);
        }
        if self.chunk_tokens < 8 {
            bail!("hypernet config: chunk_tokens {} is too small to hold a sentence", self.chunk_tokens);
        }
        Ok(())
    }
}

fn rms_plain(x: &Tensor) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(x.broadcast_div(&(ms + 1e-5)?.sqrt()?)?)
}

/// Differentiable RMS norm (the fused kernel records no backward pass).
fn rms(x: &Tensor, gain: &Tensor) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(x.broadcast_div(&(ms + 1e-5)?.sqrt()?)?.broadcast_mul(gain)?)
}

struct Block {
    q_norm: Tensor,
    kv_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    mlp_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

struct Head {
    a: Linear,
    b: Linear,
    scale_a: Tensor,
    scale_b: Tensor,
    /// Pointer queries (latent -> key space) and the strength of each pointer path.
    point_a: Option<(Linear, Tensor)>,
    point_b: Option<(Linear, Tensor)>,
}

/// What the frozen base model yields over a batch of chunks, the hypernetwork's input.
pub struct Reading {
    /// `layers + 1` tensors `n x t x hidden`: every layer's input and the final residual.
    pub residuals: Vec<Tensor>,
    /// `layers` tensors `n x t x intermediate`: every layer's `down_proj` input.
    pub mlp_hidden: Vec<Tensor>,
    /// `n x t` token ids.
    pub ids: Tensor,
}

/// Per target `(layer, module)`: A `n x r x in` and B `n x out x r` for a batch of `n` chunks.
pub struct Generated {
    pub factors: Vec<((usize, Module), Tensor, Tensor)>,
}

pub struct HyperNet {
    pub cfg: HyperConfig,
    /// All residual sources (concatenated along features) to the Perceiver width.
    in_proj: Linear,
    latents: Tensor,
    blocks: Vec<Block>,
    heads: Vec<Head>,
    /// Per-chunk gate on B (see [`HyperConfig::chunk_gate`]).
    gate: Option<candle_nn::Linear>,
    /// The heads' weights stacked along a target axis, for inference (see [`Stacked`]).
    stacked: Option<Stacked>,
    /// Unit output-token directions, `vocab x hidden` (constant).
    token_dirs: Tensor,
}

fn linear(vb: &VarBuilder, i: usize, o: usize, std: f64, name: &str) -> Result<Linear> {
    Ok(Linear::new(vb.get_with_hints((o, i), name, Init::Randn { mean: 0.0, stdev: std })?, None))
}

/// The directions in the residual stream that raise each output token's logit most: LM head rows times the final
/// norm gain, normalised.
fn token_directions(llama: &Llama) -> Result<Tensor> {
    let named: HashMap<String, Tensor> = llama.named_tensors().into_iter().collect();
    let head = named.get("lm_head.weight").or_else(|| named.get("model.embed_tokens.weight")).context("no LM head")?;
    let gain = named.get("model.norm.weight").context("no final norm")?;
    let d = head.broadcast_mul(gain)?;
    let norm = d.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    Ok(d.broadcast_div(&(norm + 1e-6)?)?.to_dtype(DType::F32)?)
}

impl HyperNet {
    /// Builds the network from `vb` (a `VarMap` builder creates fresh trainable weights).
    pub fn new(cfg: &HyperConfig, base: &Llama, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let (w, d, h) = (cfg.width, cfg.hidden, cfg.mlp_hidden);
        let sources = (cfg.layers + 1) * d;
        let in_proj = linear(&vb, sources, w, 1.0 / (sources as f64).sqrt(), "in_proj.weight")?;
        let latents =
            vb.get_with_hints((cfg.latents(), w), "latents", Init::Randn { mean: 0.0, stdev: cfg.latent_init_std })?;
        let std_w = 1.0 / (w as f64).sqrt();
        let mut blocks = Vec::new();
        for b in 0..cfg.blocks {
            let vb = vb.pp(format!("blocks.{b}"));
            blocks.push(Block {
                q_norm: vb.get_with_hints(w, "q_norm", Init::Const(1.0))?,
                kv_norm: vb.get_with_hints(w, "kv_norm", Init::Const(1.0))?,
                q: linear(&vb, w, w, std_w, "q.weight")?,
                k: linear(&vb, w, w, std_w, "k.weight")?,
                v: linear(&vb, w, w, std_w, "v.weight")?,
                o: linear(&vb, w, w, std_w / (2.0 * cfg.blocks as f64).sqrt(), "o.weight")?,
                mlp_norm: vb.get_with_hints(w, "mlp_norm", Init::Const(1.0))?,
                gate: linear(&vb, w, h, std_w, "gate.weight")?,
                up: linear(&vb, w, h, std_w, "up.weight")?,
                down: linear(&vb, h, w, 1.0 / (h as f64).sqrt() / (2.0 * cfg.blocks as f64).sqrt(), "down.weight")?,
            });
        }
        let token_dirs = token_directions(base)?;
        let mut heads = Vec::new();
        for (layer, module) in cfg.targets() {
            let (i, o) = module.dims(base.config());
            let vb = vb.pp(format!("heads.{layer}.{}", module.path()));
            let pointer = |name: &str, on: bool| -> Result<Option<(Linear, Tensor)>> {
                if !(cfg.pointers && on) {
                    return Ok(None);
                }
                Ok(Some((
                    linear(&vb, w, w, std_w, &format!("{name}.weight"))?,
                    vb.get_with_hints(1, &format!("{name}_gain"), Init::Const(1.0))?,
                )))
            };
            let point_a = pointer("point_a", module == Module::Down)?;
            let point_b = pointer("point_b", o == cfg.hidden)?;
            heads.push(Head {
                a: linear(&vb, w, i, 1.0 / (i as f64).sqrt() * (w as f64).sqrt() * std_w, "a.weight")?,
                b: linear(&vb, w, o, 1.0 / (o as f64).sqrt(), "b.weight")?,
                scale_a: vb.get_with_hints(cfg.rank, "scale_a", Init::Const(1.0))?,
                scale_b: vb.get_with_hints(cfg.rank, "scale_b", Init::Const(0.0))?,
                point_a,
                point_b,
            });
        }
        let gate = if cfg.chunk_gate {
            let w = vb.get_with_hints((1, cfg.width), "gate.weight", Init::Const(0.0))?;
            let b = vb.get_with_hints(1, "gate.bias", Init::Const(0.0))?;
            Some(candle_nn::Linear::new(w, Some(b)))
        } else {
            None
        };
        Ok(Self { cfg: cfg.clone(), in_proj, latents, blocks, heads, gate, stacked: None, token_dirs })
    }

    /// A fresh, trainable network and the variables that hold it.
    pub fn init_trainable(cfg: &HyperConfig, base: &Llama, device: &Device) -> Result<(Self, VarMap)> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let net = Self::new(cfg, base, vb)?;
        Ok((net, varmap))
    }

    /// Loads `hypernet.json` and `hypernet.safetensors` from `dir`; refuses a network trained for another base.
    pub fn load(dir: &Path, base: &BaseModel) -> Result<Self> {
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let cfg: HyperConfig = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        if cfg.base_model != base.hash {
            bail!(
                "{} was trained for base model {} but the loaded base model is {}",
                dir.display(),
                short(&cfg.base_model),
                short(&base.hash)
            );
        }
        let weights = dir.join(WEIGHTS_FILE);
        let vb = load_weights(&weights, base.llama.device())?;
        Self::new(&cfg, &base.llama, vb).with_context(|| format!("loading {}", weights.display()))?.for_inference()
    }

    /// Stacks the heads' weights so that one chunk's factors for every target come from a few batched products
    /// (the same numbers as the per-target path). Weights are copied: call once training is over.
    pub fn for_inference(mut self) -> Result<Self> {
        self.stacked = Stacked::new(&self.heads, &self.cfg)?;
        Ok(self)
    }

    /// Embeds the captured residuals of `n` chunks (`sources x [n, t, hidden]`) as Perceiver keys `n x t x w`:
    /// every source RMS-normalised, concatenated along features, one projection. (Concatenating along tokens
    /// instead makes attention `sources` times dearer for the same information.)
    fn keys(&self, residuals: &[Tensor]) -> Result<Tensor> {
        if residuals.len() != self.cfg.layers + 1 {
            bail!("expected {} residual sources, got {}", self.cfg.layers + 1, residuals.len());
        }
        let normed = residuals.iter().map(rms_plain).collect::<Result<Vec<_>>>()?;
        Ok(self.in_proj.forward(&Tensor::cat(&normed, D::Minus1)?)?)
    }

    /// Factors for a batch of chunks read by the base model; `mask`: `n x t` with 1 for real tokens and 0 for
    /// padding.
    pub fn forward(&self, reading: &Reading, mask: &Tensor) -> Result<Generated> {
        let keys = self.keys(&reading.residuals)?;
        let (n, k, w) = keys.dims3()?;
        // Padding never receives attention.
        let bias = ((mask.to_dtype(DType::F32)? - 1.0)? * 1e9)?.reshape((n, 1, 1, k))?;
        let m = self.cfg.latents();
        let (heads, hd) = (self.cfg.heads, w / self.cfg.heads);
        let mut lat = self.latents.unsqueeze(0)?.broadcast_as((n, m, w))?.contiguous()?;
        for b in &self.blocks {
            let kv = rms(&keys, &b.kv_norm)?;
            let split = |x: Tensor, len: usize| -> Result<Tensor> {
                Ok(x.reshape((n, len, heads, hd))?.transpose(1, 2)?.contiguous()?)
            };
            let q = split(b.q.forward(&rms(&lat, &b.q_norm)?)?, m)?;
            let kk = split(b.k.forward(&kv)?, k)?;
            let v = split(b.v.forward(&kv)?, k)?;
            let att = (q.matmul(&kk.t()?)? * (1.0 / (hd as f64).sqrt()))?.broadcast_add(&bias)?;
            let att = engram_model::softmax_last_dim(&att)?;
            let y = att.matmul(&v)?.transpose(1, 2)?.reshape((n, m, w))?;
            lat = (lat + b.o.forward(&y)?)?;
            let hx = rms(&lat, &b.mlp_norm)?;
            let y = b.down.forward(&(candle_nn::ops::silu(&b.gate.forward(&hx)?)? * b.up.forward(&hx)?)?)?;
            lat = (lat + y)?;
        }
        let norm = lat.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
        let lat = lat.broadcast_div(&(norm + 1e-6)?)?;
        // n x 1 x 1, multiplies every target's B.
        let gate = match &self.gate {
            Some(g) => Some((candle_nn::ops::sigmoid(&g.forward(&lat.mean(1)?)?)? * 2.0)?.reshape((n, 1, 1))?),
            None => None,
        };
        let r = self.cfg.rank;
        // Pointers score positions against the (normalised) keys; padding is never pointed at.
        let point_keys = rms_plain(&keys)?.t()?.contiguous()?;
        let point_bias = bias.reshape((n, 1, k))?;
        let point_scores = |query: &Tensor| -> Result<Tensor> {
            let s = (query.matmul(&point_keys)? * (1.0 / (w as f64).sqrt()))?.broadcast_add(&point_bias)?;
            Ok(engram_model::softmax_last_dim(&s)?)
        };
        let point = |q: &Linear, h: &Tensor| -> Result<Tensor> { point_scores(&q.forward(h)?) };
        let out_dirs = if self.heads.iter().any(|h| h.point_b.is_some()) {
            let v = self.token_dirs.index_select(&reading.ids.flatten_all()?, 0)?;
            Some(v.reshape((n, k, ()))?)
        } else {
            None
        };
        if let (Some(st), 1) = (&self.stacked, n) {
            return st.factors(&self.cfg, &lat, reading, &point_scores, out_dirs.as_ref(), gate.as_ref());
        }
        let mut factors = Vec::with_capacity(self.heads.len());
        for (g, ((layer, module), head)) in self.cfg.targets().into_iter().zip(&self.heads).enumerate() {
            let h = lat.narrow(1, g * r, r)?;
            let mut a = head.a.forward(&h)?;
            if let Some((q, gain)) = &head.point_a {
                let hidden = reading.mlp_hidden.get(layer).context("no MLP hidden activations captured")?;
                let hidden = hidden.broadcast_div(&(hidden.sqr()?.sum_keepdim(D::Minus1)?.sqrt()? + 1e-6)?)?;
                a = (a + point(q, &h)?.matmul(&hidden)?.broadcast_mul(gain)?)?;
            }
            let a = a.broadcast_mul(&head.scale_a.reshape((1, r, 1))?)?;
            let mut bt = head.b.forward(&h)?;
            if let (Some((q, gain)), Some(dirs)) = (&head.point_b, &out_dirs) {
                bt = (bt + point(q, &h)?.matmul(dirs)?.broadcast_mul(gain)?)?;
            }
            let mut bt = bt.broadcast_mul(&head.scale_b.reshape((1, r, 1))?)?;
            if let Some(g) = &gate {
                bt = bt.broadcast_mul(g)?;
            }
            factors.push(((layer, module), a, bt.transpose(1, 2)?.contiguous()?));
        }
        Ok(Generated { factors })
    }
}

/// Inference copies of the heads' weights, stacked along a target axis as `1 x T x ...` (`T` targets of one module
/// kind): one chunk's A and B for every target come from a few batched matmuls instead of a dozen small ops per
/// target, whose fixed overhead dominated the hypernetwork's share of the injection latency.
struct Stacked {
    /// `1 x T x width x in` and `1 x T x width x out` (the heads' linear maps, transposed).
    a: Tensor,
    b: Tensor,
    /// `1 x T x rank x 1`.
    scale_a: Tensor,
    scale_b: Tensor,
    /// Pointer queries `1 x T x width x width` (transposed) and gains `1 x T x 1 x 1`.
    point_a: Option<(Tensor, Tensor)>,
    point_b: Option<(Tensor, Tensor)>,
}

impl Stacked {
    /// `None` when targets mix module kinds (their shapes differ): the per-target path serves them.
    fn new(heads: &[Head], cfg: &HyperConfig) -> Result<Option<Self>> {
        if cfg.modules.len() != 1 || heads.is_empty() {
            return Ok(None);
        }
        let r = cfg.rank;
        let stack = |f: &dyn Fn(&Head) -> Result<Tensor>| -> Result<Tensor> {
            let parts = heads.iter().map(f).collect::<Result<Vec<_>>>()?;
            Ok(Tensor::stack(&parts, 0)?.unsqueeze(0)?.contiguous()?)
        };
        let pointer = |pick: &dyn Fn(&Head) -> Option<&(Linear, Tensor)>| -> Result<Option<(Tensor, Tensor)>> {
            if heads.iter().any(|h| pick(h).is_none()) {
                return Ok(None);
            }
            let q = stack(&|h| Ok(pick(h).expect("checked").0.weight().t()?))?;
            let gain = stack(&|h| Ok(pick(h).expect("checked").1.reshape((1, 1))?))?;
            Ok(Some((q, gain)))
        };
        Ok(Some(Self {
            a: stack(&|h| Ok(h.a.weight().t()?))?,
            b: stack(&|h| Ok(h.b.weight().t()?))?,
            scale_a: stack(&|h| Ok(h.scale_a.reshape((r, 1))?))?,
            scale_b: stack(&|h| Ok(h.scale_b.reshape((r, 1))?))?,
            point_a: pointer(&|h| h.point_a.as_ref())?,
            point_b: pointer(&|h| h.point_b.as_ref())?,
        }))
    }

    /// The factors of one chunk (`lat`: `1 x T*rank x width`, normalised latents).
    fn factors(
        &self,
        cfg: &HyperConfig,
        lat: &Tensor,
        reading: &Reading,
        point: &dyn Fn(&Tensor) -> Result<Tensor>,
        out_dirs: Option<&Tensor>,
        gate: Option<&Tensor>,
    ) -> Result<Generated> {
        let targets = cfg.targets();
        let (t, r, w) = (targets.len(), cfg.rank, cfg.width);
        let h = lat.reshape((1, t, r, w))?;
        // Scores of every target's pointer queries against the chunk's positions: `1 x T x rank x positions`.
        let scores = |q: &Tensor| -> Result<Tensor> {
            let s = point(&h.matmul(q)?.reshape((1, t * r, w))?)?;
            let k = s.dim(D::Minus1)?;
            Ok(s.reshape((1, t, r, k))?)
        };
        let mut a = h.matmul(&self.a)?;
        if let Some((q, gain)) = &self.point_a {
            let hidden = targets
                .iter()
                .map(|(layer, _)| reading.mlp_hidden.get(*layer).context("no MLP hidden activations captured"))
                .collect::<Result<Vec<_>>>()?;
            let hidden = Tensor::stack(&hidden, 1)?; // 1 x T x positions x in
            let hidden = hidden.broadcast_div(&(hidden.sqr()?.sum_keepdim(D::Minus1)?.sqrt()? + 1e-6)?)?;
            a = (a + scores(q)?.matmul(&hidden)?.broadcast_mul(gain)?)?;
        }
        let a = a.broadcast_mul(&self.scale_a)?;
        let mut bt = h.matmul(&self.b)?;
        if let (Some((q, gain)), Some(dirs)) = (&self.point_b, out_dirs) {
            let s = scores(q)?;
            let k = s.dim(D::Minus1)?;
            let picked = s.reshape((1, t * r, k))?.matmul(dirs)?;
            bt = (bt + picked.reshape((1, t, r, ()))?.broadcast_mul(gain)?)?;
        }
        let mut bt = bt.broadcast_mul(&self.scale_b)?;
        if let Some(g) = gate {
            bt = bt.broadcast_mul(&g.unsqueeze(0)?)?;
        }
        let mut factors = Vec::with_capacity(t);
        for (i, target) in targets.into_iter().enumerate() {
            factors.push((target, a.get_on_dim(1, i)?, bt.get_on_dim(1, i)?.transpose(1, 2)?));
        }
        Ok(Generated { factors })
    }
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

/// Loads a safetensors file into memory (no mmap: the crate forbids unsafe code).
fn load_weights(path: &Path, device: &Device) -> Result<VarBuilder<'static>> {
    let tensors =
        candle_core::safetensors::load(path, device).with_context(|| format!("reading {}", path.display()))?;
    Ok(VarBuilder::from_tensors(tensors, DType::F32, device))
}

/// Splits a document's tokens into chunks of at most `limit` tokens, each `<bos> <doc> sentences </doc>`. Cuts
/// fall after a sentence's `.`; a sentence longer than a chunk is cut where it must be. `<doc>`/`</doc>` already in
/// the text are dropped (every chunk gets its own).
pub fn chunk_document(ids: &[u32], limit: usize, special: &Specials) -> Vec<Vec<u32>> {
    let body: Vec<u32> =
        ids.iter().copied().filter(|&t| t != special.doc && t != special.end_doc && t != special.bos).collect();
    let room = limit.saturating_sub(3).max(1);
    let mut sentences: Vec<Vec<u32>> = Vec::new();
    let mut cur = Vec::new();
    for t in body {
        cur.push(t);
        if t == special.period {
            sentences.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        sentences.push(cur);
    }
    let mut chunks: Vec<Vec<u32>> = Vec::new();
    let mut body: Vec<u32> = Vec::new();
    let flush = |body: &mut Vec<u32>, chunks: &mut Vec<Vec<u32>>| {
        if !body.is_empty() {
            let mut c = vec![special.bos, special.doc];
            c.append(body);
            c.push(special.end_doc);
            chunks.push(c);
        }
    };
    for s in sentences {
        if body.len() + s.len() > room {
            flush(&mut body, &mut chunks);
        }
        for piece in s.chunks(room) {
            if body.len() + piece.len() > room {
                flush(&mut body, &mut chunks);
            }
            body.extend_from_slice(piece);
        }
    }
    flush(&mut body, &mut chunks);
    if chunks.is_empty() {
        chunks.push(vec![special.bos, special.doc, special.end_doc]);
    }
    chunks
}

/// Token ids the chunker needs.
#[derive(Debug, Clone, Copy)]
pub struct Specials {
    pub bos: u32,
    pub doc: u32,
    pub end_doc: u32,
    pub period: u32,
    pub pad: u32,
}

impl Specials {
    pub fn of(base: &BaseModel) -> Result<Self> {
        Ok(Self {
            bos: base.token_id("<bos>")?,
            doc: base.token_id("<doc>")?,
            end_doc: base.token_id("</doc>")?,
            period: base.token_id(".")?,
            pad: base.token_id("<pad>")?,
        })
    }
}

/// Right-pads chunks into `n x t` ids and a `n x t` mask (1 = token).
pub fn pad_batch(chunks: &[Vec<u32>], pad: u32, device: &Device) -> Result<(Tensor, Tensor)> {
    let t = chunks.iter().map(Vec::len).max().unwrap_or(1);
    let mut ids = Vec::with_capacity(chunks.len() * t);
    let mut mask = Vec::with_capacity(chunks.len() * t);
    for c in chunks {
        ids.extend(c.iter().copied().chain(std::iter::repeat(pad)).take(t));
        mask.extend((0..t).map(|i| if i < c.len() { 1f32 } else { 0.0 }));
    }
    Ok((Tensor::from_vec(ids, (chunks.len(), t), device)?, Tensor::from_vec(mask, (chunks.len(), t), device)?))
}

/// The base model reading a batch of chunks (inference kernels: no gradient flows into its activations).
pub fn capture(llama: &Llama, ids: &Tensor) -> Result<Reading> {
    let opts = ForwardOptions {
        capture_residuals: true,
        capture_mlp_hidden: true,
        kernels: Kernels::Fused,
        last_only: true,
        ..Default::default()
    };
    let out = llama.forward(ids, &Positions::From(0), &opts)?;
    Ok(Reading { residuals: out.residuals, mlp_hidden: out.mlp_hidden, ids: ids.clone() })
}

pub struct HyperInjector<'m> {
    model: &'m BaseModel,
    net: HyperNet,
    specials: Specials,
    /// One chunk's pass is a few hundred small ops; splitting each across threads costs more in wake-ups than it
    /// gains (hypernetwork 3.5 -> 2.9 ms per chunk on one thread, the frozen model's read unchanged), so an
    /// injection runs on a thread of its own and concurrent injections use the other cores.
    pool: std::sync::Arc<rayon::ThreadPool>,
}

fn injection_pool() -> Result<std::sync::Arc<rayon::ThreadPool>> {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).thread_name(|_| "engram-inject".into()).build()?;
    Ok(std::sync::Arc::new(pool))
}

impl<'m> HyperInjector<'m> {
    pub fn load(dir: &Path, model: &'m BaseModel) -> Result<Self> {
        let net = HyperNet::load(dir, model)?;
        Ok(Self { model, net, specials: Specials::of(model)?, pool: injection_pool()? })
    }

    pub fn from_net(net: HyperNet, model: &'m BaseModel) -> Result<Self> {
        Ok(Self { model, net, specials: Specials::of(model)?, pool: injection_pool()? })
    }

    pub fn config(&self) -> &HyperConfig {
        &self.net.cfg
    }

    /// The chunks a document is cut into.
    pub fn chunks(&self, document: &str) -> Result<Vec<Vec<u32>>> {
        let ids = self.model.encode(document)?;
        Ok(chunk_document(
            &ids,
            self.net.cfg.chunk_tokens.min(self.model.llama.config().max_position_embeddings),
            &self.specials,
        ))
    }
}

impl Injector for HyperInjector<'_> {
    fn name(&self) -> &'static str {
        "hypernet"
    }

    fn inject(&self, document: &str) -> Result<Injection> {
        Ok(self.inject_timed(document)?.0)
    }
}

/// Where one injection's time went, summed over its chunks, in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct InjectionTimes {
    /// The frozen model reading the chunks (every layer's input kept).
    pub capture_ms: f64,
    /// The hypernetwork turning the readings into factors.
    pub hypernet_ms: f64,
    /// Everything else: tokenising, chunking, summing chunk factors into the delta.
    pub other_ms: f64,
    pub chunks: usize,
}

impl HyperInjector<'_> {
    /// [`Injector::inject`] with the time split into its phases.
    pub fn inject_timed(&self, document: &str) -> Result<(Injection, InjectionTimes)> {
        self.pool.install(|| self.inject_here(document))
    }

    /// Runs `f` on the injection thread (what `inject` runs on), e.g. to time a prefill under the same threading.
    pub fn on_injection_thread<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    fn inject_here(&self, document: &str) -> Result<(Injection, InjectionTimes)> {
        let start = Instant::now();
        let dev = self.model.llama.device();
        let cfg = &self.net.cfg;
        let mut acc: Vec<Accumulator> = cfg
            .targets()
            .into_iter()
            .map(|(_, module)| {
                let (i, o) = module.dims(self.model.llama.config());
                Accumulator::new(i, o, cfg.rank)
            })
            .collect();
        let mut times = InjectionTimes::default();
        for chunk in self.chunks(document)? {
            let t0 = Instant::now();
            let ids = Tensor::new(chunk.as_slice(), dev)?.unsqueeze(0)?;
            let reading = capture(&self.model.llama, &ids)?;
            let t1 = Instant::now();
            let mask = Tensor::ones((1, chunk.len()), DType::F32, dev)?;
            let g = self.net.forward(&reading, &mask)?;
            times.capture_ms += (t1 - t0).as_secs_f64() * 1e3;
            times.hypernet_ms += t1.elapsed().as_secs_f64() * 1e3;
            for ((_, a, b), acc) in g.factors.iter().zip(acc.iter_mut()) {
                acc.append(&a.squeeze(0)?, &b.squeeze(0)?)?;
            }
            times.chunks += 1;
        }
        let mut adapters = std::collections::BTreeMap::new();
        for ((layer, module), acc) in cfg.targets().into_iter().zip(acc) {
            adapters.insert((layer, module.path().to_string()), acc.into_factors()?);
        }
        let rank = adapters.values().map(|f| f.rank).max().unwrap_or(0);
        let meta = Meta {
            base_model: self.model.hash.clone(),
            scale: cfg.scale as f32,
            injector: self.name().into(),
            injector_version: format!("1 rank={rank} chunks={} width={}", times.chunks, cfg.width),
        };
        let seconds = start.elapsed().as_secs_f64();
        times.other_ms = seconds * 1e3 - times.capture_ms - times.hypernet_ms;
        Ok((Injection { delta: Delta { meta, adapters, memory: None }, steps: 0, seconds }, times))
    }
}

/// One target's delta, summed over a document's chunks in bounded memory: chunk factors are appended along the
/// rank (A rows, B columns stored as B^T rows) until the rank would exceed `min(in, out)` plus a slack, then folded
/// exactly into the dense change (`B A` as A with B the identity, or the other way round), which never needs more
/// rank than `min(in, out)`. Buffers are sized once, so a document of any length injects in the same memory.
struct Accumulator {
    in_dim: usize,
    out_dim: usize,
    rank: usize,
    /// `rank x in`, row-major.
    a: Vec<f32>,
    /// `rank x out`, row-major (B transposed).
    bt: Vec<f32>,
    /// Fold when appending would pass this rank.
    limit: usize,
}

/// Chunks appended between folds past the exact rank; a fold costs one `out x rank x in` product.
const FOLD_SLACK_CHUNKS: usize = 8;

impl Accumulator {
    fn new(in_dim: usize, out_dim: usize, chunk_rank: usize) -> Self {
        let limit = in_dim.min(out_dim) + FOLD_SLACK_CHUNKS * chunk_rank;
        Self {
            in_dim,
            out_dim,
            rank: 0,
            a: Vec::with_capacity(limit * in_dim),
            bt: Vec::with_capacity(limit * out_dim),
            limit,
        }
    }

    /// Appends one chunk's A (`r x in`) and B (`out x r`).
    fn append(&mut self, a: &Tensor, b: &Tensor) -> Result<()> {
        let r = a.dim(0)?;
        if self.rank + r > self.limit {
            self.fold()?;
        }
        self.a.extend(a.flatten_all()?.to_vec1::<f32>()?);
        self.bt.extend(b.t()?.flatten_all()?.to_vec1::<f32>()?);
        self.rank += r;
        Ok(())
    }

    /// Replaces the factors by the exact dense change at rank `min(in, out)`.
    fn fold(&mut self) -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::from_slice(&self.a, (self.rank, self.in_dim), &dev)?;
        let bt = Tensor::from_slice(&self.bt, (self.rank, self.out_dim), &dev)?;
        let dense = bt.t()?.matmul(&a)?; // out x in
        let exact = Factors::exact(self.in_dim, self.out_dim, dense.flatten_all()?.to_vec1::<f32>()?)?;
        self.a.clear();
        self.bt.clear();
        self.a.extend_from_slice(&exact.a);
        // B (out x rank) to B^T rows.
        for r in 0..exact.rank {
            self.bt.extend((0..self.out_dim).map(|o| exact.b[o * exact.rank + r]));
        }
        self.rank = exact.rank;
        Ok(())
    }

    /// The summed delta; never above rank `min(in, out)`, which is what a delta may carry.
    fn into_factors(mut self) -> Result<Factors> {
        if self.rank > self.in_dim.min(self.out_dim) {
            self.fold()?;
        }
        let (o, rank) = (self.out_dim, self.rank);
        // B is `out x rank`: transpose the accumulated B^T rows.
        let mut b = vec![0f32; o * rank];
        for (r, row) in self.bt.chunks(o).enumerate() {
            for (j, &x) in row.iter().enumerate() {
                b[j * rank + r] = x;
            }
        }
        Ok(Factors::new(rank, self.in_dim, o, self.a, b)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dense(f: &Factors) -> Vec<f32> {
        let mut d = vec![0f32; f.out_dim * f.in_dim];
        for o in 0..f.out_dim {
            for r in 0..f.rank {
                let b = f.b[o * f.rank + r];
                for i in 0..f.in_dim {
                    d[o * f.in_dim + i] += b * f.a[r * f.in_dim + i];
                }
            }
        }
        d
    }

    /// Folding keeps the sum exact and the rank (and buffers) bounded, for wide and tall weights.
    #[test]
    fn accumulated_chunks_fold_exactly_into_bounded_rank() -> Result<()> {
        for (in_dim, out_dim) in [(12usize, 5usize), (5, 12)] {
            let (r, chunks) = (2, 40);
            let mut acc = Accumulator::new(in_dim, out_dim, r);
            let capacity = (acc.a.capacity(), acc.bt.capacity());
            let mut want = vec![0f32; out_dim * in_dim];
            let mut max_rank = 0;
            for c in 0..chunks {
                let a = Tensor::randn(0f32, 1.0, (r, in_dim), &Device::Cpu)?;
                let b = Tensor::randn(0f32, 1.0, (out_dim, r), &Device::Cpu)?;
                let d = b.matmul(&a)?.flatten_all()?.to_vec1::<f32>()?;
                want.iter_mut().zip(d).for_each(|(w, x)| *w += x);
                acc.append(&a, &b)?;
                max_rank = max_rank.max(acc.rank);
                assert!(acc.rank <= acc.limit, "chunk {c}: rank {} past {}", acc.rank, acc.limit);
            }
            assert_eq!((acc.a.capacity(), acc.bt.capacity()), capacity, "buffers grew");
            assert!(max_rank > in_dim.min(out_dim), "the test never folded");
            let f = acc.into_factors()?;
            assert_eq!(f.rank, in_dim.min(out_dim));
            let got = dense(&f);
            let err = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
            assert!(err < 1e-4, "{in_dim}x{out_dim}: folded sum differs by {err}");
        }
        Ok(())
    }
}
