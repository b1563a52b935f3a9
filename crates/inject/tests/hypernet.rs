//! The hypernetwork on a base model trained in seconds: chunking, a zero delta before training, gradients into
//! every weight, meta-training with checkpoint and resume, and injection through the saved network.

use std::collections::HashMap;

use candle_core::Device;
use engram_inject::hyper::{chunk_document, Specials};
use engram_inject::meta::step_loss;
use engram_inject::{train_hypernet, HyperInjector, HyperNet, Injector, MetaConfig};
use engram_model::BaseModel;
use engram_trainer::optim::AdamW;
use engram_trainer::{AdamWConfig, TrainConfig};
use engram_world::{Rng, World};

fn tiny_base(dir: &std::path::Path) -> BaseModel {
    engram_trainer::train(&TrainConfig::tiny(5, 20), dir, false).unwrap();
    BaseModel::load(dir, &Device::Cpu).unwrap()
}

#[test]
fn hypernetwork_chunks_trains_resumes_and_injects() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tiny_base(&tmp.path().join("base"));
    let world = World::new();
    let sp = Specials::of(&base).unwrap();

    // Chunks: sentence-aligned, within the limit, every body token kept in order.
    let people = world.draw_people(&mut Rng::new(1), engram_world::Split::Fresh, 8);
    let doc = world.document(&mut Rng::new(2), &people, true);
    let ids = base.encode(&doc).unwrap();
    let chunks = chunk_document(&ids, 40, &sp);
    assert!(chunks.len() >= 4, "{} chunks", chunks.len());
    let mut body = Vec::new();
    for c in &chunks {
        assert!(c.len() <= 40);
        assert_eq!((c[0], c[1], *c.last().unwrap()), (sp.bos, sp.doc, sp.end_doc));
        assert_eq!(c[c.len() - 2], sp.period, "chunks end at a sentence end");
        body.extend_from_slice(&c[2..c.len() - 1]);
    }
    let expected: Vec<u32> = ids.iter().copied().filter(|&t| t != sp.doc && t != sp.end_doc).collect();
    assert_eq!(body, expected);

    // Gradients reach every weight once B's scaler has moved off zero (at step 0 only it can move). Some
    // documents are long needle documents, so their path (and the chunk gate) trains too.
    let mut cfg = MetaConfig::tiny(&base, 7, 10);
    cfg.needle_prob = 0.3;
    cfg.needle_windows = 2.0;
    // Keep rows about known namesakes and skill tasks join the batch (and the gradient check below).
    cfg.keep_namesakes = 1;
    cfg.keep_skills = 1;
    assert!(cfg.hyper.chunk_gate);
    let (net, _) = HyperNet::init_trainable(&cfg.hyper, &base.llama, &Device::Cpu).unwrap();
    let untrained = HyperInjector::from_net(net, &base).unwrap();
    let zero = untrained.inject(&doc).unwrap().delta;
    assert!(zero.adapters.values().all(|f| f.b.iter().all(|&x| x == 0.0)), "an untrained hypernet writes nothing");
    let (net, varmap) = HyperNet::init_trainable(&cfg.hyper, &base.llama, &Device::Cpu).unwrap();
    let vars: HashMap<String, candle_core::Var> = varmap.data().lock().unwrap().clone();
    let mut opt = AdamW::new(&vars, AdamWConfig::default()).unwrap();
    for step in 0..3 {
        let loss = step_loss(&net, &base, &world, &cfg, step).unwrap().loss;
        let grads = loss.backward().unwrap();
        if step == 2 {
            for (name, var) in &vars {
                let g = grads.get(var).unwrap_or_else(|| panic!("{name} has no gradient"));
                let n = g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(n > 0.0, "{name} has a zero gradient");
            }
        }
        opt.update(&grads, 1e-2).unwrap();
    }

    // Meta-training stops with a checkpoint, refuses to restart over it, and resumes to the end.
    let out = tmp.path().join("hypernet");
    assert!(train_hypernet(&base, &cfg, &out, false, Some(4)).unwrap().is_none());
    assert!(train_hypernet(&base, &cfg, &out, false, None).is_err(), "a checkpoint is never silently overwritten");
    let summary = train_hypernet(&base, &cfg, &out, true, None).unwrap().unwrap();
    assert_eq!(summary.steps, 10);
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    assert!(log.lines().any(|l| l.contains("\"eval\"")), "the log records evaluations");
    for f in ["hypernet.json", "hypernet.safetensors", "MODEL_CARD.md", "training.json"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }

    let card = std::fs::read_to_string(out.join("MODEL_CARD.md")).unwrap();
    assert!(card.contains("needle at 4 context windows"), "{card}");
    assert!(card.contains("1 known namesakes, 1 skills"), "{card}");
    assert!(card.contains("namesakes_kept"), "the final evaluation scores known namesakes: {card}");

    // A run can start from a trained network's weights: with no steps it saves them unchanged.
    let mut again = cfg.clone();
    again.steps = 0;
    again.init_from = Some(out.clone());
    let copy = tmp.path().join("copy");
    train_hypernet(&base, &again, &copy, false, None).unwrap().unwrap();
    let load =
        |d: &std::path::Path| candle_core::safetensors::load(d.join("hypernet.safetensors"), &Device::Cpu).unwrap();
    let (src, dst) = (load(&out), load(&copy));
    assert_eq!(src.len(), dst.len());
    for (name, t) in &src {
        let diff = (t - &dst[name]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0, "{name} differs");
    }

    // The saved network injects: one rank-r block per chunk (up to the weight's smaller side, where the sum is
    // folded exactly), a delta that validates against the base model.
    let inj = HyperInjector::load(&out, &base).unwrap();
    let n_chunks = inj.chunks(&doc).unwrap().len();
    let got = inj.inject(&doc).unwrap();
    let f = got.delta.adapters.values().next().unwrap();
    assert_eq!(f.rank, (n_chunks * cfg.hyper.rank).min(f.in_dim.min(f.out_dim)));
    assert!(f.b.iter().any(|&x| x != 0.0));
    let shape = |m: &str| engram_model::Module::from_path(m).map(|m| m.dims(base.llama.config()));
    got.delta.validate(&base.hash, base.llama.config().num_hidden_layers, shape, 64 * 8, 1e4).unwrap();
    assert_eq!(inj.inject(&doc).unwrap().delta.content_hash(), got.delta.content_hash(), "deterministic");

    // The evaluations run end to end (their numbers on a 20-step model mean nothing; the shipped models' do).
    let ecfg = engram_inject::evaluate::InjectEvalConfig {
        seed: 3,
        single_docs: 3,
        multi_docs: 1,
        distill_docs: Some(2),
        distill: engram_inject::DistillConfig { steps: 2, ..Default::default() },
        match_docs: 2,
        match_steps: vec![1, 2],
        canary_deltas: 1,
        canary_items: 4,
    };
    let r = engram_inject::evaluate::evaluate_inject(&base, &inj, &ecfg, |_| {}).unwrap();
    for x in [r.hypernet.closed_book_single, r.distill.closed_book_multi, r.in_context_single, r.no_context_single] {
        assert!((0.0..=1.0).contains(&x), "{r:?}");
    }
    assert!(r.prefill_ms_p50 > 0.0 && r.hypernet.latency_ms_p50 > 0.0 && r.distill.latency_ms_p95 > 0.0);
    assert!(!r.distill_match_curve.is_empty());
    let b = engram_inject::evaluate::bench_inject(&base, &inj, 3, 2, 2, |_| {}).unwrap();
    assert_eq!((b.documents, b.rounds, b.ratio_per_round.len()), (2, 2, 2));
    assert!(b.prefill_ms_p50 > 0.0 && b.capture_ms_p50 > 0.0 && b.hypernet_ms_p50 > 0.0, "{b:?}");
    assert!(b.prefill_injection_thread_ms_p50 > 0.0, "{b:?}");
    let faster = b.prefill_ms_p50.min(b.prefill_injection_thread_ms_p50);
    assert!((b.ratio - b.latency_ms_p50 / faster).abs() < 1e-9);
    let n = engram_inject::evaluate::evaluate_needle(&base, &inj, 3, 1, |_| {}).unwrap();
    assert_eq!(n.lengths.iter().map(|l| l.windows).collect::<Vec<_>>(), [1, 2, 4]);
    assert!(n.lengths[2].chunks_mean > n.lengths[0].chunks_mean, "{n:?}");
    assert!(n.peak_rss_mb_16x > 0.0);
}

