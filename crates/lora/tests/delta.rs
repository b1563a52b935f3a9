use std::collections::BTreeMap;

use engram_lora::{layer_norms, peft, Delta, Factors, Meta};

fn pseudo(seed: u32, n: usize) -> Vec<f32> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(1664525).wrapping_add(1013904223);
            (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect()
}

fn delta(seed: u32, scale: f32) -> Delta {
    let mut adapters = BTreeMap::new();
    for layer in 0..2 {
        let (r, i, o) = (3, 5, 4);
        let f =
            Factors::new(r, i, o, pseudo(seed + layer as u32, r * i), pseudo(seed + 17 + layer as u32, o * r)).unwrap();
        adapters.insert((layer, "mlp.down_proj".to_string()), f);
    }
    let meta = Meta { base_model: "b4se".into(), scale, injector: "test".into(), injector_version: "1".into() };
    Delta { meta, adapters, memory: None }
}

fn dense_norm(terms: &[(f64, &Delta)], layer: usize) -> f64 {
    let mut w = vec![0.0f64; 20];
    for (s, d) in terms {
        for (wi, v) in w.iter_mut().zip(d.dense(layer, "mlp.down_proj").unwrap()) {
            *wi += s * v as f64;
        }
    }
    w.iter().map(|v| v * v).sum::<f64>().sqrt()
}

#[test]
fn native_round_trip_keeps_content_hash() {
    let d = delta(1, 2.5);
    let back = Delta::decode(&d.encode().unwrap()).unwrap();
    assert_eq!(back, d);
    assert_eq!(back.content_hash(), d.content_hash());
    assert_ne!(delta(2, 2.5).content_hash(), d.content_hash());
    assert_ne!(delta(1, 2.0).content_hash(), d.content_hash());
    assert!(Delta::decode(b"not safetensors").is_err());
}

/// The same delta always encodes to the same bytes: its blob hash (and so its version id) is a function of its
/// content. safetensors writes its metadata map in hash order, which once differed from call to call.
#[test]
fn encoding_is_deterministic() {
    let mut d = delta(3, 0.5);
    d.memory = memory_delta(4, 3).memory;
    let first = d.encode().unwrap();
    for _ in 0..20 {
        assert!(d.clone().encode().unwrap() == first, "two encodings of one delta differ");
    }
    assert_eq!(Delta::decode(&first).unwrap(), d);
}

#[test]
fn gram_norms_equal_dense_norms() {
    let (a, b) = (delta(1, 2.0), delta(2, 0.5));
    let terms = [(1.0, &a), (-1.0, &b)];
    let norms = layer_norms(&terms).unwrap();
    for layer in 0..2 {
        let dense = dense_norm(&terms, layer);
        assert!((norms[&layer] - dense).abs() < 1e-5 * dense.max(1.0), "{} vs {dense}", norms[&layer]);
    }
    assert!(layer_norms(&[(1.0, &a), (-1.0, &a)]).unwrap().values().all(|&n| n < 1e-5));
}

#[test]
fn validation_names_what_is_wrong() {
    let d = delta(1, 1.0);
    let shape = |m: &str| (m == "mlp.down_proj").then_some((5, 4));
    d.validate("b4se", 2, shape, 8, 100.0).unwrap();
    let err = |r: engram_lora::Result<()>| r.unwrap_err().to_string();
    assert!(err(d.validate("other", 2, shape, 8, 100.0)).contains("base model"));
    assert!(err(d.validate("b4se", 1, shape, 8, 100.0)).contains("has 1 layers"));
    assert!(err(d.validate("b4se", 2, |_| Some((6, 4)), 8, 100.0)).contains("4x6"));
    assert!(err(d.validate("b4se", 2, |_| None, 8, 100.0)).contains("no module"));
    assert!(err(d.validate("b4se", 2, shape, 2, 100.0)).contains("rank 3"));
    assert!(err(d.validate("b4se", 2, shape, 8, 1e-6)).contains("exceeds"));
    let mut nan = d.clone();
    nan.adapters.values_mut().next().unwrap().a[0] = f32::NAN;
    assert!(err(nan.validate("b4se", 2, shape, 8, 100.0)).contains("non-finite"));
    assert!(Factors::new(2, 3, 4, vec![0.0; 5], vec![0.0; 8]).is_err());
}

#[test]
fn peft_export_import_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let d = delta(3, 4.0);
    peft::export(&d, dir.path(), "models/base").unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(peft::CONFIG_FILE)).unwrap()).unwrap();
    assert_eq!(cfg["r"], 3);
    assert_eq!(cfg["lora_alpha"].as_f64(), Some(12.0));
    assert_eq!(cfg["target_modules"], serde_json::json!(["down_proj"]));
    let back = peft::import(dir.path(), "b4se").unwrap();
    assert_eq!(back.adapters, d.adapters);
    assert_eq!(back.meta.scale, 4.0);
    for layer in 0..2 {
        assert_eq!(back.dense(layer, "mlp.down_proj"), d.dense(layer, "mlp.down_proj"));
    }
}

#[test]
fn peft_mixed_ranks_keep_each_modules_scaling() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = delta(5, 2.0);
    d.adapters.insert((1, "self_attn.q_proj".into()), Factors::new(1, 5, 5, pseudo(9, 5), pseudo(10, 5)).unwrap());
    peft::export(&d, dir.path(), "models/base").unwrap();
    let back = peft::import(dir.path(), "b4se").unwrap();
    for ((layer, module), _) in &d.adapters {
        let (x, y) = (d.dense(*layer, module).unwrap(), back.dense(*layer, module).unwrap());
        assert!(x.iter().zip(&y).all(|(a, b)| (a - b).abs() < 1e-6), "{layer} {module}");
    }
}

