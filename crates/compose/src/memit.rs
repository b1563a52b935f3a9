//! Least-squares composition (MEMIT's batch edit, solved again after every injection).
//!
//! A candidate delta is not added; it is read as requirements on one weight, key -> wanted output change:
//! - `locate` (default): the candidate answers every trained question about each person the document names; a
//!   search finds, per question, the change of the residual leaving the edited layer at the question's last token
//!   that makes the *current head* give that answer (MEMIT's `v*`; for the last layer only the final norm and the
//!   head sit in between, so the search runs on captured residuals in tens of milliseconds). The requirement is that
//!   change at the question's key in that layer.
//! - `reproduce`: the candidate's own output change at the name tokens and last token of each question.
//!
//! The served weight change is the one matrix meeting every accepted document's requirements at once while changing
//! nothing on the protected keys (known facts, reading, skills: `C0`, weighted `lambda`), and small:
//!
//! `dW = (sum_i R_i K_i^T) (sum_i K_i K_i^T + lambda C0 / |C0| + mu I)^-1`
//!
//! The two sums are fixed-size (`out x in`, `in x in`), so an injection costs the same at N=1000 as at N=1. The
//! version appended is the difference between the new and the previous solution, in exact factors. This removes
//! the failure of naive accumulation on hypernetwork deltas (their large person-independent part is never added);
//! what it cannot remove is the ceiling of one layer's key space (ARCHITECTURE.md, "Composition, measured").

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use candle_nn::Optimizer;
use engram_lora::{Delta, Factors};
use engram_model::{ForwardOptions, Kernels, Llama, LoraSet, Module, Positions, Tokenizer};
use engram_world::World;
use nalgebra::DMatrix;
use serde::{Deserialize, Serialize};

use crate::keys::{padded, second_moment};
use crate::nullspace::protected_texts;
use crate::Strategy;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemitConfig {
    /// Weight of the protected keys' mean second moment.
    pub lambda: f64,
    /// Ridge on the weight change.
    pub mu: f64,
    /// Requirements are the candidate's outputs times this: injectors overshoot (a margin one delta can afford
    /// and a thousand cannot).
    pub target_scale: f64,
    /// Where requirements come from: `reproduce` the candidate's outputs on its questions' keys, or `locate` (MEMIT):
    /// search the residual change at the person's name that makes the candidate's answers come out of the current
    /// head, and require it of the edited layers at the name's keys.
    pub mode: Mode,
    /// Layers whose down_proj is edited (locate mode; reproduce mode edits what the candidate adapts).
    pub layers: Vec<usize>,
    /// Locate mode: Adam steps and learning rate of the residual search, and the probability every answer token
    /// must reach to stop early.
    /// Locate mode: where the fact is written. `subject`: one change at the person's last name token shared by
    /// all their questions; `last`: one change per question at its last prompt token (where the answer is read).
    pub site: Site,
    pub search_steps: usize,
    pub search_lr: f64,
    pub search_stop_p: f64,
    pub protected_samples: usize,
    pub seed: u64,
}

