//! The on-disk form of a LoRA delta, and the norms operators compare versions by.
//!
//! A delta is a safetensors file: for each adapted (layer, module) an `A` (rank x in) and a `B` (out x rank) in
//! f32, named `layers.{layer}.{module}.lora_a` / `.lora_b` with modules named as in Hugging Face Llama
//! (`mlp.down_proj`, `self_attn.q_proj`, ...), and header metadata `format` and `scale`. The weight change it
//! stands for is `scale * B @ A`.

use std::collections::{BTreeMap, HashMap};

use safetensors::{Dtype, SafeTensors};

use crate::{Error, Result};

/// A tensor as read: shape and row-major values.
type Tensor = (Vec<usize>, Vec<f32>);

pub const FORMAT: &str = "engram-lora-delta/1";

#[derive(Debug, Clone, PartialEq)]
pub struct Factors {
    pub rank: usize,
    pub in_dim: usize,
    pub out_dim: usize,
    /// rank x in, row-major.
    pub a: Vec<f32>,
    /// out x rank, row-major.
    pub b: Vec<f32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoraDelta {
    pub scale: f32,
    /// (layer, module) -> factors.
    pub adapters: BTreeMap<(usize, String), Factors>,
}

fn bad(msg: String) -> Error {
    Error::Corrupt(format!("lora delta: {msg}"))
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn le_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

impl LoraDelta {
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut owned = Vec::new();
        for ((layer, module), f) in &self.adapters {
            owned.push((format!("layers.{layer}.{module}.lora_a"), vec![f.rank, f.in_dim], le_bytes(&f.a)));
            owned.push((format!("layers.{layer}.{module}.lora_b"), vec![f.out_dim, f.rank], le_bytes(&f.b)));
        }
        let views = owned
            .iter()
            .map(|(n, shape, data)| {
                safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), data).map(|v| (n.clone(), v))
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| bad(e.to_string()))?;
        let meta =
            HashMap::from([("format".to_string(), FORMAT.to_string()), ("scale".into(), self.scale.to_string())]);
        safetensors::serialize(views, Some(meta)).map_err(|e| bad(e.to_string()))
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        match meta.get("format") {
            Some(f) if f == FORMAT => {}
            other => return Err(bad(format!("format {other:?}, expected {FORMAT:?}"))),
        }
        let scale: f32 =
            meta.get("scale").and_then(|s| s.parse().ok()).ok_or_else(|| bad("missing or unreadable scale".into()))?;
        let st = SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
        let mut parts: BTreeMap<(usize, String), (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
        for (name, view) in st.tensors() {
            if view.dtype() != Dtype::F32 {
                return Err(bad(format!("{name} is {:?}, expected F32", view.dtype())));
            }
            let parsed = name
                .strip_prefix("layers.")
                .and_then(|r| r.split_once('.'))
                .and_then(|(l, rest)| Some((l.parse::<usize>().ok()?, rest)))
                .and_then(|(l, rest)| {
                    let (module, which) = rest.rsplit_once('.')?;
                    Some((l, module.to_string(), which))
                });
            let Some((layer, module, which)) = parsed else {
                return Err(bad(format!("unexpected tensor {name}")));
            };
            let entry = parts.entry((layer, module)).or_default();
            let value = Some((view.shape().to_vec(), f32s(view.data())));
            match which {
                "lora_a" => entry.0 = value,
                "lora_b" => entry.1 = value,
                _ => return Err(bad(format!("unexpected tensor {name}"))),
            }
        }
        let mut adapters = BTreeMap::new();
        for ((layer, module), (a, b)) in parts {
            let (Some((sa, a)), Some((sb, b))) = (a, b) else {
                return Err(bad(format!("layer {layer} {module} lacks its A or B")));
            };
            if sa.len() != 2 || sb.len() != 2 || sa[0] != sb[1] {
                return Err(bad(format!("layer {layer} {module}: A {sa:?} and B {sb:?} do not chain")));
            }
            adapters.insert((layer, module), Factors { rank: sa[0], in_dim: sa[1], out_dim: sb[0], a, b });
        }
        Ok(Self { scale, adapters })
    }
}

/// Frobenius norm, per layer, of `sum_i sign_i * scale_i * B_i @ A_i` over the given deltas (all modules of a layer
/// together), computed from r x r Gram matrices, never the dense matrix: cheap even for a 70B model's shapes.
pub fn layer_norms(terms: &[(f64, &LoraDelta)]) -> Result<BTreeMap<usize, f64>> {
    let mut by_module: BTreeMap<&(usize, String), Vec<(f64, &Factors)>> = BTreeMap::new();
    for (sign, d) in terms {
        for (k, f) in &d.adapters {
            by_module.entry(k).or_default().push((sign * d.scale as f64, f));
        }
    }
    let mut out: BTreeMap<usize, f64> = BTreeMap::new();
    for ((layer, module), fs) in by_module {
        let (i0, o0) = (fs[0].1.in_dim, fs[0].1.out_dim);
        if fs.iter().any(|(_, f)| f.in_dim != i0 || f.out_dim != o0) {
            return Err(Error::Invalid(format!("layer {layer} {module}: deltas disagree on the weight's shape")));
        }
        let mut sq = 0.0;
        for (ci, fi) in &fs {
            for (cj, fj) in &fs {
                // <B_i^T B_j, A_i A_j^T>: both r_i x r_j.
                for p in 0..fi.rank {
                    for q in 0..fj.rank {
                        let bb: f64 =
                            (0..o0).map(|o| fi.b[o * fi.rank + p] as f64 * fj.b[o * fj.rank + q] as f64).sum();
                        let aa: f64 = (0..i0).map(|i| fi.a[p * i0 + i] as f64 * fj.a[q * i0 + i] as f64).sum();
                        sq += ci * cj * bb * aa;
                    }
                }
            }
        }
        *out.entry(*layer).or_default() += sq.max(0.0);
    }
    Ok(out.into_iter().map(|(l, s)| (l, s.sqrt())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(seed: u32, scale: f32) -> LoraDelta {
        let mut x = seed;
        let mut next = move || {
            x = x.wrapping_mul(1664525).wrapping_add(1013904223);
            (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        let mut adapters = BTreeMap::new();
        for layer in 0..2 {
            let (r, i, o) = (3, 5, 4);
            let f = Factors {
                rank: r,
                in_dim: i,
                out_dim: o,
                a: (0..r * i).map(|_| next()).collect(),
                b: (0..o * r).map(|_| next()).collect(),
            };
            adapters.insert((layer, "mlp.down_proj".to_string()), f);
        }
        LoraDelta { scale, adapters }
    }

    fn dense_norm(terms: &[(f64, &LoraDelta)], layer: usize) -> f64 {
        let f0 = &terms[0].1.adapters[&(layer, "mlp.down_proj".to_string())];
        let mut w = vec![0.0f64; f0.out_dim * f0.in_dim];
        for (s, d) in terms {
            let f = &d.adapters[&(layer, "mlp.down_proj".to_string())];
            for o in 0..f.out_dim {
                for i in 0..f.in_dim {
                    let v: f64 = (0..f.rank).map(|r| f.b[o * f.rank + r] as f64 * f.a[r * f.in_dim + i] as f64).sum();
                    w[o * f.in_dim + i] += s * d.scale as f64 * v;
                }
            }
        }
        w.iter().map(|v| v * v).sum::<f64>().sqrt()
    }

    #[test]
    fn encode_decode_round_trip() {
        let d = delta(1, 2.5);
        assert_eq!(LoraDelta::decode(&d.encode().unwrap()).unwrap(), d);
        assert!(LoraDelta::decode(b"not safetensors").is_err());
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
        // A delta minus itself is nothing.
        let zero = layer_norms(&[(1.0, &a), (-1.0, &a)]).unwrap();
        assert!(zero.values().all(|&n| n < 1e-5), "{zero:?}");
    }
}