#[test]
fn a_compaction_equals_the_sum_of_its_chain() {
    use engram_lora::{Delta, Factors, Meta};
    let meta = |scale: f32| Meta { base_model: "b".into(), scale, injector: "t".into(), injector_version: "1".into() };
    let values = |n: usize, k: u32| -> Vec<f32> {
        (0..n).map(|i| ((i as u32 * 7919 + k * 104_729) % 97) as f32 / 97.0 - 0.5).collect()
    };
    let delta = |seed: u32, rank: usize, scale: f32, layers: &[usize]| Delta {
        meta: meta(scale),
        adapters: layers
            .iter()
            .map(|&l| {
                let f = Factors::new(rank, 6, 4, values(rank * 6, seed), values(4 * rank, seed + 1)).unwrap();
                ((l, "mlp.down_proj".to_string()), f)
            })
            .collect(),
        memory: None,
    };
    let (a, b) = (delta(1, 2, 2.0, &[0, 1]), delta(5, 3, 0.5, &[1]));
    let c = Delta::compact(&[&a, &b], meta(7.0)).unwrap();
    assert_eq!(c.meta.scale, 1.0);
    assert_eq!(c.adapters[&(0, "mlp.down_proj".to_string())].rank, 4, "exact factors have rank min(out, in)");
    for layer in [0, 1] {
        let mut want = a.dense(layer, "mlp.down_proj").unwrap();
        if let Some(x) = b.dense(layer, "mlp.down_proj") {
            want.iter_mut().zip(x).for_each(|(s, x)| *s += x);
        }
        let got = c.dense(layer, "mlp.down_proj").unwrap();
        assert!(got.iter().zip(&want).all(|(g, w)| (g - w).abs() < 1e-6), "layer {layer}");
    }
    let mut other = delta(2, 2, 1.0, &[0]);
    other.meta.base_model = "other".into();
    assert!(Delta::compact(&[&a, &other], meta(1.0)).is_err());
    assert!(Delta::compact(&[], meta(1.0)).is_err());
}

fn memory_delta(seed: u32, entries: usize) -> Delta {
    let d = 4;
    let keys: Vec<f32> = pseudo(seed, entries * d)
        .chunks(d)
        .flat_map(|k| {
            let n = k.iter().map(|x| x * x).sum::<f32>().sqrt();
            k.iter().map(move |x| x / n).collect::<Vec<_>>()
        })
        .collect();
    Delta {
        meta: Meta { base_model: "b4se".into(), scale: 1.0, injector: "test".into(), injector_version: "1".into() },
        adapters: BTreeMap::new(),
        memory: Some(engram_lora::Memory {
            hidden: d,
            mean: vec![0.5; d],
            keys,
            values: pseudo(seed + 1, entries * d),
            thresholds: vec![0.7; entries],
            gates: vec![0.8; entries],
            unsure_thresholds: vec![0.5; entries],
        }),
    }
}

#[test]
fn memory_entries_round_trip_hash_validate_and_compact_by_concatenation() {
    let m = memory_delta(3, 2);
    let back = Delta::decode(&m.encode().unwrap()).unwrap();
    assert_eq!(back, m);
    assert_eq!(back.content_hash(), m.content_hash());
    assert_ne!(memory_delta(4, 2).content_hash(), m.content_hash());
    let shape = |_: &str| Some((4, 4));
    m.validate("b4se", 2, shape, 4, 1e4).unwrap();

    let mut bad = m.clone();
    bad.memory.as_mut().unwrap().thresholds[1] = 1.5;
    let err = bad.validate("b4se", 2, shape, 4, 1e4).unwrap_err().to_string();
    assert!(err.contains("threshold 1.5"), "{err}");
    let mut bad = m.clone();
    bad.memory.as_mut().unwrap().gates[0] = 1.5;
    let err = bad.validate("b4se", 2, shape, 4, 1e4).unwrap_err().to_string();
    assert!(err.contains("gate 1.5"), "{err}");
    let mut bad = m.clone();
    bad.memory.as_mut().unwrap().unsure_thresholds.pop();
    assert!(bad.validate("b4se", 2, shape, 4, 1e4).is_err(), "a memory short of an unsure threshold passed");
    let mut bad = m.clone();
    bad.memory.as_mut().unwrap().keys[0] = 3.0;
    assert!(bad.validate("b4se", 2, shape, 4, 1e4).unwrap_err().to_string().contains("key norm"));
    let mut bad = m.clone();
    bad.memory.as_mut().unwrap().values.pop();
    assert!(bad.validate("b4se", 2, shape, 4, 1e4).is_err());
    assert!(Delta { memory: None, ..m.clone() }.validate("b4se", 2, shape, 4, 1e4).is_err(), "an empty delta passed");

    // A compaction keeps every entry in chain order beside the summed adapters.
    let with_lora = Delta { memory: memory_delta(5, 1).memory, ..delta(1, 1.0) };
    let c = Delta::compact(&[&m, &with_lora, &memory_delta(6, 3)], m.meta.clone()).unwrap();
    let cm = c.memory.as_ref().unwrap();
    assert_eq!(cm.entries(), 6);
    assert_eq!(&cm.keys[..8], &m.memory.as_ref().unwrap().keys[..]);
    assert_eq!((cm.gates.len(), cm.unsure_thresholds.len()), (6, 6));
    assert_eq!(c.adapters.len(), 2);
    let mut other_centre = memory_delta(7, 1);
    other_centre.memory.as_mut().unwrap().mean[0] = 0.0;
    assert!(Delta::compact(&[&m, &other_centre], m.meta.clone()).is_err());

    let dir = tempfile::tempdir().unwrap();
    let err = peft::export(&with_lora, dir.path(), "base").unwrap_err().to_string();
    assert!(err.contains("side-memory"), "{err}");
}
