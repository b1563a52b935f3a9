//! Probe: can a key-value side memory tell injected facts apart by the residual at a question's last token?
//! Measures, per candidate key site, top-1 retrieval of trained and held-out phrasings among N people's entries,
//! and how often unrelated positions (known facts, reading, skills, other new people) score above a threshold.
//! `cargo run --release -p engram-compose --example memory_probe -- models/base 1000`

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use engram_compose::keys::padded;
use engram_model::{BaseModel, ForwardOptions, Kernels, Positions};
use engram_world::{Rng, World};
use nalgebra::DMatrix;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(args.get(1).map(String::as_str).unwrap_or("models/base"));
    let n: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(1000);
    let base = BaseModel::load(&dir, &Device::Cpu)?;
    let (llama, tok) = (&base.llama, &base.tokenizer);
    let world = World::new();
    let mut rng = Rng::derive(7, 0x5E9);
    let people = world.new_people(&mut rng, n + 200);
    let (injected, others) = people.split_at(n);
    let layers = llama.config().num_hidden_layers;
    let pad = tok.token_to_id("<pad>").unwrap();

    // Captures every layer's residual for `texts`; `last` keeps only the last token of each text.
    let capture = |texts: &[String], last: bool| -> Result<Vec<Tensor>> {
        let mut parts: Vec<Vec<Tensor>> = vec![Vec::new(); layers + 1];
        let rows: Vec<Vec<u32>> = texts.iter().map(|t| engram_model::encode(tok, t)).collect::<Result<_, _>>()?;
        for batch in rows.chunks(64) {
            let (ids, t) = padded(batch.iter().map(Vec::as_slice), pad, llama.device())?;
            let keep: Vec<u32> = batch
                .iter()
                .enumerate()
                .flat_map(|(i, r)| {
                    let from = if last { r.len() - 1 } else { 0 };
                    (from..r.len()).map(move |p| (i * t + p) as u32)
                })
                .collect();
            let keep = Tensor::new(keep.as_slice(), llama.device())?;
            let opts = ForwardOptions { kernels: Kernels::Fused, capture_residuals: true, ..Default::default() };
            let out = llama.forward(&ids, &Positions::From(0), &opts)?;
            for (l, r) in out.residuals.iter().enumerate() {
                parts[l].push(r.reshape(((), r.dim(2)?))?.index_select(&keep, 0)?);
            }
        }
        parts.into_iter().map(|p| Ok(Tensor::cat(&p, 0)?)).collect()
    };
    let q = |who: &engram_world::Person, heldout: bool| -> Vec<String> {
        if heldout {
            world.closed_book_probes_heldout(who).into_iter().map(|p| p.prompt).collect()
        } else {
            world.closed_book_probes_all(who).into_iter().map(|p| p.prompt).collect()
        }
    };
    let trained: Vec<String> = injected.iter().flat_map(|p| q(p, false)).collect();
    let heldout: Vec<String> = injected.iter().flat_map(|p| q(p, true)).collect();
    let mut negatives = engram_compose::nullspace::protected_texts(&world, 400, 0x5AFE);
    let neg_last: Vec<String> = others.iter().flat_map(|p| [q(p, false), q(p, true)].concat()).collect();
    negatives.truncate(negatives.len());
    let t0 = std::time::Instant::now();
    let kt = capture(&trained, true)?;
    let kh = capture(&heldout, true)?;
    let kn = capture(&negatives, false)?;
    let ko = capture(&neg_last, true)?;
    eprintln!(
        "captured {} trained, {} heldout, {} negative positions, {} other-people questions in {:?}",
        trained.len(),
        heldout.len(),
        kn[0].dim(0)?,
        neg_last.len(),
        t0.elapsed()
    );

    for l in 1..=layers {
        for whiten in [false, true] {
            report(l, whiten, &kt[l], &kh[l], &kn[l], &ko[l], n)?;
        }
    }
    Ok(())
}

fn to_dm(t: &Tensor) -> Result<DMatrix<f64>> {
    let (r, c) = t.dims2()?;
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(DMatrix::from_row_iterator(r, c, v.into_iter().map(f64::from)))
}

