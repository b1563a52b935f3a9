//! A LoRA delta: for each adapted (layer, module) a pair of factors `A` (rank x in) and `B` (out x rank), standing
//! for the weight change `scale * B @ A`, plus what it applies to and who made it.
//!
//! The native file is safetensors: tensors `layers.{layer}.{module}.lora_a|lora_b` (f32, modules named as in
//! Hugging Face Llama: `mlp.down_proj`, `self_attn.q_proj`, ...) and header metadata (format, base model hash, scale,
//! injector). A delta's identity is [`Delta::content_hash`], a SHA-256 over a canonical encoding, so equal deltas
//! have equal hashes however their files were written. [`peft`] converts to and from Hugging Face PEFT.
//! Nothing here needs candle: services and operator tools read deltas without a tensor library.
#![forbid(unsafe_code)]

pub mod peft;

use std::collections::{BTreeMap, HashMap};

use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const FORMAT: &str = "engram-lora-delta/1";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("malformed delta: {0}")]
    Malformed(String),
    #[error("invalid delta: {0}")]
    Invalid(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn malformed(msg: impl Into<String>) -> Error {
    Error::Malformed(msg.into())
}

/// The factors of one adapted weight.
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

impl Factors {
    pub fn new(rank: usize, in_dim: usize, out_dim: usize, a: Vec<f32>, b: Vec<f32>) -> Result<Self> {
        if a.len() != rank * in_dim || b.len() != out_dim * rank {
            return Err(Error::Invalid(format!(
                "factors of rank {rank} for a {out_dim}x{in_dim} weight need {} and {} values, got {} and {}",
                rank * in_dim,
                out_dim * rank,
                a.len(),
                b.len()
            )));
        }
        Ok(Self { rank, in_dim, out_dim, a, b })
    }
}

impl Factors {
    /// Exact factors of a dense `out x in` weight change (row-major), at scale 1: the dense matrix as A with B the
    /// identity (or the other way round when the weight is taller than wide), so the rank is `min(out, in)`.
    pub fn exact(in_dim: usize, out_dim: usize, dense: Vec<f32>) -> Result<Self> {
        if dense.len() != in_dim * out_dim {
            return Err(Error::Invalid(format!(
                "a {out_dim}x{in_dim} weight change needs {} values, got {}",
                in_dim * out_dim,
                dense.len()
            )));
        }
        let identity =
            |n: usize| -> Vec<f32> { (0..n * n).map(|i| if i % (n + 1) == 0 { 1.0 } else { 0.0 }).collect() };
        if out_dim <= in_dim {
            Self::new(out_dim, in_dim, out_dim, dense, identity(out_dim))
        } else {
            Self::new(in_dim, in_dim, out_dim, identity(in_dim), dense)
        }
    }
}

/// Where a delta comes from and what it applies to.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Meta {
    /// Hash of the base model the delta was made for (`BaseModel::hash`).
    pub base_model: String,
    pub scale: f32,
    /// e.g. `hypernet`, `distill`, `import`.
    pub injector: String,
    pub injector_version: String,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Delta {
    pub meta: Meta,
    /// (layer, module) -> factors.
    pub adapters: BTreeMap<(usize, String), Factors>,
    /// Side-memory entries this delta adds (the `memory` composition strategy); `None` for a plain LoRA delta.
    pub memory: Option<Memory>,
}

/// A key-value side memory read at the final residual stream. At every position the residual after the last layer,
/// centred on `mean` and scaled to unit length, is compared with every key (cosine); the best-matching entry adds
/// its value to the normed residual (after the final norm, so a value is a fixed change of the logits) when its
/// score exceeds that entry's threshold, or, where the model without the memory gives its top next token a
/// probability below the entry's gate, when the score exceeds the entry's lower unsure threshold.
/// Nothing before the head sees the memory, so entries cannot disturb each other's keys, and a chain's memories
/// are concatenated, never summed: the thousandth entry is stored exactly like the first.
#[derive(Debug, Clone, PartialEq)]
pub struct Memory {
    pub hidden: usize,
    /// `hidden`: the centre the keys were measured from (a property of the base model, equal along a chain).
    pub mean: Vec<f32>,
    /// `entries x hidden`, unit rows.
    pub keys: Vec<f32>,
    /// `entries x hidden`: what a firing entry adds to the normed residual.
    pub values: Vec<f32>,
    /// `entries`: the cosine an entry's score must exceed to fire.
    pub thresholds: Vec<f32>,
    /// `entries`: below this top next-token probability of the model without the memory, a position is one the
    /// model is unsure of, and the entry fires above `unsure_thresholds` instead. 0 never (deltas written before
    /// gates existed read as 0).
    pub gates: Vec<f32>,
    /// `entries`: the cosine an entry's score must exceed to fire at a position the model is unsure of.
    pub unsure_thresholds: Vec<f32>,
}

impl Memory {
    pub fn entries(&self) -> usize {
        self.thresholds.len()
    }

    /// Checks that the parts agree in shape and hold finite values, keys of unit length and thresholds in [-1, 1].
    pub fn check(&self) -> Result<()> {
        let (d, n) = (self.hidden, self.thresholds.len());
        if d == 0
            || self.mean.len() != d
            || self.keys.len() != n * d
            || self.values.len() != n * d
            || self.gates.len() != n
            || self.unsure_thresholds.len() != n
        {
            return Err(Error::Invalid(format!(
                "memory of {n} entries at hidden size {d} has mean {}, keys {}, values {}, gates {} and unsure \
                 thresholds {} values",
                self.mean.len(),
                self.keys.len(),
                self.values.len(),
                self.gates.len(),
                self.unsure_thresholds.len()
            )));
        }
        if let Some(bad) = self.mean.iter().chain(&self.keys).chain(&self.values).find(|v| !v.is_finite()) {
            return Err(Error::Invalid(format!("memory: non-finite value {bad}")));
        }
        if let Some(t) = self.thresholds.iter().chain(&self.unsure_thresholds).find(|t| !(-1.0..=1.0).contains(*t)) {
            return Err(Error::Invalid(format!("memory: threshold {t} is not a cosine in [-1, 1]")));
        }
        if let Some(g) = self.gates.iter().find(|g| !(0.0..=1.0).contains(*g)) {
            return Err(Error::Invalid(format!("memory: gate {g} is not a probability in [0, 1]")));
        }

        for (i, k) in self.keys.chunks_exact(d).enumerate() {
            let norm = k.iter().map(|x| x * x).sum::<f32>().sqrt();
            if (norm - 1.0).abs() > 1e-3 {
                return Err(Error::Invalid(format!("memory entry {i}: key norm {norm}, expected 1")));
            }
        }
        Ok(())
    }

    /// Appends `other`'s entries; both must be measured from the same centre.
    pub fn extend(&mut self, other: &Memory) -> Result<()> {
        if other.hidden != self.hidden || other.mean != self.mean {
            return Err(Error::Invalid(
                "memories measured from different centres (another base model or strategy configuration) \
                 cannot be joined"
                    .into(),
            ));
        }
        self.keys.extend_from_slice(&other.keys);
        self.values.extend_from_slice(&other.values);
        self.thresholds.extend_from_slice(&other.thresholds);
        self.gates.extend_from_slice(&other.gates);
        self.unsure_thresholds.extend_from_slice(&other.unsure_thresholds);
        Ok(())
    }

    /// The memories of `deltas`, in order, as one (`None` when none carries one).
    pub fn joined<'a>(deltas: impl IntoIterator<Item = &'a Delta>) -> Result<Option<Memory>> {
        let mut out: Option<Memory> = None;
        for m in deltas.into_iter().filter_map(|d| d.memory.as_ref()) {
            match &mut out {
                None => out = Some(m.clone()),
                Some(o) => o.extend(m)?,
            }
        }
        Ok(out)
    }
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn le_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A tensor as read: shape and row-major values.
pub(crate) type Tensor = (Vec<usize>, Vec<f32>);

/// A safetensors header's free-form metadata.
pub(crate) type Metadata = HashMap<String, String>;

/// Reads every tensor of a safetensors file as f32.
pub(crate) fn read_tensors(bytes: &[u8]) -> Result<(Metadata, Vec<(String, Tensor)>)> {
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| malformed(e.to_string()))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(bytes).map_err(|e| malformed(e.to_string()))?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(malformed(format!("{name} is {:?}; deltas are f32", view.dtype())));
        }
        out.push((name, (view.shape().to_vec(), f32s(view.data()))));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((meta, out))
}

