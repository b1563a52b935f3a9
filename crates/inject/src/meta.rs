//! `engram train hypernet`: meta-training the hypernetwork.
//!
//! Every step draws documents of one to four reading-split people (names never memorised by the base model and
//! never the `fresh` people that evaluations inject), with distractor sentences; the hypernetwork turns each
//! document into a delta (chunks concatenated along the rank), and the frozen base model plus that delta answers
//! questions about the document's people with no document in context. The loss:
//! - context distillation: cross-entropy against the teacher's distribution, the same frozen model reading the
//!   document in context and answering the same questions (teacher-forced on the true answers);
//! - the world's true answer (the base model cannot read every attribute in context; the world knows the truth);
//! - keep: questions about `known` people and, after a first phase, about other documents' people, with KL to the
//!   frozen model without a delta (a delta must act on its own document's names only);
//! - a small L1 penalty on A and B.
//!
//! Some documents are split into two chunks and some get an extra chunk of distractor sentences, so the network
//! learns that chunk deltas are summed and that a chunk without facts should write nothing.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use engram_model::{BaseModel, ForwardOptions, Kernels, LoraAdapter, LoraSet, Module, Positions};
use engram_trainer::optim::AdamW;
use engram_trainer::{AdamWConfig, Schedule};
use engram_world::{Attribute, Person, Phrasing, Rng, Split, World, SKILL_SUITE};
use serde::{Deserialize, Serialize};

use crate::hyper::{capture, chunk_document, pad_batch, HyperConfig, HyperNet, Specials, CONFIG_FILE, WEIGHTS_FILE};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MetaConfig {
    pub seed: u64,
    pub steps: u64,
    pub docs_per_step: usize,
    /// Relative frequency of documents of 1, 2, 3 and 4 people.
    pub doc_people: [f64; 4],
    pub questions_per_doc: usize,
    /// Ask the document's own questions in the world's extra paraphrases too (never the held-out phrasing), so a
    /// delta is trained to answer however the question is worded.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paraphrases: bool,
    /// Keep questions per document: about known people from the start, about other documents' people from
    /// `negatives_from` (a fraction of the run) on. Specificity pressure from step 0 stalls learning.
    pub keep_known: usize,
    /// Keep questions per document about known people who share a first or last name with someone in the
    /// document: every known fact one delta broke was such a namesake's (29 of 29 flips over 12 deltas).
    #[serde(default)]
    pub keep_namesakes: usize,
    /// Keep rows per document of skill tasks (addition, copying), which a delta must leave alone.
    #[serde(default)]
    pub keep_skills: usize,
    pub negatives: usize,
    pub negatives_from: f64,
    pub answer_weight: f64,
    pub distill_weight: f64,
    pub keep_weight: f64,
    pub l1: f64,
    /// Chance a document is cut into two chunks at a random sentence, and that it gets an extra chunk of
    /// distractor sentences.
    pub split_prob: f64,
    pub distractor_chunk_prob: f64,
    /// Chance a one-person document is instead its biography hidden among distractor sentences, a document of up
    /// to `needle_windows` context windows (tens of chunks): most chunks then have nothing to teach and must write
    /// nothing. The teacher reads the biography alone.
    #[serde(default)]
    pub needle_prob: f64,
    #[serde(default = "default_needle_windows")]
    pub needle_windows: f64,
    /// Start from this hypernetwork's weights (a directory with hypernet.safetensors); variables it lacks (a
    /// gate it was trained without) keep their initialisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<PathBuf>,
    pub schedule: Schedule,
    pub adamw: AdamWConfig,
    pub eval_every: u64,
    pub eval_items: usize,
    pub checkpoint_every: u64,
    pub hyper: HyperConfig,
}

impl MetaConfig {
    pub fn new(base: &BaseModel, seed: u64, steps: u64) -> Self {
        Self {
            seed,
            steps,
            docs_per_step: 16,
            doc_people: [0.4, 0.2, 0.2, 0.2],
            questions_per_doc: 4,
            paraphrases: false,
            keep_known: 1,
            keep_namesakes: 0,
            keep_skills: 0,
            negatives: 1,
            negatives_from: 0.3,
            // The teacher is confidently wrong where the base model cannot read in context (every year question gets
            // the same wrong year): with equal weights the optimum ties truth and teacher and years were never
            // learned (0.00 after 800 steps); at 0.3 they reached 1.00 by step 750.
            answer_weight: 1.0,
            distill_weight: 0.3,
            // Keep-KL at 2 held known recall at 0.985 with the delta applied (0.91-0.98 at 1).
            keep_weight: 2.0,
            l1: 1e-3,
            split_prob: 0.2,
            distractor_chunk_prob: 0.2,
            needle_prob: 0.0,
            needle_windows: default_needle_windows(),
            init_from: None,
            schedule: Schedule { peak_lr: 1e-3, warmup_steps: 100, hold_fraction: 0.0, final_fraction: 0.1 },
            adamw: AdamWConfig { weight_decay: 0.01, ..AdamWConfig::default() },
            eval_every: 250,
            eval_items: 120,
            checkpoint_every: 50,
            hyper: HyperConfig::for_base(base),
        }
    }

