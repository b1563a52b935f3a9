//! A softmax over the last dimension that records its backward pass.
//!
//! candle's fused `softmax_last_dim` records none (issue 2168) and the composed `ops::softmax` makes five passes
//! over the attention scores forward and about ten backward, which dominated training time at our sequence lengths.
//! This op makes one pass forward (CPU, f32) and expresses its backward, `y * (g - sum(g * y))`, in tensor ops.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "engram-softmax-last-dim"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("{}: only f32 is supported", self.name());
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("{}: input must be contiguous", self.name());
        };
        let n = layout.dims().last().copied().unwrap_or(1);
        let src = &data[start..end];
        let mut out = vec![0f32; src.len()];
        out.par_chunks_mut(n).zip(src.par_chunks(n)).for_each(|(o, x)| {
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for (o, &x) in o.iter_mut().zip(x) {
                *o = (x - max).exp();
                sum += *o;
            }
            let inv = 1.0 / sum;
            o.iter_mut().for_each(|o| *o *= inv);
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dot = (grad_res * res)?.sum_keepdim(D::Minus1)?;
        Ok(Some((grad_res.broadcast_sub(&dot)? * res)?))
    }
}

/// Differentiable softmax over the last dimension: the one-pass op on CPU f32, candle's composed one elsewhere.
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(Softmax)
    } else {
        candle_nn::ops::softmax(x, D::Minus1)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    #[test]
    fn matches_candle_softmax_forward_and_backward() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 3.0, (2, 3, 5, 7), &dev).unwrap()).unwrap();
        let mask = Tensor::from_vec(
            (0..35).map(|i| if i % 7 > i / 7 + 1 { f32::NEG_INFINITY } else { 0.0 }).collect::<Vec<_>>(),
            (5, 7),
            &dev,
        )
        .unwrap();
        let w = Tensor::randn(0f32, 1.0, (2, 3, 5, 7), &dev).unwrap();
        let xm = x.as_tensor().broadcast_add(&mask).unwrap();
        let ours = softmax_last_dim(&xm).unwrap();
        let theirs = candle_nn::ops::softmax(&xm, D::Minus1).unwrap();
        let diff = |a: &Tensor, b: &Tensor| {
            (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
        };
        assert!(diff(&ours, &theirs) < 1e-6);
        let g1 = (ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (theirs * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let (g1, g2) = (g1.get(&x).unwrap(), g2.get(&x).unwrap());
        assert!(diff(g1, g2) < 1e-5, "{}", diff(g1, g2));
        assert!(g1.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
    }
}
