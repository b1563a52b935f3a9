//! Composition on the shipped models: what naive accumulation breaks, the memit strategy keeps, and the gate
//! tells the two apart. These are the regression thresholds for `engram bench sequential` at a size CI affords.

use std::path::PathBuf;
use std::sync::OnceLock;

use engram_compose::sequential::{run, SequentialConfig, SequentialReport};
use engram_compose::{Gate, GateConfig, Memit, MemitConfig, MemoryConfig, Naive, SideMemoryStrategy, Strategy};
use engram_inject::{HyperInjector, Injector};
use engram_model::BaseModel;
use engram_world::{Rng, World};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn base() -> &'static BaseModel {
    static BASE: OnceLock<BaseModel> = OnceLock::new();
    BASE.get_or_init(|| BaseModel::load(&root().join("models/base"), &candle_core::Device::Cpu).unwrap())
}

/// One memory strategy for every test: it is stateless (its entries live in the chain), and measuring its protected
/// positions is the slow part.
fn memory() -> std::sync::MutexGuard<'static, SideMemoryStrategy> {
    static MEMORY: OnceLock<std::sync::Mutex<SideMemoryStrategy>> = OnceLock::new();
    MEMORY
        .get_or_init(|| {
            let base = base();
            std::sync::Mutex::new(
                SideMemoryStrategy::new(&base.llama, &base.tokenizer, MemoryConfig::default()).unwrap(),
            )
        })
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

fn bench(strategy: &mut dyn Strategy, n: usize) -> SequentialReport {
    bench_documents_of(strategy, n, 1)
}

fn bench_documents_of(strategy: &mut dyn Strategy, n: usize, people_per_doc: usize) -> SequentialReport {
    let base = base();
    let injector = HyperInjector::load(&root().join("models/hypernet"), base).unwrap();
    let mut cfg = SequentialConfig::new(n);
    cfg.people_per_doc = people_per_doc;
    cfg.eval_every = n;
    cfg.locality_items = 100;
    let r = run(base, &injector, strategy, 0.0, &cfg, &mut |_| {}).unwrap();
    eprint!("{}", r.table());
    r
}

#[test]
fn memit_keeps_twenty_documents_that_naive_accumulation_destroys() {
    let base = base();
    let naive = bench(&mut Naive, 20).last;
    let mut memit = Memit::new(&base.llama, &base.tokenizer, MemitConfig::default()).unwrap();
    let kept = bench(&mut memit, 20).last;
    // Naive: hypernetwork deltas share a large person-independent part, so twenty of them add up to several
    // times the base weights.
    assert!(naive.locality < 0.5, "naive accumulation no longer collapses: locality {}", naive.locality);
    assert!(naive.drift > 2.0, "naive drift {}", naive.drift);
    assert!(kept.reliability >= 0.9, "memit reliability {}", kept.reliability);
    // Known recall, one-person reading and skills stay within 3%. Four-person reading keeps a looser floor: on the
    // previous base it sat at chance (0.275), where 100 items move its ratio by about 0.16 from sampling alone.
    for (suite, kept_ratio) in &kept.locality_by_suite {
        let floor = if suite == "icl_multi" { 0.8 } else { 0.97 };
        assert!(*kept_ratio >= floor, "memit locality on {suite}: {kept_ratio}");
    }
    assert!(kept.drift < 1.0, "memit drift {}", kept.drift);
}

#[test]
fn side_memory_keeps_forty_documents_exactly_and_leaves_the_model_alone() {
    let r = bench(&mut *memory(), 40).last;
    // One entry per fact: its value reaches the candidate's answer on its own (memit at this size: ~0.9).
    assert!(r.reliability >= 0.95, "memory reliability {}", r.reliability);
    // The held-out phrasing reaches its entry through the unsure threshold and keys centred on their attribute:
    // 0.875 here, 0.84 at N=1000 (0.49 without the unsure threshold, 0.76 with it on uncentred keys).
    assert!(r.generalization >= 0.8, "memory generalization {}", r.generalization);
    // Entries stay below every protected position's cosine: known recall, reading and skills are untouched.
    assert!(r.locality >= 0.99, "memory locality {}", r.locality);
    // No weight moves: every entry lives beside the model.
    assert!(r.drift.abs() < 1e-9, "memory drift {}", r.drift);
    assert_eq!(r.chain_length, 40);
}