    /// Trains in seconds on a tiny base model, for tests.
    pub fn tiny(base: &BaseModel, seed: u64, steps: u64) -> Self {
        let mut c = Self::new(base, seed, steps);
        c.docs_per_step = 6;
        c.hyper.width = 32;
        c.hyper.mlp_hidden = 64;
        c.hyper.blocks = 1;
        c.schedule.warmup_steps = 3;
        c.eval_every = steps;
        c.eval_items = 12;
        c.checkpoint_every = 5;
        c
    }
}

fn default_needle_windows() -> f64 {
    4.0
}

/// A distractor document of about `tokens` tokens with one person's biography at a random sentence position.
pub fn needle_document(world: &World, base: &BaseModel, rng: &mut Rng, who: &Person, tokens: usize) -> Result<String> {
    let bio = world.document(rng, std::slice::from_ref(who), false);
    let bio = bio.trim_start_matches("<doc>").trim_end_matches("</doc>").trim().to_string();
    let mut sentences: Vec<String> = Vec::new();
    let mut len = base.encode(&bio)?.len() + 2;
    while len < tokens {
        let s = world.distractors(rng, 1);
        len += base.encode(&s)?.len();
        sentences.push(s);
    }
    let at = rng.below(sentences.len() + 1);
    sentences.insert(at, bio);
    Ok(format!("<doc> {} </doc>", sentences.join(" ")))
}

/// One question as a closed-book row: `<bos> Q : ... A : value <eos>`, with the answer's token span.
struct Row {
    ids: Vec<u32>,
    /// Index of the first answer token; the rest of the row is the answer.
    answer_at: usize,
    /// Which document's delta the row runs with.
    doc: usize,
}

/// A training document: its chunks and the teacher's sequence (document, then every own question and answer).
struct Doc {
    chunks: Vec<Vec<u32>>,
    teacher: Vec<u32>,
    /// Positions in `teacher` of every answer token, in the order of the document's own rows.
    teacher_answers: Vec<usize>,
}

fn row(base: &BaseModel, prompt: &str, answer: &str, doc: usize) -> Result<Row> {
    let mut ids = base.encode(&format!("<bos> {prompt}"))?;
    let answer_at = ids.len();
    ids.extend(base.encode(answer)?);
    Ok(Row { ids, answer_at, doc })
}

fn pick_people_count(rng: &mut Rng, weights: &[f64; 4]) -> usize {
    let total: f64 = weights.iter().sum();
    let mut x = rng.unit() * total;
    for (i, w) in weights.iter().enumerate() {
        if x < *w {
            return i + 1;
        }
        x -= w;
    }
    1
}

/// Known people sharing a first or last name with one of `people` (and not one of them).
pub(crate) fn known_namesakes<'w>(world: &'w World, people: &[Person]) -> Vec<&'w Person> {
    world
        .known()
        .iter()
        .filter(|k| people.iter().any(|p| (p.first == k.first || p.last == k.last) && p.name() != k.name()))
        .collect()
}

