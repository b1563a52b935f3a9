//! The decoder against candle-transformers' Llama, its gradients, its LoRA paths and its file round trip.

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use engram_model::{ForwardOptions, Kernels, KvCache, Llama, LlamaConfig, LoraAdapter, LoraSet, Module, Positions};

fn tiny_config(kv_heads: usize, tie: bool) -> LlamaConfig {
    let mut cfg = LlamaConfig::small(53);
    cfg.hidden_size = 32;
    cfg.intermediate_size = 48;
    cfg.num_hidden_layers = 2;
    cfg.num_attention_heads = 4;
    cfg.num_key_value_heads = Some(kv_heads);
    cfg.max_position_embeddings = 64;
    cfg.tie_word_embeddings = tie;
    cfg
}

/// A randomly initialised model whose weights are trainable variables.
/// Normal(0, std) values from a seed (candle's CPU generator cannot be seeded, and a test that draws from it
/// checks a different case every run).
fn seeded_normal(seed: u64, shape: &candle_core::Shape, std: f32) -> Tensor {
    let mut s = seed;
    let mut unit = move || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (((z ^ (z >> 31)) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let v: Vec<f32> = (0..shape.elem_count())
        .map(|_| {
            let (u, w) = (unit(), unit());
            ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * w).cos()) as f32 * std
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn name_seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

fn trainable(cfg: &LlamaConfig, seed: u64) -> (Llama, VarMap) {
    let dev = Device::Cpu;
    let (model, vm) = Llama::init_trainable(cfg, seed, &dev).unwrap();
    // Norm weights start at 1: perturb them so a swapped or ignored norm weight would show.
    for (name, var) in vm.data().lock().unwrap().iter() {
        if name.contains("norm") {
            let noise = (seeded_normal(seed ^ name_seed(name), var.shape(), 0.1) + 1.0).unwrap();
            var.set(&noise).unwrap();
        }
    }
    (model, vm)
}

fn ids(rows: &[&[u32]]) -> Tensor {
    Tensor::new(rows.iter().map(|r| r.to_vec()).collect::<Vec<_>>(), &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn reference(model: &Llama) -> (candle_transformers::models::llama::Llama, candle_transformers::models::llama::Config) {
    let json = serde_json::to_string(model.config()).unwrap();
    let cfg: candle_transformers::models::llama::LlamaConfig = serde_json::from_str(&json).unwrap();
    let cfg = cfg.into_config(false);
    let tensors = model.named_tensors().into_iter().collect();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    (candle_transformers::models::llama::Llama::load(vb, &cfg).unwrap(), cfg)
}

#[test]
fn logits_match_candle_transformers_llama() {
    for (kv_heads, tie) in [(4, false), (2, true), (1, false)] {
        let cfg = tiny_config(kv_heads, tie);
        let (model, _vm) = trainable(&cfg, 1);
        let (theirs, their_cfg) = reference(&model);
        let seq: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % 53).collect();
        for len in [1, 5, 40] {
            let input = ids(&[&seq[..len]]);
            let mut cache =
                candle_transformers::models::llama::Cache::new(false, DType::F32, &their_cfg, &Device::Cpu).unwrap();
            let want = theirs.forward(&input, 0, &mut cache).unwrap();
            for kernels in [Kernels::Differentiable, Kernels::Fused] {
                let opts = ForwardOptions { kernels, last_only: true, ..Default::default() };
                let got = model.forward(&input, &Positions::From(0), &opts).unwrap().logits;
                let diff = max_abs_diff(&got, &want);
                assert!(diff < 1e-4, "kv_heads {kv_heads} tie {tie} len {len} {kernels:?}: max diff {diff}");
            }
        }
    }
}

#[test]
fn kv_cache_decoding_matches_full_forward() {
    let cfg = tiny_config(2, false);
    let (model, _vm) = trainable(&cfg, 2);
    let seq: Vec<u32> = (0..12).map(|i| (i * 5 + 1) % 53).collect();
    let full = model
        .forward(&ids(&[&seq]), &Positions::From(0), &ForwardOptions::default())
        .unwrap()
        .logits
        .squeeze(0)
        .unwrap();
    let mut cache = KvCache::new(&cfg);
    let opts = ForwardOptions::inference();
    let prefill = model.forward_cached(&ids(&[&seq[..7]]), &mut cache, &opts).unwrap().logits;
    assert!(max_abs_diff(&prefill.squeeze(0).unwrap(), &full.get(6).unwrap()) < 1e-4);
    for (i, &tok) in seq.iter().enumerate().skip(7) {
        let step = model.forward_cached(&ids(&[&[tok]]), &mut cache, &opts).unwrap().logits;
        let diff = max_abs_diff(&step.squeeze(0).unwrap(), &full.get(i).unwrap());
        assert!(diff < 1e-4, "position {i}: {diff}");
    }
    assert_eq!(cache.len(), 12);
}

fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Tensor {
    let v = logits.dim(D::Minus1).unwrap();
    candle_nn::loss::cross_entropy(&logits.reshape(((), v)).unwrap(), &targets.flatten_all().unwrap()).unwrap()
}

#[test]
fn every_trainable_variable_gets_a_nonzero_gradient() {
    for tie in [false, true] {
        let cfg = tiny_config(2, tie);
        let (model, vm) = trainable(&cfg, 3);
        let input = ids(&[&[1, 2, 3, 4, 5, 6], &[7, 8, 9, 10, 11, 12]]);
        let targets = ids(&[&[2, 3, 4, 5, 6, 7], &[8, 9, 10, 11, 12, 13]]);
        let logits = model.forward(&input, &Positions::From(0), &ForwardOptions::default()).unwrap().logits;
        let grads = cross_entropy(&logits, &targets).backward().unwrap();
        let data = vm.data().lock().unwrap();
        assert_eq!(data.len(), cfg.num_hidden_layers * 9 + 2 + usize::from(!tie));
        for (name, var) in data.iter() {
            let g = grads.get(var).unwrap_or_else(|| panic!("{name}: no gradient"));
            let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(norm > 0.0, "{name}: zero gradient");
        }
    }
}

fn random_adapter(cfg: &LlamaConfig, module: Module, rank: usize, batch: Option<usize>) -> LoraAdapter {
    let (i, o) = module.dims(cfg);
    let dev = Device::Cpu;
    let (a, b) = match batch {
        None => (Tensor::randn(0f32, 0.3, (rank, i), &dev), Tensor::randn(0f32, 0.3, (o, rank), &dev)),
        Some(n) => (Tensor::randn(0f32, 0.3, (n, rank, i), &dev), Tensor::randn(0f32, 0.3, (n, o, rank), &dev)),
    };
    LoraAdapter::new(a.unwrap(), b.unwrap(), 2.0)
}

#[test]
fn lora_on_every_module_is_differentiable_and_changes_output() {
    let cfg = tiny_config(2, false);
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let model = Llama::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    let frozen =
        Llama::new(&cfg, VarBuilder::from_tensors(model.named_tensors().into_iter().collect(), DType::F32, &dev))
            .unwrap();
    let mut lora = LoraSet::new();
    let mut vars = Vec::new();
    for layer in 0..cfg.num_hidden_layers {
        for m in Module::ALL {
            let ad = random_adapter(&cfg, m, 3, None);
            let a = candle_core::Var::from_tensor(&ad.a).unwrap();
            let b = candle_core::Var::from_tensor(&ad.b).unwrap();
            lora.insert(layer, m, LoraAdapter::new(a.as_tensor().clone(), b.as_tensor().clone(), 0.5));
            vars.push((format!("{layer}.{m:?}"), a, b));
        }
    }
    let input = ids(&[&[1, 2, 3, 4, 5]]);
    let targets = ids(&[&[2, 3, 4, 5, 6]]);
    let base = frozen.forward(&input, &Positions::From(0), &ForwardOptions::default()).unwrap().logits;
    let opts = ForwardOptions { lora: Some(&lora), ..Default::default() };
    let adapted = frozen.forward(&input, &Positions::From(0), &opts).unwrap().logits;
    assert!(max_abs_diff(&base, &adapted) > 1e-3);
    let grads = cross_entropy(&adapted, &targets).backward().unwrap();
    for (name, a, b) in &vars {
        for (which, v) in [("A", a), ("B", b)] {
            let g = grads.get(v).unwrap_or_else(|| panic!("{name} {which}: no gradient"));
            assert!(g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0, "{name} {which}");
        }
    }
}

#[test]
fn per_example_lora_equals_running_each_example_alone() {
    let cfg = tiny_config(2, false);
    let (model, _vm) = trainable(&cfg, 4);
    let batched = random_adapter(&cfg, Module::Down, 4, Some(2));
    let mut set = LoraSet::new();
    set.insert(1, Module::Down, batched.clone());
    let rows: [&[u32]; 2] = [&[1, 2, 3, 4], &[9, 8, 7, 6]];
    let opts = ForwardOptions { lora: Some(&set), ..Default::default() };
    let both = model.forward(&ids(&rows), &Positions::From(0), &opts).unwrap().logits;
    for (i, row) in rows.iter().enumerate() {
        let mut alone = LoraSet::new();
        let a = batched.a.get(i).unwrap();
        let b = batched.b.get(i).unwrap();
        alone.insert(1, Module::Down, LoraAdapter::new(a, b, batched.scale));
        let opts = ForwardOptions { lora: Some(&alone), ..Default::default() };
        let one = model.forward(&ids(&[row]), &Positions::From(0), &opts).unwrap().logits;
        let diff = max_abs_diff(&one.squeeze(0).unwrap(), &both.get(i).unwrap());
        assert!(diff < 1e-5, "example {i}: {diff}");
    }
}

#[test]
fn lora_shape_errors_name_the_module() {
    let cfg = tiny_config(2, false);
    let (model, _vm) = trainable(&cfg, 5);
    let mut set = LoraSet::new();
    set.insert(0, Module::Down, random_adapter(&cfg, Module::Up, 2, None));
    let opts = ForwardOptions { lora: Some(&set), ..Default::default() };
    let err = model.forward(&ids(&[&[1, 2]]), &Positions::From(0), &opts).unwrap_err().to_string();
    assert!(err.contains("layer 0 mlp.down_proj"), "{err}");
    let mut set = LoraSet::new();
    set.insert(7, Module::Q, random_adapter(&cfg, Module::Q, 2, None));
    let opts = ForwardOptions { lora: Some(&set), ..Default::default() };
    let err = model.forward(&ids(&[&[1, 2]]), &Positions::From(0), &opts).unwrap_err().to_string();
    assert!(err.contains("layer 7"), "{err}");
}

#[test]
fn packed_rows_equal_separate_sequences() {
    let cfg = tiny_config(2, false);
    let (model, _vm) = trainable(&cfg, 6);
    let (a, b): (&[u32], &[u32]) = (&[3, 4, 5], &[6, 7, 8, 9]);
    let row: Vec<u32> = a.iter().chain(b).copied().collect();
    let positions = Tensor::new(&[[0u32, 1, 2, 0, 1, 2, 3]], &Device::Cpu).unwrap();
    let seg = [0, 0, 0, 1, 1, 1, 1];
    let mask: Vec<f32> = (0..7)
        .flat_map(|i| (0..7).map(move |j| if j <= i && seg[i] == seg[j] { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    let mask = Tensor::from_vec(mask, (1, 1, 7, 7), &Device::Cpu).unwrap();
    let packed = model
        .forward(&ids(&[&row]), &Positions::Packed { positions, mask }, &ForwardOptions::default())
        .unwrap()
        .logits
        .squeeze(0)
        .unwrap();
    let sep_a = model.forward(&ids(&[a]), &Positions::From(0), &ForwardOptions::default()).unwrap().logits;
    let sep_b = model.forward(&ids(&[b]), &Positions::From(0), &ForwardOptions::default()).unwrap().logits;
    assert!(max_abs_diff(&packed.narrow(0, 0, 3).unwrap(), &sep_a.squeeze(0).unwrap()) < 1e-5);
    assert!(max_abs_diff(&packed.narrow(0, 3, 4).unwrap(), &sep_b.squeeze(0).unwrap()) < 1e-5);
}

#[test]
fn residuals_are_each_layers_input() {
    let cfg = tiny_config(4, false);
    let (model, _vm) = trainable(&cfg, 7);
    let opts = ForwardOptions { capture_residuals: true, ..Default::default() };
    let out = model.forward(&ids(&[&[1, 2, 3]]), &Positions::From(0), &opts).unwrap();
    assert_eq!(out.residuals.len(), cfg.num_hidden_layers + 1);
    for r in &out.residuals {
        assert_eq!(r.dims(), &[1, 3, cfg.hidden_size]);
    }
    let embed = &model.named_tensors()[0].1;
    let want = embed.index_select(&Tensor::new(&[1u32, 2, 3], &Device::Cpu).unwrap(), 0).unwrap();
    assert_eq!(max_abs_diff(&out.residuals[0].squeeze(0).unwrap(), &want), 0.0);
    assert!(max_abs_diff(&out.residuals[1], &out.residuals[0]) > 0.0);
}

#[test]
fn save_then_load_is_bit_identical() {
    for tie in [false, true] {
        let cfg = tiny_config(2, tie);
        let (model, _vm) = trainable(&cfg, 8);
        let dir = tempfile::tempdir().unwrap();
        model.save(dir.path()).unwrap();
        let loaded = Llama::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(loaded.config(), model.config());
        let (a, b) = (model.named_tensors(), loaded.named_tensors());
        assert_eq!(a.len(), b.len());
        for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
            assert_eq!(na, nb);
            let va: Vec<u32> =
                ta.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect();
            let vb: Vec<u32> =
                tb.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect();
            assert_eq!(va, vb, "{na}");
        }
        let first = std::fs::read(dir.path().join("model.safetensors")).unwrap();
        let again = tempfile::tempdir().unwrap();
        loaded.save(again.path()).unwrap();
        assert_eq!(first, std::fs::read(again.path().join("model.safetensors")).unwrap());
        let input = ids(&[&[1, 2, 3, 4]]);
        let la = model.forward(&input, &Positions::From(0), &ForwardOptions::default()).unwrap().logits;
        let lb = loaded.forward(&input, &Positions::From(0), &ForwardOptions::default()).unwrap().logits;
        assert_eq!(max_abs_diff(&la, &lb), 0.0);
    }
}

#[test]
fn bad_config_is_refused_with_the_field_named() {
    let mut cfg = tiny_config(3, false);
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("num_key_value_heads"), "{err}");
    cfg.num_key_value_heads = Some(2);
    cfg.hidden_act = "gelu".into();
    assert!(cfg.validate().unwrap_err().to_string().contains("hidden_act"));
}

#[test]
fn generation_stops_at_the_stop_token_and_respects_the_context() {
    let cfg = tiny_config(2, false);
    let (model, _vm) = trainable(&cfg, 9);
    let out = model.generate_greedy(&[1, 2, 3], 10, u32::MAX, None).unwrap();
    assert_eq!(out.len(), 10);
    let stop = out[0];
    assert_eq!(model.generate_greedy(&[1, 2, 3], 10, stop, None).unwrap(), vec![stop]);
    let long: Vec<u32> = vec![1; 60];
    assert_eq!(model.generate_greedy(&long, 10, u32::MAX, None).unwrap().len(), 4);
    assert!(model.generate_greedy(&[], 3, 0, None).is_err());
}

/// Backward agrees with the loss itself: for every variable, the directional derivative along a random direction
/// equals the central finite difference. A wrong backward anywhere (softmax, rope, norm, mask) fails here even when
/// every gradient is non-zero. Packed rows, so the mask and per-token positions are covered too.
#[test]
fn gradients_match_finite_differences() {
    let cfg = tiny_config(2, false);
    let (model, vm) = trainable(&cfg, 11);
    let row: Vec<u32> = vec![3, 4, 5, 3, 4, 9, 10, 11, 9, 10];
    let targets = ids(&[&[4, 5, 3, 4, 5, 10, 11, 9, 10, 11]]);
    let positions = Tensor::new(&[[0u32, 1, 2, 3, 4, 0, 1, 2, 3, 4]], &Device::Cpu).unwrap();
    let seg = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1];
    let mask: Vec<f32> = (0..10)
        .flat_map(|i| (0..10).map(move |j| if j <= i && seg[i] == seg[j] { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    let mask = Tensor::from_vec(mask, (1, 1, 10, 10), &Device::Cpu).unwrap();
    let pos = Positions::Packed { positions, mask };
    let loss = || {
        let logits = model.forward(&ids(&[&row]), &pos, &ForwardOptions::default()).unwrap().logits;
        cross_entropy(&logits, &targets)
    };
    let grads = loss().backward().unwrap();
    let data = vm.data().lock().unwrap();
    for (name, var) in data.iter() {
        let g = grads.get(var).unwrap();
        // A direction on the weight's own scale, so 1% steps stay in the linear regime for every variable.
        let rms = var.as_tensor().sqr().unwrap().mean_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap();
        let dir = seeded_normal(name_seed(name), var.shape(), rms);
        let analytic = (g * &dir).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        let w = var.as_tensor().copy().unwrap();
        let eps = 1e-2;
        var.set(&(&w + (&dir * eps).unwrap()).unwrap()).unwrap();
        let up = loss().to_scalar::<f32>().unwrap() as f64;
        var.set(&(&w - (&dir * eps).unwrap()).unwrap()).unwrap();
        let down = loss().to_scalar::<f32>().unwrap() as f64;
        var.set(&w).unwrap();
        let numeric = (up - down) / (2.0 * eps);
        // 5% relative, plus what f32 loss differences can resolve.
        let tolerance = 0.05 * numeric.abs().max(analytic.abs()) + 5e-5;
        assert!(
            (analytic - numeric).abs() < tolerance,
            "{name}: backward says {analytic:.6}, finite difference {numeric:.6}"
        );
    }
}

/// A stored delta applied as an adapter and merged into the weights gives the same logits; merging is deterministic
/// and leaves the base weights alone; LoraSet <-> Delta round-trips.
#[test]
fn merged_deltas_equal_adapters_and_rebuild_exactly() {
    let cfg = tiny_config(2, false);
    let (model, _vm) = trainable(&cfg, 21);
    let mut set = LoraSet::new();
    for (layer, module) in [(0, Module::Down), (1, Module::Q), (1, Module::Down)] {
        let mut ad = random_adapter(&cfg, module, 3, None);
        ad.scale = 1.5;
        set.insert(layer, module, ad);
    }
    let meta = engram_lora::Meta { base_model: "h".into(), scale: 1.5, ..Default::default() };
    let delta = set.to_delta(meta).unwrap();
    let back = LoraSet::from_delta(&delta, &Device::Cpu).unwrap();
    assert_eq!(back.to_delta(delta.meta.clone()).unwrap(), delta);

    let input = ids(&[&[1, 2, 3, 4, 5, 6]]);
    let with = |m: &Llama, lora: Option<&LoraSet>| {
        let opts = ForwardOptions { lora, ..ForwardOptions::default() };
        m.forward(&input, &Positions::From(0), &opts).unwrap().logits
    };
    let base_before = with(&model, None);
    let adapted = with(&model, Some(&back));
    let merged = model.merged(&[&delta, &delta]).unwrap();
    let twice = LoraSet::from_delta(
        &{
            let mut d = delta.clone();
            d.meta.scale *= 2.0;
            d
        },
        &Device::Cpu,
    )
    .unwrap();
    assert!(max_abs_diff(&with(&merged, None), &with(&model, Some(&twice))) < 1e-4);
    assert!(max_abs_diff(&with(&model.merged(&[&delta]).unwrap(), None), &adapted) < 1e-4);
    assert!(max_abs_diff(&adapted, &base_before) > 1e-3, "the delta must change something");
    assert_eq!(max_abs_diff(&with(&model, None), &base_before), 0.0, "W0 untouched");
    let again = model.merged(&[&delta, &delta]).unwrap();
    for ((n, a), (_, b)) in merged.named_tensors().iter().zip(again.named_tensors().iter()) {
        assert_eq!(max_abs_diff(a, b), 0.0, "{n} differs between two identical merges");
    }
}

#[test]
fn side_memory_fires_only_above_its_threshold_and_changes_only_the_head() {
    let cfg = tiny_config(2, false);
    let (model, _vm) = trainable(&cfg, 31);
    let d = cfg.hidden_size;
    let input = ids(&[&[1, 2, 3, 4, 5, 6]]);
    let opts = ForwardOptions { capture_residuals: true, ..ForwardOptions::default() };
    let before = model.forward(&input, &Positions::From(0), &opts).unwrap();
    let last: Vec<f32> = before.residuals.last().unwrap().squeeze(0).unwrap().get(3).unwrap().to_vec1().unwrap();
    let unit = |v: &[f32]| -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    };
    let value: Vec<f32> = (0..d).map(|i| if i % 3 == 0 { 2.0 } else { -1.0 }).collect();
    let gated = |threshold: f32, gate: f32, unsure: f32| engram_lora::Delta {
        memory: Some(engram_lora::Memory {
            hidden: d,
            mean: vec![0.0; d],
            keys: unit(&last),
            values: value.clone(),
            thresholds: vec![threshold],
            gates: vec![gate],
            unsure_thresholds: vec![unsure],
        }),
        ..Default::default()
    };
    let keyed = |sign: f32, threshold: f32, mean: f32| engram_lora::Delta {
        memory: Some(engram_lora::Memory {
            hidden: d,
            mean: vec![mean; d],
            keys: unit(&last.iter().map(|x| sign * (x - mean)).collect::<Vec<_>>()),
            values: value.clone(),
            thresholds: vec![threshold],
            gates: vec![0.0],
            unsure_thresholds: vec![1.0],
        }),
        ..Default::default()
    };
    let memory = |threshold: f32, mean: f32| keyed(1.0, threshold, mean);
    // Position 3's own residual scores cosine 1: a threshold below fires there and (generically) nowhere else.
    let head = model.merged(&[&memory(0.999, 0.0)]).unwrap();
    assert_eq!(head.memory().unwrap().entries(), 1);
    let after = head.forward(&input, &Positions::From(0), &opts).unwrap();
    for (a, b) in after.residuals.iter().zip(&before.residuals) {
        assert_eq!(max_abs_diff(a, b), 0.0, "the memory changed a residual");
    }
    let diff = (&after.logits - &before.logits).unwrap().abs().unwrap().max(D::Minus1).unwrap().squeeze(0).unwrap();
    let diff: Vec<f32> = diff.to_vec1().unwrap();
    assert!(diff[3] > 1e-3, "the entry did not fire on its own key: {diff:?}");
    assert!(diff.iter().enumerate().all(|(p, &x)| p == 3 || x == 0.0), "fired elsewhere: {diff:?}");
    // The change is the head applied to the value, added after the final norm.
    let normed =
        model.final_norm(&before.residuals.last().unwrap().get(0).unwrap().get(3).unwrap().unsqueeze(0).unwrap());
    let want = model
        .normed_logits(
            &(normed.unwrap() + Tensor::new(value.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap()).unwrap(),
        )
        .unwrap();
    let got = after.logits.get(0).unwrap().get(3).unwrap().unsqueeze(0).unwrap();
    assert!(max_abs_diff(&got, &want) < 1e-4);
    // The opposite direction scores -1 there: it stays silent.
    let silent = model.merged(&[&keyed(-1.0, 0.9, 0.0)]).unwrap();
    assert_eq!(max_abs_diff(&silent.forward(&input, &Positions::From(0), &opts).unwrap().logits, &before.logits), 0.0);
    // A gated entry fires above its unsure threshold only where the model's own top probability is below the gate
    // (an untrained model is never sure: below 1, above 0): its absolute threshold of 1 is never exceeded.
    let logits_of = |delta: &engram_lora::Delta| {
        model.merged(&[delta]).unwrap().forward(&input, &Positions::From(0), &opts).unwrap().logits
    };
    assert!(max_abs_diff(&logits_of(&gated(1.0, 1.0, 0.999)), &after.logits) < 1e-4, "the gated entry did not fire");
    assert_eq!(
        max_abs_diff(&logits_of(&gated(1.0, 0.0, 0.999)), &before.logits),
        0.0,
        "fired though the model is sure"
    );
    // Chains concatenate; memories measured from different centres are refused; adapters alone cannot carry one.
    assert_eq!(head.merged(&[&memory(0.5, 0.0)]).unwrap().memory().unwrap().entries(), 2);
    assert!(head.merged(&[&memory(0.5, 0.25)]).is_err());
    assert!(LoraSet::from_delta(&memory(0.5, 0.0), &Device::Cpu).is_err());
    assert!(head.save(&std::env::temp_dir().join("engram-memory-save-refused")).is_err());
    // Generation reads the same memory through the KV cache.
    let mut cache = KvCache::new(&cfg);
    let cached = head.forward_cached(&input, &mut cache, &ForwardOptions::default()).unwrap().logits;
    assert!(max_abs_diff(&cached, &after.logits) < 1e-4);
}