impl Default for MemitConfig {
    fn default() -> Self {
        Self {
            lambda: 1000.0,
            mu: 1e-3,
            target_scale: 1.0,
            mode: Mode::Locate,
            layers: vec![3],
            site: Site::Last,
            search_steps: 200,
            search_lr: 0.5,
            search_stop_p: 0.9,
            protected_samples: 400,
            seed: 0x5AFE,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Reproduce,
    Locate,
}

impl std::str::FromStr for Mode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "reproduce" => Ok(Self::Reproduce),
            "locate" => Ok(Self::Locate),
            other => bail!("unknown memit mode {other:?}; expected reproduce or locate"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Site {
    Subject,
    Last,
}

impl std::str::FromStr for Site {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "subject" => Ok(Self::Subject),
            "last" => Ok(Self::Last),
            other => bail!("unknown memit site {other:?}; expected subject or last"),
        }
    }
}

/// One layer's requirements from one document: `(K K^T, R K^T)`.
type Requirement = (DMatrix<f64>, DMatrix<f64>);

struct LayerState {
    /// `sum R_i K_i^T`, `out x in`.
    s: DMatrix<f64>,
    /// `sum K_i K_i^T + lambda C0n + mu I`, `in x in`.
    c: DMatrix<f64>,
    /// The current solution `out x in`.
    dw: DMatrix<f64>,
}

pub struct Memit {
    cfg: MemitConfig,
    world: World,
    tokenizer: Tokenizer,
    base: Llama,
    layers: Vec<LayerState>,
    /// Per layer, the requirements of the candidate being composed (`K K^T`, `R K^T`) and the solution including
    /// them; committed by `accepted`, dropped when the next candidate is composed (a rejected one).
    pending: Option<Vec<(Requirement, DMatrix<f64>)>>,
    profile: bool,
}

fn dmatrix(t: &Tensor) -> Result<DMatrix<f64>> {
    let (r, c) = t.dims2()?;
    let v = t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(DMatrix::from_row_iterator(r, c, v.into_iter().map(f64::from)))
}

impl Memit {
    pub fn new(base: &Llama, tokenizer: &Tokenizer, cfg: MemitConfig) -> Result<Self> {
        let world = World::new();
        let texts = protected_texts(&world, cfg.protected_samples, cfg.seed);
        let n = base.config().num_hidden_layers;
        if let Some(l) = cfg.layers.iter().find(|&&l| l >= n) {
            bail!("memit: layer {l} asked for; the model has {n} layers");
        }
        if cfg.layers.is_empty() {
            bail!("memit: no layers to edit");
        }
        // Reproduce mode requires what the candidate does wherever it acts: every layer is protected.
        let only = (cfg.mode == Mode::Locate).then_some(cfg.layers.as_slice());
        let (moments, tokens) = second_moment(base, tokenizer, &texts, only)?;
        let (inp, out) = Module::Down.dims(base.config());
        let layers = moments
            .into_iter()
            .map(|c0| {
                if c0.nrows() == 0 {
                    // Not edited: no protected moment needed, and its solution stays zero.
                    return LayerState {
                        s: DMatrix::zeros(out, inp),
                        c: DMatrix::identity(inp, inp),
                        dw: DMatrix::zeros(out, inp),
                    };
                }
                let c0 = c0 / tokens as f64;
                // mu is relative to the mean key energy per dimension, so it means the same on any model.
                let unit = c0.trace() / inp as f64;
                if std::env::var_os("ENGRAM_PROFILE").is_some() {
                    eprintln!("memit: mean key energy per dimension {unit:.3e}");
                }
                let c = c0 * cfg.lambda + DMatrix::identity(inp, inp) * (cfg.mu * unit);
                LayerState { s: DMatrix::zeros(out, inp), c, dw: DMatrix::zeros(out, inp) }
            })
            .collect();
        Ok(Self {
            cfg,
            world,
            tokenizer: tokenizer.clone(),
            base: base.clone(),
            layers,
            pending: None,
            profile: std::env::var_os("ENGRAM_PROFILE").is_some(),
        })
    }

    /// A strategy whose state comes from `state` (a `save` of a strategy with the same configuration and base
    /// model) instead of measuring the protected keys again: what a restarting worker does with a cached initial
    /// state.
    pub fn restored(base: &Llama, tokenizer: &Tokenizer, cfg: MemitConfig, state: &[u8]) -> Result<Self> {
        if cfg.mode != Mode::Locate {
            bail!("memit: only locate mode restores without measuring keys");
        }
        let (inp, out) = Module::Down.dims(base.config());
        let n = base.config().num_hidden_layers;
        if let Some(l) = cfg.layers.iter().find(|&&l| l >= n) {
            bail!("memit: layer {l} asked for; the model has {n} layers");
        }
        let layers = (0..n)
            .map(|_| LayerState {
                s: DMatrix::zeros(out, inp),
                c: DMatrix::identity(inp, inp),
                dw: DMatrix::zeros(out, inp),
            })
            .collect();
        let mut m = Self {
            cfg,
            world: World::new(),
            tokenizer: tokenizer.clone(),
            base: base.clone(),
            layers,
            pending: None,
            profile: std::env::var_os("ENGRAM_PROFILE").is_some(),
        };
        m.restore(state)?;
        Ok(m)
    }