/// Four people per document: the hypernetwork's delta writes each attribute's values without tying them to names
/// (one answer in four right), while the base model reads such documents in context at 0.96. The memory strategy
/// takes its answers from that reading.
#[test]
fn side_memory_writes_four_person_documents_as_the_model_reads_them() {
    let read = bench_documents_of(&mut *memory(), 10, 4).last;
    let setup = memory().setup().unwrap();
    let base = base();
    let cfg = MemoryConfig { read_in_context: false, ..Default::default() };
    let mut from_candidate = SideMemoryStrategy::from_setup(&base.llama, &base.tokenizer, cfg, &setup).unwrap();
    let written = bench_documents_of(&mut from_candidate, 10, 4).last;
    eprintln!(
        "40 people in 10 documents: reliability {} read in context, {} from the candidate",
        read.reliability, written.reliability
    );
    assert!(read.reliability >= 0.85, "four-person documents read in context: reliability {}", read.reliability);
    assert!(
        read.reliability > written.reliability,
        "reading {} against the candidate {}",
        read.reliability,
        written.reliability
    );
    assert!(read.locality >= 0.99, "memory locality {}", read.locality);
}

#[test]
fn a_memory_chain_compacts_into_one_delta_serving_the_same_answers() {
    let base = base();
    let world = World::new();
    let injector = HyperInjector::load(&root().join("models/hypernet"), base).unwrap();
    let mut memory = memory();
    let mut rng = Rng::derive(12, 4);
    let people = world.new_people(&mut rng, 3);
    let mut head = base.llama.clone();
    let mut chain = Vec::new();
    // What each candidate delta itself answers closed book (the entries take their answers from the model reading
    // the document, which on one-person documents agrees with the candidate).
    let mut written = 0;
    for p in &people {
        let doc = world.document(&mut rng, std::slice::from_ref(p), false);
        let candidate = injector.inject(&doc).unwrap().delta;
        let lora = engram_model::LoraSet::from_delta(&candidate, base.llama.device()).unwrap();
        let own = world.closed_book_probes_all(p);
        written += engram_eval::exact_match(&base.llama, &base.tokenizer, Some(&lora), &own)
            .unwrap()
            .iter()
            .filter(|&&x| x)
            .count();
        let d = memory.compose(&head, &doc, candidate).unwrap();
        assert!(d.adapters.is_empty() && d.memory.as_ref().unwrap().entries() == 5, "one entry per fact");
        base.check_delta(&d).unwrap();
        head = head.merged(&[&d]).unwrap();
        memory.accepted(&head, &doc).unwrap();
        chain.push(d);
    }
    assert_eq!(head.memory().unwrap().entries(), 15);
    let compacted = engram_lora::Delta::compact(&chain.iter().collect::<Vec<_>>(), Default::default()).unwrap();
    let rebuilt = base.llama.merged(&[&compacted]).unwrap();
    let probes: Vec<_> = people.iter().flat_map(|p| world.closed_book_probes_all(p)).collect();
    let a = engram_eval::exact_match(&head, &base.tokenizer, None, &probes).unwrap();
    let b = engram_eval::exact_match(&rebuilt, &base.tokenizer, None, &probes).unwrap();
    assert_eq!(a, b);
    let served = a.iter().filter(|&&x| x).count();
    eprintln!("served {served} of 30, the candidates alone {written}");
    // Nothing the injector wrote is lost, and the compacted delta serves the same answers.
    assert!(served >= written && served >= 24, "{a:?} (the candidates alone answered {written})");
    // The base model knew none of it.
    let before = engram_eval::exact_match(&base.llama, &base.tokenizer, None, &probes).unwrap();
    assert!(before.iter().filter(|&&x| x).count() <= 3, "{before:?}");
}

/// Sabotages every other new document the first time it is composed (its candidate, blown up 30 times, added
/// as it is); composes everything else, retries included, with the memory strategy.
struct SabotageFirstOffers<'a> {
    inner: &'a mut SideMemoryStrategy,
    seen: std::collections::HashSet<String>,
}