/// Builds one step's documents and rows (own rows first, then keep rows).
fn sample_step(
    base: &BaseModel,
    world: &World,
    sp: &Specials,
    cfg: &MetaConfig,
    step: u64,
) -> Result<(Vec<Doc>, Vec<Row>, Vec<Row>)> {
    let mut rng = Rng::derive(cfg.seed, step);
    let negatives = if (step as f64) >= cfg.negatives_from * cfg.steps as f64 { cfg.negatives } else { 0 };
    let people: Vec<Vec<Person>> = (0..cfg.docs_per_step)
        .map(|_| {
            let n = pick_people_count(&mut rng, &cfg.doc_people);
            world.draw_people(&mut rng, Split::Reading, n)
        })
        .collect();
    let (mut docs, mut own, mut keep) = (Vec::new(), Vec::new(), Vec::new());
    for (i, ps) in people.iter().enumerate() {
        let text = world.document(&mut rng, ps, true);
        let ids = base.encode(&text)?;
        let mut chunks = chunk_document(&ids, cfg.hyper.chunk_tokens, sp);
        if ps.len() == 1 && cfg.needle_prob > 0.0 && rng.chance(cfg.needle_prob) {
            let window = base.llama.config().max_position_embeddings as f64;
            let tokens = (window * (0.5 + rng.unit() * (cfg.needle_windows - 0.5).max(0.0))) as usize;
            let long = needle_document(world, base, &mut rng, &ps[0], tokens)?;
            chunks = chunk_document(&base.encode(&long)?, cfg.hyper.chunk_tokens, sp);
        } else if chunks.len() == 1 && rng.chance(cfg.split_prob) {
            let body = &chunks[0][2..chunks[0].len() - 1];
            let ends: Vec<usize> =
                body.iter().enumerate().filter(|(_, &t)| t == sp.period).map(|(j, _)| j + 1).collect();
            if ends.len() >= 2 {
                let cut = ends[rng.below(ends.len() - 1)];
                let (a, b) = body.split_at(cut);
                chunks =
                    vec![chunk_document(a, cfg.hyper.chunk_tokens, sp), chunk_document(b, cfg.hyper.chunk_tokens, sp)]
                        .concat();
            }
        }
        if rng.chance(cfg.distractor_chunk_prob) {
            let n = 1 + rng.below(6);
            let noise = base.encode(&world.distractors(&mut rng, n))?;
            chunks.extend(chunk_document(&noise, cfg.hyper.chunk_tokens, sp));
        }
        let mut teacher = base.encode(&format!("<bos> {text}"))?;
        let mut teacher_answers = Vec::new();
        for _ in 0..cfg.questions_per_doc {
            let who = rng.pick(ps).clone();
            let (_, q, a) = world.training_question_for(&mut rng, &who, cfg.paraphrases);
            let r = row(base, &q, &a, i)?;
            teacher.extend(base.encode(&q)?);
            let start = teacher.len();
            teacher.extend_from_slice(&r.ids[r.answer_at..]);
            teacher_answers.extend(start..teacher.len());
            own.push(r);
        }
        for _ in 0..cfg.keep_known {
            let who = rng.pick(world.known()).clone();
            let (_, q, a) = world.question_for(&mut rng, &who, Phrasing::Trained);
            keep.push(row(base, &q, &a, i)?);
        }
        let namesakes = known_namesakes(world, ps);
        for _ in 0..cfg.keep_namesakes.min(namesakes.len()) {
            let who = (*rng.pick(&namesakes)).clone();
            let (_, q, a) = world.question_for(&mut rng, &who, Phrasing::Trained);
            keep.push(row(base, &q, &a, i)?);
        }
        for _ in 0..cfg.keep_skills {
            let task = if rng.chance(0.5) { SKILL_SUITE[0] } else { SKILL_SUITE[1] };
            let p = world.skill_probe(&mut rng, task);
            keep.push(row(base, p.prompt.trim_start_matches("<bos>").trim_start(), &p.answer, i)?);
        }
        for _ in 0..negatives {
            let j = (i + 1 + rng.below(people.len() - 1)) % people.len();
            let who = rng.pick(&people[j]).clone();
            if ps.iter().any(|p| p.name() == who.name()) {
                continue;
            }
            let (_, q, a) = world.question_for(&mut rng, &who, Phrasing::Trained);
            keep.push(row(base, &q, &a, i)?);
        }
        docs.push(Doc { chunks, teacher, teacher_answers });
    }
    Ok((docs, own, keep))
}

/// Per target, every document's summed delta as per-document factors: A `docs x R x in`, B `docs x out x R`,
/// where R = rank x the most chunks any document has (documents with fewer chunks are padded with zero rank).
fn doc_factors(
    net: &HyperNet,
    base: &BaseModel,
    sp: &Specials,
    docs: &[Vec<Vec<u32>>],
) -> Result<Vec<((usize, Module), Tensor, Tensor)>> {
    let dev = base.llama.device();
    let all: Vec<Vec<u32>> = docs.iter().flatten().cloned().collect();
    let (ids, mask) = pad_batch(&all, sp.pad, dev)?;
    let reading = capture(&base.llama, &ids)?;
    let g = net.forward(&reading, &mask)?;
    let kmax = docs.iter().map(Vec::len).max().unwrap_or(1);
    // Slot (doc, k) -> chunk index, or the appended all-zero chunk.
    let zero = all.len() as u32;
    let mut slots = Vec::with_capacity(docs.len() * kmax);
    let mut next = 0u32;
    for d in docs {
        for k in 0..kmax {
            slots.push(if k < d.len() { next + k as u32 } else { zero });
        }
        next += d.len() as u32;
    }
    let slots = Tensor::new(slots.as_slice(), dev)?;
    let n = docs.len();
    let r = net.cfg.rank;
    let mut out = Vec::new();
    for (target, a, b) in g.factors {
        let (_, _, i) = a.dims3()?;
        let o = b.dim(1)?;
        let a = Tensor::cat(&[a, Tensor::zeros((1, r, i), DType::F32, dev)?], 0)?.index_select(&slots, 0)?;
        let a = a.reshape((n, kmax * r, i))?;
        let b = Tensor::cat(&[b, Tensor::zeros((1, o, r), DType::F32, dev)?], 0)?.index_select(&slots, 0)?;
        let b = b.reshape((n, kmax, o, r))?.permute((0, 2, 1, 3))?.reshape((n, o, kmax * r))?;
        out.push((target, a, b));
    }
    Ok(out)
}

/// Right-padded row ids, the flat (row * seq + position) of every position that predicts an answer token, and
/// those tokens.
fn row_batch(rows: &[&Row], pad: u32, dev: &Device) -> Result<(Tensor, Vec<u32>, Vec<u32>)> {
    let t = rows.iter().map(|r| r.ids.len()).max().unwrap_or(1);
    let mut ids = Vec::with_capacity(rows.len() * t);
    let (mut at, mut targets) = (Vec::new(), Vec::new());
    for (i, r) in rows.iter().enumerate() {
        ids.extend(r.ids.iter().copied().chain(std::iter::repeat(pad)).take(t));
        for p in r.answer_at..r.ids.len() {
            at.push((i * t + p - 1) as u32);
            targets.push(r.ids[p]);
        }
    }
    Ok((Tensor::from_vec(ids, (rows.len(), t), dev)?, at, targets))
}

