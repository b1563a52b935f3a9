//! The decoder: one forward implementation for training, evaluation, injection and serving.
//!
//! Two kernel sets. `Kernels::Differentiable` uses only ops that record a backward pass (`ops::softmax`, a
//! hand-written RMSNorm and rope): every trained path, including gradients into LoRA factors through a frozen model,
//! must use it (candle issue 2168: the fused kernels silently drop gradients). `Kernels::Fused` uses candle's fused
//! softmax, RMSNorm and rope for inference only; a test keeps the two within float tolerance.

use candle_core::{DType, Device, IndexOp, Module as _, Tensor, D};
use candle_nn::{Init, Linear, VarBuilder};

use crate::lora::{LoraSet, Module};
use crate::{LlamaConfig, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    #[default]
    Differentiable,
    Fused,
}

/// Positions of a batch. `Packed` rows hold several samples: each token has its own position (restarting at every
/// sample) and an additive block-diagonal causal mask keeps samples apart.
#[derive(Debug, Clone)]
pub enum Positions {
    /// Consecutive positions starting here (0 for a fresh sequence, the cache length when decoding).
    From(usize),
    /// `positions`: `batch x seq` u32; `mask`: `batch x 1 x seq x seq` f32 with 0 or -inf.
    Packed { positions: Tensor, mask: Tensor },
}

/// What a forward pass should do beyond computing logits.
#[derive(Debug, Clone, Default)]
pub struct ForwardOptions<'a> {
    pub lora: Option<&'a LoraSet>,
    pub kernels: Kernels,
    /// Return the residual stream entering every layer, plus the final residual (before the last norm).
    pub capture_residuals: bool,
    /// Return the input of every layer's `down_proj` (the MLP's hidden activation, the "keys" of the MLP seen as
    /// a key-value memory).
    pub capture_mlp_hidden: bool,
    /// Logits for the last position only (prefill and decoding) instead of every position.
    pub last_only: bool,
    /// Adds this tensor (`batch x seq x hidden`) to the residual stream leaving layer `.0`: the handle by which a
    /// locate-and-edit method (MEMIT) searches for the residual change that makes a fact come out.
    pub residual_add: Option<(usize, &'a Tensor)>,
}

impl<'a> ForwardOptions<'a> {
    pub fn inference() -> Self {
        Self { kernels: Kernels::Fused, last_only: true, ..Self::default() }
    }
}

#[derive(Debug)]
pub struct ForwardOutput {
    /// `batch x seq x vocab`, or `batch x vocab` with `last_only`.
    pub logits: Tensor,
    /// `num_hidden_layers + 1` tensors of `batch x seq x hidden` when captured: the input of each layer, then the
    /// final residual.
    pub residuals: Vec<Tensor>,
    /// `num_hidden_layers` tensors of `batch x seq x intermediate` when captured.
    pub mlp_hidden: Vec<Tensor>,
}