impl Strategy for SabotageFirstOffers<'_> {
    fn name(&self) -> &'static str {
        "sabotage"
    }

    fn compose(
        &mut self,
        head: &engram_model::Llama,
        document: &str,
        mut candidate: engram_lora::Delta,
    ) -> anyhow::Result<engram_lora::Delta> {
        let first = self.seen.insert(document.to_string());
        if first && self.seen.len().is_multiple_of(2) {
            candidate.meta.scale *= 30.0;
            return Ok(candidate);
        }
        self.inner.compose(head, document, candidate)
    }

    fn accepted(&mut self, head: &engram_model::Llama, document: &str) -> anyhow::Result<()> {
        self.inner.accepted(head, document)
    }
}

#[test]
fn a_rejected_document_waits_for_the_next_consolidation_and_is_not_lost() {
    let base = base();
    let injector = HyperInjector::load(&root().join("models/hypernet"), base).unwrap();
    let mut memory = memory();
    let mut strategy = SabotageFirstOffers { inner: &mut memory, seen: Default::default() };
    let mut cfg = SequentialConfig::new(6);
    cfg.eval_every = 6;
    cfg.locality_items = 30;
    cfg.compact_every = 2;
    cfg.gate = Some(GateConfig { items: 40, ..Default::default() });
    let r = run(base, &injector, &mut strategy, 0.0, &cfg, &mut |_| {}).unwrap();
    eprint!("{}", r.table());
    // Documents 1, 3 and 5 are turned away. The consolidation after document 2 (two accepted versions) offers
    // document 1 again, composed properly this time: accepted. Documents 3 and 5 still wait: after document 4 the
    // chain holds one version, short of the next consolidation.
    let last = &r.last;
    assert_eq!((last.rejected, last.readmitted, last.queued, last.accepted), (3, 1, 2, 4), "{last:?}");
    assert_eq!(last.accepted + last.queued, last.documents, "a document was lost");
    assert_eq!(r.rejections.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![1, 3, 5]);
    assert_eq!(r.compactions, 1);
    // Four documents' facts are served, the two queued ones' are not yet (the base model guesses a few).
    assert!(last.reliability >= 0.6 && last.reliability <= 0.75, "reliability {}", last.reliability);
}

#[test]
fn a_memory_strategy_rebuilt_from_its_setup_composes_exactly_the_same_entries() {
    let base = base();
    let world = World::new();
    let injector = HyperInjector::load(&root().join("models/hypernet"), base).unwrap();
    let memory = memory();
    let setup = memory.setup().unwrap();
    let mut rebuilt = engram_compose::restored_strategy("memory", &base.llama, &base.tokenizer, &setup).unwrap();
    let mut rng = Rng::derive(13, 5);
    let who = world.new_people(&mut rng, 1);
    let doc = world.document(&mut rng, &who, false);
    let candidate = injector.inject(&doc).unwrap().delta;
    let mut memory = memory;
    let a = memory.compose(&base.llama, &doc, candidate.clone()).unwrap();
    let b = rebuilt.compose(&base.llama, &doc, candidate).unwrap();
    let diff = |x: &engram_lora::Delta, y: &engram_lora::Delta| {
        let (x, y) = (x.memory.as_ref().unwrap(), y.memory.as_ref().unwrap());
        let d = |u: &[f32], v: &[f32]| u.iter().zip(v).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        (d(&x.keys, &y.keys), d(&x.values, &y.values), d(&x.thresholds, &y.thresholds), d(&x.mean, &y.mean))
    };
    eprintln!("rebuilt from the setup, largest differences (keys, values, thresholds, mean): {:?}", diff(&a, &b));
    assert!(
        a == b && a.content_hash() == b.content_hash(),
        "a worker starting from the cached setup composes differently"
    );
    // A setup is refused where it does not fit.
    let e =
        engram_compose::SideMemoryStrategy::from_setup(&base.llama, &base.tokenizer, Default::default(), &setup[..100])
            .err()
            .unwrap();
    assert!(e.to_string().contains("not a memory strategy setup") || e.to_string().contains("bytes"), "{e}");
    // A setup cached by an older worker (v2: no attribute centres) is refused, so the worker measures again.
    let mut old = setup.clone();
    let magic = b"engram-memory-setup-v3\n";
    assert!(old.starts_with(magic), "the setup's magic changed: update this test");
    old[magic.len() - 2] = b'2';
    let e = engram_compose::SideMemoryStrategy::from_setup(&base.llama, &base.tokenizer, Default::default(), &old)
        .err()
        .unwrap();
    assert!(e.to_string().contains("not a memory strategy setup"), "{e}");
    let other = engram_compose::MemoryConfig { protected_samples: 10, ..Default::default() };
    let e = engram_compose::SideMemoryStrategy::from_setup(&base.llama, &base.tokenizer, other, &setup).err().unwrap();
    assert!(e.to_string().contains("another protected sample"), "{e}");
}

