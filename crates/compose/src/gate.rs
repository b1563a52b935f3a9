//! The capability gate: before a candidate state is served, a canary suite is scored on it, and a candidate whose
//! drop on any canary exceeds the threshold is rejected. Canaries: known facts, in-context reading, skills (each
//! against the base model's score), and a rolling sample of facts injected earlier (against the score the current
//! head has on them, so the gate notices an update that erases earlier updates).
//!
//! Canary probes are drawn with their own seed, never the evaluation's, so passing the gate is not the same as
//! passing the benchmark by construction.

use std::collections::{BTreeMap, VecDeque};

use anyhow::Result;
use engram_eval::exact_match;
use engram_model::{Llama, Tokenizer};
use engram_world::{Phrasing, Probe, Rng, Split, World, SKILL_SUITE};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GateConfig {
    /// Largest drop, in accuracy points (0-100), tolerated on any canary.
    pub max_drop_points: f64,
    /// Probes per fixed canary.
    pub items: usize,
    /// Earlier injected facts kept in the rolling canary.
    pub recent_facts: usize,
    pub seed: u64,
}

impl Default for GateConfig {
    fn default() -> Self {
        Self { max_drop_points: 2.0, items: 100, recent_facts: 100, seed: 0x6A7E }
    }
}

/// The gate's verdict on one candidate; stored with the version in the lineage.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GateReport {
    /// Accuracy per canary on the candidate.
    pub scores: BTreeMap<String, f64>,
    /// Drop per canary, in points (negative: the candidate does better).
    pub drops: BTreeMap<String, f64>,
    pub passed: bool,
    /// The canary with the largest drop and that drop.
    pub worst: (String, f64),
}

impl GateReport {
    /// Flat metrics as the lineage stores them with the version (`NewVersion::gate_metrics`): each canary's
    /// score and drop, and whether it passed.
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        let mut m = BTreeMap::new();
        for (k, v) in &self.scores {
            m.insert(format!("{k}.score"), *v);
        }
        for (k, v) in &self.drops {
            m.insert(format!("{k}.drop_points"), *v);
        }
        m.insert("passed".into(), if self.passed { 1.0 } else { 0.0 });
        m
    }
}

pub struct Gate {
    cfg: GateConfig,
    suites: Vec<(String, Vec<Probe>, f64)>,
    recent: VecDeque<Probe>,
    recent_reference: f64,
}

fn accuracy(model: &Llama, tokenizer: &Tokenizer, probes: &[Probe]) -> Result<f64> {
    if probes.is_empty() {
        return Ok(1.0);
    }
    let hits = exact_match(model, tokenizer, None, probes)?;
    Ok(hits.iter().filter(|&&h| h).count() as f64 / hits.len() as f64)
}

impl Gate {
    /// Draws the canaries and scores them on `base`, the reference for the fixed canaries.
    pub fn new(base: &Llama, tokenizer: &Tokenizer, cfg: GateConfig) -> Result<Self> {
        let world = World::new();
        let mut rng = Rng::derive(cfg.seed, 0x6A7E);
        let n = cfg.items;
        let known: Vec<Probe> =
            (0..n).map(|_| world.closed_book_probe(&mut rng, Split::Known, Phrasing::Trained)).collect();
        // Reading people: the evaluation reads fresh people; the gate must not share its probes.
        let reading: Vec<Probe> =
            (0..n).map(|i| world.reading_probe(&mut rng, Split::Reading, 1 + i % 2, Phrasing::Trained)).collect();
        let skills: Vec<Probe> = (0..n).map(|i| world.skill_probe(&mut rng, SKILL_SUITE[i % 2])).collect();
        let mut suites = Vec::new();
        for (name, probes) in [("known_facts", known), ("reading", reading), ("skills", skills)] {
            let reference = accuracy(base, tokenizer, &probes)?;
            suites.push((name.to_string(), probes, reference));
        }
        Ok(Self { cfg, suites, recent: VecDeque::new(), recent_reference: 1.0 })
    }

    pub fn config(&self) -> &GateConfig {
        &self.cfg
    }

    /// Scores `candidate` on every canary.
    pub fn check(&self, candidate: &Llama, tokenizer: &Tokenizer) -> Result<GateReport> {
        let mut scores = BTreeMap::new();
        let mut drops = BTreeMap::new();
        for (name, probes, reference) in &self.suites {
            let s = accuracy(candidate, tokenizer, probes)?;
            scores.insert(name.clone(), s);
            drops.insert(name.clone(), (reference - s) * 100.0);
        }
        if !self.recent.is_empty() {
            let probes: Vec<Probe> = self.recent.iter().cloned().collect();
            let s = accuracy(candidate, tokenizer, &probes)?;
            scores.insert("earlier_injections".into(), s);
            drops.insert("earlier_injections".into(), (self.recent_reference - s) * 100.0);
        }
        let worst = drops.iter().max_by(|a, b| a.1.total_cmp(b.1)).map(|(k, v)| (k.clone(), *v)).unwrap_or_default();
        Ok(GateReport { passed: worst.1 <= self.cfg.max_drop_points, scores, drops, worst })
    }

    /// Records an accepted candidate: its facts join the rolling canary, and the reference for earlier injections
    /// becomes the new head's score on them.
    pub fn admit(&mut self, head: &Llama, tokenizer: &Tokenizer, facts: &[Probe]) -> Result<()> {
        for f in facts {
            if self.recent.len() == self.cfg.recent_facts {
                self.recent.pop_front();
            }
            self.recent.push_back(f.clone());
        }
        let probes: Vec<Probe> = self.recent.iter().cloned().collect();
        self.recent_reference = accuracy(head, tokenizer, &probes)?;
        Ok(())
    }
}