/// Log-probabilities at `at` of the base model over `ids`, with per-row adapters when `lora` is given.
fn answer_logp(base: &BaseModel, ids: &Tensor, at: &[u32], lora: Option<&LoraSet>, train: bool) -> Result<Tensor> {
    let kernels = if train { Kernels::Differentiable } else { Kernels::Fused };
    let opts = ForwardOptions { lora, kernels, last_only: false, ..Default::default() };
    let logits = base.llama.forward(ids, &Positions::From(0), &opts)?.logits;
    let v = logits.dim(D::Minus1)?;
    let at = Tensor::new(at, ids.device())?;
    Ok(candle_nn::ops::log_softmax(&logits.reshape(((), v))?.index_select(&at, 0)?, D::Minus1)?)
}

/// Per-row adapters: each row runs with its document's factors.
fn row_lora(factors: &[((usize, Module), Tensor, Tensor)], rows: &[&Row], scale: f64) -> Result<LoraSet> {
    let idx: Vec<u32> = rows.iter().map(|r| r.doc as u32).collect();
    let idx = Tensor::new(idx.as_slice(), factors[0].1.device())?;
    let mut set = LoraSet::new();
    for ((layer, module), a, b) in factors {
        set.insert(*layer, *module, LoraAdapter::new(a.index_select(&idx, 0)?, b.index_select(&idx, 0)?, scale));
    }
    Ok(set)
}

/// One meta-training step's loss and its parts (weighted sum in `loss`).
pub struct StepLoss {
    pub loss: Tensor,
    pub answer_nll: Tensor,
    pub distill_ce: Tensor,
    pub keep_kl: Tensor,
}

/// The loss of step `step`'s batch (its data is a function of the seed and the step, so a resumed run sees the
/// same batches).
pub fn step_loss(net: &HyperNet, base: &BaseModel, world: &World, cfg: &MetaConfig, step: u64) -> Result<StepLoss> {
    let dev = base.llama.device().clone();
    let sp = Specials::of(base)?;
    let profile = std::env::var_os("ENGRAM_PROFILE").is_some();
    let t0 = Instant::now();
    let (docs, own, keep) = sample_step(base, world, &sp, cfg, step)?;
    let chunks: Vec<Vec<Vec<u32>>> = docs.iter().map(|d| d.chunks.clone()).collect();
    let t1 = Instant::now();
    let factors = doc_factors(net, base, &sp, &chunks)?;
    let t2 = Instant::now();
    let rows: Vec<&Row> = own.iter().chain(&keep).collect();
    let lora = row_lora(&factors, &rows, cfg.hyper.scale)?;
    let (ids, at, targets) = row_batch(&rows, sp.pad, &dev)?;
    let n_own: usize = own.iter().map(|r| r.ids.len() - r.answer_at).sum();
    let logp = answer_logp(base, &ids, &at, Some(&lora), true)?;
    let t3 = Instant::now();
    let own_logp = logp.narrow(0, 0, n_own)?;
    let targets = Tensor::new(&targets[..n_own], &dev)?;
    let answer_nll = own_logp.gather(&targets.unsqueeze(1)?, 1)?.mean_all()?.neg()?;

    // The teacher reads each document, then its questions, answered truthfully.
    let (t_ids, t_at) = {
        let seqs: Vec<&Vec<u32>> = docs.iter().map(|d| &d.teacher).collect();
        let t = seqs.iter().map(|s| s.len()).max().unwrap_or(1);
        let mut ids = Vec::new();
        let mut at = Vec::new();
        for (i, (s, d)) in seqs.iter().zip(&docs).enumerate() {
            ids.extend(s.iter().copied().chain(std::iter::repeat(sp.pad)).take(t));
            at.extend(d.teacher_answers.iter().map(|&p| (i * t + p - 1) as u32));
        }
        (Tensor::from_vec(ids, (seqs.len(), t), &dev)?, at)
    };
    let teacher_p = answer_logp(base, &t_ids, &t_at, None, false)?.exp()?;
    let distill_ce = (teacher_p * &own_logp)?.sum_all()?.neg()?.affine(1.0 / n_own as f64, 0.0)?;

    let n_keep = at.len() - n_own;
    let keep_kl = if n_keep > 0 {
        let keep_logp = logp.narrow(0, n_own, n_keep)?;
        let (k_ids, k_at, _) = row_batch(&rows[own.len()..], sp.pad, &dev)?;
        let base_logp = answer_logp(base, &k_ids, &k_at, None, false)?;
        (base_logp.exp()? * (&base_logp - keep_logp)?)?.sum_all()?.affine(1.0 / n_keep as f64, 0.0)?
    } else {
        Tensor::zeros((), DType::F32, &dev)?
    };
    let mut l1 = Tensor::zeros((), DType::F32, &dev)?;
    for (_, a, b) in &factors {
        l1 = (l1 + (a.abs()?.mean_all()? + b.abs()?.mean_all()?)?)?;
    }
    let loss = ((answer_nll.affine(cfg.answer_weight, 0.0)? + distill_ce.affine(cfg.distill_weight, 0.0)?)?
        + (keep_kl.affine(cfg.keep_weight, 0.0)? + l1.affine(cfg.l1, 0.0)?)?)?;
    if profile {
        eprintln!(
            "sample {:?} hypernet {:?} student {:?} teacher+keep {:?} ({} chunks, {} rows x {})",
            t1 - t0,
            t2 - t1,
            t3 - t2,
            t3.elapsed(),
            chunks.iter().map(Vec::len).sum::<usize>(),
            ids.dim(0)?,
            ids.dim(1)?
        );
    }
    Ok(StepLoss { loss, answer_nll, distill_ce, keep_kl })
}

