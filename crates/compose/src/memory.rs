//! Side-memory composition: each injected person becomes one key-value entry read at the final residual.
//!
//! Why: a weight edit stores facts in a linear map whose key space is the edited layer's width, so MEMIT-style
//! composition hits a ceiling of a few dozen people on this model however it is solved (ARCHITECTURE.md,
//! "Composition, measured"). A memory entry needs no room in any weight: the thousandth is stored exactly like
//! the first, and nothing before the head sees it, so entries cannot disturb each other's keys or the model's.
//!
//! For each person a document names, the base model reading the document in context answers every trained question
//! about them (or the candidate, the injector's delta, where the document does not fit the context window). The
//! entry's key is the mean direction of those questions' final residuals at the last prompt token, centred on the
//! protected texts' mean, less its attribute's centre (below); a probe found that the mean direction identifies the
//! person (98% top-1 among 1,000 people for a question phrasing never used to build the key, on an earlier base
//! model) while a per-question key does not carry over to new phrasings (20%). The entry's value is one residual
//! change, searched so the head gives that answer
//! to all of those questions at once: the question's own residual already selects the attribute, so one vector
//! serves every attribute and phrasing. Its threshold is the highest cosine any protected position (known facts,
//! reading, skills) reaches against the key, so the entry stays silent on everything the model must keep.
//!
//! A second, lower threshold holds where the model is unsure (its own top next-token probability below the gate):
//! the highest cosine among the protected positions where it is unsure too. Most protected positions that come
//! close to an entry are ones the model answers with confidence (a known person's question, a document it reads),
//! while a question about someone it was never taught leaves it unsure. So the lower threshold reaches wordings of
//! the question the key was not built from and still never fires on a measured protected position.
//!
//! Every question about one attribute shares a direction, whoever it names; a key that keeps it comes close to any
//! question of that attribute the model is unsure of, such as a four-person reading question (at an unsure margin
//! of 0.05 an employer question about one person fired an unrelated person's employer entry, cosine 0.678 against
//! 0.677). So a fact's key drops its attribute's centre (the mean direction of the known people's questions about
//! it, in all five trained wordings) and points at what tells the person apart. At the default margin (0.08)
//! held-out wordings fire their own entry 0.827 of the time instead of 0.739, and another fact's entry fires on none
//! of 3,400 reading questions instead of 1 (at 0.05: none instead of 6; `examples/key_probe.rs`).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, D};
use candle_nn::Optimizer;
use engram_lora::{Delta, Memory};
use engram_model::{ForwardOptions, Kernels, KvCache, Llama, LoraSet, Positions, Tokenizer};
use engram_world::{Attribute, World};
use serde::{Deserialize, Serialize};

use crate::keys::{padded, token_rows};
use crate::nullspace::protected_texts;
use crate::Strategy;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemoryConfig {
    /// Adam steps, learning rate and the answer probability every question must reach to stop the value search.
    pub search_steps: usize,
    pub search_lr: f64,
    pub search_stop_p: f64,
    /// Added to each entry's threshold (the highest protected cosine): positive is safer, negative reaches further.
    /// At 0 a known namesake's question, the very position that set the threshold, fired now and then on float
    /// noise of another batch shape (known recall 0.97 at N=40); at 0.02, 5,000 entries still flipped 4 of 150
    /// in-context answers the protected sample had not covered (locality 0.973 at N=1000); 0.05 kept every one
    /// at N=1000 for 0.001 of reliability but lost 2 of 150 at N=3000 (15,000 entries); 0.08 keeps 0.993 there.
    pub margin: f32,
    /// One entry per fact (person and attribute) instead of one per person. A person's single value cannot raise
    /// all five answers at once on this model (the search stalls at answer p 0.03-0.9), while a fact's value reaches
    /// its answer at once; a person-level key carries over to new phrasings better, but on this base model those
    /// are capped by its reading of them anyway.
    pub per_fact: bool,
    /// Build each entry from the world's extra paraphrases of its questions too, not only the two trained
    /// phrasings: the key is then the mean over five wordings, closer to what any wording of the question reads.
    #[serde(default)]
    pub paraphrases: bool,
    /// Below this top next-token probability of the model without the memory an entry fires above its unsure
    /// threshold (the highest cosine of protected positions the model is unsure of, plus `unsure_margin`). 0: never.
    #[serde(default)]
    pub gate: f32,
    /// `margin` for the unsure threshold.
    #[serde(default)]
    pub unsure_margin: f32,
    /// Key each fact on its question directions minus its attribute's centre (the mean direction of the known
    /// people's questions about that attribute, always in all five trained wordings), so questions that share only
    /// the attribute stay far from it. A configuration written before this field existed keeps the old keys.
    #[serde(default)]
    pub attribute_centred: bool,
    /// Take each fact's answer from the base model reading the document in context, where the document and the
    /// question fit its context window, instead of from the candidate delta (which still answers for longer
    /// documents). The hypernetwork's delta gets one answer in four right on four-person documents, where the base
    /// model reads 0.96: its delta writes each attribute's values without tying them to names. A configuration
    /// written before this field existed keeps the candidate's answers.
    #[serde(default)]
    pub read_in_context: bool,
    pub protected_samples: usize,
    pub seed: u64,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            search_steps: 200,
            search_lr: 0.5,
            search_stop_p: 0.9,
            margin: 0.08,
            per_fact: true,
            paraphrases: true,
            gate: 0.8,
            unsure_margin: 0.08,
            attribute_centred: true,
            read_in_context: true,
            protected_samples: 400,
            seed: 0x5AFE,
        }
    }
}

