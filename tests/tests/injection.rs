//! Context distillation on the shipped base model: a fresh person's biography becomes a delta, and the model then
//! answers questions about that person with no document in context, about as well as it reads them in context.

use std::path::PathBuf;

use engram_inject::{DistillConfig, DistillInjector, Injector};
use engram_model::{BaseModel, LoraSet};
use engram_world::{Probe, Rng, World};

#[test]
fn distillation_teaches_the_shipped_model_a_fresh_person() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/base");
    let base = BaseModel::load(&dir, &candle_core::Device::Cpu).expect("models/base loads");
    let world = World::new();
    let injector = DistillInjector::new(&base, DistillConfig::default());
    let (mut before, mut in_context, mut after, mut total) = (0, 0, 0, 0);
    for (i, person) in world.fresh().iter().skip(100).take(3).enumerate() {
        let mut rng = Rng::derive(42, i as u64);
        let doc = world.document(&mut rng, std::slice::from_ref(person), false);
        let delta = injector.inject(&doc).unwrap().delta;
        let lora = LoraSet::from_delta(&delta, base.llama.device()).unwrap();
        for probe in world.closed_book_probes_all(person) {
            let with_doc =
                Probe { prompt: probe.prompt.replacen("<bos>", &format!("<bos> {doc}"), 1), ..probe.clone() };
            let score = |p: &Probe, l: Option<&LoraSet>| {
                engram_eval::score(&base.llama, &base.tokenizer, l, std::slice::from_ref(p)).unwrap()[0] as usize
            };
            before += score(&probe, None);
            in_context += score(&with_doc, None);
            after += score(&probe, Some(&lora));
            total += 1;
        }
    }
    eprintln!("{total} questions: closed book {before}, in context {in_context}, after distillation {after}");
    assert!(before * 5 <= total, "the base model already knows these people");
    assert!(in_context * 2 >= total, "the shipped model should read most of these in context");
    assert!(after * 10 >= in_context * 8, "distillation kept {after} of the {in_context} answers read in context");
}

/// The shipped hypernetwork reproduces the evaluation recorded when it was trained, and one forward pass per
/// document teaches the shipped model fresh people without touching the people it knew.
#[test]
fn shipped_hypernetwork_reproduces_its_card_and_teaches_fresh_people() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let base = BaseModel::load(&root.join("models/base"), &candle_core::Device::Cpu).expect("models/base loads");
    let hyper = root.join("models/hypernet");
    let training: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hyper.join("training.json")).unwrap()).unwrap();
    let net = engram_inject::HyperNet::load(&hyper, &base).unwrap();
    let world = World::new();
    let got = engram_inject::meta::quick_eval(&net, &base, &world, engram_eval::DEFAULT_SEED, 200).unwrap();
    for (field, value) in [
        ("closed_book_single", got.closed_book_single),
        ("closed_book_heldout", got.closed_book_heldout),
        ("known_kept", got.known_kept),
        ("namesakes_kept", got.namesakes_kept.expect("some evaluation people have known namesakes")),
    ] {
        let recorded = training["final_eval"][field].as_f64().unwrap();
        assert!((value - recorded).abs() <= 0.015, "{field}: recorded {recorded}, measured {value}");
    }
    // A biography hidden in a document of four context windows (about 23 chunks, most of them distractors).
    let recorded = training["final_eval"]["needle_4x"].as_f64().expect("the card records needle_4x");
    let needle = engram_inject::meta::needle_eval(&net, &base, &world, engram_eval::DEFAULT_SEED, 50, 4).unwrap();
    assert!((needle - recorded).abs() <= 0.02, "needle_4x: recorded {recorded}, measured {needle}");

    // Through the real injector (chunking, the stored delta format): every trained-phrasing question about each
    // person, closed book.
    let injector = engram_inject::HyperInjector::load(&hyper, &base).unwrap();
    let (mut after, mut known_kept, mut total, mut known_total) = (0, 0, 0, 0);
    for (i, person) in world.fresh().iter().skip(300).take(20).enumerate() {
        let mut rng = Rng::derive(43, i as u64);
        let doc = world.document(&mut rng, std::slice::from_ref(person), false);
        let delta = injector.inject(&doc).unwrap().delta;
        let lora = LoraSet::from_delta(&delta, base.llama.device()).unwrap();
        let mut probes: Vec<Probe> = world.closed_book_probes_all(person);
        total += probes.len();
        after += engram_eval::score(&base.llama, &base.tokenizer, Some(&lora), &probes)
            .unwrap()
            .iter()
            .filter(|&&h| h)
            .count();
        probes = (0..3)
            .map(|_| world.closed_book_probe(&mut rng, engram_world::Split::Known, engram_world::Phrasing::Trained))
            .collect();
        known_total += probes.len();
        known_kept += engram_eval::score(&base.llama, &base.tokenizer, Some(&lora), &probes)
            .unwrap()
            .iter()
            .filter(|&&h| h)
            .count();
    }
    eprintln!(
        "hypernet: {after}/{total} closed-book answers after injection; known people kept {known_kept}/{known_total}"
    );
    let recorded = training["final_eval"]["closed_book_single"].as_f64().unwrap();
    assert!(after as f64 >= (recorded - 0.1) * total as f64, "{after}/{total} against a recorded {recorded}");
    assert!(known_kept * 100 >= known_total * 95, "known people damaged: {known_kept}/{known_total}");
}