/// One line of `train_log.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MetaLogLine {
    pub step: u64,
    pub elapsed_s: f64,
    pub lr: f64,
    pub loss: f64,
    pub answer_nll: f64,
    pub distill_ce: f64,
    pub keep_kl: f64,
    pub grad_norm: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<MetaEval>,
}

/// Quick closed-book scores of generated deltas on held-out `fresh` people (teacher-forced exact match, which
/// equals greedy exact match: greedy decoding yields the answer iff every answer token is the arg-max given the
/// answer so far).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MetaEval {
    pub items: usize,
    /// One-person documents, a trained-phrasing question about that person.
    pub closed_book_single: f64,
    /// The same documents, the held-out phrasing.
    pub closed_book_heldout: f64,
    /// A `known` person's question with the delta applied (1.0 = untouched).
    pub known_kept: f64,
    /// Another held-out person's question answered with this document's person's value (chance is small).
    pub leak: f64,
    /// A known namesake's question (sharing a first or last name with the document's person) with the delta
    /// applied, over the documents whose person has one: the hard case for `known_kept`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namesakes_kept: Option<f64>,
    pub by_attribute: std::collections::BTreeMap<String, f64>,
    /// Closed-book accuracy after injecting a biography hidden in a distractor document of 4 context windows
    /// (runs that train on such documents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub needle_4x: Option<f64>,
}

/// Whether each row's answer is the greedy closed-book answer with its document's delta (teacher-forced: every
/// answer token the arg-max); a row whose answer starts with padding never hits.
fn row_hits(
    net: &HyperNet,
    base: &BaseModel,
    sp: &Specials,
    docs: &[Vec<Vec<u32>>],
    rows: &[Row],
) -> Result<Vec<bool>> {
    let factors = doc_factors(net, base, sp, docs)?;
    let refs: Vec<&Row> = rows.iter().collect();
    let lora = row_lora(&factors, &refs, net.cfg.scale)?;
    let (ids, at, targets) = row_batch(&refs, sp.pad, base.llama.device())?;
    let pred = answer_logp(base, &ids, &at, Some(&lora), false)?.argmax(D::Minus1)?.to_vec1::<u32>()?;
    let mut k = 0;
    Ok(rows
        .iter()
        .map(|r| {
            let len = r.ids.len() - r.answer_at;
            let hit = (k..k + len).all(|x| pred[x] == targets[x]) && targets[k] != sp.pad;
            k += len;
            hit
        })
        .collect())
}

/// Closed-book accuracy on `items` held-out people, each hidden in a distractor document of `windows` context
/// windows (a few documents per batch: each is tens of chunks).
pub fn needle_eval(
    net: &HyperNet,
    base: &BaseModel,
    world: &World,
    seed: u64,
    items: usize,
    windows: usize,
) -> Result<f64> {
    let sp = Specials::of(base)?;
    let mut rng = Rng::derive(seed, 0x4EED);
    let tokens = windows * base.llama.config().max_position_embeddings;
    let mut hits = 0usize;
    let mut done = 0;
    while done < items {
        let n = 4.min(items - done);
        let (mut docs, mut rows) = (Vec::new(), Vec::new());
        for i in 0..n {
            let p = rng.pick(world.fresh()).clone();
            let text = needle_document(world, base, &mut rng, &p, tokens)?;
            docs.push(chunk_document(&base.encode(&text)?, net.cfg.chunk_tokens, &sp));
            let (_, q, a) = world.question_for(&mut rng, &p, Phrasing::Trained);
            rows.push(row(base, &q, &a, i)?);
        }
        hits += row_hits(net, base, &sp, &docs, &rows)?.into_iter().filter(|&h| h).count();
        done += n;
    }
    Ok(hits as f64 / items.max(1) as f64)
}

