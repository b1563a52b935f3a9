//! `engram eval inject` and `engram eval needle`: what an injected delta teaches, what it costs, and what it breaks.
//!
//! Every score is greedy exact match of the whole answer, closed book (no document in context) unless named
//! `in_context`. Documents are about `fresh` people, which neither the base model nor the hypernetwork ever saw.

use std::time::Instant;

use anyhow::Result;
use candle_core::Tensor;
use engram_eval::{percentile, score, suite_probes};
use engram_model::{BaseModel, ForwardOptions, LoraSet, Positions};
use engram_world::{Person, Phrasing, Probe, Rng, Split, World};
use serde::Serialize;

use crate::{DistillConfig, DistillInjector, HyperInjector, Injector};

/// Peak resident memory of this process since the last [`reset_peak_rss`], in MB (Linux; 0 elsewhere).
pub fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Resets the kernel's peak-RSS mark (`VmHWM`) to the current RSS, and the live-heap peak, so the next phase
/// measures its own peak.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    engram_eval::heap::reset_peak();
}

fn mean(hits: &[bool]) -> f64 {
    hits.iter().filter(|&&h| h).count() as f64 / hits.len().max(1) as f64
}

/// One injector's results.
#[derive(Debug, Clone, Serialize)]
pub struct InjectorReport {
    pub closed_book_single: f64,
    pub closed_book_multi: f64,
    pub heldout_phrasing: f64,
    /// Closed book / in context, on the same single-person items.
    pub relative_single: f64,
    pub relative_multi: f64,
    pub relative_heldout: f64,
    pub latency_ms_p50: f64,
    pub latency_ms_p95: f64,
    pub peak_rss_mb: f64,
    /// The most heap bytes live at once (counted by the `engram` binary's allocator; absent elsewhere).
    pub peak_heap_mb: Option<f64>,
    pub by_attribute: std::collections::BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct InjectReport {
    pub seed: u64,
    pub single_docs: usize,
    pub multi_docs: usize,
    /// Distillation runs on the first `distill_single_docs` / `distill_multi_docs` of the same documents (it
    /// costs seconds per document on CPU); its ratios use in-context scores on that subset.
    pub distill_single_docs: usize,
    pub distill_multi_docs: usize,
    pub distill_steps: usize,
    pub no_context_single: f64,
    pub in_context_single: f64,
    pub in_context_multi: f64,
    pub in_context_heldout: f64,
    /// One forward of the base model over the same single-person documents, on the process's thread pool and on
    /// the injection's own thread (injections run single-threaded); the ratio uses the faster.
    pub prefill_ms_p50: f64,
    pub prefill_injection_thread_ms_p50: f64,
    pub hypernet: InjectorReport,
    pub distill: InjectorReport,
    pub latency_ratio_hypernet_to_prefill: f64,
    /// Distillation steps and median milliseconds to reach the hypernetwork's closed-book accuracy on
    /// `match_docs` single-person documents (`None` when no tried step count reached it).
    pub match_docs: usize,
    /// The hypernetwork's accuracy on the match documents' questions (every trained phrasing, all attributes).
    pub match_target: f64,
    pub distill_steps_to_match: Option<usize>,
    pub distill_ms_to_match: Option<f64>,
    pub distill_match_curve: Vec<(usize, f64, f64)>,
    /// Worst drop, in points, of `closed_book_known`, `icl_single` and `skills` with one hypernet delta applied
    /// (worst over `canary_deltas` deltas).
    pub canary_drop: f64,
    pub canary_deltas: usize,
    pub canary: std::collections::BTreeMap<String, f64>,
    /// Every trained-phrasing question about the known people who share a first or last name with a canary
    /// delta's person, answered with that delta applied (the base model answers all of them): where one delta's
    /// damage to known facts concentrates.
    pub namesakes_kept: f64,
    pub namesake_probes: usize,
    pub seconds: f64,
}

/// A document and the closed-book probes about it, plus the same probes with the document in context.
struct Item {
    people: Vec<Person>,
    doc: String,
    closed: Vec<Probe>,
    heldout: Vec<Probe>,
}

fn items(world: &World, rng: &mut Rng, n: usize, people: usize) -> Vec<Item> {
    (0..n)
        .map(|_| {
            let ps: Vec<Person> = world.draw_people(rng, Split::Fresh, people);
            let doc = world.document(rng, &ps, false);
            let closed = ps.iter().map(|p| world.closed_book_probe_for(rng, p, Phrasing::Trained)).collect();
            let heldout = ps.iter().map(|p| world.closed_book_probe_for(rng, p, Phrasing::Heldout)).collect();
            Item { people: ps, doc, closed, heldout }
        })
        .collect()
}

/// The same probes, asked with the document in context.
fn in_context(item: &Item, probes: &[Probe]) -> Vec<Probe> {
    probes
        .iter()
        .map(|p| Probe {
            prompt: p.prompt.replacen("<bos>", &format!("<bos> {}", item.doc), 1),
            answer: p.answer.clone(),
            attribute: p.attribute,
        })
        .collect()
}

struct Run {
    single: Vec<bool>,
    single_attr: Vec<Option<engram_world::Attribute>>,
    heldout: Vec<bool>,
    multi: Vec<bool>,
    ms: Vec<f64>,
    peak: f64,
    peak_heap: Option<f64>,
}

/// One prefill of `ids` timed on the process's thread pool, then one on the injection's own thread (ms, ms).
fn timed_prefills(base: &BaseModel, hyper: &HyperInjector, ids: &Tensor) -> Result<(f64, f64)> {
    let timed = || -> Result<f64> {
        let s = Instant::now();
        base.llama.forward(ids, &Positions::From(0), &ForwardOptions::inference())?;
        Ok(s.elapsed().as_secs_f64() * 1e3)
    };
    Ok((timed()?, hyper.on_injection_thread(timed)?))
}

fn run_injector(
    base: &BaseModel,
    inj: &dyn Injector,
    single: &[Item],
    multi: &[Item],
    mut prefill_ms: Option<(&HyperInjector, &mut Vec<f64>, &mut Vec<f64>)>,
    progress: &mut dyn FnMut(&str),
) -> Result<Run> {
    let (l, t) = (&base.llama, &base.tokenizer);
    reset_peak_rss();
    let mut r = Run {
        single: vec![],
        single_attr: vec![],
        heldout: vec![],
        multi: vec![],
        ms: vec![],
        peak: 0.0,
        peak_heap: None,
    };
    let total = single.len() + multi.len();
    for (i, item) in single.iter().chain(multi).enumerate() {
        // The prefill the latency is compared with runs on the same document right before the injection, so
        // both see the same machine load.
        if let (Some((hyper, pool, own)), true) = (prefill_ms.as_mut(), i < single.len()) {
            let ids = Tensor::new(base.encode(&format!("<bos> {}", item.doc))?.as_slice(), l.device())?.unsqueeze(0)?;
            let (on_pool, on_own) = timed_prefills(base, hyper, &ids)?;
            pool.push(on_pool);
            own.push(on_own);
        }
        let start = Instant::now();
        let delta = inj.inject(&item.doc)?.delta;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        let lora = LoraSet::from_delta(&delta, l.device())?;
        if i < single.len() {
            r.ms.push(ms);
            r.single.extend(score(l, t, Some(&lora), &item.closed)?);
            r.single_attr.extend(item.closed.iter().map(|p| p.attribute));
            r.heldout.extend(score(l, t, Some(&lora), &item.heldout)?);
        } else {
            r.multi.extend(score(l, t, Some(&lora), &item.closed)?);
        }
        if (i + 1) % 10 == 0 || i + 1 == total {
            progress(&format!("{} {}/{total}", inj.name(), i + 1));
        }
    }
    r.peak = peak_rss_mb();
    r.peak_heap = engram_eval::heap::peak_mb();
    Ok(r)
}

fn report(r: &Run, ic_single: f64, ic_multi: f64, ic_heldout: f64) -> InjectorReport {
    let mut by = std::collections::BTreeMap::new();
    for a in engram_world::Attribute::ALL {
        let h: Vec<bool> =
            r.single.iter().zip(&r.single_attr).filter(|(_, x)| **x == Some(a)).map(|(&h, _)| h).collect();
        by.insert(a.name().to_string(), mean(&h));
    }
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    InjectorReport {
        closed_book_single: mean(&r.single),
        closed_book_multi: mean(&r.multi),
        heldout_phrasing: mean(&r.heldout),
        relative_single: ratio(mean(&r.single), ic_single),
        relative_multi: ratio(mean(&r.multi), ic_multi),
        relative_heldout: ratio(mean(&r.heldout), ic_heldout),
        latency_ms_p50: percentile(&r.ms, 0.5),
        latency_ms_p95: percentile(&r.ms, 0.95),
        peak_rss_mb: r.peak,
        peak_heap_mb: r.peak_heap,
        by_attribute: by,
    }
}

pub struct InjectEvalConfig {
    pub seed: u64,
    pub single_docs: usize,
    pub multi_docs: usize,
    /// Documents distillation runs on (a prefix of the single and four-person sets; `None` = all).
    pub distill_docs: Option<usize>,
    pub distill: DistillConfig,
    pub match_docs: usize,
    pub match_steps: Vec<usize>,
    pub canary_deltas: usize,
    pub canary_items: usize,
}

pub fn evaluate_inject(
    base: &BaseModel,
    hyper: &HyperInjector,
    cfg: &InjectEvalConfig,
    mut progress: impl FnMut(&str),
) -> Result<InjectReport> {
    let start = Instant::now();
    let world = World::new();
    let (l, t) = (&base.llama, &base.tokenizer);
    let mut rng = Rng::derive(cfg.seed, 0x1A7E);
    let single = items(&world, &mut rng, cfg.single_docs, 1);
    let multi = items(&world, &mut rng, cfg.multi_docs, 4);

    let closed: Vec<Probe> = single.iter().flat_map(|i| i.closed.clone()).collect();
    let no_context_single = mean(&score(l, t, None, &closed)?);
    let ic = |items: &[Item], heldout: bool| -> Result<f64> {
        let probes: Vec<Probe> =
            items.iter().flat_map(|i| in_context(i, if heldout { &i.heldout } else { &i.closed })).collect();
        Ok(mean(&score(l, t, None, &probes)?))
    };
    let (in_context_single, in_context_multi, in_context_heldout) =
        (ic(&single, false)?, ic(&multi, false)?, ic(&single, true)?);
    progress("baselines done");

    // A warm-up injection so one-time allocation is not charged to the first document.
    hyper.inject(&single[0].doc)?;
    let (mut prefill, mut prefill_own) = (Vec::new(), Vec::new());
    let h = run_injector(base, hyper, &single, &multi, Some((hyper, &mut prefill, &mut prefill_own)), &mut progress)?;
    let prefill_ms_p50 = percentile(&prefill, 0.5);
    let prefill_injection_thread_ms_p50 = percentile(&prefill_own, 0.5);
    let distiller = DistillInjector::new(base, cfg.distill.clone());
    let n_single = cfg.distill_docs.unwrap_or(single.len()).min(single.len());
    let n_multi = cfg.distill_docs.map_or(multi.len(), |n| n.div_ceil(4)).min(multi.len());
    let (d_single, d_multi) = (&single[..n_single], &multi[..n_multi]);
    let d = run_injector(base, &distiller, d_single, d_multi, None, &mut progress)?;
    let hypernet = report(&h, in_context_single, in_context_multi, in_context_heldout);
    let distill = if n_single == single.len() && n_multi == multi.len() {
        report(&d, in_context_single, in_context_multi, in_context_heldout)
    } else {
        report(&d, ic(d_single, false)?, ic(d_multi, false)?, ic(d_single, true)?)
    };

    // How many distillation steps match the hypernetwork, on the first `match_docs` documents, asking every
    // trained-phrasing question about each one's person (ten per document, so every attribute counts).
    let subset = &single[..cfg.match_docs.min(single.len())];
    let all_questions = |item: &Item| -> Vec<Probe> {
        let who = world.names_in(&item.doc);
        let person = world.fresh().iter().find(|p| who.contains(&p.name())).expect("a fresh person");
        world.closed_book_probes_all(person)
    };
    let accuracy = |inj: &dyn Injector| -> Result<(f64, f64)> {
        let (mut hits, mut ms) = (Vec::new(), Vec::new());
        for item in subset {
            let s = Instant::now();
            let delta = inj.inject(&item.doc)?.delta;
            ms.push(s.elapsed().as_secs_f64() * 1e3);
            hits.extend(score(l, t, Some(&LoraSet::from_delta(&delta, l.device())?), &all_questions(item))?);
        }
        Ok((mean(&hits), percentile(&ms, 0.5)))
    };
    let mut curve = Vec::new();
    let mut matched = None;
    let target = if subset.is_empty() { f64::NAN } else { accuracy(hyper)?.0 };
    for &steps in cfg.match_steps.iter().filter(|_| !subset.is_empty()) {
        let (acc, p50) = accuracy(&DistillInjector::new(base, DistillConfig { steps, ..cfg.distill.clone() }))?;
        curve.push((steps, acc, p50));
        progress(&format!("distill {steps} steps: {acc:.3} in {p50:.0} ms (hypernet {target:.3})"));
        if acc >= target {
            matched = Some((steps, p50));
            break;
        }
    }

    // Canaries: the base model's other abilities with one hypernet delta applied.
    let mut canary = std::collections::BTreeMap::new();
    let mut canary_drop: f64 = 0.0;
    let suites = [("closed_book_known", 3), ("icl_single", 0), ("skills", 5)];
    let deltas = single
        .iter()
        .take(cfg.canary_deltas)
        .map(|item| Ok(LoraSet::from_delta(&hyper.inject(&item.doc)?.delta, l.device())?))
        .collect::<Result<Vec<_>>>()?;
    for (name, idx) in suites {
        let probes = suite_probes(&world, cfg.seed, idx, cfg.canary_items);
        let before = mean(&score(l, t, None, &probes)?);
        canary.insert(format!("{name}_base"), before);
        for (k, lora) in deltas.iter().enumerate() {
            let after = mean(&score(l, t, Some(lora), &probes)?);
            canary.insert(format!("{name}_with_delta_{k}"), after);
            canary_drop = canary_drop.max((before - after) * 100.0);
        }
    }
    let mut kept = Vec::new();
    for (item, lora) in single.iter().zip(&deltas) {
        let probes: Vec<Probe> = crate::meta::known_namesakes(&world, &item.people)
            .into_iter()
            .flat_map(|k| world.closed_book_probes_all(k))
            .collect();
        let before = score(l, t, None, &probes)?;
        let after = score(l, t, Some(lora), &probes)?;
        kept.extend(before.iter().zip(&after).filter(|(b, _)| **b).map(|(_, a)| *a));
    }
    progress("canaries done");

    Ok(InjectReport {
        seed: cfg.seed,
        single_docs: single.len(),
        multi_docs: multi.len(),
        distill_single_docs: n_single,
        distill_multi_docs: n_multi,
        distill_steps: cfg.distill.steps,
        no_context_single,
        in_context_single,
        in_context_multi,
        in_context_heldout,
        prefill_ms_p50,
        prefill_injection_thread_ms_p50,
        latency_ratio_hypernet_to_prefill: hypernet.latency_ms_p50
            / prefill_ms_p50.min(prefill_injection_thread_ms_p50),
        hypernet,
        distill,
        match_docs: subset.len(),
        match_target: target,
        distill_steps_to_match: matched.map(|m| m.0),
        distill_ms_to_match: matched.map(|m| m.1),
        distill_match_curve: curve,
        canary_drop,
        canary_deltas: cfg.canary_deltas,
        canary,
        namesakes_kept: mean(&kept),
        namesake_probes: kept.len(),
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct NeedleLength {
    /// Document length as a multiple of the model's context window.
    pub windows: usize,
    pub tokens_mean: f64,
    pub chunks_mean: f64,
    pub closed_book: f64,
    pub latency_ms_p50: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct NeedleReport {
    pub seed: u64,
    pub items: usize,
    pub context_window: usize,
    pub lengths: Vec<NeedleLength>,
    /// Peak RSS while injecting one document of 1x and of 16x the window (chunks are encoded one at a time).
    pub peak_rss_mb_1x: f64,
    pub peak_rss_mb_16x: f64,
    pub peak_rss_ratio_16x_to_1x: f64,
    /// The most heap bytes live at once during the injection (the `engram` binary counts them; RSS also holds
    /// what the allocator caches), and the part of it the injection itself allocated.
    pub peak_heap_mb_1x: Option<f64>,
    pub peak_heap_mb_16x: Option<f64>,
    pub peak_heap_ratio_16x_to_1x: Option<f64>,
    pub injection_heap_mb_1x: Option<f64>,
    pub injection_heap_mb_16x: Option<f64>,
}

pub fn evaluate_needle(
    base: &BaseModel,
    hyper: &HyperInjector,
    seed: u64,
    items: usize,
    mut progress: impl FnMut(&str),
) -> Result<NeedleReport> {
    let world = World::new();
    let (l, t) = (&base.llama, &base.tokenizer);
    let window = l.config().max_position_embeddings;
    let mut rng = Rng::derive(seed, 0x4EED);
    let mut lengths = Vec::new();
    for windows in [1usize, 2, 4] {
        let (mut hits, mut ms, mut toks, mut chunks) = (Vec::new(), Vec::new(), 0usize, 0usize);
        for i in 0..items {
            let who = world.draw_people(&mut rng, Split::Fresh, 1).remove(0);
            let doc = crate::meta::needle_document(&world, base, &mut rng, &who, windows * window)?;
            toks += base.encode(&doc)?.len();
            chunks += hyper.chunks(&doc)?.len();
            let s = Instant::now();
            let delta = hyper.inject(&doc)?.delta;
            ms.push(s.elapsed().as_secs_f64() * 1e3);
            let probe = world.closed_book_probe_for(&mut rng, &who, Phrasing::Trained);
            hits.extend(score(l, t, Some(&LoraSet::from_delta(&delta, l.device())?), &[probe])?);
            if (i + 1) % 10 == 0 {
                progress(&format!("{windows}x window: {}/{items}", i + 1));
            }
        }
        lengths.push(NeedleLength {
            windows,
            tokens_mean: toks as f64 / items as f64,
            chunks_mean: chunks as f64 / items as f64,
            closed_book: mean(&hits),
            latency_ms_p50: percentile(&ms, 0.5),
        });
    }
    let who = world.draw_people(&mut rng, Split::Fresh, 1).remove(0);
    // (peak RSS, peak live heap, heap the injection itself added at its peak)
    let mut peak = |n: usize| -> Result<(f64, Option<f64>, Option<f64>)> {
        let doc = crate::meta::needle_document(&world, base, &mut rng, &who, n * window)?;
        reset_peak_rss();
        let before = engram_eval::heap::current_mb();
        hyper.inject(&doc)?;
        let heap = engram_eval::heap::peak_mb();
        Ok((peak_rss_mb(), heap, heap.zip(before).map(|(p, b)| p - b)))
    };
    let ((p1, h1, w1), (p16, h16, w16)) = (peak(1)?, peak(16)?);
    Ok(NeedleReport {
        seed,
        items,
        context_window: window,
        lengths,
        peak_rss_mb_1x: p1,
        peak_rss_mb_16x: p16,
        peak_heap_mb_1x: h1,
        peak_heap_mb_16x: h16,
        peak_heap_ratio_16x_to_1x: h16.zip(h1).map(|(a, b)| a / b),
        injection_heap_mb_1x: w1,
        injection_heap_mb_16x: w16,
        peak_rss_ratio_16x_to_1x: p16 / p1,
    })
}

/// `engram bench inject`: the hypernetwork's injection latency against one prefill of the same document, and
/// where the injection's time goes.
#[derive(Debug, Clone, Serialize)]
pub struct InjectBench {
    pub seed: u64,
    pub documents: usize,
    pub rounds: usize,
    pub tokens_mean: f64,
    /// A prefill on the process's thread pool (what `eval inject` compares with).
    pub prefill_ms_p50: f64,
    /// The same prefill on the injection's own thread (injections run single-threaded).
    pub prefill_injection_thread_ms_p50: f64,
    pub latency_ms_p50: f64,
    pub latency_ms_p95: f64,
    /// Injection p50 over the faster of the two prefill p50s. The goal: <= 1.5 (the floor is 1.0: the
    /// document must be read once).
    pub ratio: f64,
    /// The ratio per round, to show how much it moves on a shared machine.
    pub ratio_per_round: Vec<f64>,
    pub capture_ms_p50: f64,
    pub hypernet_ms_p50: f64,
    pub other_ms_p50: f64,
}

/// Times `rounds` passes over `documents` one-person fresh documents (the ones `eval inject` draws with the same
/// seed); each injection runs right after a bare prefill of the same document, so both see the same load.
pub fn bench_inject(
    base: &BaseModel,
    hyper: &HyperInjector,
    seed: u64,
    documents: usize,
    rounds: usize,
    mut progress: impl FnMut(&str),
) -> Result<InjectBench> {
    let world = World::new();
    let l = &base.llama;
    let mut rng = Rng::derive(seed, 0x1A7E);
    let docs: Vec<String> = items(&world, &mut rng, documents, 1).into_iter().map(|i| i.doc).collect();
    anyhow::ensure!(!docs.is_empty(), "--documents must be at least 1");
    let encoded = docs
        .iter()
        .map(|d| Ok(Tensor::new(base.encode(&format!("<bos> {d}"))?.as_slice(), l.device())?.unsqueeze(0)?))
        .collect::<Result<Vec<_>>>()?;
    let tokens_mean = encoded.iter().map(|t| t.dim(1).unwrap_or(0)).sum::<usize>() as f64 / docs.len() as f64;
    // Warm-up: one-time allocations are not charged to the first document.
    for (doc, ids) in docs.iter().zip(&encoded).take(3) {
        l.forward(ids, &Positions::From(0), &ForwardOptions::inference())?;
        hyper.inject(doc)?;
    }
    let (mut prefill, mut prefill_1, mut total) = (vec![], vec![], vec![]);
    let (mut capture, mut net, mut other) = (vec![], vec![], vec![]);
    let mut ratio_per_round = Vec::new();
    for round in 0..rounds {
        let (mut p, mut p1, mut t) = (vec![], vec![], vec![]);
        for (doc, ids) in docs.iter().zip(&encoded) {
            let (on_pool, on_own) = timed_prefills(base, hyper, ids)?;
            p.push(on_pool);
            p1.push(on_own);
            let s = Instant::now();
            let (_, times) = hyper.inject_timed(doc)?;
            t.push(s.elapsed().as_secs_f64() * 1e3);
            capture.push(times.capture_ms);
            net.push(times.hypernet_ms);
            other.push(times.other_ms);
        }
        ratio_per_round.push(percentile(&t, 0.5) / percentile(&p, 0.5).min(percentile(&p1, 0.5)));
        progress(&format!("round {}/{rounds}: ratio {:.3}", round + 1, ratio_per_round[round]));
        prefill.extend(p);
        prefill_1.extend(p1);
        total.extend(t);
    }
    let prefill_ms_p50 = percentile(&prefill, 0.5);
    let prefill_injection_thread_ms_p50 = percentile(&prefill_1, 0.5);
    let latency_ms_p50 = percentile(&total, 0.5);
    Ok(InjectBench {
        seed,
        documents: docs.len(),
        rounds,
        tokens_mean,
        prefill_ms_p50,
        prefill_injection_thread_ms_p50,
        latency_ms_p50,
        latency_ms_p95: percentile(&total, 0.95),
        ratio: latency_ms_p50 / prefill_ms_p50.min(prefill_injection_thread_ms_p50),
        ratio_per_round,
        capture_ms_p50: percentile(&capture, 0.5),
        hypernet_ms_p50: percentile(&net, 0.5),
        other_ms_p50: percentile(&other, 0.5),
    })
}
