//! Probe: which key construction lets the memory reach held-out wordings without firing on reading questions?
//! With a lower unsure margin the memory reaches more held-out wordings but, at a thousand entries, fires another
//! person's entry on a four-person reading question the model got right (locality 0.982). The entry it fires is
//! not a namesake's: the bench's case ("which company employs Ulquo Ruslorard ?" firing Ulgol Wynquowyn's employer
//! entry, cosine 0.678 against an unsure threshold of 0.677) shares only the attribute. A guard that also cleared
//! reading questions about two to four made-up namesakes per entry (tried in an earlier version of this probe)
//! raised 8-22 of 5,000 entries' thresholds and changed no firing. So the keys carry too much of what every question of an attribute shares.
//! This probe compares keys as the strategy built them before (five wordings' mean direction from the protected
//! mean) with keys that also drop the attribute's own direction: the attribute's centre (the mean direction of the
//! known people's questions about it) subtracted, which the strategy now does, or that direction projected out.
//! Thresholds are the protected sample's maxima plus the margin, as the strategy sets them less its halfway rule
//! for entries whose own questions sit inside the margin; firing is counted on the bench's injected people and
//! locality reading questions plus a larger sample.
//! `cargo run --release -p engram-compose --example key_probe -- models/base 1000 2000`

use anyhow::Result;
use candle_core::{Device, Tensor, D};
use engram_model::BaseModel;
use engram_world::{Phrasing, Probe, Rng, Split, World};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(args.get(1).map(String::as_str).unwrap_or("models/base"));
    let n: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(1000);
    let reads: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(2000);
    let base = BaseModel::load(&dir, &Device::Cpu)?;
    let (llama, tok) = (&base.llama, &base.tokenizer);
    let world = World::new();
    // The people `engram bench sequential` injects on its default seed, and its locality suites' reading questions.
    let bench_seed = 20261126;
    let mut rng = Rng::derive(bench_seed, 0x5E9);
    // The first `n` are those the bench injects; the rest were never injected (their questions should not fire).
    let people = world.new_people(&mut rng, n + 200);
    let (injected, never) = people.split_at(n);
    let pad = tok.token_to_id("<pad>").unwrap();
    let t0 = std::time::Instant::now();
    let capture = |texts: &[String], last: bool| -> Result<Tensor> {
        let rows: Vec<Vec<u32>> = texts.iter().map(|t| engram_model::encode(tok, t)).collect::<Result<_, _>>()?;
        engram_compose::memory::final_residuals(llama, &rows, pad, last)
    };
    let logits_of = |x: &Tensor| -> Result<Tensor> {
        let mut parts = Vec::new();
        for start in (0..x.dim(0)?).step_by(4096) {
            let rows = x.narrow(0, start, 4096.min(x.dim(0)? - start))?;
            parts.push(llama.normed_logits(&llama.final_norm(&rows)?)?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    };
    let confidence = |x: &Tensor| -> Result<Vec<f32>> {
        Ok(candle_nn::ops::softmax(&logits_of(x)?, D::Minus1)?.max(D::Minus1)?.to_vec1::<f32>()?)
    };
    let unit = |c: &Tensor| -> Result<Tensor> { Ok(c.broadcast_div(&c.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)?) };

    let protected = engram_compose::nullspace::protected_texts(&world, 400, 0x5AFE);
    let kp = capture(&protected, false)?;
    let mean = kp.mean_keepdim(0)?;
    let dirs = |x: &Tensor| unit(&x.broadcast_sub(&mean)?);
    let p_conf = confidence(&kp)?;
    let p = dirs(&kp)?;
    drop(kp);
    let d = mean.dim(1)?;
    let five: Vec<String> = injected
        .iter()
        .flat_map(|who| world.questions_about_with(&who.name(), true).into_iter().map(|(_, q)| format!("<bos> {q}")))
        .collect();
    let raw = dirs(&capture(&five, true)?)?.reshape((n * 5, 5, d))?.mean(1)?;
    // Each attribute's direction: the known people's trained questions about it (what the base model answers).
    let known_q: Vec<String> = world
        .known()
        .iter()
        .flat_map(|who| world.questions_about_with(&who.name(), true).into_iter().map(|(_, q)| format!("<bos> {q}")))
        .collect();
    let kq = dirs(&capture(&known_q, true)?)?.reshape((world.known().len(), 5, 5, d))?;
    let centre = kq.mean(2)?.mean(0)?; // 5 x d, not unit
    let per_entry = centre.repeat((n, 1))?; // entry i*5+a gets attribute a's
    let cu = unit(&per_entry)?;
    let projected = raw.sub(&cu.broadcast_mul(&(raw.mul(&cu)?.sum_keepdim(D::Minus1)?))?)?;
    let variants = [
        ("mean direction (before)", unit(&raw)?),
        ("minus the attribute's centre (the strategy now)", unit(&raw.sub(&per_entry)?)?),
        ("attribute's direction projected out", unit(&projected)?),
    ];
    eprintln!("keys measured in {:?}", t0.elapsed());

    let mut erng = Rng::derive(13, 0x77);
    let mut probes: Vec<(usize, Probe)> =
        (0..reads).map(|_| (4, world.reading_probe(&mut erng, Split::Fresh, 4, Phrasing::Trained))).collect();
    probes.extend((0..reads / 2).map(|_| (1, world.reading_probe(&mut erng, Split::Fresh, 1, Phrasing::Trained))));
    probes.extend(engram_eval::suite_probes(&world, bench_seed, 1, 200).into_iter().map(|p| (4, p)));
    probes.extend(engram_eval::suite_probes(&world, bench_seed, 0, 200).into_iter().map(|p| (1, p)));
    let index: std::collections::HashMap<String, usize> =
        injected.iter().enumerate().map(|(i, p)| (p.name(), i)).collect();
    let asked: Vec<Option<usize>> = probes
        .iter()
        .map(|(_, pr)| {
            let a = pr.attribute?;
            let q = pr.prompt.rsplit("</doc>").next()?;
            world.names_in(q).first().and_then(|nm| index.get(nm)).map(|i| i * 5 + a.index())
        })
        .collect();
    let ex = capture(&probes.iter().map(|(_, p)| p.prompt.clone()).collect::<Vec<_>>(), true)?;
    let elogits = logits_of(&ex)?;
    let e_conf = candle_nn::ops::softmax(&elogits, D::Minus1)?.max(D::Minus1)?.to_vec1::<f32>()?;
    let e_pred = elogits.argmax(D::Minus1)?.to_vec1::<u32>()?;
    let e_right: Vec<bool> = probes
        .iter()
        .zip(&e_pred)
        .map(|((_, p), &t)| engram_model::encode(tok, &p.answer).map(|a| a.first() == Some(&t)).unwrap_or(false))
        .collect();
    let held: Vec<String> =
        injected.iter().flat_map(|p| world.closed_book_probes_heldout(p)).map(|p| p.prompt).collect();
    let hx = capture(&held, true)?;
    let h_conf = confidence(&hx)?;
    let other: Vec<String> = never
        .iter()
        .flat_map(|p| [world.closed_book_probes_all(p), world.closed_book_probes_heldout(p)].concat())
        .map(|p| p.prompt)
        .collect();
    let ox = capture(&other, true)?;
    let o_conf = confidence(&ox)?;
    let (ed, hd, od) = (dirs(&ex)?, dirs(&hx)?, dirs(&ox)?);
    eprintln!("evaluation questions measured in {:?}", t0.elapsed());
    for (docs, label) in [(4, "icl_multi"), (1, "icl_single")] {
        let right = probes.iter().zip(&e_right).filter(|((d, _), r)| *d == docs && **r).count();
        println!("{label}: base right {right} of {}", probes.iter().filter(|(d, _)| *d == docs).count());
    }

    let gate = 0.8f32;
    for (label, keys) in &variants {
        // Per entry, the highest protected score: over all positions, and over those where the model is unsure.
        let (mut pmax, mut gmax) = (vec![f32::MIN; n * 5], vec![f32::MIN; n * 5]);
        for start in (0..p.dim(0)?).step_by(2048) {
            let len = 2048.min(p.dim(0)? - start);
            let s = p.narrow(0, start, len)?.matmul(&keys.t()?)?.to_vec2::<f32>()?;
            for (r, row) in s.iter().enumerate() {
                let unsure = p_conf[start + r] < gate;
                for (e, &v) in row.iter().enumerate() {
                    pmax[e] = pmax[e].max(v);
                    if unsure {
                        gmax[e] = gmax[e].max(v);
                    }
                }
            }
        }
        let best = |x: &Tensor| -> Result<Vec<(usize, f32)>> {
            let s = x.matmul(&keys.t()?)?;
            let i = s.argmax(D::Minus1)?.to_vec1::<u32>()?;
            Ok(i.into_iter().map(|i| i as usize).zip(s.max(D::Minus1)?.to_vec1::<f32>()?).collect())
        };
        let (eb, hb, ob) = (best(&ed)?, best(&hd)?, best(&od)?);
        let top1 = hb.iter().enumerate().filter(|(i, b)| b.0 == *i).count() as f32 / hb.len() as f32;
        println!("== keys: {label}; held-out top-1 {top1:.3}");
        for margin in [0.03f32, 0.05, 0.065, 0.08] {
            let fires = |(e, s): (usize, f32), c: f32| {
                s > pmax[e] + margin || (c < gate && s > (gmax[e] + margin).min(pmax[e] + margin))
            };
            let gen = hb.iter().enumerate().filter(|(i, b)| b.0 == *i && fires(**b, h_conf[*i])).count() as f32
                / hb.len() as f32;
            let oth = ob.iter().zip(&o_conf).filter(|(b, c)| fires(**b, **c)).count() as f32 / ob.len() as f32;
            let (mut wrong, mut flips) = ([0usize; 2], [0usize; 2]);
            for (j, ((docs, _), b)) in probes.iter().zip(&eb).enumerate() {
                if fires(*b, e_conf[j]) && asked[j] != Some(b.0) {
                    let s = usize::from(*docs == 1);
                    wrong[s] += 1;
                    flips[s] += usize::from(e_right[j]);
                }
            }
            println!(
                "  margin {margin:.3}: held-out own-entry firing {gen:.3} | another fact's entry fires on icl_multi \
                 {} (on a right answer {}), icl_single {} ({}) | never-injected people's questions firing {oth:.3}",
                wrong[0], flips[0], wrong[1], flips[1]
            );
        }
    }
    Ok(())
}
