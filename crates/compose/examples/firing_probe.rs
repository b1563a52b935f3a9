//! Probe: which firing rule lets a fact entry answer the held-out phrasing without firing on protected positions?
//! The memory strategy's entries find the right fact for most held-out questions (top-1 among 5,000) but fire for
//! few, because each entry's threshold sits above the highest cosine any protected position reaches. Most protected
//! positions that come that close are ones the model answers with confidence, while a question about a person it
//! was never taught leaves it unsure. This probe compares the absolute threshold alone with the absolute threshold
//! or, where the model's own top next-token probability is below a gate, a lower one: the highest cosine among the
//! protected positions below the gate. Keys come from the two trained phrasings or from all five trained wordings.
//! Thresholds are fitted on even protected positions; firing is counted on odd ones.
//! `cargo run --release -p engram-compose --example firing_probe -- models/base 1000`

use anyhow::Result;
use candle_core::{Device, Tensor, D};
use engram_model::BaseModel;
use engram_world::{Rng, World};

/// Per row: the best entry and its score.
fn best(x: &Tensor, keys: &Tensor) -> Result<Vec<(usize, f32)>> {
    let mut out = Vec::new();
    for start in (0..x.dim(0)?).step_by(2048) {
        let len = 2048.min(x.dim(0)? - start);
        let s = x.narrow(0, start, len)?.matmul(&keys.t()?)?.to_vec2::<f32>()?;
        out.extend(
            s.iter()
                .map(|row| row.iter().enumerate().fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })),
        );
    }
    Ok(out)
}

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
    let pad = tok.token_to_id("<pad>").unwrap();
    let capture = |texts: &[String], last: bool| -> Result<Tensor> {
        let rows: Vec<Vec<u32>> = texts.iter().map(|t| engram_model::encode(tok, t)).collect::<Result<_, _>>()?;
        engram_compose::memory::final_residuals(llama, &rows, pad, last)
    };
    let probes = |who: &engram_world::Person, heldout: bool| -> Vec<String> {
        let p = if heldout { world.closed_book_probes_heldout(who) } else { world.closed_book_probes_all(who) };
        p.into_iter().map(|p| p.prompt).collect()
    };
    let trained: Vec<String> = injected.iter().flat_map(|p| probes(p, false)).collect();
    let heldout: Vec<String> = injected.iter().flat_map(|p| probes(p, true)).collect();
    let other_q: Vec<String> = others.iter().flat_map(|p| [probes(p, false), probes(p, true)].concat()).collect();
    // Five trained wordings per fact (two phrasings, three paraphrases), attribute-major.
    let five = |who: &engram_world::Person| -> Vec<String> {
        world.questions_about_with(&who.name(), true).into_iter().map(|(_, q)| format!("<bos> {q}")).collect()
    };
    let injected5: Vec<String> = injected.iter().flat_map(five).collect();
    let protected = engram_compose::nullspace::protected_texts(&world, 400, 0x5AFE);
    let kp = capture(&protected, false)?;
    let mean = kp.mean_keepdim(0)?;
    let raw =
        [kp, capture(&trained, true)?, capture(&heldout, true)?, capture(&other_q, true)?, capture(&injected5, true)?];
    let d = mean.dim(1)?;
    let unit = |c: &Tensor| -> Result<Tensor> { Ok(c.broadcast_div(&c.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)?) };
    // The base model's top next-token probability at each row: how sure it is without any memory.
    let confidence = |x: &Tensor| -> Result<Vec<f32>> {
        let mut out = Vec::new();
        for start in (0..x.dim(0)?).step_by(4096) {
            let len = 4096.min(x.dim(0)? - start);
            let logits = llama.normed_logits(&llama.final_norm(&x.narrow(0, start, len)?)?)?;
            out.extend(candle_nn::ops::softmax(&logits, D::Minus1)?.max(D::Minus1)?.to_vec1::<f32>()?);
        }
        Ok(out)
    };
    let conf: Vec<Vec<f32>> = raw[..4].iter().map(confidence).collect::<Result<_>>()?;
    for (name, c) in ["protected", "trained", "held-out", "other people"].iter().zip(&conf) {
        let mut v = c.clone();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!(
            "base confidence, {name}: p10 {:.3} p50 {:.3} p90 {:.3}",
            v[v.len() / 10],
            v[v.len() / 2],
            v[v.len() * 9 / 10]
        );
    }
    let m: Vec<Tensor> = raw.iter().map(|x| unit(&x.broadcast_sub(&mean)?)).collect::<Result<_>>()?;
    for from5 in [false, true] {
        let keys = if from5 {
            unit(&m[4].reshape((n * 5, 5, d))?.mean(1)?)?
        } else {
            unit(&m[1].reshape((n * 5, 2, d))?.mean(1)?)?
        };
        for gate in [0.95f32, 0.9, 0.8, 0.7] {
            println!(
                "== keys from {} wordings; or above the unsure positions' max where the base's confidence < {gate}",
                if from5 { 5 } else { 2 }
            );
            report(n, &m[0], &m[1], &m[2], &m[3], &keys, &conf, gate)?;
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn report(
    n: usize,
    p: &Tensor,
    t: &Tensor,
    h: &Tensor,
    o: &Tensor,
    keys: &Tensor,
    conf: &[Vec<f32>],
    gate: f32,
) -> Result<()> {
    let (bp, bt, bh, bo) = (best(p, keys)?, best(t, keys)?, best(h, keys)?, best(o, keys)?);
    // Each entry's highest score over even protected positions: all of them, and only those where the base is unsure.
    let entry_max = |rows: Vec<u32>| -> Result<Vec<f32>> {
        let sel = p.index_select(&Tensor::new(rows.as_slice(), &Device::Cpu)?, 0)?;
        let mut out = vec![f32::MIN; n * 5];
        for start in (0..sel.dim(0)?).step_by(2048) {
            let len = 2048.min(sel.dim(0)? - start);
            let m = sel.narrow(0, start, len)?.matmul(&keys.t()?)?.max(0)?.to_vec1::<f32>()?;
            for (a, b) in out.iter_mut().zip(m) {
                *a = a.max(b);
            }
        }
        Ok(out)
    };
    let pmax = entry_max((0..p.dim(0)? as u32).step_by(2).collect())?;
    let gmax = entry_max((0..p.dim(0)? as u32).step_by(2).filter(|&i| conf[0][i as usize] < gate).collect())?;
    let trained_right = |i: usize, j: usize| j == (i / 10) * 5 + (i % 10) / 2;
    let held_right = |i: usize, j: usize| j == i;
    let top1 = bh.iter().enumerate().filter(|(i, b)| held_right(*i, b.0)).count() as f32 / bh.len() as f32;
    let mut own: Vec<f32> = bh.iter().enumerate().filter(|(i, b)| held_right(*i, b.0)).map(|(_, b)| b.1).collect();
    own.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mut pm = pmax.clone();
    pm.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "held-out top-1 {top1:.3}, its score p10 {:.3} p50 {:.3}; entries' protected max p50 {:.3}",
        own[own.len() / 10],
        own[own.len() / 2],
        pm[pm.len() / 2]
    );
    for margin in [0.0f32, 0.03, 0.08] {
        let fires = |b: &(usize, f32), c: f32| b.1 > pmax[b.0] + margin || (c < gate && b.1 > gmax[b.0] + margin);
        let odd = bp.iter().enumerate().skip(1).step_by(2).filter(|(i, b)| fires(b, conf[0][*i])).count();
        let rel = bt.iter().enumerate().filter(|(i, b)| trained_right(*i, b.0) && fires(b, conf[1][*i])).count() as f32
            / bt.len() as f32;
        let gen = bh.iter().enumerate().filter(|(i, b)| held_right(*i, b.0) && fires(b, conf[2][*i])).count() as f32
            / bh.len() as f32;
        let wrong = bh.iter().enumerate().filter(|(i, b)| !held_right(*i, b.0) && fires(b, conf[2][*i])).count() as f32
            / bh.len() as f32;
        let oth = bo.iter().enumerate().filter(|(i, b)| fires(b, conf[3][*i])).count() as f32 / bo.len() as f32;
        println!(
            "  margin {margin:.2}: trained {rel:.3} held-out right {gen:.3} wrong {wrong:.3} | odd protected firing {odd} of {} | other people's questions firing {oth:.3}",
            bp.len() / 2
        );
    }
    Ok(())
}
