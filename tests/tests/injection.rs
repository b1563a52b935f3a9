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
        for (a, q) in world.questions_about(&person.name()) {
            let probe = Probe {
                prompt: format!("<bos> {q}"),
                answer: format!("{} <eos>", person.value(a)),
                attribute: Some(a),
            };
            let with_doc = Probe { prompt: format!("<bos> {doc} {q}"), ..probe.clone() };
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
