//! A tiny configuration trains in seconds: the loss falls, the output is a loadable model directory, and a stopped
//! run resumes from its checkpoint to the same weights as an uninterrupted one.

use engram_model::{BaseModel, Llama};
use engram_trainer::{train, train_until, TrainConfig};

fn log_losses(dir: &std::path::Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect()
}

#[test]
fn tiny_training_learns_and_writes_a_model_directory() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TrainConfig::tiny(3, 100);
    let summary = train(&cfg, dir.path(), false).unwrap();
    assert_eq!(summary.steps, 100);
    let losses = log_losses(dir.path());
    assert!(losses.last().unwrap() < &(losses[0] - 0.5), "loss did not fall: {losses:?}");
    for f in ["config.json", "model.safetensors", "tokenizer.json", "MODEL_CARD.md", "training.json"] {
        assert!(dir.path().join(f).is_file(), "{f} missing");
    }
    let base = BaseModel::load(dir.path(), &candle_core::Device::Cpu).unwrap();
    assert_eq!(base.hash.len(), 64);
    let card = std::fs::read_to_string(dir.path().join("MODEL_CARD.md")).unwrap();
    assert!(card.contains("| steps | 100 |") && card.contains("icl_single"), "{card}");
    // Starting over on top of a checkpoint is refused rather than silently overwriting it.
    let err = train(&cfg, dir.path(), false).unwrap_err().to_string();
    assert!(err.contains("--resume"), "{err}");
}

#[test]
fn resumed_run_matches_an_uninterrupted_one() {
    let cfg = TrainConfig::tiny(4, 20);
    let whole = tempfile::tempdir().unwrap();
    train(&cfg, whole.path(), false).unwrap();

    let resumed = tempfile::tempdir().unwrap();
    assert!(train_until(&cfg, resumed.path(), false, Some(9)).unwrap().is_none());
    let mut other = cfg.clone();
    other.seed = 5;
    let err = train(&other, resumed.path(), true).unwrap_err().to_string();
    assert!(err.contains("different training config"), "{err}");
    let summary = train(&cfg, resumed.path(), true).unwrap();
    assert_eq!(summary.steps, 20);

    let a = Llama::load(whole.path(), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    let b = Llama::load(resumed.path(), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    for ((name, x), (_, y)) in a.named_tensors().iter().zip(b.named_tensors().iter()) {
        let diff = (x - y).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{name} differs by {diff} after resuming");
    }
}

#[test]
fn a_second_stage_starts_from_the_first_stages_weights() {
    let first = tempfile::tempdir().unwrap();
    train(&TrainConfig::tiny(6, 30), first.path(), false).unwrap();
    let first_losses = log_losses(first.path());

    // A second stage with drills, from the first stage's weights: its first loss starts where the first stage
    // ended, not where a fresh model starts.
    let mut cfg = TrainConfig::tiny(7, 25);
    cfg.init_from = Some(first.path().to_path_buf());
    cfg.mix.drill = Some(engram_trainer::Drill {
        weight: 1.0,
        people: [2, 2],
        attributes: [1, 2],
        until: 0,
        pairs: 0.0,
        pair_form: Default::default(),
    });
    let second = tempfile::tempdir().unwrap();
    train(&cfg, second.path(), false).unwrap();
    let second_losses = log_losses(second.path());
    assert!(
        second_losses[0] < first_losses[0] - 0.3,
        "second stage started at {} against a fresh start's {}",
        second_losses[0],
        first_losses[0]
    );
    let card = std::fs::read_to_string(second.path().join("MODEL_CARD.md")).unwrap();
    assert!(card.contains("binding drills") && card.contains("the weights of"), "{card}");

    // Weights of another shape are refused with the path named.
    let mut wrong = TrainConfig::tiny(7, 5);
    wrong.model.hidden_size *= 2;
    wrong.init_from = Some(first.path().to_path_buf());
    let err = format!("{:#}", train(&wrong, tempfile::tempdir().unwrap().path(), false).unwrap_err());
    assert!(err.contains("model shape"), "{err}");
}

/// Every committed recipe and the recorded configuration of the shipped base model parse, and a misspelt field is an
/// error that names it rather than silently the default.
#[test]
fn recipes_parse_and_a_misspelt_field_is_refused() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let world = engram_world::World::new();
    let tok = engram_trainer::tokenizer::build(&world).unwrap();
    let unk = tok.token_to_id("<unk>").unwrap();
    let mut seen = 0;
    for entry in std::fs::read_dir(root.join("recipes")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let cfg: TrainConfig = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if let Some(d) = &cfg.mix.drill {
            d.pair_form.check().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
        // Every word the recipe trains on is in the vocabulary.
        let mut rng = engram_world::Rng::derive(cfg.seed, 0);
        for step in 0..300 {
            let sample = cfg.mix.sample(&world, &mut rng, step);
            let text: Vec<&str> = sample.segments.iter().map(|g| g.text.as_str()).collect();
            let ids = engram_model::encode(&tok, &text.join(" ")).unwrap();
            assert!(!ids.contains(&unk), "{}: an unknown word in {text:?}", path.display());
        }
        seen += 1;
    }
    assert!(seen >= 5, "only {seen} recipes");
    let shipped: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("../../models/base/training.json")).unwrap()).unwrap();
    serde_json::from_value::<TrainConfig>(shipped["config"].clone()).unwrap();

    let mut recipe: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("recipes/bind-2-prompt.json")).unwrap()).unwrap();
    recipe["mix"]["drill"]["pair_prompt"] = "{N} ?".into();
    let e = serde_json::from_value::<TrainConfig>(recipe).unwrap_err().to_string();
    assert!(e.contains("pair_prompt"), "{e}");
}
