//! Probe: does the base model's residual stream say which attribute a question asks about, for the held-out
//! phrasing too? The memory strategy finds the person of a held-out question (98% top-1) but the final residual at
//! its last token does not name the attribute (chance). If some layer does, a side memory could route a held-out
//! question to the right fact's entry. Classifiers (nearest centroid and ridge regression to one-hot) are fitted on
//! trained phrasings only and tested on other people's trained and held-out phrasings, per layer, at the last token
//! and averaged over the question's tokens.
//! `cargo run --release -p engram-compose --example attribute_probe -- models/base 300`

use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};
use engram_compose::keys::padded;
use engram_model::{BaseModel, ForwardOptions, Kernels, Positions};
use engram_world::{Probe, Rng, World};
use nalgebra::DMatrix;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(args.get(1).map(String::as_str).unwrap_or("models/base"));
    let n: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(300);
    let base = BaseModel::load(&dir, &Device::Cpu)?;
    let (llama, tok) = (&base.llama, &base.tokenizer);
    let world = World::new();
    let mut rng = Rng::derive(11, 0xA77);
    let people = world.new_people(&mut rng, 2 * n);
    let (fit_people, test_people) = people.split_at(n);
    let layers = llama.config().num_hidden_layers;
    let pad = tok.token_to_id("<pad>").unwrap();

    // Per layer (inputs of each layer, then the final residual): the last token's residual and the mean over the
    // question's tokens (after `<bos>`).
    let capture = |probes: &[Probe]| -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        let mut last: Vec<Vec<Tensor>> = vec![Vec::new(); layers + 1];
        let mut mean: Vec<Vec<Tensor>> = vec![Vec::new(); layers + 1];
        let rows: Vec<Vec<u32>> =
            probes.iter().map(|p| engram_model::encode(tok, &p.prompt)).collect::<Result<_, _>>()?;
        for batch in rows.chunks(64) {
            let (ids, t) = padded(batch.iter().map(Vec::as_slice), pad, llama.device())?;
            let opts = ForwardOptions { kernels: Kernels::Fused, capture_residuals: true, ..Default::default() };
            let out = llama.forward(&ids, &Positions::From(0), &opts)?;
            // Weights: 1/len over each row's tokens after <bos>, 0 elsewhere.
            let mut w = vec![0f32; batch.len() * t];
            let mut ends = Vec::new();
            for (i, r) in batch.iter().enumerate() {
                for p in 1..r.len() {
                    w[i * t + p] = 1.0 / (r.len() - 1) as f32;
                }
                ends.push((i * t + r.len() - 1) as u32);
            }
            let w = Tensor::from_vec(w, (batch.len(), 1, t), llama.device())?;
            let ends = Tensor::new(ends.as_slice(), llama.device())?;
            for (l, r) in out.residuals.iter().enumerate() {
                let r = r.to_dtype(DType::F32)?;
                last[l].push(r.reshape(((), r.dim(2)?))?.index_select(&ends, 0)?);
                mean[l].push(w.matmul(&r)?.squeeze(1)?);
            }
        }
        let cat =
            |v: Vec<Vec<Tensor>>| -> Result<Vec<Tensor>> { v.into_iter().map(|p| Ok(Tensor::cat(&p, 0)?)).collect() };
        Ok((cat(last)?, cat(mean)?))
    };
    let trained = |who: &[engram_world::Person]| -> Vec<Probe> {
        who.iter().flat_map(|p| world.closed_book_probes_all(p)).collect()
    };
    let heldout = |who: &[engram_world::Person]| -> Vec<Probe> {
        who.iter().flat_map(|p| world.closed_book_probes_heldout(p)).collect()
    };
    let labels = |probes: &[Probe]| -> Vec<usize> {
        probes.iter().map(|p| p.attribute.expect("closed-book probes name their attribute").index()).collect()
    };
    let (fit, test_t, test_h) = (trained(fit_people), trained(test_people), heldout(test_people));
    let t0 = std::time::Instant::now();
    let (fl, fm) = capture(&fit)?;
    let (tl, tm) = capture(&test_t)?;
    let (hl, hm) = capture(&test_h)?;
    eprintln!("captured {} + {} + {} questions in {:?}", fit.len(), test_t.len(), test_h.len(), t0.elapsed());
    let (yf, yt, yh) = (labels(&fit), labels(&test_t), labels(&test_h));

    println!(
        "{:<14} {:>6} | {:>9} {:>9} | {:>9} {:>9}",
        "site", "layer", "cent tr", "cent held", "ridge tr", "ridge held"
    );
    for (site, f, t, h) in [("last token", &fl, &tl, &hl), ("question mean", &fm, &tm, &hm)] {
        for l in 0..=layers {
            let c = centroid(&f[l], &yf)?;
            let r = ridge(&f[l], &yf)?;
            println!(
                "{:<14} {:>6} | {:>9.3} {:>9.3} | {:>9.3} {:>9.3}",
                site,
                if l == layers { "final".to_string() } else { format!("in {l}") },
                c.accuracy(&t[l], &yt)?,
                c.accuracy(&h[l], &yh)?,
                r.accuracy(&t[l], &yt)?,
                r.accuracy(&h[l], &yh)?,
            );
        }
    }
    Ok(())
}

