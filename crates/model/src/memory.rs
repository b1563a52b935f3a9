//! The side memory a chain of `memory`-strategy deltas builds (see `engram_lora::Memory`): entries read at the
//! final residual: matched before the final norm, added after it.

use candle_core::{DType, Device, Tensor, D};

use crate::{ModelError, Result};

/// A chain's memory entries as tensors, ready to apply.
#[derive(Debug, Clone)]
pub struct SideMemory {
    /// `1 x hidden`.
    mean: Tensor,
    /// `entries x hidden`, unit rows.
    keys: Tensor,
    /// `entries x hidden`.
    values: Tensor,
    /// `entries`.
    thresholds: Tensor,
    /// `entries`: the top next-token probability below which an entry fires above its unsure threshold instead.
    gates: Tensor,
    /// `entries`.
    unsure_thresholds: Tensor,
    /// Whether any entry has a gate: only then does the caller need the model's own confidence.
    gated: bool,
    entries: usize,
}

impl SideMemory {
    pub fn new(m: &engram_lora::Memory, hidden: usize, device: &Device) -> Result<Self> {
        m.check().map_err(|e| ModelError::Lora(e.to_string()))?;
        if m.hidden != hidden {
            return Err(ModelError::Lora(format!(
                "memory entries are for hidden size {}, the model's is {hidden}",
                m.hidden
            )));
        }
        let n = m.entries();
        Ok(Self {
            mean: Tensor::from_vec(m.mean.clone(), (1, hidden), device)?,
            keys: Tensor::from_vec(m.keys.clone(), (n, hidden), device)?,
            values: Tensor::from_vec(m.values.clone(), (n, hidden), device)?,
            thresholds: Tensor::from_vec(m.thresholds.clone(), n, device)?,
            gates: Tensor::from_vec(m.gates.clone(), n, device)?,
            unsure_thresholds: Tensor::from_vec(m.unsure_thresholds.clone(), n, device)?,
            gated: m.gates.iter().any(|&g| g > 0.0),
            entries: n,
        })
    }

    /// These entries followed by `other`'s; both must be measured from the same centre.
    pub fn joined(&self, other: &SideMemory) -> Result<SideMemory> {
        let same = self.mean.sub(&other.mean)?.abs()?.max_all()?.to_scalar::<f32>()? == 0.0;
        if !same || self.mean.dims() != other.mean.dims() {
            return Err(ModelError::Lora(
                "memories measured from different centres (another base model or strategy configuration) cannot be \
                 joined"
                    .into(),
            ));
        }
        Ok(Self {
            mean: self.mean.clone(),
            keys: Tensor::cat(&[&self.keys, &other.keys], 0)?,
            values: Tensor::cat(&[&self.values, &other.values], 0)?,
            thresholds: Tensor::cat(&[&self.thresholds, &other.thresholds], 0)?,
            gates: Tensor::cat(&[&self.gates, &other.gates], 0)?,
            unsure_thresholds: Tensor::cat(&[&self.unsure_thresholds, &other.unsure_thresholds], 0)?,
            gated: self.gated || other.gated,
            entries: self.entries + other.entries,
        })
    }

    pub fn entries(&self) -> usize {
        self.entries
    }

    /// Whether [`SideMemory::added`] reads the model's own confidence (some entry is gated).
    pub fn gated(&self) -> bool {
        self.gated
    }

    /// What the memory adds at every position of `x` (final residuals, `batch x seq x hidden`, before the final
    /// norm): the value of the best-matching entry when its cosine exceeds that entry's threshold, or its unsure
    /// threshold where `confidence` (`batch x seq`: the model's top next-token probability without the memory) is
    /// below the entry's gate; else zero. One entry at most per position: a person's value is tuned alone. The
    /// caller adds it after the final norm.
    pub fn added(&self, x: &Tensor, confidence: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let flat = x.reshape((b * t, d))?.to_dtype(DType::F32)?;
        let centred = flat.broadcast_sub(&self.mean)?;
        let norm = centred.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12f32, f32::MAX)?;
        let scores = centred.matmul(&self.keys.t()?)?.broadcast_div(&norm)?;
        let best = scores.argmax(D::Minus1)?;
        let score = scores.max(D::Minus1)?;
        let mut fire = score.gt(&self.thresholds.index_select(&best, 0)?)?.to_dtype(DType::F32)?;
        if let (Some(c), true) = (confidence, self.gated) {
            let unsure = c.flatten_all()?.to_dtype(DType::F32)?.lt(&self.gates.index_select(&best, 0)?)?;
            let above = score.gt(&self.unsure_thresholds.index_select(&best, 0)?)?;
            let gated = unsure.to_dtype(DType::F32)?.mul(&above.to_dtype(DType::F32)?)?;
            fire = fire.maximum(&gated)?;
        }
        let add = self.values.index_select(&best, 0)?.broadcast_mul(&fire.unsqueeze(1)?)?;
        Ok(add.reshape((b, t, d))?.to_dtype(x.dtype())?)
    }
}
