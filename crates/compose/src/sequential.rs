//! `engram bench sequential`: N documents injected one after another, the state carried from each to the next the
//! way the service carries a namespace's head (candidate from the injector, composed by the strategy, checked by
//! the gate when one is configured, merged; a rejected document waits for the next consolidation, which offers it
//! again on the head as it is then). Every `eval_every` documents it scores:
//! - `reliability`: closed-book exact match on every fact injected so far (all trained phrasings);
//! - `generalization`: the held-out question phrasing on the same facts;
//! - `locality`: the base evaluation's `closed_book_known`, `icl_single`, `icl_multi` and `skills`, each relative
//!   to the base model, and their minimum;
//! - the adapted weights' drift `|W - W0| / |W0|`, the injection and composition latency, protected dimensions.
//!
//! Scoring is teacher-forced exact match ([`engram_eval::exact_match`]), the same verdict as greedy decoding.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use anyhow::{bail, Result};
use engram_eval::{exact_match, suite_probes};
use engram_inject::Injector;
use engram_model::{BaseModel, Llama, Module};
use engram_world::{Probe, Rng, World};
use serde::Serialize;

use crate::{Gate, GateConfig, GateReport, Strategy};

#[derive(Debug, Clone, Serialize)]
pub struct SequentialConfig {
    /// Documents injected.
    pub n: usize,
    pub eval_every: usize,
    pub people_per_doc: usize,
    pub seed: u64,
    /// Probes per locality suite.
    pub locality_items: usize,
    pub gate: Option<GateConfig>,
    /// Every this many accepted versions a consolidation runs: documents the gate rejected since are offered again
    /// on the head, then the chain since the last compaction is replaced by one delta (their sum), as a compaction
    /// version in the lineage would; 0 never consolidates.
    pub compact_every: usize,
}

impl SequentialConfig {
    pub fn new(n: usize) -> Self {
        Self {
            n,
            eval_every: (n / 10).max(1),
            people_per_doc: 1,
            seed: 20261126,
            locality_items: 200,
            gate: None,
            compact_every: 100,
        }
    }
}

/// The base-evaluation suites locality is measured on (indices into [`engram_eval::SUITES`]).
const LOCALITY: [(&str, usize); 4] = [("closed_book_known", 3), ("icl_single", 0), ("icl_multi", 1), ("skills", 5)];