fn report(l: usize, whiten: bool, kt: &Tensor, kh: &Tensor, kn: &Tensor, ko: &Tensor, n: usize) -> Result<()> {
    let d = kt.dim(1)?;
    let neg = to_dm(kn)?;
    let mean = neg.row_mean();
    // Map: centre on the negatives' mean, then (optionally) whiten by their covariance, then unit length.
    let w = if whiten {
        let mut c = DMatrix::zeros(d, d);
        for r in neg.row_iter() {
            let x = r - &mean;
            c += x.transpose() * &x;
        }
        c /= neg.nrows() as f64;
        let eps = c.trace() / d as f64 * 1e-2;
        let e = nalgebra::SymmetricEigen::new(c);
        let inv: Vec<f64> = e.eigenvalues.iter().map(|&v| 1.0 / (v + eps).sqrt()).collect();
        &e.eigenvectors * DMatrix::from_diagonal(&nalgebra::DVector::from_vec(inv)) * e.eigenvectors.transpose()
    } else {
        DMatrix::identity(d, d)
    };
    let map = |t: &Tensor| -> Result<DMatrix<f64>> {
        let mut m = to_dm(t)?;
        for mut r in m.row_iter_mut() {
            r -= &mean;
        }
        let mut m = m * &w;
        for mut r in m.row_iter_mut() {
            let nrm = r.norm().max(1e-12);
            r /= nrm;
        }
        Ok(m)
    };
    let t = map(kt)?;
    let h = map(kh)?;
    // Entries: one per (person, attribute), the mean of its two trained phrasings.
    let mut e = DMatrix::zeros(n * 5, d);
    for p in 0..n {
        for a in 0..5 {
            let row = (t.row(p * 10 + 2 * a) + t.row(p * 10 + 2 * a + 1)) / 2.0;
            let nrm = row.norm();
            e.set_row(p * 5 + a, &(row / nrm));
        }
    }
    let top = |m: &DMatrix<f64>| -> Vec<(usize, f64)> {
        let s = m * e.transpose();
        s.row_iter()
            .map(|r| {
                let (i, v) = r.iter().enumerate().fold((0, f64::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b });
                (i, v)
            })
            .collect()
    };
    let tt = top(&t);
    let th = top(&h);
    let tn = top(&map(kn)?);
    let to = top(&map(ko)?);
    let rel =
        tt.iter().enumerate().filter(|(i, (j, _))| *j == (i / 10) * 5 + (i % 10) / 2).count() as f64 / tt.len() as f64;
    let gen = th.iter().enumerate().filter(|(i, (j, _))| *j == *i).count() as f64 / th.len() as f64;
    let mut negs: Vec<f64> = tn.iter().map(|x| x.1).chain(to.iter().map(|x| x.1)).collect();
    negs.sort_by(|a, b| b.partial_cmp(a).unwrap());
    let tau = negs[negs.len() / 1000]; // 0.1% of negative positions fire
    let tau_o = {
        let mut o: Vec<f64> = to.iter().map(|x| x.1).collect();
        o.sort_by(|a, b| b.partial_cmp(a).unwrap());
        o[0]
    };
    let rel_t = tt.iter().enumerate().filter(|(i, (j, v))| *j == (i / 10) * 5 + (i % 10) / 2 && *v > tau).count()
        as f64
        / tt.len() as f64;
    let gen_t = th.iter().enumerate().filter(|(i, (j, v))| *j == *i && *v > tau).count() as f64 / th.len() as f64;
    // Per-person entries (mean of all ten trained keys): does the held-out phrasing find its person?
    let mut pe = DMatrix::zeros(n, d);
    for p in 0..n {
        let mut row = t.row(p * 10).clone_owned();
        for k in 1..10 {
            row += t.row(p * 10 + k);
        }
        let nrm = row.norm();
        pe.set_row(p, &(row / nrm));
    }
    let sp = &h * pe.transpose();
    let person_gen = sp
        .row_iter()
        .enumerate()
        .filter(|(i, r)| {
            r.iter().enumerate().fold((0, f64::MIN), |b, (j, &v)| if v > b.1 { (j, v) } else { b }).0 == i / 5
        })
        .count() as f64
        / h.nrows() as f64;
    let ep = &t * e.transpose();
    // Held-out: right person when the attribute is given (argmax over that attribute's entries only).
    let sh = &h * e.transpose();
    let attr_gen = sh
        .row_iter()
        .enumerate()
        .filter(|(i, r)| {
            let a = i % 5;
            (0..n).map(|p| (p, r[p * 5 + a])).fold((0, f64::MIN), |b, x| if x.1 > b.1 { x } else { b }).0 == i / 5
        })
        .count() as f64
        / h.nrows() as f64;
    let _ = ep;
    // Held-out: right attribute when the person is given (argmax over that person's five fact keys).
    let attr_given_person = sh
        .row_iter()
        .enumerate()
        .filter(|(i, r)| {
            let p = i / 5;
            (0..5).map(|a| (a, r[p * 5 + a])).fold((0, f64::MIN), |b, x| if x.1 > b.1 { x } else { b }).0 == i % 5
        })
        .count() as f64
        / h.nrows() as f64;
    println!("  right attribute given the person {attr_given_person:.3}");
    println!("  per-person top1 heldout {person_gen:.3}; right person given the attribute {attr_gen:.3}");
    let best = |m: &DMatrix<f64>| -> Vec<(usize, f64)> {
        (m * pe.transpose())
            .row_iter()
            .map(|r| r.iter().enumerate().fold((0, f64::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b }))
            .collect()
    };
    let pn = best(&map(kn)?);
    let po = best(&map(ko)?);
    let pt = best(&t);
    let ph = best(&h);
    let mut ns: Vec<f64> = pn.iter().map(|x| x.1).collect();
    ns.sort_by(|a, b| b.partial_cmp(a).unwrap());
    let mut os: Vec<f64> = po.iter().map(|x| x.1).collect();
    os.sort_by(|a, b| b.partial_cmp(a).unwrap());
    // Per-entry thresholds: the entry's highest score over even protected positions (times a margin); false fires
    // counted on odd positions.
    let sn = map(kn)? * pe.transpose();
    for margin in [1.0, 0.95, 0.9] {
        let tau: Vec<f64> =
            (0..n).map(|p| (0..sn.nrows()).step_by(2).map(|i| sn[(i, p)]).fold(f64::MIN, f64::max) * margin).collect();
        let fires = (1..sn.nrows()).step_by(2).filter(|&i| (0..n).any(|p| sn[(i, p)] > tau[p])).count() as f64
            / (sn.nrows() / 2) as f64;
        let r =
            pt.iter().enumerate().filter(|(i, (j, v))| *j == i / 10 && *v > tau[*j]).count() as f64 / pt.len() as f64;
        let g =
            ph.iter().enumerate().filter(|(i, (j, v))| *j == i / 5 && *v > tau[*j]).count() as f64 / ph.len() as f64;
        let o = po.iter().filter(|(j, v)| *v > tau[*j]).count() as f64 / po.len() as f64;
        let mut ts = tau.clone();
        ts.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!("  per-entry tau x{margin} (median {:.3}): trained {r:.3} heldout {g:.3}, odd protected positions firing {fires:.4}, other people {o:.3}", ts[n / 2]);
    }
    for frac in [0.0, 0.001, 0.01] {
        let tau = ns[(ns.len() as f64 * frac) as usize];
        let r = pt.iter().enumerate().filter(|(i, (j, v))| *j == i / 10 && *v > tau).count() as f64 / pt.len() as f64;
        let g = ph.iter().enumerate().filter(|(i, (j, v))| *j == i / 5 && *v > tau).count() as f64 / ph.len() as f64;
        let o = os.iter().filter(|&&v| v > tau).count() as f64 / os.len() as f64;
        println!("  person entries, tau at {frac} of protected positions = {tau:.3}: trained {r:.3} heldout {g:.3}, other people firing {o:.3}");
    }
    let mut own_h: Vec<f64> = th.iter().map(|x| x.1).collect();
    own_h.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "layer {l} whiten {whiten}: top1 trained {rel:.3} heldout {gen:.3} | tau(0.1% neg) {tau:.3} max other-people {tau_o:.3} | above tau: trained {rel_t:.3} heldout {gen_t:.3} | heldout score p10 {:.3} p50 {:.3}",
        own_h[own_h.len() / 10],
        own_h[own_h.len() / 2]
    );
    Ok(())
}
