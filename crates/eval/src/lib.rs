//! Evaluations and benchmarks shared by the CLI, the trainer and the tests.
#![forbid(unsafe_code)]

pub mod bench;
pub mod heap;

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, Result};
use engram_model::{Llama, LoraSet, Tokenizer};
use engram_world::{Phrasing, Probe, Rng, Split, World, SKILL_SUITE};
use serde::Serialize;

pub const DEFAULT_SEED: u64 = 20261126;
pub const DEFAULT_ITEMS: usize = 200;

/// The base model's capabilities, each an exact-match accuracy over `items` probes.
#[derive(Debug, Clone, Serialize)]
pub struct BaseReport {
    pub seed: u64,
    pub items: usize,
    /// In context, one-person documents of fresh people.
    pub icl_single: f64,
    /// In context, four-person documents of fresh people.
    pub icl_multi: f64,
    /// In context, one-person documents, the question phrasing held out of all training.
    pub icl_heldout_phrasing: f64,
    /// Closed book, people the model memorised.
    pub closed_book_known: f64,
    /// Closed book, fresh people: should be near chance before any injection.
    pub closed_book_fresh: f64,
    /// Multi-digit addition and sequence copying.
    pub skills: f64,
    /// `icl_single` broken down by attribute.
    pub icl_single_by_attribute: BTreeMap<String, f64>,
    pub seconds: f64,
}

/// The suites of the base evaluation, in report order.
pub const SUITES: [&str; 6] =
    ["icl_single", "icl_multi", "icl_heldout_phrasing", "closed_book_known", "closed_book_fresh", "skills"];

/// The `p` quantile (0 to 1) of `xs`, nearest rank; NaN for none. Benchmarks report medians and tails with it.
pub fn percentile(xs: &[f64], p: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p.clamp(0.0, 1.0)).round() as usize]
}

/// Draws suite `index`'s `n` probes. People come from the `fresh` (held-out) split unless the suite is about known
/// people; the seed picks which.
pub fn suite_probes(world: &World, seed: u64, index: usize, n: usize) -> Vec<Probe> {
    let mut rng = Rng::derive(seed, index as u64);
    (0..n)
        .map(|i| match SUITES[index] {
            "icl_single" => world.reading_probe(&mut rng, Split::Fresh, 1, Phrasing::Trained),
            "icl_multi" => world.reading_probe(&mut rng, Split::Fresh, 4, Phrasing::Trained),
            "icl_heldout_phrasing" => world.reading_probe(&mut rng, Split::Fresh, 1, Phrasing::Heldout),
            "closed_book_known" => world.closed_book_probe(&mut rng, Split::Known, Phrasing::Trained),
            "closed_book_fresh" => world.closed_book_probe(&mut rng, Split::Fresh, Phrasing::Trained),
            "skills" => world.skill_probe(&mut rng, SKILL_SUITE[i % 2]),
            other => unreachable!("unknown suite {other}"),
        })
        .collect()
}

/// Greedy-decodes each probe and counts exact matches of the whole answer (including the closing `<eos>`).
pub fn score(llama: &Llama, tokenizer: &Tokenizer, lora: Option<&LoraSet>, probes: &[Probe]) -> Result<Vec<bool>> {
    let eos = tokenizer.token_to_id("<eos>").context("tokenizer has no <eos>")?;
    probes
        .iter()
        .map(|p| {
            let prompt = engram_model::encode(tokenizer, &p.prompt)?;
            let answer = engram_model::encode(tokenizer, &p.answer)?;
            let got = llama.generate_greedy(&prompt, answer.len(), eos, lora)?;
            Ok(got == answer)
        })
        .collect()
}

/// Exact match like [`score`], but teacher-forced and batched: a probe counts when the arg-max at every answer
/// position equals the answer token. That is the same verdict as greedy decoding (greedy reproduces the answer iff
/// each step's arg-max, fed the answer so far, is the next answer token) at a fraction of the cost, which is what
/// makes scoring thousands of facts after every few injections affordable. Rows are right-padded, and a causal model
/// never looks right, so padding changes nothing.
pub fn exact_match(
    llama: &Llama,
    tokenizer: &Tokenizer,
    lora: Option<&LoraSet>,
    probes: &[Probe],
) -> Result<Vec<bool>> {
    const BATCH: usize = 64;
    let pad = tokenizer.token_to_id("<pad>").context("tokenizer has no <pad>")?;
    let rows: Vec<(Vec<u32>, usize)> = probes
        .iter()
        .map(|p| {
            let mut ids = engram_model::encode(tokenizer, &p.prompt)?;
            let answer_at = ids.len();
            ids.extend(engram_model::encode(tokenizer, &p.answer)?);
            Ok((ids, answer_at))
        })
        .collect::<Result<_>>()?;
    let mut hits = Vec::with_capacity(rows.len());
    let opts = engram_model::ForwardOptions { lora, kernels: engram_model::Kernels::Fused, ..Default::default() };
    for batch in rows.chunks(BATCH) {
        let t = batch.iter().map(|(ids, _)| ids.len()).max().unwrap_or(1);
        let flat: Vec<u32> =
            batch.iter().flat_map(|(ids, _)| ids.iter().copied().chain(std::iter::repeat(pad)).take(t)).collect();
        let ids = candle_core::Tensor::from_vec(flat, (batch.len(), t), llama.device())?;
        let logits = llama.forward(&ids, &engram_model::Positions::From(0), &opts)?.logits;
        let pred = logits.argmax(candle_core::D::Minus1)?.to_vec2::<u32>()?;
        for ((ids, answer_at), row) in batch.iter().zip(&pred) {
            hits.push((*answer_at..ids.len()).all(|p| row[p - 1] == ids[p]));
        }
    }
    Ok(hits)
}

