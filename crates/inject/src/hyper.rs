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
        Ok(Self { cfg: cfg.clone(), in_proj, latents, blocks, heads, token_dirs })
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
        Self::new(&cfg, &base.llama, vb).with_context(|| format!("loading {}", weights.display()))
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
        let r = self.cfg.rank;
        // Pointers score positions against the (normalised) keys; padding is never pointed at.
        let point_keys = rms_plain(&keys)?.t()?.contiguous()?;
        let point_bias = bias.reshape((n, 1, k))?;
        let point = |q: &Linear, h: &Tensor| -> Result<Tensor> {
            let s = (q.forward(h)?.matmul(&point_keys)? * (1.0 / (w as f64).sqrt()))?.broadcast_add(&point_bias)?;
            Ok(engram_model::softmax_last_dim(&s)?)
        };
        let out_dirs = if self.heads.iter().any(|h| h.point_b.is_some()) {
            let v = self.token_dirs.index_select(&reading.ids.flatten_all()?, 0)?;
            Some(v.reshape((n, k, ()))?)
        } else {
            None
        };
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
            let bt = bt.broadcast_mul(&head.scale_b.reshape((1, r, 1))?)?;
            factors.push(((layer, module), a, bt.transpose(1, 2)?.contiguous()?));
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
}

impl<'m> HyperInjector<'m> {
    pub fn load(dir: &Path, model: &'m BaseModel) -> Result<Self> {
        let net = HyperNet::load(dir, model)?;
        Ok(Self { model, net, specials: Specials::of(model)? })
    }

    pub fn from_net(net: HyperNet, model: &'m BaseModel) -> Result<Self> {
        Ok(Self { model, net, specials: Specials::of(model)? })
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
        let start = Instant::now();
        let dev = self.model.llama.device();
        let cfg = &self.net.cfg;
        // Per target: A rows and B columns (stored as B^T rows), appended chunk by chunk.
        let mut acc: Vec<(Vec<f32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); cfg.targets().len()];
        let mut rank = 0;
        let profile = std::env::var_os("ENGRAM_PROFILE").is_some();
        for chunk in self.chunks(document)? {
            let t0 = Instant::now();
            let ids = Tensor::new(chunk.as_slice(), dev)?.unsqueeze(0)?;
            let reading = capture(&self.model.llama, &ids)?;
            let t1 = Instant::now();
            let mask = Tensor::ones((1, chunk.len()), DType::F32, dev)?;
            let g = self.net.forward(&reading, &mask)?;
            if profile {
                eprintln!("chunk of {} tokens: capture {:?} hypernet {:?}", chunk.len(), t1 - t0, t1.elapsed());
            }
            for ((_, a, b), (acc_a, acc_bt)) in g.factors.iter().zip(acc.iter_mut()) {
                acc_a.extend(a.squeeze(0)?.flatten_all()?.to_vec1::<f32>()?);
                acc_bt.extend(b.squeeze(0)?.t()?.flatten_all()?.to_vec1::<f32>()?);
            }
            rank += cfg.rank;
        }
        let mut adapters = std::collections::BTreeMap::new();
        for ((layer, module), (a, bt)) in cfg.targets().into_iter().zip(acc) {
            let (i, o) = module.dims(self.model.llama.config());
            // B is `out x rank`: transpose the accumulated B^T rows.
            let mut b = vec![0f32; o * rank];
            for (r, row) in bt.chunks(o).enumerate() {
                for (j, &x) in row.iter().enumerate() {
                    b[j * rank + r] = x;
                }
            }
            adapters.insert((layer, module.path().to_string()), Factors::new(rank, i, o, a, b)?);
        }
        let meta = Meta {
            base_model: self.model.hash.clone(),
            scale: cfg.scale as f32,
            injector: self.name().into(),
            injector_version: format!("1 rank={} chunks={} width={}", cfg.rank, rank / cfg.rank, cfg.width),
        };
        Ok(Injection { delta: Delta { meta, adapters }, steps: 0, seconds: start.elapsed().as_secs_f64() })
    }
}