/// Classifies a row by the largest score of `x @ w + b` (one column per attribute), after centring on `mean`.
struct Linear {
    mean: Tensor,
    w: Tensor,
    b: Tensor,
}

impl Linear {
    fn accuracy(&self, x: &Tensor, y: &[usize]) -> Result<f64> {
        let scores = x.broadcast_sub(&self.mean)?.matmul(&self.w)?.broadcast_add(&self.b)?;
        let pred = scores.argmax(D::Minus1)?.to_vec1::<u32>()?;
        Ok(pred.iter().zip(y).filter(|(p, y)| **p as usize == **y).count() as f64 / y.len() as f64)
    }
}

/// Nearest centroid by cosine: columns are the unit-length class means (centred).
fn centroid(x: &Tensor, y: &[usize]) -> Result<Linear> {
    let mean = x.mean_keepdim(0)?;
    let xc = x.broadcast_sub(&mean)?;
    let mut cols = Vec::new();
    for c in 0..5 {
        let idx: Vec<u32> = y.iter().enumerate().filter(|(_, &k)| k == c).map(|(i, _)| i as u32).collect();
        let m = xc.index_select(&Tensor::new(idx.as_slice(), x.device())?, 0)?.mean_keepdim(0)?;
        let norm = m.sqr()?.sum_all()?.sqrt()?;
        cols.push(m.broadcast_div(&norm)?);
    }
    let w = Tensor::cat(&cols, 0)?.t()?.contiguous()?;
    Ok(Linear { mean, w, b: Tensor::zeros(5, DType::F32, x.device())? })
}

/// Ridge regression onto one-hot labels (lambda relative to the mean feature energy).
fn ridge(x: &Tensor, y: &[usize]) -> Result<Linear> {
    let mean = x.mean_keepdim(0)?;
    let xc = x.broadcast_sub(&mean)?;
    let (n, d) = xc.dims2()?;
    let v = xc.flatten_all()?.to_vec1::<f32>()?;
    let xm = DMatrix::from_row_slice(n, d, &v.iter().map(|&a| a as f64).collect::<Vec<_>>());
    let mut t = DMatrix::zeros(n, 5);
    for (i, &k) in y.iter().enumerate() {
        t[(i, k)] = 1.0;
    }
    let g = xm.transpose() * &xm;
    let lambda = 1e-2 * g.trace() / d as f64;
    let a = g + DMatrix::identity(d, d) * lambda;
    let w = a.lu().solve(&(xm.transpose() * t)).expect("ridge system is positive definite");
    let w: Vec<f32> = (0..d).flat_map(|i| (0..5).map(move |j| (i, j))).map(|(i, j)| w[(i, j)] as f32).collect();
    Ok(Linear { mean, w: Tensor::from_vec(w, (d, 5), x.device())?, b: Tensor::full(0.2f32, 5, x.device())? })
}