/// The stacked inference path gives the per-target path's factors.
#[test]
fn stacked_heads_match_the_per_target_path() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tiny_base(&tmp.path().join("base"));
    let cfg = MetaConfig::tiny(&base, 7, 10);
    let (per_target, varmap) = HyperNet::init_trainable(&cfg.hyper, &base.llama, &Device::Cpu).unwrap();
    // Random values everywhere (B's scaler starts at zero, which would hide B).
    for var in varmap.all_vars() {
        var.set(&var.randn_like(0.0, 0.5).unwrap()).unwrap();
    }
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &Device::Cpu);
    let stacked = HyperNet::new(&cfg.hyper, &base.llama, vb).unwrap().for_inference().unwrap();
    let world = World::new();
    let people = world.draw_people(&mut Rng::new(1), engram_world::Split::Fresh, 1);
    let ids = base.encode(&world.document(&mut Rng::new(2), &people, true)).unwrap();
    let ids = candle_core::Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let reading = engram_inject::hyper::capture(&base.llama, &ids).unwrap();
    let mask = candle_core::Tensor::ones(ids.dims(), candle_core::DType::F32, &Device::Cpu).unwrap();
    let (x, y) = (per_target.forward(&reading, &mask).unwrap(), stacked.forward(&reading, &mask).unwrap());
    assert_eq!(x.factors.len(), y.factors.len());
    for ((tx, ax, bx), (ty, ay, by)) in x.factors.iter().zip(&y.factors) {
        assert_eq!(tx, ty);
        assert_eq!((ax.dims(), bx.dims()), (ay.dims(), by.dims()));
        for (p, q) in [(ax, ay), (bx, by)] {
            let scale = p.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let diff = (p - q).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(scale > 0.0 && diff <= 1e-5 * scale.max(1.0), "{tx:?}: differs by {diff} (scale {scale})");
        }
    }
}