/// Keys and values of every layer for incremental decoding.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(cfg: &LlamaConfig) -> Self {
        Self { layers: vec![None; cfg.num_hidden_layers] }
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map_or(0, |(k, _)| k.dims()[2])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone)]
struct Layer {
    attn_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    mlp_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

#[derive(Debug, Clone)]
pub struct Llama {
    cfg: LlamaConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    /// `max_position x head_dim/2`.
    cos: Tensor,
    sin: Tensor,
    /// Entries of `memory`-strategy deltas merged into this state (none for a plain model).
    memory: Option<crate::SideMemory>,
}

impl Llama {
    /// Builds the model from a `VarBuilder` with Hugging Face tensor names. With a `VarMap`-backed builder the
    /// tensors are created as trainable variables with the initialisation hinted here; with a loading builder the
    /// hints are ignored.
    pub fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.hidden_size;
        let std = 0.02;
        // Residual-branch outputs start smaller so the stream's variance does not grow with depth (GPT-2 style).
        let out_std = std / (2.0 * cfg.num_hidden_layers as f64).sqrt();
        let randn = |s: f64| Init::Randn { mean: 0.0, stdev: s };
        let linear = |vb: &VarBuilder, m: Module, s: f64| -> Result<Linear> {
            let (i, o) = m.dims(cfg);
            Ok(Linear::new(vb.get_with_hints((o, i), &format!("{}.weight", m.path()), randn(s))?, None))
        };
        let embed = vb.get_with_hints((cfg.vocab_size, d), "model.embed_tokens.weight", randn(std))?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let vb = vb.pp(format!("model.layers.{i}"));
            layers.push(Layer {
                attn_norm: vb.get_with_hints(d, "input_layernorm.weight", Init::Const(1.0))?,
                q: linear(&vb, Module::Q, std)?,
                k: linear(&vb, Module::K, std)?,
                v: linear(&vb, Module::V, std)?,
                o: linear(&vb, Module::O, out_std)?,
                mlp_norm: vb.get_with_hints(d, "post_attention_layernorm.weight", Init::Const(1.0))?,
                gate: linear(&vb, Module::Gate, std)?,
                up: linear(&vb, Module::Up, std)?,
                down: linear(&vb, Module::Down, out_std)?,
            });
        }
        let norm = vb.get_with_hints(d, "model.norm.weight", Init::Const(1.0))?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new(embed.clone(), None)
        } else {
            Linear::new(vb.get_with_hints((cfg.vocab_size, d), "lm_head.weight", randn(std))?, None)
        };
        let (cos, sin) = rope_tables(cfg, vb.device(), vb.dtype())?;
        Ok(Self { cfg: cfg.clone(), embed, layers, norm, lm_head, cos, sin, memory: None })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    pub fn dtype(&self) -> DType {
        self.embed.dtype()
    }

    /// Every weight under its Hugging Face name (the tied head is not repeated).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed.clone())];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), l.attn_norm.clone()));
            out.push((format!("{p}.post_attention_layernorm.weight"), l.mlp_norm.clone()));
            for (m, lin) in [
                (Module::Q, &l.q),
                (Module::K, &l.k),
                (Module::V, &l.v),
                (Module::O, &l.o),
                (Module::Gate, &l.gate),
                (Module::Up, &l.up),
                (Module::Down, &l.down),
            ] {
                out.push((format!("{p}.{}.weight", m.path()), lin.weight().clone()));
            }
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        if !self.cfg.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), self.lm_head.weight().clone()));
        }
        out
    }

    /// A copy of this model with `deltas` merged into its weights, `W = W0 + sum scale * B @ A`, added in the
    /// given order, and their side-memory entries appended after this model's. `self` (W0) is untouched, and the
    /// same deltas in the same order give bit-identical weights, so a merged state is always rebuilt from W0,
    /// never patched.
    pub fn merged(&self, deltas: &[&engram_lora::Delta]) -> Result<Llama> {
        let mut tensors: std::collections::HashMap<String, Tensor> = self.named_tensors().into_iter().collect();
        for delta in deltas {
            let set = crate::LoraSet::from_adapters(delta, self.device())?;
            set.validate(&self.cfg, None)?;
            for (&(layer, module), ad) in set.iter() {
                let name = format!("model.layers.{layer}.{}.weight", module.path());
                let w = &tensors[&name];
                let dw = (ad.b.matmul(&ad.a)? * ad.scale)?.to_dtype(w.dtype())?;
                let sum = (w + dw)?;
                tensors.insert(name, sum);
            }
        }
        let mut merged = Llama::new(&self.cfg, VarBuilder::from_tensors(tensors, self.dtype(), self.device()))?;
        let added = engram_lora::Memory::joined(deltas.iter().copied())
            .map_err(|e| crate::ModelError::Lora(e.to_string()))?
            .map(|m| crate::SideMemory::new(&m, self.cfg.hidden_size, self.device()))
            .transpose()?;
        merged.memory = match (&self.memory, added) {
            (None, added) => added,
            (Some(old), None) => Some(old.clone()),
            (Some(old), Some(added)) => Some(old.joined(&added)?),
        };
        Ok(merged)
    }

    /// This state without its side memory (the weights are shared, not copied): residuals are the same, and a
    /// forward pass no longer pays for matching every entry.
    pub fn without_memory(&self) -> Llama {
        Llama { memory: None, ..self.clone() }
    }

    /// The side memory merged into this state, if any.
    pub fn memory(&self) -> Option<&crate::SideMemory> {
        self.memory.as_ref()
    }

    /// The frozen weight of one linear module (`out x in`), e.g. for null-space projections.
    pub fn weight(&self, layer: usize, module: Module) -> &Tensor {
        let l = &self.layers[layer];
        match module {
            Module::Q => l.q.weight(),
            Module::K => l.k.weight(),
            Module::V => l.v.weight(),
            Module::O => l.o.weight(),
            Module::Gate => l.gate.weight(),
            Module::Up => l.up.weight(),
            Module::Down => l.down.weight(),
        }
    }

    /// Logits from a final residual (`... x hidden`, the last entry of `ForwardOutput::residuals`): the final norm
    /// and the head, differentiable. A search for a change of the last residual needs nothing else.
    pub fn head_logits(&self, residual: &Tensor) -> Result<Tensor> {
        self.normed_logits(&self.final_norm(residual)?)
    }

    /// The final norm of a final residual, differentiable.
    pub fn final_norm(&self, residual: &Tensor) -> Result<Tensor> {
        self.rms_norm(residual, &self.norm, Kernels::Differentiable)
    }

    /// Logits from a normed final residual: the head alone (linear), where side-memory values are added.
    pub fn normed_logits(&self, normed: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(normed)?)
    }

    /// A full forward pass over `ids` (`batch x seq`, u32) with no cache.
    pub fn forward(&self, ids: &Tensor, positions: &Positions, opts: &ForwardOptions) -> Result<ForwardOutput> {
        self.run(ids, positions, None, opts)
    }

    /// Appends `ids` to `cache` and returns logits for the new positions.
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache, opts: &ForwardOptions) -> Result<ForwardOutput> {
        let from = cache.len();
        self.run(ids, &Positions::From(from), Some(cache), opts)
    }

    fn run(
        &self,
        ids: &Tensor,
        positions: &Positions,
        mut cache: Option<&mut KvCache>,
        opts: &ForwardOptions,
    ) -> Result<ForwardOutput> {
        let (b, t) = ids.dims2()?;
        if let Some(lora) = opts.lora {
            lora.validate(&self.cfg, Some(b))?;
        }
        let past = cache.as_ref().map_or(0, |c| c.len());
        let total = match positions {
            Positions::From(p) => p + t,
            Positions::Packed { .. } => t,
        };
        if total > self.cfg.max_position_embeddings {
            return Err(crate::ModelError::Input(format!(
                "sequence of {total} positions exceeds max_position_embeddings {}",
                self.cfg.max_position_embeddings
            )));
        }
        let rope = self.rope_for(positions, b, t, opts.kernels)?;
        let mask = match positions {
            Positions::Packed { mask, .. } => Some(mask.clone()),
            Positions::From(_) if t > 1 => Some(causal_mask(t, past, self.device())?),
            Positions::From(_) => None,
        };
        let mut x = self.embed.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, ()))?;
        let mut residuals = Vec::new();
        let mut mlp_hidden = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            if opts.capture_residuals {
                residuals.push(x.clone());
            }
            let kv = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let hidden = opts.capture_mlp_hidden.then_some(&mut mlp_hidden);
            x = self.layer(i, layer, &x, &rope, mask.as_ref(), kv, opts, hidden)?;
            if let Some((_, add)) = opts.residual_add.filter(|(l, _)| *l == i) {
                x = (x + add)?;
            }
        }
        if opts.capture_residuals {
            residuals.push(x.clone());
        }
        let x = if opts.last_only { x.i((.., t - 1..t, ..))?.contiguous()? } else { x };
        // The side memory matches the residual before the final norm and adds after it, where a value is a fixed
        // change of the logits (`lm_head @ value`) whatever the residual's scale.
        // A gated entry also reads how sure the model is without the memory (its top next-token probability).
        let normed = self.rms_norm(&x, &self.norm, opts.kernels)?;
        let logits = match &self.memory {
            None => self.lm_head.forward(&normed)?,
            Some(m) if !m.gated() => self.lm_head.forward(&(normed + m.added(&x, None)?)?)?,
            Some(m) => {
                let logits = self.lm_head.forward(&normed)?;
                let confidence = candle_nn::ops::softmax_last_dim(&logits.to_dtype(DType::F32)?)?.max(D::Minus1)?;
                (&logits + self.lm_head.forward(&m.added(&x, Some(&confidence))?)?)?
            }
        };
        let logits = if opts.last_only { logits.squeeze(1)? } else { logits };
        Ok(ForwardOutput { logits: logits.to_dtype(DType::F32)?, residuals, mlp_hidden })
    }

    #[allow(clippy::too_many_arguments)]
    fn layer(
        &self,
        index: usize,
        l: &Layer,
        x: &Tensor,
        rope: &Rope,
        mask: Option<&Tensor>,
        kv: Option<&mut Option<(Tensor, Tensor)>>,
        opts: &ForwardOptions,
        capture_hidden: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, kvh, hd) = (self.cfg.num_attention_heads, self.cfg.kv_heads(), self.cfg.head_dim());
        let lin = |m: Module, w: &Linear, x: &Tensor| -> Result<Tensor> {
            let y = w.forward(x)?;
            match opts.lora.and_then(|s| s.get(index, m)) {
                Some(a) => Ok((y + a.apply(x)?)?),
                None => Ok(y),
            }
        };

        let hx = self.rms_norm(x, &l.attn_norm, opts.kernels)?;
        let q = lin(Module::Q, &l.q, &hx)?.reshape((b, t, h, hd))?.transpose(1, 2)?.contiguous()?;
        let k = lin(Module::K, &l.k, &hx)?.reshape((b, t, kvh, hd))?.transpose(1, 2)?.contiguous()?;
        let v = lin(Module::V, &l.v, &hx)?.reshape((b, t, kvh, hd))?.transpose(1, 2)?.contiguous()?;
        let q = rope.apply(&q)?;
        let mut k = rope.apply(&k)?;
        let mut v = v;
        if let Some(slot) = kv {
            if let Some((pk, pv)) = slot.as_ref() {
                k = Tensor::cat(&[pk, &k], 2)?.contiguous()?;
                v = Tensor::cat(&[pv, &v], 2)?.contiguous()?;
            }
            *slot = Some((k.clone(), v.clone()));
        }
        let k = repeat_kv(k, h / kvh)?;
        let v = repeat_kv(v, h / kvh)?;
        // Scaling q (t x hd) is cheaper than scaling the scores (t x t).
        let q = (q * (1.0 / (hd as f64).sqrt()))?;
        let mut att = q.matmul(&k.t()?)?;
        if let Some(m) = mask {
            att = att.broadcast_add(m)?;
        }
        let att = match opts.kernels {
            Kernels::Differentiable => crate::softmax::softmax_last_dim(&att)?,
            Kernels::Fused => candle_nn::ops::softmax_last_dim(&att)?,
        };
        let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h * hd))?;
        let x = (x + lin(Module::O, &l.o, &y)?)?;

        let hx = self.rms_norm(&x, &l.mlp_norm, opts.kernels)?;
        let g = candle_nn::ops::silu(&lin(Module::Gate, &l.gate, &hx)?)?;
        let u = lin(Module::Up, &l.up, &hx)?;
        let hidden = (g * u)?;
        if let Some(c) = capture_hidden {
            c.push(hidden.clone());
        }
        let y = lin(Module::Down, &l.down, &hidden)?;
        Ok((x + y)?)
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor, kernels: Kernels) -> Result<Tensor> {
        let eps = self.cfg.rms_norm_eps;
        Ok(match kernels {
            Kernels::Fused => candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)?,
            Kernels::Differentiable => {
                let dtype = x.dtype();
                let x = x.to_dtype(DType::F32)?;
                let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
                x.broadcast_div(&(ms + eps)?.sqrt()?)?.to_dtype(dtype)?.broadcast_mul(w)?
            }
        })
    }

    fn rope_for(&self, positions: &Positions, b: usize, t: usize, kernels: Kernels) -> Result<Rope> {
        Ok(match (positions, kernels) {
            (Positions::From(p), Kernels::Fused) => {
                Rope::Fused { cos: self.cos.narrow(0, *p, t)?, sin: self.sin.narrow(0, *p, t)? }
            }
            (Positions::From(p), Kernels::Differentiable) => {
                let full = |x: &Tensor| -> Result<Tensor> {
                    let x = x.narrow(0, *p, t)?;
                    Ok(Tensor::cat(&[&x, &x], D::Minus1)?.reshape((1, 1, t, ()))?)
                };
                Rope::Broadcast { cos: full(&self.cos)?, sin: full(&self.sin)? }
            }
            (Positions::Packed { positions, .. }, _) => {
                let idx = positions.flatten_all()?;
                let full = |x: &Tensor| -> Result<Tensor> {
                    let x = x.index_select(&idx, 0)?;
                    Ok(Tensor::cat(&[&x, &x], D::Minus1)?.reshape((b, 1, t, ()))?)
                };
                Rope::Broadcast { cos: full(&self.cos)?, sin: full(&self.sin)? }
            }
        })
    }
}

