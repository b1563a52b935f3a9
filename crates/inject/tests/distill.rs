//! Context distillation on a model trained in seconds: the delta must pull the document-free student towards the
//! teacher that reads the document.

use candle_core::Device;
use engram_inject::{DistillConfig, DistillInjector, Injector};
use engram_model::BaseModel;
use engram_trainer::TrainConfig;
use engram_world::{Rng, World};

#[test]
fn distillation_moves_the_student_to_the_teacher_and_is_repeatable() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TrainConfig::tiny(5, 30);
    engram_trainer::train(&cfg, dir.path(), false).unwrap();
    let model = BaseModel::load(dir.path(), &Device::Cpu).unwrap();
    let world = World::new();
    let person = world.fresh()[3].clone();
    let doc = world.document(&mut Rng::derive(1, 2), &[person.clone()], false);

    let cfg = DistillConfig { steps: 25, ..Default::default() };
    let inj = DistillInjector::new(&model, cfg);
    let before = inj.distill_kl(&doc, None).unwrap();
    let out = inj.inject(&doc).unwrap();
    let after = inj.distill_kl(&doc, Some(&out.delta)).unwrap();
    // A 30-step, 32-wide model is close to random: its teacher's distributions depend on the document in ways a
    // rank-8 down_proj delta can only partly express (measured: 1.99 -> 1.51). Quality on the shipped model is
    // `engram eval inject`'s job; this checks the machinery moves the student towards the teacher.
    assert!(after < 0.85 * before, "KL to the teacher {before:.4} -> {after:.4}");
    assert_eq!(out.delta.meta.base_model, model.hash);
    assert_eq!(out.delta.target_modules(), ["mlp.down_proj"]);
    let shape = |m: &str| engram_model::Module::from_path(m).map(|m| m.dims(model.llama.config()));
    out.delta.validate(&model.hash, model.llama.config().num_hidden_layers, shape, 8, 1e3).unwrap();
    // Same document, same delta: an injection can be re-run and audited.
    assert_eq!(inj.inject(&doc).unwrap().delta.content_hash(), out.delta.content_hash());
    assert!(inj.inject("no names here").is_err());
}