#[test]
fn the_gate_rejects_a_damaging_candidate_and_passes_a_composed_one() {
    let base = base();
    let world = World::new();
    let injector = HyperInjector::load(&root().join("models/hypernet"), base).unwrap();
    let gate = Gate::new(&base.llama, &base.tokenizer, GateConfig::default()).unwrap();
    let mut rng = Rng::derive(9, 9);
    let people = world.new_people(&mut rng, 5);
    let docs: Vec<String> = people.iter().map(|p| world.document(&mut rng, std::slice::from_ref(p), false)).collect();

    let unchanged = gate.check(&base.llama, &base.tokenizer).unwrap();
    assert!(unchanged.passed && unchanged.worst.1.abs() < 1e-9, "{unchanged:?}");

    let deltas: Vec<_> = docs.iter().map(|d| injector.inject(d).unwrap().delta).collect();
    let summed = base.llama.merged(&deltas.iter().collect::<Vec<_>>()).unwrap();
    let verdict = gate.check(&summed, &base.tokenizer).unwrap();
    assert!(!verdict.passed, "five summed hypernetwork deltas passed the gate: {verdict:?}");
    assert_eq!(verdict.metrics()["passed"], 0.0);
    assert!(verdict.metrics().contains_key("known_facts.drop_points"));
    // Far past the 2-point threshold, not a borderline call (stage 3 of the shipped hypernetwork, trained to keep
    // known namesakes and skills, brought this from over 10 points to 10).
    assert!(verdict.worst.1 > 2.0 * GateConfig::default().max_drop_points, "{verdict:?}");

    let mut memit = Memit::new(&base.llama, &base.tokenizer, MemitConfig::default()).unwrap();
    let composed = memit.compose(&base.llama, &docs[0], deltas[0].clone()).unwrap();
    let head = base.llama.merged(&[&composed]).unwrap();
    let verdict = gate.check(&head, &base.tokenizer).unwrap();
    assert!(verdict.passed, "one composed edit failed the gate: {verdict:?}");
}

#[test]
fn a_restored_memit_state_composes_exactly_what_the_original_would() {
    let base = base();
    let world = World::new();
    let injector = HyperInjector::load(&root().join("models/hypernet"), base).unwrap();
    let mut rng = Rng::derive(11, 3);
    let people = world.new_people(&mut rng, 3);
    let docs: Vec<String> = people.iter().map(|p| world.document(&mut rng, std::slice::from_ref(p), false)).collect();
    let mut first = Memit::new(&base.llama, &base.tokenizer, MemitConfig::default()).unwrap();
    let initial = first.save().unwrap();
    let mut head = base.llama.clone();
    for doc in &docs[..2] {
        let d = first.compose(&head, doc, injector.inject(doc).unwrap().delta).unwrap();
        head = head.merged(&[&d]).unwrap();
        first.accepted(&head, doc).unwrap();
    }
    // A second worker: fresh, then given the saved state (as a worker continuing another's chain would be).
    let mut second = Memit::new(&base.llama, &base.tokenizer, MemitConfig::default()).unwrap();
    second.restore(&first.save().unwrap()).unwrap();
    let candidate = injector.inject(&docs[2]).unwrap().delta;
    let a = first.compose(&head, &docs[2], candidate.clone()).unwrap();
    let b = second.compose(&head, &docs[2], candidate.clone()).unwrap();
    assert_eq!(a, b, "a restored state composed a different delta");
    // Back to the initial state: the same as a fresh strategy on the base model.
    second.restore(&initial).unwrap();
    assert_eq!(second.save().unwrap(), initial);
    assert_ne!(first.save().unwrap(), initial);
    assert!(Naive.restore(&initial).is_err(), "naive accepted memit's state");
}
