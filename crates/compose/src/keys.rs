//! Keys: what an adapted weight reads. For `mlp.down_proj` that is the MLP hidden activation at every token, the
//! "key" under which the MLP looks a fact up (ROME/MEMIT's key-value view of the MLP). A delta `B A` changes the
//! output at a token only through `A k`, so keeping `A` orthogonal to the keys of what must be kept keeps it.

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use engram_model::{ForwardOptions, Kernels, Llama, Positions, Tokenizer};
use nalgebra::DMatrix;

const BATCH: usize = 32;

/// Token rows right-padded with `pad` into one `rows x t` tensor, and `t`. A causal model never looks right, so
/// padding changes nothing at the real positions.
pub fn padded<'a>(
    rows: impl ExactSizeIterator<Item = &'a [u32]> + Clone,
    pad: u32,
    dev: &candle_core::Device,
) -> Result<(Tensor, usize)> {
    let n = rows.len();
    let t = rows.clone().map(<[u32]>::len).max().unwrap_or(1);
    let flat: Vec<u32> = rows.flat_map(|r| r.iter().copied().chain(std::iter::repeat(pad)).take(t)).collect();
    Ok((Tensor::from_vec(flat, (n, t), dev)?, t))
}

/// `texts` as token rows, each cut to the model's context.
pub fn token_rows(model: &Llama, tokenizer: &Tokenizer, texts: &[String]) -> Result<Vec<Vec<u32>>> {
    let max = model.config().max_position_embeddings;
    texts
        .iter()
        .map(|t| {
            let mut ids = engram_model::encode(tokenizer, t)?;
            ids.truncate(max);
            Ok(ids)
        })
        .collect()
}

/// Runs `texts` through `model` and hands each batch's keys to `sink(layer, keys)`, `keys` being `tokens x in`
/// (padding removed).
fn for_each_key_batch(
    model: &Llama,
    tokenizer: &Tokenizer,
    texts: &[String],
    mut sink: impl FnMut(usize, &Tensor) -> Result<()>,
) -> Result<()> {
    let pad = tokenizer.token_to_id("<pad>").context("tokenizer has no <pad>")?;
    let rows = token_rows(model, tokenizer, texts)?;
    let opts =
        ForwardOptions { kernels: Kernels::Fused, capture_mlp_hidden: true, last_only: true, ..Default::default() };
    for batch in rows.chunks(BATCH) {
        let (ids, t) = padded(batch.iter().map(Vec::as_slice), pad, model.device())?;
        let keep: Vec<u32> =
            batch.iter().enumerate().flat_map(|(i, r)| (0..r.len()).map(move |p| (i * t + p) as u32)).collect();
        let keep = Tensor::new(keep.as_slice(), model.device())?;
        let out = model.forward(&ids, &Positions::From(0), &opts)?;
        for (layer, h) in out.mlp_hidden.iter().enumerate() {
            let flat = h.reshape(((), h.dim(2)?))?.index_select(&keep, 0)?.to_dtype(DType::F32)?;
            sink(layer, &flat)?;
        }
    }
    Ok(())
}

/// Every layer's keys over `texts`: one `tokens x in` matrix per layer.
pub fn keys(model: &Llama, tokenizer: &Tokenizer, texts: &[String]) -> Result<Vec<DMatrix<f64>>> {
    let layers = model.config().num_hidden_layers;
    let mut parts: Vec<Vec<Tensor>> = vec![Vec::new(); layers];
    for_each_key_batch(model, tokenizer, texts, |l, k| {
        parts[l].push(k.clone());
        Ok(())
    })?;
    parts
        .into_iter()
        .map(|p| {
            let k = Tensor::cat(&p, 0)?;
            let (n, d) = k.dims2()?;
            let v = k.flatten_all()?.to_vec1::<f32>()?;
            Ok(DMatrix::from_row_iterator(n, d, v.into_iter().map(f64::from)))
        })
        .collect()
}

/// The uncentred second moment `sum k k^T` over `texts` (AlphaEdit's `K0 K0^T`) of each layer in `only` (every
/// layer when `None`; the others get an empty matrix), and the token count.
pub fn second_moment(
    model: &Llama,
    tokenizer: &Tokenizer,
    texts: &[String],
    only: Option<&[usize]>,
) -> Result<(Vec<DMatrix<f64>>, usize)> {
    let layers = model.config().num_hidden_layers;
    let mut sums: Vec<Option<Tensor>> = vec![None; layers];
    let mut tokens = 0;
    for_each_key_batch(model, tokenizer, texts, |l, k| {
        if l == 0 {
            tokens += k.dim(0)?;
        }
        if only.is_some_and(|o| !o.contains(&l)) {
            return Ok(());
        }
        let m = k.t()?.matmul(k)?;
        sums[l] = Some(match sums[l].take() {
            Some(s) => (s + m)?,
            None => m,
        });
        Ok(())
    })?;
    let moments = sums
        .into_iter()
        .map(|s| {
            let Some(s) = s else {
                anyhow::ensure!(tokens > 0, "no keys: empty text set");
                return Ok(DMatrix::zeros(0, 0));
            };
            let d = s.dim(0)?;
            let v = s.flatten_all()?.to_vec1::<f32>()?;
            Ok(DMatrix::from_row_iterator(d, d, v.into_iter().map(f64::from)))
        })
        .collect::<Result<_>>()?;
    Ok((moments, tokens))
}