    /// Each layer's `(K K^T, R K^T)` for `candidate` on the questions about the people `document` names.
    fn requirements(&self, document: &str, candidate: &Delta) -> Result<Vec<Requirement>> {
        let names = self.world.names_in(document);
        if names.is_empty() {
            bail!("the document names nobody; the memit strategy has no questions to fit");
        }
        // Requirements hold where the fact is read: the name's tokens (where the MLP looks the person up) and the
        // last prompt token (where the answer is produced). The template's other tokens are shared with every
        // known person's questions; requiring the candidate's behaviour there would fight the protected keys.
        let mut rows: Vec<Vec<u32>> = Vec::new();
        let mut at: Vec<Vec<usize>> = Vec::new();
        for n in &names {
            let name_ids = engram_model::encode(&self.tokenizer, n)?;
            for (_, q) in self.world.questions_about(n) {
                let ids = engram_model::encode(&self.tokenizer, &format!("<bos> {q}"))?;
                let mut pos: Vec<usize> = (0..ids.len()).filter(|&p| name_ids.contains(&ids[p])).collect();
                pos.push(ids.len() - 1);
                rows.push(ids);
                at.push(pos);
            }
        }
        let dev = self.base.device();
        let lora = LoraSet::from_delta(candidate, dev)?;
        let pad = self.tokenizer.token_to_id("<pad>").context("tokenizer has no <pad>")?;
        let (ids, t) = padded(rows.iter().map(Vec::as_slice), pad, dev)?;
        let keep: Vec<u32> =
            at.iter().enumerate().flat_map(|(i, ps)| ps.iter().map(move |&p| (i * t + p) as u32)).collect();
        let keep = Tensor::new(keep.as_slice(), dev)?;
        let opts = ForwardOptions {
            lora: Some(&lora),
            kernels: Kernels::Fused,
            capture_mlp_hidden: true,
            last_only: true,
            ..Default::default()
        };
        let hidden = self.base.forward(&ids, &Positions::From(0), &opts)?.mlp_hidden;
        let mut out = Vec::with_capacity(self.layers.len());
        for (layer, h) in hidden.iter().enumerate() {
            let k = h.reshape(((), h.dim(2)?))?.index_select(&keep, 0)?;
            let r = match lora.get(layer, Module::Down) {
                Some(ad) => ad.apply(&k.unsqueeze(0)?)?.squeeze(0)?,
                None => Tensor::zeros((k.dim(0)?, self.layers[layer].s.nrows()), k.dtype(), dev)?,
            };
            let k = dmatrix(&k)?;
            let r = dmatrix(&r)? * self.cfg.target_scale;
            out.push((k.transpose() * &k, r.transpose() * &k));
        }
        Ok(out)
    }
}

impl Strategy for Memit {
    fn name(&self) -> &'static str {
        "memit"
    }

    fn compose(&mut self, head: &Llama, document: &str, candidate: Delta) -> Result<Delta> {
        let down = Module::Down.path();
        if let Some((l, m)) = candidate.adapters.keys().find(|(_, m)| m != down) {
            bail!("the memit strategy composes {down} only; this delta also adapts layer {l} {m}");
        }
        let req = match self.cfg.mode {
            Mode::Reproduce => self.requirements(document, &candidate)?,
            Mode::Locate => self.locate(head, document, &candidate)?,
        };
        let mut adapters = std::collections::BTreeMap::new();
        let mut pending = Vec::with_capacity(req.len());
        for (layer, ((kk, rk), st)) in req.into_iter().zip(&self.layers).enumerate() {
            if rk.iter().all(|&x| x == 0.0) && st.s.iter().all(|&x| x == 0.0) {
                // A layer nobody asked anything of stays as it is.
                pending.push(((kk, rk), st.dw.clone()));
                continue;
            }
            let c = &st.c + &kk;
            let s = &st.s + &rk;
            // dW C = S  <=>  C dW^T = S^T (C is symmetric positive definite).
            let chol = c.cholesky().context("the key covariance is not positive definite; raise mu")?;
            let dw = chol.solve(&s.transpose()).transpose();
            let diff = &dw - &st.dw;
            if self.profile && rk.norm() > 0.0 {
                // How much of this document's requirement the solution meets: 1 - |dW K - R| / |R| in the
                // Gram form, via the unexplained part of the fit on its own keys.
                let achieved = (&dw * &kk).norm() / rk.norm();
                eprintln!("memit layer {layer}: |dW KK^T| / |R K^T| = {achieved:.3}, |dW| {:.3}", dw.norm());
            }
            let (out, inp) = diff.shape();
            let mut dense = Vec::with_capacity(out * inp);
            for i in 0..out {
                dense.extend(diff.row(i).iter().map(|&x| x as f32));
            }
            adapters.insert((layer, down.to_string()), Factors::exact(inp, out, dense)?);
            pending.push(((kk, rk), dw));
        }
        self.pending = Some(pending);
        let meta = engram_lora::Meta {
            scale: 1.0,
            injector_version: format!("{} composed=memit", candidate.meta.injector_version),
            ..candidate.meta
        };
        Ok(Delta { meta, adapters, memory: None })
    }

    fn accepted(&mut self, _head: &Llama, _document: &str) -> Result<()> {
        let req = self.pending.take().context("accepted without a composed candidate")?;
        for (((kk, rk), dw), st) in req.into_iter().zip(self.layers.iter_mut()) {
            st.c += kk;
            st.s += rk;
            st.dw = dw;
        }
        Ok(())
    }