pub(crate) fn write_tensors(
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    meta: HashMap<String, String>,
) -> Result<Vec<u8>> {
    let owned: Vec<(String, Vec<usize>, Vec<u8>)> =
        tensors.iter().map(|(n, s, v)| (n.clone(), s.clone(), le_bytes(v))).collect();
    let views = owned
        .iter()
        .map(|(n, shape, data)| {
            safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), data).map(|v| (n.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| malformed(e.to_string()))?;
    let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| malformed(e.to_string()))?;
    canonical_header(bytes)
}

/// The same file with its JSON header's keys in sorted order. safetensors writes the metadata map in hash order,
/// which differs from call to call: the same delta then had different bytes, so a different blob hash and version
/// id, each time it was encoded (a worker's guess of the next version's id missed, and identical deltas did not
/// deduplicate in the content-addressed blob store).
fn canonical_header(mut bytes: Vec<u8>) -> Result<Vec<u8>> {
    fn sorted(v: serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(m) => {
                let m: BTreeMap<String, serde_json::Value> = m.into_iter().map(|(k, v)| (k, sorted(v))).collect();
                serde_json::to_value(m).expect("a map of JSON values is JSON")
            }
            other => other,
        }
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Value =
        serde_json::from_slice(&bytes[8..8 + n]).map_err(|e| malformed(format!("header: {e}")))?;
    let mut canonical = serde_json::to_vec(&sorted(header)).map_err(|e| malformed(e.to_string()))?;
    if canonical.len() > n {
        return Err(malformed("canonical header longer than the written one"));
    }
    // The same length as before (safetensors pads with spaces to keep the data 8-byte aligned).
    canonical.resize(n, b' ');
    bytes[8..8 + n].copy_from_slice(&canonical);
    Ok(bytes)
}