enum Rope {
    /// `seq x head_dim/2` tables for candle's fused (non-differentiable) kernel.
    Fused { cos: Tensor, sin: Tensor },
    /// Full-width tables broadcastable to `batch x heads x seq x head_dim`.
    Broadcast { cos: Tensor, sin: Tensor },
}

impl Rope {
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Rope::Fused { cos, sin } => candle_nn::rotary_emb::rope(x, cos, sin)?,
            Rope::Broadcast { cos, sin } => {
                let hd = x.dim(D::Minus1)?;
                let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
                let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
                let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
                (x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?
            }
        })
    }
}

fn rope_tables(cfg: &LlamaConfig, device: &Device, dtype: DType) -> Result<(Tensor, Tensor)> {
    let inv = cfg.inv_freq();
    let n = cfg.max_position_embeddings;
    let inv = Tensor::from_vec(inv.clone(), (1, inv.len()), device)?;
    let pos = Tensor::arange(0u32, n as u32, device)?.to_dtype(DType::F32)?.reshape((n, 1))?;
    let angles = pos.matmul(&inv)?;
    Ok((angles.cos()?.to_dtype(dtype)?, angles.sin()?.to_dtype(dtype)?))
}

/// Additive causal mask for `t` new positions after `past` cached ones: `t x (past + t)`.
fn causal_mask(t: usize, past: usize, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> =
        (0..t).flat_map(|i| (0..past + t).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Ok(Tensor::from_vec(data, (t, past + t), device)?)
}

fn repeat_kv(x: Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x);
    }
    let (b, kvh, t, hd) = x.dims4()?;
    Ok(x.unsqueeze(2)?.broadcast_as((b, kvh, n, t, hd))?.reshape((b, kvh * n, t, hd))?)
}