    fn save(&self) -> Result<Vec<u8>> {
        // Only edited layers carry state; the others keep their initial (identity, zero) matrices.
        let mut mats = Vec::new();
        for &l in &self.cfg.layers {
            let st = &self.layers[l];
            mats.extend([&st.s, &st.c, &st.dw]);
        }
        Ok(crate::state::encode(self.name(), &mats))
    }

    fn restore(&mut self, state: &[u8]) -> Result<()> {
        let mats = crate::state::decode(self.name(), state)?;
        if mats.len() != 3 * self.cfg.layers.len() {
            bail!(
                "memit state holds {} matrices; this configuration edits {} layers",
                mats.len(),
                self.cfg.layers.len()
            );
        }
        for (&l, m) in self.cfg.layers.iter().zip(mats.chunks_exact(3)) {
            let st = &self.layers[l];
            if m[0].shape() != st.s.shape() || m[1].shape() != st.c.shape() || m[2].shape() != st.dw.shape() {
                bail!("memit state for layer {l} has the wrong shapes for this model");
            }
        }
        for (&l, m) in self.cfg.layers.iter().zip(mats.chunks_exact(3)) {
            let st = &mut self.layers[l];
            (st.s, st.c, st.dw) = (m[0].clone(), m[1].clone(), m[2].clone());
        }
        self.pending = None;
        Ok(())
    }
}

impl Memit {
    pub fn config(&self) -> &MemitConfig {
        &self.cfg
    }