/// Pairs up the A and B tensors of each (layer, module). `parse` names a tensor's layer, module and whether it is
/// the A (`true`) or the B factor; `None` marks a tensor that does not belong in a delta.
pub(crate) fn assemble(
    tensors: Vec<(String, Tensor)>,
    parse: impl Fn(&str) -> Option<(usize, String, bool)>,
) -> Result<BTreeMap<(usize, String), Factors>> {
    let mut parts: BTreeMap<(usize, String), (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    for (name, t) in tensors {
        let (layer, module, is_a) = parse(&name).ok_or_else(|| malformed(format!("unexpected tensor {name}")))?;
        let entry = parts.entry((layer, module)).or_default();
        *(if is_a { &mut entry.0 } else { &mut entry.1 }) = Some(t);
    }
    let mut adapters = BTreeMap::new();
    for ((layer, module), (a, b)) in parts {
        let (Some((sa, a)), Some((sb, b))) = (a, b) else {
            return Err(malformed(format!("layer {layer} {module} lacks its A or B")));
        };
        if sa.len() != 2 || sb.len() != 2 || sa[0] != sb[1] {
            return Err(malformed(format!("layer {layer} {module}: A {sa:?} and B {sb:?} do not chain")));
        }
        adapters.insert((layer, module), Factors { rank: sa[0], in_dim: sa[1], out_dim: sb[0], a, b });
    }
    Ok(adapters)
}

impl Delta {
    /// Largest rank over the adapted weights.
    pub fn rank(&self) -> usize {
        self.adapters.values().map(|f| f.rank).max().unwrap_or(0)
    }

    /// The adapted module names, e.g. `["mlp.down_proj"]`.
    pub fn target_modules(&self) -> Vec<String> {
        let mut m: Vec<String> = self.adapters.keys().map(|(_, m)| m.clone()).collect();
        m.sort();
        m.dedup();
        m
    }

    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut tensors = Vec::new();
        for ((layer, module), f) in &self.adapters {
            tensors.push((format!("layers.{layer}.{module}.lora_a"), vec![f.rank, f.in_dim], f.a.clone()));
            tensors.push((format!("layers.{layer}.{module}.lora_b"), vec![f.out_dim, f.rank], f.b.clone()));
        }
        if let Some(m) = &self.memory {
            let (n, d) = (m.entries(), m.hidden);
            tensors.push(("memory.mean".into(), vec![d], m.mean.clone()));
            tensors.push(("memory.keys".into(), vec![n, d], m.keys.clone()));
            tensors.push(("memory.values".into(), vec![n, d], m.values.clone()));
            tensors.push(("memory.thresholds".into(), vec![n], m.thresholds.clone()));
            tensors.push(("memory.gates".into(), vec![n], m.gates.clone()));
            tensors.push(("memory.unsure_thresholds".into(), vec![n], m.unsure_thresholds.clone()));
        }
        let meta = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("base_model".into(), self.meta.base_model.clone()),
            ("scale".into(), self.meta.scale.to_string()),
            ("rank".into(), self.rank().to_string()),
            ("target_modules".into(), self.target_modules().join(",")),
            ("injector".into(), self.meta.injector.clone()),
            ("injector_version".into(), self.meta.injector_version.clone()),
        ]);
        write_tensors(&tensors, meta)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let (meta, tensors) = read_tensors(bytes)?;
        match meta.get("format") {
            Some(f) if f == FORMAT => {}
            other => return Err(malformed(format!("format {other:?}, expected {FORMAT:?}"))),
        }
        let scale: f32 =
            meta.get("scale").and_then(|s| s.parse().ok()).ok_or_else(|| malformed("missing or unreadable scale"))?;
        let field = |k: &str| meta.get(k).cloned().unwrap_or_default();
        let (memory, tensors): (Vec<_>, Vec<_>) = tensors.into_iter().partition(|(n, _)| n.starts_with("memory."));
        let memory = read_memory(memory)?;
        let adapters = assemble(tensors, |name| {
            let (layer, rest) = name.strip_prefix("layers.")?.split_once('.')?;
            let (module, which) = rest.rsplit_once('.')?;
            let is_a = match which {
                "lora_a" => true,
                "lora_b" => false,
                _ => return None,
            };
            Some((layer.parse().ok()?, module.to_string(), is_a))
        })?;
        Ok(Self {
            meta: Meta {
                base_model: field("base_model"),
                scale,
                injector: field("injector"),
                injector_version: field("injector_version"),
            },
            adapters,
            memory,
        })
    }

    /// SHA-256 (hex) over a canonical encoding: metadata fields in a fixed order, then every adapter in key order
    /// with its shape and little-endian values. Independent of file layout and header key order.
    pub fn content_hash(&self) -> String {
        let mut h = Sha256::new();
        let mut field = |b: &[u8]| {
            h.update((b.len() as u64).to_le_bytes());
            h.update(b);
        };
        field(FORMAT.as_bytes());
        field(self.meta.base_model.as_bytes());
        field(&self.meta.scale.to_le_bytes());
        field(self.meta.injector.as_bytes());
        field(self.meta.injector_version.as_bytes());
        for ((layer, module), f) in &self.adapters {
            field(format!("{layer}/{module}/{}/{}/{}", f.rank, f.in_dim, f.out_dim).as_bytes());
            field(&le_bytes(&f.a));
            field(&le_bytes(&f.b));
        }
        if let Some(m) = &self.memory {
            field(format!("memory/{}/{}", m.entries(), m.hidden).as_bytes());
            for part in [&m.mean, &m.keys, &m.values, &m.thresholds] {
                field(&le_bytes(part));
            }
        }
        hex::encode(h.finalize())
    }

    /// Checks the delta against what it will be applied to: `shape(module)` gives a module's (in, out) dimensions
    /// in the base model (`None`: no such module); `layers` its layer count. Also refuses non-finite values, a rank
    /// above `max_rank`, a per-weight norm of `scale * B @ A` above `max_norm`, and a different base model hash.
    pub fn validate(
        &self,
        base_model: &str,
        layers: usize,
        shape: impl Fn(&str) -> Option<(usize, usize)>,
        max_rank: usize,
        max_norm: f64,
    ) -> Result<()> {
        if self.meta.base_model != base_model {
            return Err(Error::Invalid(format!("made for base model {:?}, not {base_model:?}", self.meta.base_model)));
        }
        if !self.meta.scale.is_finite() {
            return Err(Error::Invalid(format!("scale {} is not finite", self.meta.scale)));
        }
        if self.adapters.is_empty() && self.memory.is_none() {
            return Err(Error::Invalid("no adapted weights and no memory entries".into()));
        }
        if let Some(m) = &self.memory {
            m.check()?;
        }
        for ((layer, module), f) in &self.adapters {
            let at = format!("layer {layer} {module}");
            if *layer >= layers {
                return Err(Error::Invalid(format!("{at}: the base model has {layers} layers")));
            }
            let Some((i, o)) = shape(module) else {
                return Err(Error::Invalid(format!("{at}: the base model has no module {module:?}")));
            };
            if (f.in_dim, f.out_dim) != (i, o) {
                return Err(Error::Invalid(format!(
                    "{at}: factors are for a {}x{} weight, the base model's is {o}x{i}",
                    f.out_dim, f.in_dim
                )));
            }
            if f.rank == 0 || f.rank > max_rank {
                return Err(Error::Invalid(format!("{at}: rank {} outside 1..={max_rank}", f.rank)));
            }
            if let Some(bad) = f.a.iter().chain(&f.b).find(|v| !v.is_finite()) {
                return Err(Error::Invalid(format!("{at}: non-finite value {bad}")));
            }
        }
        for (layer, n) in layer_norms(&[(1.0, self)])? {
            if n > max_norm {
                return Err(Error::Invalid(format!(
                    "layer {layer}: norm {n:.3} of the weight change exceeds {max_norm}"
                )));
            }
        }
        Ok(())
    }

    /// The dense weight change `scale * B @ A` of one adapter, (out x in) row-major.
    pub fn dense(&self, layer: usize, module: &str) -> Option<Vec<f32>> {
        let f = self.adapters.get(&(layer, module.to_string()))?;
        let mut w = vec![0f32; f.out_dim * f.in_dim];
        for o in 0..f.out_dim {
            for r in 0..f.rank {
                let b = f.b[o * f.rank + r] * self.meta.scale;
                for (wi, ai) in
                    w[o * f.in_dim..(o + 1) * f.in_dim].iter_mut().zip(&f.a[r * f.in_dim..(r + 1) * f.in_dim])
                {
                    *wi += b * ai;
                }
            }
        }
        Some(w)
    }
}