/// Where an entry's answer comes from.
enum AnswerSource<'a> {
    /// The injector's delta on the base model, asked closed book.
    Candidate(&'a LoraSet),
    /// The base model with the document read into this cache, asked in context.
    Reading(KvCache),
}

pub struct SideMemoryStrategy {
    cfg: MemoryConfig,
    world: World,
    tokenizer: Tokenizer,
    base: Llama,
    /// The protected positions' mean final residual (`1 x hidden`): keys are directions from it.
    mean: Tensor,
    /// Every protected position's centred, unit-length final residual (`positions x hidden`).
    protected: Tensor,
    /// The model's top next-token probability at each protected position (`positions`).
    confidence: Tensor,
    /// The rows of `protected` where that probability is below the gate: they set the unsure thresholds.
    unsure: Tensor,
    /// Per attribute (`5 x hidden`, in [`Attribute::ALL`] order): the mean centred direction of the known people's
    /// questions about it, in every trained wording.
    attribute_centres: Tensor,
    profile: bool,
}

const SETUP_MAGIC: &[u8] = b"engram-memory-setup-v3\n";

/// What the protected sample depends on: a setup measured under another sample must not be reused.
fn setup_fingerprint(cfg: &MemoryConfig) -> u64 {
    (cfg.protected_samples as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ cfg.seed
}

/// An entry fires above the highest protected cosine plus the margin, but never so high that its own questions
/// cannot reach it: where they sit within the margin (a known namesake's question lies close to the key), the
/// threshold goes halfway between the protected maximum and the lowest own question instead. It never goes below
/// the protected maximum, so no measured protected position ever fires.
fn entry_threshold(protected_max: f32, own_min: f32, margin: f32) -> f32 {
    let full = protected_max + margin;
    let t = if own_min > protected_max && own_min <= full { (protected_max + own_min) / 2.0 } else { full };
    t.clamp(-1.0, 1.0)
}

/// Rows scaled to unit length.
fn unit(x: &Tensor) -> Result<Tensor> {
    let n = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12f32, f32::MAX)?;
    Ok(x.broadcast_div(&n)?)
}

/// `x - mean`, rows scaled to unit length.
fn directions(x: &Tensor, mean: &Tensor) -> Result<Tensor> {
    unit(&x.broadcast_sub(mean)?)
}