    /// Locate-and-edit requirements (MEMIT): for each person the document names, the candidate answers every
    /// trained question about them; a search finds one residual change `v` at the person's last name token,
    /// leaving the top edited layer, after which the current `head` gives those answers; each edited layer is then
    /// required to add `v / layers` at the name's keys. One `v` per person serves every question (the person's
    /// representation carries all attributes), which is also why it generalises to unseen phrasings.
    fn locate(&self, head: &Llama, document: &str, candidate: &Delta) -> Result<Vec<Requirement>> {
        let names = self.world.names_in(document);
        if names.is_empty() {
            bail!("the document names nobody; the memit strategy has no questions to fit");
        }
        let dev = head.device().clone();
        let tok = &self.tokenizer;
        let eos = tok.token_to_id("<eos>").context("tokenizer has no <eos>")?;
        let pad = tok.token_to_id("<pad>").context("tokenizer has no <pad>")?;
        let lora = LoraSet::from_delta(candidate, &dev)?;
        let top = *self.cfg.layers.iter().max().context("memit needs at least one edited layer")?;
        let (inp, out) = Module::Down.dims(head.config());
        let mut totals: Vec<Requirement> =
            self.cfg.layers.iter().map(|_| (DMatrix::zeros(inp, inp), DMatrix::zeros(out, inp))).collect();
        for name in &names {
            let name_ids = engram_model::encode(tok, name)?;
            // Rows: prompt + the candidate's answer; the subject position; the answer positions.
            let mut rows: Vec<(Vec<u32>, usize, usize)> = Vec::new();
            for (_, q) in self.world.questions_about(name) {
                let prompt = engram_model::encode(tok, &format!("<bos> {q}"))?;
                let answer = self.base.generate_greedy(&prompt, 4, eos, Some(&lora))?;
                let subject = match self.cfg.site {
                    Site::Last => prompt.len() - 1,
                    Site::Subject => match (0..prompt.len()).rev().find(|&p| name_ids.contains(&prompt[p])) {
                        Some(p) => p,
                        None => continue,
                    },
                };
                let answer_at = prompt.len();
                rows.push(([prompt, answer].concat(), subject, answer_at));
            }
            if rows.is_empty() {
                continue;
            }
            let b = rows.len();
            let (ids, t) = padded(rows.iter().map(|r| r.0.as_slice()), pad, &dev)?;
            let mut onehot = vec![0f32; b * t];
            let (mut at, mut targets) = (Vec::new(), Vec::new());
            for (i, (r, subject, answer_at)) in rows.iter().enumerate() {
                onehot[i * t + subject] = 1.0;
                for (p, &token) in r.iter().enumerate().skip(*answer_at) {
                    at.push((i * t + p - 1) as u32);
                    targets.push(token);
                }
            }
            let onehot = Tensor::from_vec(onehot, (b, t, 1), &dev)?;
            let at = Tensor::new(at.as_slice(), &dev)?;
            let targets_t = Tensor::new(targets.as_slice(), &dev)?;
            let per_row = if self.cfg.site == Site::Last { b } else { 1 };
            let v = candle_core::Var::zeros((per_row, 1, head.config().hidden_size), candle_core::DType::F32, &dev)?;
            let mut opt = candle_nn::AdamW::new(
                vec![v.clone()],
                candle_nn::ParamsAdamW { lr: self.cfg.search_lr, weight_decay: 0.0, ..Default::default() },
            )?;
            let t_search = std::time::Instant::now();
            let (mut steps, mut reached, mut mean_p) = (0, 0f32, 0f32);
            // Editing the last layer at the last prompt token: nothing but the final norm and the head sits between
            // the change and the first answer token, so the search runs on the captured final residuals alone.
            let last_layer = top + 1 == head.config().num_hidden_layers;
            let fast = last_layer && self.cfg.site == Site::Last;
            let captured = if fast {
                let opts = ForwardOptions { kernels: Kernels::Fused, capture_residuals: true, ..Default::default() };
                let res = head.forward(&ids, &Positions::From(0), &opts)?.residuals.pop().context("no residuals")?;
                let sel: Vec<u32> = rows.iter().enumerate().map(|(i, r)| (i * t + r.2 - 1) as u32).collect();
                let x = res.reshape(((), res.dim(2)?))?.index_select(&Tensor::new(sel.as_slice(), &dev)?, 0)?;
                let first: Vec<u32> = rows.iter().map(|r| r.0[r.2]).collect();
                Some((x.unsqueeze(1)?, Tensor::new(first.as_slice(), &dev)?))
            } else {
                None
            };
            for _ in 0..self.cfg.search_steps {
                let (logp, wanted) = if let Some((x, first)) = &captured {
                    let logits = head.head_logits(&(x + v.as_tensor())?)?.squeeze(1)?;
                    (candle_nn::ops::log_softmax(&logits, 1)?, first.clone())
                } else {
                    let add = onehot.broadcast_mul(v.as_tensor())?;
                    let opts = ForwardOptions { residual_add: Some((top, &add)), ..Default::default() };
                    let logits = head.forward(&ids, &Positions::From(0), &opts)?.logits;
                    let vsz = logits.dim(2)?;
                    (
                        candle_nn::ops::log_softmax(&logits.reshape(((), vsz))?.index_select(&at, 0)?, 1)?,
                        targets_t.clone(),
                    )
                };
                let picked = logp.gather(&wanted.unsqueeze(1)?, 1)?;
                reached = picked.min_all()?.to_scalar::<f32>()?.exp();
                mean_p = picked.exp()?.mean_all()?.to_scalar::<f32>()?;
                if reached >= self.cfg.search_stop_p as f32 {
                    break;
                }
                let loss = picked.mean_all()?.neg()?;
                opt.backward_step(&loss)?;
                steps += 1;
            }
            let v = dmatrix(&v.as_tensor().reshape((per_row, ()))?)?
                * (self.cfg.target_scale / self.cfg.layers.len() as f64);
            if self.profile {
                eprintln!(
                    "memit locate {name}: {steps} steps, answer p min {reached:.3} mean {mean_p:.3}, |v| {:.3}, {:?}",
                    v.norm(),
                    t_search.elapsed()
                );
            }
            // The name's keys in each edited layer, read by the current head.
            let opts = ForwardOptions {
                kernels: Kernels::Fused,
                capture_mlp_hidden: true,
                last_only: true,
                ..Default::default()
            };
            let hidden = head.forward(&ids, &Positions::From(0), &opts)?.mlp_hidden;
            let sel: Vec<u32> = rows.iter().enumerate().map(|(i, r)| (i * t + r.1) as u32).collect();
            let sel = Tensor::new(sel.as_slice(), &dev)?;
            for (slot, &layer) in totals.iter_mut().zip(&self.cfg.layers) {
                let h = &hidden[layer];
                let k = dmatrix(&h.reshape(((), h.dim(2)?))?.index_select(&sel, 0)?)?;
                let r = DMatrix::from_fn(k.nrows(), out, |i, j| v[(i.min(per_row - 1), j)]);
                slot.0 += k.transpose() * &k;
                slot.1 += r.transpose() * &k;
            }
        }
        // Unedited layers get no requirement.
        let mut req = Vec::with_capacity(self.layers.len());
        for layer in 0..self.layers.len() {
            match self.cfg.layers.iter().position(|&l| l == layer) {
                Some(i) => req.push(totals[i].clone()),
                None => req.push((DMatrix::zeros(inp, inp), DMatrix::zeros(out, inp))),
            }
        }
        Ok(req)
    }
}