impl Delta {
    /// One delta equal to the sum of `chain` (what a compaction version stores): per adapted weight, the dense sum
    /// of every delta's `scale * B @ A`, in exact factors at scale 1, and every memory entry in chain order. Every
    /// delta must be for the same base model.
    pub fn compact(chain: &[&Delta], mut meta: Meta) -> Result<Delta> {
        let Some(first) = chain.first() else {
            return Err(Error::Invalid("nothing to compact".into()));
        };
        if let Some(d) = chain.iter().find(|d| d.meta.base_model != first.meta.base_model) {
            return Err(Error::Invalid(format!(
                "cannot compact deltas for base models {:?} and {:?}",
                first.meta.base_model, d.meta.base_model
            )));
        }
        let mut sums: BTreeMap<(usize, String), (usize, usize, Vec<f32>)> = BTreeMap::new();
        for d in chain {
            for ((layer, module), f) in &d.adapters {
                let entry = sums
                    .entry((*layer, module.clone()))
                    .or_insert_with(|| (f.in_dim, f.out_dim, vec![0.0; f.in_dim * f.out_dim]));
                if (entry.0, entry.1) != (f.in_dim, f.out_dim) {
                    return Err(Error::Invalid(format!(
                        "layer {layer} {module}: factor shapes differ along the chain"
                    )));
                }
                let dense = d.dense(*layer, module).expect("the adapter exists");
                entry.2.iter_mut().zip(dense).for_each(|(s, x)| *s += x);
            }
        }
        meta.base_model = first.meta.base_model.clone();
        meta.scale = 1.0;
        let adapters = sums
            .into_iter()
            .map(|(k, (i, o, w))| Ok((k, Factors::exact(i, o, w)?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        let memory = Memory::joined(chain.iter().copied())?;
        Ok(Delta { meta, adapters, memory })
    }
}

/// The `memory.*` tensors of a delta file as one [`Memory`] (`None` when there are none).
fn read_memory(tensors: Vec<(String, Tensor)>) -> Result<Option<Memory>> {
    if tensors.is_empty() {
        return Ok(None);
    }
    let mut parts: BTreeMap<String, Tensor> = tensors.into_iter().collect();
    let mut take = |name: &str| parts.remove(name).ok_or_else(|| malformed(format!("memory lacks {name}")));
    let (mean, keys, values, thresholds) =
        (take("memory.mean")?, take("memory.keys")?, take("memory.values")?, take("memory.thresholds")?);
    let n = thresholds.1.len();
    // Written before gates existed: no entry is gated.
    let gates = parts.remove("memory.gates").map_or_else(|| vec![0.0; n], |t| t.1);
    let unsure_thresholds = parts.remove("memory.unsure_thresholds").map_or_else(|| vec![1.0; n], |t| t.1);
    if let Some(extra) = parts.keys().next() {
        return Err(malformed(format!("unexpected tensor {extra}")));
    }
    let d = mean.1.len();
    let m = Memory {
        hidden: d,
        mean: mean.1,
        keys: keys.1,
        values: values.1,
        thresholds: thresholds.1,
        gates,
        unsure_thresholds,
    };
    if keys.0 != [n, d] || values.0 != [n, d] {
        return Err(malformed(format!("memory keys {:?} and values {:?} are not {n}x{d}", keys.0, values.0)));
    }
    Ok(Some(m))
}

/// Frobenius norm, per layer, of `sum_i sign_i * scale_i * B_i @ A_i` over the given deltas (all modules of a layer
/// together), computed from r x r Gram matrices, never the dense matrix: cheap even for a 70B model's shapes.
pub fn layer_norms(terms: &[(f64, &Delta)]) -> Result<BTreeMap<usize, f64>> {
    let mut by_module: BTreeMap<&(usize, String), Vec<(f64, &Factors)>> = BTreeMap::new();
    for (sign, d) in terms {
        for (k, f) in &d.adapters {
            by_module.entry(k).or_default().push((sign * d.meta.scale as f64, f));
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

    #[test]
    fn a_memory_written_before_gates_existed_reads_as_ungated() {
        let (n, d) = (2, 3);
        let key = |i: usize| (0..d).map(|j| if i == j { 1.0 } else { 0.0 }).collect::<Vec<f32>>();
        let tensors = vec![
            ("memory.mean".to_string(), vec![d], vec![0.0; d]),
            ("memory.keys".to_string(), vec![n, d], [key(0), key(1)].concat()),
            ("memory.values".to_string(), vec![n, d], vec![0.5; n * d]),
            ("memory.thresholds".to_string(), vec![n], vec![0.7; n]),
        ];
        let meta = HashMap::from([("format".to_string(), FORMAT.to_string()), ("scale".into(), "1".into())]);
        let delta = Delta::decode(&write_tensors(&tensors, meta).unwrap()).unwrap();
        let m = delta.memory.unwrap();
        m.check().unwrap();
        assert_eq!((m.gates, m.unsure_thresholds), (vec![0.0; n], vec![1.0; n]));
    }
}