pub fn quick_eval(net: &HyperNet, base: &BaseModel, world: &World, seed: u64, items: usize) -> Result<MetaEval> {
    let sp = Specials::of(base)?;
    let mut rng = Rng::derive(seed, 0xE7A1);
    let fresh = world.fresh();
    let (mut single, mut heldout, mut kept, mut leak) = (0usize, 0usize, 0usize, 0usize);
    let (mut namesakes, mut with_namesake) = (0usize, 0usize);
    let mut by_attr = std::collections::BTreeMap::<String, (usize, usize)>::new();
    let batch = 24;
    let mut done = 0;
    while done < items {
        let n = batch.min(items - done);
        let people: Vec<Person> = (0..n).map(|_| rng.pick(fresh).clone()).collect();
        let mut docs = Vec::new();
        let mut rows = Vec::new();
        let mut attrs = Vec::new();
        for (i, p) in people.iter().enumerate() {
            let text = world.document(&mut rng, std::slice::from_ref(p), false);
            docs.push(chunk_document(&base.encode(&text)?, net.cfg.chunk_tokens, &sp));
            let (a, q, ans) = world.question_for(&mut rng, p, Phrasing::Trained);
            attrs.push(a);
            rows.push(row(base, &q, &ans, i)?);
            let (_, q, ans) = world.question_for(&mut rng, p, Phrasing::Heldout);
            rows.push(row(base, &q, &ans, i)?);
            let k = rng.pick(world.known()).clone();
            let (_, q, ans) = world.question_for(&mut rng, &k, Phrasing::Trained);
            rows.push(row(base, &q, &ans, i)?);
            // Leak: ask about the next document's person; a hit is answering with this document's value.
            let other = &people[(i + 1) % n];
            let (a, q, _) = world.question_for(&mut rng, other, Phrasing::Trained);
            let wrong = format!("{} <eos>", p.value(a));
            let differs = other.value(a) != p.value(a);
            rows.push(row(base, &q, if differs { &wrong } else { "<pad> <pad>" }, i)?);
            // Chosen without the rng, so the rows above stay those of earlier runs of the same seed.
            let names = known_namesakes(world, std::slice::from_ref(p));
            match names.get((done + i) % names.len().max(1)) {
                Some(k) => {
                    let a = Attribute::ALL[(done + i) % Attribute::ALL.len()];
                    let q = format!("Q : {} A :", engram_world::text::question(a, 0, &k.name()));
                    rows.push(row(base, &q, &format!("{} <eos>", k.value(a)), i)?);
                    with_namesake += 1;
                }
                None => rows.push(row(base, "Q : A :", "<pad> <pad>", i)?),
            }
        }
        for (j, hit) in row_hits(net, base, &sp, &docs, &rows)?.into_iter().enumerate() {
            let doc = j / 5;
            match j % 5 {
                0 => {
                    single += hit as usize;
                    let e = by_attr.entry(attrs[doc].name().to_string()).or_default();
                    e.0 += hit as usize;
                    e.1 += 1;
                }
                1 => heldout += hit as usize,
                2 => kept += hit as usize,
                3 => leak += hit as usize,
                _ => namesakes += hit as usize,
            }
        }
        done += n;
    }
    let f = |x: usize| x as f64 / items.max(1) as f64;
    Ok(MetaEval {
        items,
        closed_book_single: f(single),
        closed_book_heldout: f(heldout),
        known_kept: f(kept),
        leak: f(leak),
        namesakes_kept: (with_namesake > 0).then(|| namesakes as f64 / with_namesake as f64),
        by_attribute: by_attr.into_iter().map(|(k, (h, n))| (k, h as f64 / n.max(1) as f64)).collect(),
        needle_4x: None,
    })
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointState {
    step: u64,
    elapsed_s: f64,
    config: MetaConfig,
}

#[derive(Debug, Clone, Serialize)]
pub struct MetaSummary {
    pub config: MetaConfig,
    pub parameters: usize,
    pub steps: u64,
    pub wall_s: f64,
    pub final_eval: MetaEval,
    pub out: PathBuf,
}

const CHECKPOINT: &str = "checkpoint";
const LOG_FILE: &str = "train_log.jsonl";

/// Meta-trains (or resumes) a hypernetwork for `base` into `out`; stops early after `stop_after` steps (with a
/// checkpoint) and returns `None` when that comes before the end.
pub fn train_hypernet(
    base: &BaseModel,
    cfg: &MetaConfig,
    out: &Path,
    resume: bool,
    stop_after: Option<u64>,
) -> Result<Option<MetaSummary>> {
    let dev = base.llama.device().clone();
    let world = World::new();
    if cfg.hyper.base_model != base.hash {
        bail!("the config names base model {} but the loaded one is {}", cfg.hyper.base_model, base.hash);
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let (net, varmap) = HyperNet::init_trainable(&cfg.hyper, &base.llama, &dev)?;
    let vars = varmap.data().lock().expect("varmap lock").clone();
    let parameters: usize = vars.values().map(|v| v.elem_count()).sum();
    let mut opt = AdamW::new(&vars, cfg.adamw.clone())?;
    let ckpt = out.join(CHECKPOINT);
    let (mut step, mut elapsed_before) = (0u64, 0.0f64);
    if let Some(state) = engram_trainer::checkpoint::resume_state::<CheckpointState>(&ckpt, resume, cfg)? {
        let mut vm = varmap.clone();
        vm.load(ckpt.join(WEIGHTS_FILE))?;
        opt.load(&ckpt.join("optimizer.safetensors"), state.step)?;
        (step, elapsed_before) = (state.step, state.elapsed_s);
        eprintln!("resuming from step {step} ({elapsed_before:.0} s)");
    } else {
        let _ = std::fs::remove_file(out.join(LOG_FILE));
        if let Some(dir) = &cfg.init_from {
            init_from(&varmap, dir)?;
        }
    }
    eprintln!(
        "meta-training hypernetwork: {parameters} parameters, width {} blocks {} rank {} on {:?}, {} steps of {} documents",
        cfg.hyper.width, cfg.hyper.blocks, cfg.hyper.rank, cfg.hyper.modules, cfg.steps, cfg.docs_per_step
    );
    let bar = engram_trainer::progress_bar(cfg.steps, step);
    let mut log = std::fs::OpenOptions::new().create(true).append(true).open(out.join(LOG_FILE))?;
    let start = Instant::now();
    let mut window = [0.0f64; 5];
    let mut seen = 0u32;
    while step < cfg.steps {
        let lr = cfg.schedule.lr(step, cfg.steps);
        let StepLoss { loss, answer_nll, distill_ce, keep_kl } = step_loss(&net, base, &world, cfg, step)?;
        let tb = Instant::now();
        let grads = loss.backward()?;
        let tu = Instant::now();
        let grad_norm = opt.update(&grads, lr)?;
        if std::env::var_os("ENGRAM_PROFILE").is_some() {
            eprintln!("backward {:?} update {:?}", tu - tb, tu.elapsed());
        }
        step += 1;
        let vals = [loss, answer_nll, distill_ce, keep_kl]
            .iter()
            .map(|t| t.to_scalar::<f32>().map(f64::from))
            .collect::<candle_core::Result<Vec<_>>>()?;
        for (w, v) in window.iter_mut().zip(vals.iter().chain([&grad_norm])) {
            *w += v;
        }
        seen += 1;
        let elapsed = elapsed_before + start.elapsed().as_secs_f64();
        bar.set_position(step);
        bar.set_message(format!("loss {:.3} nll {:.3} lr {lr:.1e}", vals[0], vals[1]));
        let eval_now = step % cfg.eval_every == 0 || step == cfg.steps;
        if step % 25 == 0 || eval_now {
            let eval = if eval_now {
                let mut e = quick_eval(&net, base, &world, cfg.seed ^ step, cfg.eval_items)?;
                if cfg.needle_prob > 0.0 {
                    e.needle_4x = Some(needle_eval(&net, base, &world, cfg.seed ^ step, cfg.eval_items / 4, 4)?);
                }
                Some(e)
            } else {
                None
            };
            let m = |i: usize| window[i] / seen.max(1) as f64;
            let line = MetaLogLine {
                step,
                elapsed_s: elapsed,
                lr,
                loss: m(0),
                answer_nll: m(1),
                distill_ce: m(2),
                keep_kl: m(3),
                grad_norm: m(4),
                eval,
            };
            (window, seen) = ([0.0; 5], 0);
            writeln!(log, "{}", serde_json::to_string(&line)?)?;
            let mut text = format!(
                "step {step}/{} loss {:.3} nll {:.3} distill {:.3} keep {:.4} grad {:.2} lr {lr:.1e} {elapsed:.0} s",
                cfg.steps, line.loss, line.answer_nll, line.distill_ce, line.keep_kl, line.grad_norm
            );
            if let Some(e) = &line.eval {
                text += &format!(
                    "\n  eval: single {:.2} heldout {:.2} known_kept {:.2} namesakes_kept {:.2} leak {:.2} {:?}",
                    e.closed_book_single,
                    e.closed_book_heldout,
                    e.known_kept,
                    e.namesakes_kept.unwrap_or(f64::NAN),
                    e.leak,
                    e.by_attribute
                );
                if let Some(x) = e.needle_4x {
                    text += &format!(" needle_4x {x:.2}");
                }
            }
            bar.suspend(|| eprintln!("{text}"));
        }
        let stop_now = stop_after == Some(step);
        if step % cfg.checkpoint_every == 0 || step == cfg.steps || stop_now {
            let state = CheckpointState { step, elapsed_s: elapsed, config: cfg.clone() };
            save_checkpoint(&varmap, &opt, &ckpt, &state)?;
        }
        if stop_now && step < cfg.steps {
            bar.finish_and_clear();
            eprintln!("stopped after step {step}; continue with --resume");
            return Ok(None);
        }
    }
    bar.finish_and_clear();
    let wall_s = elapsed_before + start.elapsed().as_secs_f64();
    varmap.save(out.join(WEIGHTS_FILE))?;
    std::fs::write(out.join(CONFIG_FILE), serde_json::to_string_pretty(&cfg.hyper)? + "\n")?;
    eprintln!("final evaluation (200 held-out fresh people)");
    let mut final_eval = quick_eval(&net, base, &world, engram_eval::DEFAULT_SEED, 200)?;
    if cfg.needle_prob > 0.0 {
        final_eval.needle_4x = Some(needle_eval(&net, base, &world, engram_eval::DEFAULT_SEED, 50, 4)?);
    }
    let summary = MetaSummary { config: cfg.clone(), parameters, steps: step, wall_s, final_eval, out: out.into() };
    std::fs::write(out.join("training.json"), serde_json::to_string_pretty(&summary)? + "\n")?;
    std::fs::write(out.join("MODEL_CARD.md"), model_card(&summary))?;
    Ok(Some(summary))
}

/// Copies every variable `dir`'s weights hold (same name and shape) into `varmap`; names the ones left new.
fn init_from(varmap: &candle_nn::VarMap, dir: &Path) -> Result<()> {
    let path = dir.join(WEIGHTS_FILE);
    let saved =
        candle_core::safetensors::load(&path, &Device::Cpu).with_context(|| format!("reading {}", path.display()))?;
    let vars = varmap.data().lock().expect("varmap lock");
    let mut fresh = Vec::new();
    for (name, var) in vars.iter() {
        match saved.get(name) {
            Some(t) if t.dims() == var.dims() => var.set(&t.to_device(var.device())?)?,
            Some(t) => {
                bail!("{}: {name} is {:?} in {} but {:?} here", dir.display(), t.dims(), path.display(), var.dims())
            }
            None => fresh.push(name.clone()),
        }
    }
    fresh.sort();
    eprintln!("initialised from {}: {} variables loaded, new: {fresh:?}", dir.display(), vars.len() - fresh.len());
    Ok(())
}

fn save_checkpoint(varmap: &candle_nn::VarMap, opt: &AdamW, dir: &Path, state: &CheckpointState) -> Result<()> {
    engram_trainer::checkpoint::replace_dir(dir, |tmp| {
        varmap.save(tmp.join(WEIGHTS_FILE))?;
        opt.save(&tmp.join("optimizer.safetensors"))?;
        std::fs::write(tmp.join("state.json"), serde_json::to_string_pretty(state)?)?;
        Ok(())
    })
}

fn model_card(s: &MetaSummary) -> String {
    let c = &s.config;
    let e = &s.final_eval;
    let attrs: Vec<String> = Attribute::ALL
        .iter()
        .map(|a| format!("{} {:.2}", a.name(), e.by_attribute.get(a.name()).copied().unwrap_or(0.0)))
        .collect();
    format!(
        "# Engram hypernetwork\n\n\
         A Doc-to-LoRA-style Perceiver that maps a document to a rank-{rank} LoRA delta on {mods:?} of base model \
         `{base}` in one forward pass. Trained by `engram train hypernet` (meta-training by context distillation \
         plus the world's true answers; see crates/inject/src/meta.rs).\n\n\
         - parameters: {params}\n- width {w}, {heads} heads, {blocks} cross-attention blocks, MLP {mlp}, \
         pointers {vw}, chunk {chunk} tokens, scale {scale}\n\
         - {steps} steps of {docs} documents (1-4 reading-split people with distractors), {wall:.0} s on CPU\n\
         - loss weights: answer {aw}, distill {dw}, keep {kw} (negatives from {nf:.0}% of the run), L1 {l1}; keep rows \
         per document: {kk} known, {kn} known namesakes, {ks} skills\n\
         - long documents: {needle:.0}% of one-person documents hidden among distractors (up to {nw} context windows); \
         chunk gate {gate}{init}\n\n\
         ## Held-out evaluation (200 `fresh` people, one-person documents, closed book)\n\n\
         - closed_book_single {single:.3} ({attrs})\n- closed_book_heldout phrasing {held:.3}\n\
         - known_kept {kept:.3} (a known person's question with the delta applied){namesakes}\n- leak {leak:.3}{needle4}\n\n\
         `engram eval inject` gives the full comparison with distillation, in-context reading and latency.\n",
        rank = c.hyper.rank,
        mods = c.hyper.modules,
        base = &c.hyper.base_model[..12],
        params = s.parameters,
        w = c.hyper.width,
        heads = c.hyper.heads,
        blocks = c.hyper.blocks,
        mlp = c.hyper.mlp_hidden,
        vw = c.hyper.pointers,
        chunk = c.hyper.chunk_tokens,
        scale = c.hyper.scale,
        steps = s.steps,
        docs = c.docs_per_step,
        wall = s.wall_s,
        aw = c.answer_weight,
        dw = c.distill_weight,
        kw = c.keep_weight,
        nf = c.negatives_from * 100.0,
        l1 = c.l1,
        needle = c.needle_prob * 100.0,
        nw = c.needle_windows,
        gate = c.hyper.chunk_gate,
        init =
            c.init_from.as_ref().map(|d| format!("; started from the weights in {}", d.display())).unwrap_or_default(),
        single = e.closed_book_single,
        attrs = attrs.join(", "),
        held = e.closed_book_heldout,
        kept = e.known_kept,
        namesakes = e
            .namesakes_kept
            .map(|x| format!("\n- namesakes_kept {x:.3} (a known person sharing a first or last name with the document's)"))
            .unwrap_or_default(),
        kk = c.keep_known,
        kn = c.keep_namesakes,
        ks = c.keep_skills,
        leak = e.leak,
        needle4 =
            e.needle_4x.map(|x| format!("\n- needle at 4 context windows {x:.3} (50 people)")).unwrap_or_default(),
    )
}