/// The model's top next-token probability after each final residual in `x` (`positions x hidden`).
fn confidence(model: &Llama, x: &Tensor) -> Result<Tensor> {
    let mut parts = Vec::new();
    for start in (0..x.dim(0)?).step_by(4096) {
        let rows = x.narrow(0, start, 4096.min(x.dim(0)? - start))?;
        let logits = model.normed_logits(&model.final_norm(&rows)?)?;
        parts.push(candle_nn::ops::softmax_last_dim(&logits)?.max(D::Minus1)?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// Final residuals (before the last norm) of `rows`, at every position or only each row's last one.
pub fn final_residuals(model: &Llama, rows: &[Vec<u32>], pad: u32, last_only: bool) -> Result<Tensor> {
    let mut parts = Vec::new();
    for batch in rows.chunks(32) {
        let (ids, t) = padded(batch.iter().map(Vec::as_slice), pad, model.device())?;
        let keep: Vec<u32> = batch
            .iter()
            .enumerate()
            .flat_map(|(i, r)| {
                let from = if last_only { r.len() - 1 } else { 0 };
                (from..r.len()).map(move |p| (i * t + p) as u32)
            })
            .collect();
        let opts = ForwardOptions { kernels: Kernels::Fused, capture_residuals: true, ..Default::default() };
        let out = model.forward(&ids, &Positions::From(0), &opts)?;
        let r = out.residuals.last().context("no residuals captured")?;
        parts.push(r.reshape(((), r.dim(2)?))?.index_select(&Tensor::new(keep.as_slice(), model.device())?, 0)?);
    }
    Ok(Tensor::cat(&parts, 0)?.to_dtype(DType::F32)?)
}

/// Per attribute, the mean centred direction of the known people's questions about it in every trained wording
/// (`5 x hidden`): what all of that attribute's questions share, whoever they name.
fn attribute_centres(base: &Llama, tokenizer: &Tokenizer, world: &World, mean: &Tensor) -> Result<Tensor> {
    let pad = tokenizer.token_to_id("<pad>").context("tokenizer has no <pad>")?;
    let mut centres = Vec::new();
    for a in Attribute::ALL {
        let prompts: Vec<Vec<u32>> = world
            .known()
            .iter()
            .flat_map(|who| world.questions_about_with(&who.name(), true))
            .filter(|(b, _)| *b == a)
            .map(|(_, q)| engram_model::encode(tokenizer, &format!("<bos> {q}")))
            .collect::<std::result::Result<_, _>>()?;
        centres.push(directions(&final_residuals(base, &prompts, pad, true)?, mean)?.mean_keepdim(0)?);
    }
    Ok(Tensor::cat(&centres, 0)?)
}

impl SideMemoryStrategy {
    /// Measures the protected positions' final residuals and the attribute centres on `base` (about 20 s on two CPU
    /// cores for the shipped model).
    pub fn new(base: &Llama, tokenizer: &Tokenizer, cfg: MemoryConfig) -> Result<Self> {
        let world = World::new();
        let pad = tokenizer.token_to_id("<pad>").context("tokenizer has no <pad>")?;
        let rows = token_rows(base, tokenizer, &protected_texts(&world, cfg.protected_samples, cfg.seed))?;
        let x = final_residuals(base, &rows, pad, false)?;
        let mean = x.mean_keepdim(0)?;
        let protected = directions(&x, &mean)?;
        let confidence = confidence(base, &x)?;
        let attribute_centres = attribute_centres(base, tokenizer, &world, &mean)?;
        Self::with_protected(base, tokenizer, cfg, mean, protected, confidence, attribute_centres)
    }

    /// The strategy over protected positions already measured: their mean, centred unit directions and the model's
    /// confidence at each.
    fn with_protected(
        base: &Llama,
        tokenizer: &Tokenizer,
        cfg: MemoryConfig,
        mean: Tensor,
        protected: Tensor,
        confidence: Tensor,
        attribute_centres: Tensor,
    ) -> Result<Self> {
        let rows: Vec<u32> = confidence
            .to_vec1::<f32>()?
            .iter()
            .enumerate()
            .filter(|(_, &c)| c < cfg.gate)
            .map(|(i, _)| i as u32)
            .collect();
        let unsure = protected.index_select(&Tensor::new(rows.as_slice(), protected.device())?, 0)?;
        Ok(Self {
            cfg,
            world: World::new(),
            tokenizer: tokenizer.clone(),
            base: base.clone(),
            mean,
            protected,
            confidence,
            unsure,
            attribute_centres,
            profile: std::env::var_os("ENGRAM_PROFILE").is_some(),
        })
    }

    /// Rebuilt from what [`Strategy::setup`] wrote on the same base model and configuration, without measuring.
    pub fn from_setup(base: &Llama, tokenizer: &Tokenizer, cfg: MemoryConfig, setup: &[u8]) -> Result<Self> {
        let header = SETUP_MAGIC.len() + 4 + 8 + 8;
        if setup.len() < header || !setup.starts_with(SETUP_MAGIC) {
            bail!("not a memory strategy setup ({} bytes)", setup.len());
        }
        let word = |at: usize, n: usize| -> u64 {
            let mut b = [0u8; 8];
            b[..n].copy_from_slice(&setup[at..at + n]);
            u64::from_le_bytes(b)
        };
        let at = SETUP_MAGIC.len();
        let (hidden, rows, fingerprint) = (word(at, 4) as usize, word(at + 4, 8) as usize, word(at + 12, 8));
        if hidden != base.config().hidden_size {
            bail!("memory setup for hidden size {hidden}, the base model has {}", base.config().hidden_size);
        }
        if fingerprint != setup_fingerprint(&cfg) {
            bail!("memory setup measured with another protected sample (config changed)");
        }
        let attributes = Attribute::ALL.len();
        let floats = (1 + rows) * hidden + rows + attributes * hidden;
        if setup.len() != header + 4 * floats {
            bail!("memory setup is {} bytes, expected {}", setup.len(), header + 4 * floats);
        }
        let v: Vec<f32> =
            setup[header..].chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let dev = base.device();
        let mean = Tensor::from_slice(&v[..hidden], (1, hidden), dev)?;
        let protected = Tensor::from_slice(&v[hidden..(1 + rows) * hidden], (rows, hidden), dev)?;
        let at = (1 + rows) * hidden;
        let confidence = Tensor::from_slice(&v[at..at + rows], rows, dev)?;
        let attribute_centres = Tensor::from_slice(&v[at + rows..], (attributes, hidden), dev)?;
        Self::with_protected(base, tokenizer, cfg, mean, protected, confidence, attribute_centres)
    }

    pub fn config(&self) -> &MemoryConfig {
        &self.cfg
    }

    /// The first answer token for each prompt (`<bos> question`): of the base model with the candidate applied,
    /// or of the base model reading the document, whose keys and values `Reading` holds (each question continues
    /// a copy of that cache, so the document is run once per injection, not once per question). One fact has one
    /// value: with one entry per fact every wording gets the token favoured over all of them together (the highest
    /// summed log-probability), so that one value is searched for, not two answers it cannot give at once when the
    /// wordings disagree.
    fn first_answers(&self, prompts: &[Vec<u32>], source: &AnswerSource) -> Result<Vec<u32>> {
        let mut summed: Option<Tensor> = None;
        let mut answers = Vec::with_capacity(prompts.len());
        for p in prompts {
            let logits = match source {
                AnswerSource::Candidate(lora) => {
                    let ids = Tensor::new(p.as_slice(), self.base.device())?.unsqueeze(0)?;
                    let opts = ForwardOptions { lora: Some(lora), ..ForwardOptions::inference() };
                    self.base.forward(&ids, &Positions::From(0), &opts)?.logits
                }
                AnswerSource::Reading(document) => {
                    let ids = Tensor::new(&p[1..], self.base.device())?.unsqueeze(0)?;
                    let mut cache = document.clone();
                    self.base.forward_cached(&ids, &mut cache, &ForwardOptions::inference())?.logits
                }
            }
            .flatten_all()?;
            answers.push(logits.argmax(0)?.to_scalar::<u32>()?);
            let lp = candle_nn::ops::log_softmax(&logits, 0)?;
            summed = Some(match summed {
                Some(s) => (s + lp)?,
                None => lp,
            });
        }
        if self.cfg.per_fact {
            if let Some(s) = summed {
                let consensus = s.argmax(0)?.to_scalar::<u32>()?;
                answers.iter_mut().for_each(|a| *a = consensus);
            }
        }
        Ok(answers)
    }

    /// The base model's keys and values after reading `document` in context (`<bos> <doc> sentences </doc>`;
    /// markers already in the text are dropped, as the injector's chunks drop them), or None where it and a question
    /// of `question_tokens` (`<bos>` included) do not fit the context window together.
    fn read(&self, document: &str, question_tokens: usize) -> Result<Option<KvCache>> {
        let tok = &self.tokenizer;
        let id = |t: &str| tok.token_to_id(t).with_context(|| format!("tokenizer has no {t}"));
        let (bos, doc, end) = (id("<bos>")?, id("<doc>")?, id("</doc>")?);
        let body = engram_model::encode(tok, document)?.into_iter().filter(|&t| t != bos && t != doc && t != end);
        let prefix: Vec<u32> = [bos, doc].into_iter().chain(body).chain([end]).collect();
        if prefix.len() + question_tokens.saturating_sub(1) > self.base.config().max_position_embeddings {
            return Ok(None);
        }
        let mut cache = KvCache::new(self.base.config());
        let ids = Tensor::new(prefix.as_slice(), self.base.device())?.unsqueeze(0)?;
        self.base.forward_cached(&ids, &mut cache, &ForwardOptions::inference())?;
        Ok(Some(cache))
    }

    /// The change `v` of the normed final residual after which `head` gives `answers[i]` at every `x[i]` (final
    /// residuals, `questions x hidden`), and the lowest answer probability reached. The logits are linear in `v`, so
    /// one vector can raise the person's answer to every attribute at once; each question's own logits pick the
    /// attribute.
    fn search(&self, head: &Llama, x: &Tensor, answers: &[u32]) -> Result<(Tensor, f32)> {
        let dev = x.device();
        let wanted = Tensor::new(answers, dev)?.unsqueeze(1)?;
        let v = candle_core::Var::zeros((1, x.dim(1)?), DType::F32, dev)?;
        let mut opt = candle_nn::AdamW::new(
            vec![v.clone()],
            candle_nn::ParamsAdamW { lr: self.cfg.search_lr, weight_decay: 0.0, ..Default::default() },
        )?;
        let normed = head.final_norm(x)?.detach();
        let mut reached = 0f32;
        for _ in 0..=self.cfg.search_steps {
            let logits = head.normed_logits(&normed.broadcast_add(v.as_tensor())?)?;
            let picked = candle_nn::ops::log_softmax(&logits, 1)?.gather(&wanted, 1)?;
            reached = picked.min_all()?.to_scalar::<f32>()?.exp();
            if reached >= self.cfg.search_stop_p as f32 {
                break;
            }
            opt.backward_step(&picked.mean_all()?.neg()?)?;
        }
        Ok((v.as_tensor().clone(), reached))
    }
}

impl Strategy for SideMemoryStrategy {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn compose(&mut self, head: &Llama, document: &str, candidate: Delta) -> Result<Delta> {
        let names = self.world.names_in(document);
        if names.is_empty() {
            bail!("the document names nobody; the memory strategy has no questions to fit");
        }
        let tok = &self.tokenizer;
        let pad = tok.token_to_id("<pad>").context("tokenizer has no <pad>")?;
        let lora = LoraSet::from_delta(&candidate, head.device())?;
        let hidden = head.config().hidden_size;
        let (mut keys, mut values, mut thresholds) = (Vec::new(), Vec::new(), Vec::new());
        let (mut gates, mut unsure_thresholds) = (Vec::new(), Vec::new());
        // (what the entry is about, the centre its key is measured from, its questions as `<bos> question` tokens)
        let mut facts: Vec<(String, Tensor, Vec<Vec<u32>>)> = Vec::new();
        let encode = |qs: Vec<String>| -> Result<Vec<Vec<u32>>> {
            Ok(qs
                .iter()
                .map(|q| engram_model::encode(tok, &format!("<bos> {q}")))
                .collect::<std::result::Result<_, _>>()?)
        };
        let centre = |a: Option<Attribute>| -> Result<Tensor> {
            Ok(match (self.cfg.attribute_centred, a) {
                (false, _) => Tensor::zeros((1, hidden), DType::F32, head.device())?,
                (true, Some(a)) => self.attribute_centres.narrow(0, a.index(), 1)?,
                (true, None) => self.attribute_centres.mean_keepdim(0)?,
            })
        };
        for name in &names {
            let questions = self.world.questions_about_with(name, self.cfg.paraphrases);
            if self.cfg.per_fact {
                for a in Attribute::ALL {
                    let qs = questions.iter().filter(|(b, _)| *b == a).map(|(_, q)| q.clone()).collect();
                    facts.push((format!("{name} {}", a.name()), centre(Some(a))?, encode(qs)?));
                }
            } else {
                facts.push((name.clone(), centre(None)?, encode(questions.into_iter().map(|(_, q)| q).collect())?));
            }
        }
        let longest = facts.iter().flat_map(|(_, _, ps)| ps).map(Vec::len).max().unwrap_or(0);
        let source = match self.cfg.read_in_context.then(|| self.read(document, longest)).transpose()?.flatten() {
            Some(cache) => AnswerSource::Reading(cache),
            None => AnswerSource::Candidate(&lora),
        };
        for (name, centre, prompts) in &facts {
            let t0 = std::time::Instant::now();
            // The answer is what the entry must make the head say: the base model's reading of the document, or the
            // candidate's. Both are the base model's, so earlier entries cannot answer for it.
            let answers = self.first_answers(prompts, &source)?;
            // The memory changes no residual; matching its entries would only make each injection cost O(N).
            let x = final_residuals(&head.without_memory(), prompts, pad, true)?;
            let (v, reached) = self.search(head, &x, &answers)?;
            let dirs = directions(&x, &self.mean)?;
            let key = unit(&dirs.mean_keepdim(0)?.sub(centre)?)?;
            let protected_max = self.protected.matmul(&key.t()?)?.max_all()?.to_scalar::<f32>()?;
            let own = dirs.matmul(&key.t()?)?.flatten_all()?.to_vec1::<f32>()?;
            let own_min = own.iter().copied().fold(f32::INFINITY, f32::min);
            let threshold = entry_threshold(protected_max, own_min, self.cfg.margin);
            let (gate, unsure_threshold) = if self.cfg.gate > 0.0 && self.unsure.dim(0)? > 0 {
                let unsure_max = self.unsure.matmul(&key.t()?)?.max_all()?.to_scalar::<f32>()?;
                (self.cfg.gate, entry_threshold(unsure_max, own_min, self.cfg.unsure_margin).min(threshold))
            } else {
                (0.0, 1.0)
            };
            if self.profile {
                let covered = own.iter().filter(|&&s| s > threshold).count();
                eprintln!(
                    "memory {name}: answer p min {reached:.3}, |v| {:.2}, threshold {threshold:.3} (unsure \
                     {unsure_threshold:.3}), own questions above it {covered}/{}, {:?}",
                    v.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt(),
                    own.len(),
                    t0.elapsed()
                );
            }
            keys.extend(key.flatten_all()?.to_vec1::<f32>()?);
            values.extend(v.flatten_all()?.to_vec1::<f32>()?);
            thresholds.push(threshold);
            gates.push(gate);
            unsure_thresholds.push(unsure_threshold);
        }
        let mean = self.mean.flatten_all()?.to_vec1::<f32>()?;
        let memory = Memory { hidden, mean, keys, values, thresholds, gates, unsure_thresholds };
        memory.check()?;
        let meta = engram_lora::Meta {
            scale: 1.0,
            injector_version: format!("{} composed=memory", candidate.meta.injector_version),
            ..candidate.meta
        };
        Ok(Delta { meta, adapters: Default::default(), memory: Some(memory) })
    }

    fn accepted(&mut self, _head: &Llama, _document: &str) -> Result<()> {
        // Entries live in the chain itself; nothing here depends on which were accepted.
        Ok(())
    }

    /// The protected positions' mean, directions and the model's confidence at each, and the attribute centres
    /// (about `4 x (hidden + 1) x (positions + 1)` bytes: 100 MB for the shipped model's 95,000 positions), so a
    /// worker starts in a second instead of measuring for 20 s.
    fn setup(&self) -> Result<Vec<u8>> {
        let (rows, hidden) = self.protected.dims2()?;
        let floats = (rows + 1) * hidden + rows + self.attribute_centres.elem_count();
        let mut out = Vec::with_capacity(SETUP_MAGIC.len() + 20 + 4 * floats);
        out.extend_from_slice(SETUP_MAGIC);
        out.extend_from_slice(&(hidden as u32).to_le_bytes());
        out.extend_from_slice(&(rows as u64).to_le_bytes());
        out.extend_from_slice(&setup_fingerprint(&self.cfg).to_le_bytes());
        for t in [&self.mean, &self.protected, &self.confidence, &self.attribute_centres] {
            for x in t.flatten_all()?.to_vec1::<f32>()? {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::entry_threshold;

    #[test]
    fn a_threshold_keeps_the_margin_unless_the_entrys_own_questions_sit_inside_it() {
        // Own questions well clear: the full margin.
        assert!((entry_threshold(0.5, 0.9, 0.08) - 0.58).abs() < 1e-6);
        // Own questions inside the margin: halfway, still above every protected position.
        let t = entry_threshold(0.91, 0.95, 0.08);
        assert!((t - 0.93).abs() < 1e-6 && t > 0.91 && t < 0.95);
        // Own questions no closer than a protected position: nothing to gain, the full margin stays.
        assert!((entry_threshold(0.91, 0.90, 0.08) - 0.99).abs() < 1e-6);
    }
}