#[derive(Debug, Clone, Serialize)]
pub struct Point {
    /// Documents submitted so far.
    pub documents: usize,
    pub accepted: usize,
    /// Documents the gate turned away when first offered.
    pub rejected: usize,
    /// Of those, documents accepted when a later consolidation offered them again.
    pub readmitted: usize,
    /// Documents waiting in the queue for the next consolidation (`accepted + queued == documents`).
    pub queued: usize,
    /// Facts scored for reliability (every trained question about every submitted person).
    pub facts: usize,
    pub reliability: f64,
    pub generalization: f64,
    /// Minimum of `locality_by_suite`.
    pub locality: f64,
    /// Each suite's accuracy relative to the base model's.
    pub locality_by_suite: BTreeMap<String, f64>,
    /// Reliability on the first documents' facts (the first `eval_every` documents): what later updates erase.
    pub reliability_first: f64,
    /// `|W - W0|_F / |W0|_F` over the adapted weights.
    pub drift: f64,
    /// Mean milliseconds per document since the previous point: the injector's forward/fit, and composition
    /// (strategy, merge, gate, strategy update).
    pub inject_ms: f64,
    pub compose_ms: f64,
    pub protected_dims: Vec<usize>,
    /// Versions a replica applies to reach the head: the compactions so far plus the chain since the last one.
    pub chain_length: usize,
    pub elapsed_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SequentialReport {
    pub strategy: String,
    pub injector: String,
    pub config: SequentialConfig,
    /// The base model's accuracy on each locality suite.
    pub base: BTreeMap<String, f64>,
    /// Seconds spent before the first injection (the strategy's protected keys, the gate's references).
    pub setup_s: f64,
    pub curve: Vec<Point>,
    pub last: Point,
    /// Gate verdicts of rejected candidates (document index, report), retries included.
    pub rejections: Vec<(usize, GateReport)>,
    pub compactions: usize,
    /// Compaction time amortised over every accepted version, in milliseconds.
    pub compaction_ms_per_version: f64,
    /// Largest |weight difference| between the head rebuilt from the base and the compactions and the head
    /// built version by version: a compaction must serve what the chain served.
    pub compaction_max_error: f64,
    /// Injection latency (inject + compose + merge) on the bare base model and on the final head, timed
    /// alternately on the same documents so that the machine's drift over a long run cancels out.
    pub latency: LatencyCheck,
    pub wall_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencyCheck {
    pub documents: usize,
    pub rounds: usize,
    /// Milliseconds per document with the chain empty (N=0) and with the whole chain (N).
    pub empty_ms: f64,
    pub full_ms: f64,
    /// `full_ms / empty_ms`: what the chain's length costs an injection.
    pub ratio: f64,
}

fn accuracy(hits: &[bool]) -> f64 {
    hits.iter().filter(|&&h| h).count() as f64 / hits.len().max(1) as f64
}

/// `|W - W0|_F / |W0|_F` over every down_proj.
fn drift(head: &Llama, base: &Llama) -> Result<f64> {
    let (mut num, mut den) = (0.0, 0.0);
    for l in 0..base.config().num_hidden_layers {
        let w0 = base.weight(l, Module::Down);
        let w = head.weight(l, Module::Down);
        num += (w - w0)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        den += w0.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    Ok((num / den).sqrt())
}

/// The state a namespace serves as the benchmark carries it: the head, the chain since the last compaction, and the
/// gate's rolling canary.
struct Served {
    head: Llama,
    chain: Vec<engram_lora::Delta>,
    gate: Option<Gate>,
    accepted: usize,
}

struct Offer {
    /// The gate's verdict when it turned the document away.
    rejected: Option<GateReport>,
    inject_ms: f64,
    /// Composition, merge, gate and the strategy's update.
    compose_ms: f64,
}

impl Served {
    /// One document the way the service handles a job: the injector's candidate, composed by the strategy on the
    /// head, checked by the gate, and merged when it passes.
    fn offer(
        &mut self,
        injector: &dyn Injector,
        strategy: &mut dyn Strategy,
        tok: &engram_model::Tokenizer,
        doc: &str,
        facts: &[Probe],
    ) -> Result<Offer> {
        let t0 = Instant::now();
        let candidate = injector.inject(doc)?.delta;
        let t1 = Instant::now();
        let composed = strategy.compose(&self.head, doc, candidate)?;
        let next = self.head.merged(&[&composed])?;
        let verdict = self.gate.as_ref().map(|g| g.check(&next, tok)).transpose()?;
        let rejected = match verdict {
            Some(v) if !v.passed => Some(v),
            _ => {
                self.head = next;
                self.chain.push(composed);
                strategy.accepted(&self.head, doc)?;
                if let Some(g) = self.gate.as_mut() {
                    g.admit(&self.head, tok, facts)?;
                }
                self.accepted += 1;
                None
            }
        };
        let inject_ms = (t1 - t0).as_secs_f64() * 1e3;
        Ok(Offer { rejected, inject_ms, compose_ms: t1.elapsed().as_secs_f64() * 1e3 })
    }
}

/// Runs the benchmark. `setup_s` is what building `strategy` cost (reported, not timed here); `progress` gets a line
/// per evaluation point.
pub fn run(
    base: &BaseModel,
    injector: &dyn Injector,
    strategy: &mut dyn Strategy,
    setup_s: f64,
    cfg: &SequentialConfig,
    progress: &mut dyn FnMut(&Point),
) -> Result<SequentialReport> {
    let start = Instant::now();
    let world = World::new();
    let people_needed = cfg.n * cfg.people_per_doc;
    if people_needed > world.new_people_limit() {
        bail!("{people_needed} people asked for; the world has {} never-trained names", world.new_people_limit());
    }
    if cfg.n == 0 || cfg.eval_every == 0 || cfg.people_per_doc == 0 {
        bail!("n, eval_every and people_per_doc must be positive");
    }
    let (llama, tok) = (&base.llama, &base.tokenizer);
    let mut rng = Rng::derive(cfg.seed, 0x5E9);
    let people = world.new_people(&mut rng, people_needed);

    let t_setup = Instant::now();
    let locality: Vec<(&str, Vec<Probe>)> =
        LOCALITY.iter().map(|&(name, i)| (name, suite_probes(&world, cfg.seed, i, cfg.locality_items))).collect();
    let mut base_scores = BTreeMap::new();
    let mut base_hits = BTreeMap::new();
    for (name, probes) in &locality {
        let hits = exact_match(llama, tok, None, probes)?;
        base_scores.insert(name.to_string(), accuracy(&hits));
        base_hits.insert(name.to_string(), hits);
    }
    // ENGRAM_PROFILE: name every locality probe whose answer the chain changed.
    let profile = std::env::var_os("ENGRAM_PROFILE").is_some();
    let gate = cfg.gate.clone().map(|g| Gate::new(llama, tok, g)).transpose()?;
    let setup_s = setup_s + t_setup.elapsed().as_secs_f64();

    let mut served = Served { head: llama.clone(), chain: Vec::new(), gate, accepted: 0 };
    // What a replica would apply: compactions, then the chain since the last one (`served.chain`).
    let mut compacted: Vec<engram_lora::Delta> = Vec::new();
    let (mut compaction_s, mut compaction_err) = (0.0, 0.0f64);
    let (mut reliability, mut heldout) = (Vec::<Probe>::new(), Vec::<Probe>::new());
    let mut first_facts = 0;
    let (mut rejected, mut readmitted) = (0, 0);
    let mut rejections = Vec::new();
    // Documents the gate turned away, offered again at each consolidation: a rejection must not lose a document.
    let mut queue: VecDeque<(usize, String, Vec<Probe>)> = VecDeque::new();
    let (mut inject_ms, mut compose_ms) = (0.0, 0.0);
    let mut window = 0;
    let mut curve = Vec::new();
    for (i, who) in people.chunks(cfg.people_per_doc).enumerate() {
        let doc = world.document(&mut rng, who, false);
        let facts: Vec<Probe> = who.iter().flat_map(|p| world.closed_book_probes_all(p)).collect();
        reliability.extend(facts.iter().cloned());
        heldout.extend(who.iter().flat_map(|p| world.closed_book_probes_heldout(p)));
        if i < cfg.eval_every {
            first_facts = reliability.len();
        }

        let offer = served.offer(injector, strategy, tok, &doc, &facts)?;
        inject_ms += offer.inject_ms;
        compose_ms += offer.compose_ms;
        window += 1;
        if let Some(v) = offer.rejected {
            rejected += 1;
            rejections.push((i, v));
            queue.push_back((i, doc, facts));
        }
        if cfg.compact_every > 0 && served.chain.len() >= cfg.compact_every {
            let t = Instant::now();
            // The consolidation first offers the queued documents again, on the head as it is now.
            for (j, doc, facts) in std::mem::take(&mut queue) {
                match served.offer(injector, strategy, tok, &doc, &facts)?.rejected {
                    None => readmitted += 1,
                    Some(v) => {
                        rejections.push((j, v));
                        queue.push_back((j, doc, facts));
                    }
                }
            }
            let chain = std::mem::take(&mut served.chain);
            let meta = engram_lora::Meta { injector: "compaction".into(), ..chain[0].meta.clone() };
            compacted.push(engram_lora::Delta::compact(&chain.iter().collect::<Vec<_>>(), meta)?);
            compaction_s += t.elapsed().as_secs_f64();
            // The served state rebuilt from the base: it must equal the head built version by version.
            let rebuilt = llama.merged(&compacted.iter().collect::<Vec<_>>())?;
            for l in 0..llama.config().num_hidden_layers {
                let d = (rebuilt.weight(l, Module::Down) - served.head.weight(l, Module::Down))?;
                compaction_err = compaction_err.max(d.abs()?.max_all()?.to_scalar::<f32>()? as f64);
            }
        }

        let done = i + 1;
        if done % cfg.eval_every == 0 || done == cfg.n {
            let head = &served.head;
            let hits = exact_match(head, tok, None, &reliability)?;
            let mut by_suite = BTreeMap::new();
            for (name, probes) in &locality {
                let hits = exact_match(head, tok, None, probes)?;
                if profile {
                    for ((p, now), was) in probes.iter().zip(&hits).zip(&base_hits[*name]) {
                        if now != was {
                            eprintln!(
                                "locality {name} changed ({was} -> {now}) after {}: {} | {}",
                                i + 1,
                                p.prompt,
                                p.answer
                            );
                        }
                    }
                }
                let acc = accuracy(&hits);
                by_suite.insert(name.to_string(), acc / base_scores[*name].max(1e-9));
            }
            let point = Point {
                documents: done,
                accepted: served.accepted,
                rejected,
                readmitted,
                queued: queue.len(),
                facts: reliability.len(),
                reliability: accuracy(&hits),
                generalization: accuracy(&exact_match(head, tok, None, &heldout)?),
                locality: by_suite.values().copied().fold(f64::INFINITY, f64::min),
                locality_by_suite: by_suite,
                reliability_first: accuracy(&hits[..first_facts]),
                drift: drift(head, llama)?,
                inject_ms: inject_ms / window as f64,
                compose_ms: compose_ms / window as f64,
                protected_dims: strategy.protected_dims(),
                chain_length: compacted.len() + served.chain.len(),
                elapsed_s: start.elapsed().as_secs_f64(),
            };
            progress(&point);
            curve.push(point);
            (inject_ms, compose_ms, window) = (0.0, 0.0, 0);
        }
    }
    let latency = latency_check(
        llama,
        &served.head,
        &world,
        injector,
        strategy,
        &people[..cfg.n.min(5) * cfg.people_per_doc],
        cfg,
    )?;
    let last = curve.last().cloned().expect("n > 0 gives at least one point");
    Ok(SequentialReport {
        strategy: strategy.name().into(),
        injector: injector.name().into(),
        config: cfg.clone(),
        base: base_scores,
        setup_s,
        curve,
        last,
        rejections,
        compactions: compacted.len(),
        compaction_ms_per_version: compaction_s * 1e3 / served.accepted.max(1) as f64,
        compaction_max_error: compaction_err,
        latency,
        wall_s: start.elapsed().as_secs_f64(),
    })
}

/// Times what one more document costs on the empty chain and on the full `head`, alternating, three rounds over
/// the documents of `people` (already injected: only the cost matters here). The strategy composes without being
/// told of acceptance, so its state does not move.
fn latency_check(
    base: &Llama,
    head: &Llama,
    world: &World,
    injector: &dyn Injector,
    strategy: &mut dyn Strategy,
    people: &[engram_world::Person],
    cfg: &SequentialConfig,
) -> Result<LatencyCheck> {
    const ROUNDS: usize = 3;
    let mut rng = Rng::derive(cfg.seed, 0x1A7);
    let docs: Vec<String> = people.chunks(cfg.people_per_doc).map(|who| world.document(&mut rng, who, false)).collect();
    let mut one = |state: &Llama, doc: &str| -> Result<f64> {
        let t = Instant::now();
        let candidate = injector.inject(doc)?.delta;
        let composed = strategy.compose(state, doc, candidate)?;
        state.merged(&[&composed])?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    let (mut empty, mut full) = (0.0, 0.0);
    for _ in 0..ROUNDS {
        for doc in &docs {
            empty += one(base, doc)?;
            full += one(head, doc)?;
        }
    }
    let n = (ROUNDS * docs.len()).max(1) as f64;
    Ok(LatencyCheck {
        documents: docs.len(),
        rounds: ROUNDS,
        empty_ms: empty / n,
        full_ms: full / n,
        ratio: full / empty.max(1e-9),
    })
}

impl SequentialReport {
    /// The curve as CSV, one row per evaluation point.
    pub fn csv(&self) -> String {
        let suites: Vec<&str> = LOCALITY.iter().map(|(n, _)| *n).collect();
        let mut s = format!(
            "documents,accepted,rejected,readmitted,queued,facts,reliability,generalization,locality,{},reliability_first,drift,inject_ms,compose_ms,protected_dims,elapsed_s\n",
            suites.join(",")
        );
        for p in &self.curve {
            let loc: Vec<String> = suites.iter().map(|n| format!("{:.4}", p.locality_by_suite[*n])).collect();
            let dims: Vec<String> = p.protected_dims.iter().map(|d| d.to_string()).collect();
            s += &format!(
                "{},{},{},{},{},{},{:.4},{:.4},{:.4},{},{:.4},{:.4},{:.2},{:.2},{},{:.1}\n",
                p.documents,
                p.accepted,
                p.rejected,
                p.readmitted,
                p.queued,
                p.facts,
                p.reliability,
                p.generalization,
                p.locality,
                loc.join(","),
                p.reliability_first,
                p.drift,
                p.inject_ms,
                p.compose_ms,
                dims.join(" "),
                p.elapsed_s
            );
        }
        s
    }

    /// A human table.
    pub fn table(&self) -> String {
        let mut s = format!(
            "sequential injection: {} documents, strategy {}, injector {}{}\n",
            self.config.n,
            self.strategy,
            self.injector,
            if self.config.gate.is_some() { ", gated" } else { "" }
        );
        s += &format!(
            "{:>6} {:>6} {:>6} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>6} {:>9} {:>9}\n",
            "docs",
            "rej",
            "queue",
            "rel",
            "gen",
            "local",
            "known",
            "icl1",
            "icl4",
            "skills",
            "drift",
            "inject_ms",
            "compose_ms"
        );
        for p in &self.curve {
            let l = &p.locality_by_suite;
            s += &format!(
                "{:>6} {:>6} {:>6} {:>7.3} {:>7.3} {:>7.3} {:>7.3} {:>7.3} {:>7.3} {:>7.3} {:>6.3} {:>9.1} {:>9.1}\n",
                p.documents,
                p.rejected,
                p.queued,
                p.reliability,
                p.generalization,
                p.locality,
                l["closed_book_known"],
                l["icl_single"],
                l["icl_multi"],
                l["skills"],
                p.drift,
                p.inject_ms,
                p.compose_ms
            );
        }
        s += &format!(
            "{} compactions ({:.1} ms per version amortised, max weight error {:.1e}); setup {:.1} s, total {:.1} s\n",
            self.compactions, self.compaction_ms_per_version, self.compaction_max_error, self.setup_s, self.wall_s
        );
        let l = &self.latency;
        s += &format!(
            "latency per document, timed alternately: {:.1} ms on the empty chain, {:.1} ms after {} documents \
             ({:.2}x)\n",
            l.empty_ms, l.full_ms, self.config.n, l.ratio
        );
        s
    }
}