fn mean(hits: &[bool]) -> f64 {
    if hits.is_empty() {
        return 0.0;
    }
    hits.iter().filter(|&&h| h).count() as f64 / hits.len() as f64
}

/// Runs every suite with `items` probes each. `progress(done, total)` is called after each suite.
pub fn evaluate_base(
    llama: &Llama,
    tokenizer: &Tokenizer,
    world: &World,
    seed: u64,
    items: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<BaseReport> {
    let start = Instant::now();
    let mut acc = [0.0; 6];
    let mut by_attribute = BTreeMap::new();
    for (i, slot) in acc.iter_mut().enumerate() {
        let probes = suite_probes(world, seed, i, items);
        let hits = score(llama, tokenizer, None, &probes)?;
        *slot = mean(&hits);
        if SUITES[i] == "icl_single" {
            for a in engram_world::Attribute::ALL {
                let h: Vec<bool> =
                    probes.iter().zip(&hits).filter(|(p, _)| p.attribute == Some(a)).map(|(_, &h)| h).collect();
                by_attribute.insert(a.name().to_string(), mean(&h));
            }
        }
        progress(i + 1, SUITES.len());
    }
    Ok(BaseReport {
        seed,
        items,
        icl_single: acc[0],
        icl_multi: acc[1],
        icl_heldout_phrasing: acc[2],
        closed_book_known: acc[3],
        closed_book_fresh: acc[4],
        skills: acc[5],
        icl_single_by_attribute: by_attribute,
        seconds: start.elapsed().as_secs_f64(),
    })
}

impl BaseReport {
    /// A human table.
    pub fn table(&self) -> String {
        let mut s = format!("base model evaluation (seed {}, {} items per suite)\n", self.seed, self.items);
        s += &format!("{:<24} {:>8}\n", "suite", "accuracy");
        for (name, v) in [
            ("icl_single", self.icl_single),
            ("icl_multi", self.icl_multi),
            ("icl_heldout_phrasing", self.icl_heldout_phrasing),
            ("closed_book_known", self.closed_book_known),
            ("closed_book_fresh", self.closed_book_fresh),
            ("skills", self.skills),
        ] {
            s += &format!("{name:<24} {v:>8.3}\n");
        }
        let attrs: Vec<String> = self.icl_single_by_attribute.iter().map(|(k, v)| format!("{k} {v:.2}")).collect();
        s += &format!("icl_single by attribute: {}\n", attrs.join(", "));
        s += &format!("took {:.1} s\n", self.seconds);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_the_nearest_rank() {
        let xs = [5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!((percentile(&xs, 0.0), percentile(&xs, 0.5), percentile(&xs, 1.0)), (1.0, 3.0, 5.0));
        assert_eq!(percentile(&[2.0, 1.0, 4.0, 3.0], 0.5), 3.0);
        assert!(percentile(&[], 0.5).is_nan());
    }

    #[test]
    fn teacher_forced_exact_match_agrees_with_greedy_decoding() {
        let base = engram_model::BaseModel::load(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/base"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let world = World::new();
        // A mix of hits and misses: known people (mostly right), fresh people (mostly wrong), reading, skills.
        let probes: Vec<Probe> = (0..SUITES.len()).flat_map(|i| suite_probes(&world, 7, i, 12)).collect();
        let greedy = score(&base.llama, &base.tokenizer, None, &probes).unwrap();
        let forced = exact_match(&base.llama, &base.tokenizer, None, &probes).unwrap();
        assert_eq!(greedy, forced);
        assert!(forced.iter().any(|&h| h) && forced.iter().any(|&h| !h), "the sample must hold hits and misses");
    }

    #[test]
    fn probes_depend_on_the_seed_and_draw_fresh_people() {
        let world = World::new();
        let fresh: Vec<String> = world.fresh().iter().map(|p| p.name()).collect();
        let known: Vec<String> = world.known().iter().map(|p| p.name()).collect();
        for (i, suite) in SUITES.iter().enumerate() {
            let a = suite_probes(&world, 1, i, 20);
            let b = suite_probes(&world, 1, i, 20);
            let c = suite_probes(&world, 2, i, 20);
            assert_eq!(
                a.iter().map(|p| &p.prompt).collect::<Vec<_>>(),
                b.iter().map(|p| &p.prompt).collect::<Vec<_>>()
            );
            assert_ne!(
                a.iter().map(|p| &p.prompt).collect::<Vec<_>>(),
                c.iter().map(|p| &p.prompt).collect::<Vec<_>>()
            );
            if suite.starts_with("icl") || *suite == "closed_book_fresh" {
                for p in &a {
                    assert!(fresh.iter().any(|n| p.prompt.contains(n.as_str())), "{suite}: {}", p.prompt);
                    assert!(!known.iter().any(|n| p.prompt.contains(n.as_str())), "{suite}: {}", p.prompt);
                }
            }
        }
    }
}
