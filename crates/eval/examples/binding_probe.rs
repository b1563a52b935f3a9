//! Where in-context reading of many-person documents goes wrong: for documents of `--people` fresh people, asks
//! about each person in turn and sorts the model's answers into right, another person's value of the same attribute
//! (a binding failure), or anything else, by the asked person's place in the document.
//!
//! `cargo run --release -p engram-eval --example binding_probe -- [MODEL_DIR] [PEOPLE] [DOCS] [VARIANT [DOC PROMPT]]`
//!
//! VARIANT isolates a cause: `distinct` (no two people share a first or last name), `one-phrasing` (every biography
//! in the first phrasing, so a value is always the same distance from its name), `both`, or `drill` (the binding
//! drills' form: one sentence per person, all about the one attribute then asked of each person), or `form` (the
//! pair-recall drills' form, `World::pair_recall`, with the entry template DOC and the question template PROMPT:
//! `form '{N} {V}' '{N}'` is `<doc> C D Y A B X </doc> C D` answered by `Y`; `form '{S}' '{Q}'` is the drill in
//! sentences).

use anyhow::Result;
use engram_model::BaseModel;
use engram_world::{Attribute, Phrasing, Rng, SkillTask, Split, World};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args.get(1).map(String::as_str).unwrap_or("models/base");
    let people: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(4);
    let docs: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(50);
    let variant = args.get(4).map(String::as_str).unwrap_or("as-trained");
    let form = engram_world::PairForm {
        docs: args.get(5).into_iter().cloned().collect(),
        prompts: args.get(6).into_iter().cloned().collect(),
    };
    let drilled = matches!(variant, "drill" | "form");
    let distinct = matches!(variant, "distinct" | "both");
    let one_phrasing = matches!(variant, "one-phrasing" | "both");
    let base = BaseModel::load(std::path::Path::new(dir), &candle_core::Device::Cpu)?;
    let world = World::new();
    let eos = base.tokenizer.token_to_id("<eos>").expect("<eos>");
    let mut rng = Rng::derive(7, people as u64);
    // [place][right, other person's value, anything else]
    let mut tally = vec![[0usize; 3]; people];
    let mut by_attribute = std::collections::BTreeMap::<&str, [usize; 3]>::new();
    // A few answers that are no one's value of the asked attribute, to see what the model reaches for instead.
    let mut others: Vec<String> = Vec::new();
    for _ in 0..docs {
        let ps = loop {
            let ps = world.draw_people(&mut rng, Split::Fresh, people);
            let shared =
                ps.iter().enumerate().any(|(i, p)| ps[..i].iter().any(|q| q.first == p.first || q.last == p.last));
            if !distinct || !shared {
                break ps;
            }
        };
        // Drawn only for drills, so the other variants keep the documents they always had.
        let drill_attribute = if drilled { *rng.pick(&Attribute::ALL) } else { Attribute::ALL[0] };
        // A pair-recall form's own prompt for each person (asked here in the document's order).
        let mut asked = Vec::new();
        let doc = if variant == "form" {
            let (doc, qs) = world.pair_recall(&mut rng, &ps, drill_attribute, &form);
            asked = qs;
            doc
        } else if variant == "drill" {
            let sentences: Vec<String> = ps
                .iter()
                .map(|p| {
                    let phrasing = rng.below(engram_world::text::BIO_ORDER.len());
                    engram_world::text::bio_sentence(drill_attribute, phrasing, &p.name(), p.value(drill_attribute))
                })
                .collect();
            format!("<doc> {} </doc>", sentences.join(" "))
        } else if one_phrasing {
            format!("<doc> {} </doc>", ps.iter().map(|p| p.bio(0)).collect::<Vec<_>>().join(" "))
        } else {
            world.document(&mut rng, &ps, false)
        };
        for (place, who) in ps.iter().enumerate() {
            let attribute = if drilled { drill_attribute } else { *rng.pick(&Attribute::ALL) };
            let q = match asked.iter().find(|(i, _)| *i == place) {
                Some((_, prompt)) => prompt.clone(),
                _ => world.question_about(&mut rng, who, attribute, Phrasing::Trained).1,
            };
            let prompt = base.encode(&format!("<bos> {doc} {q}"))?;
            let got = base.llama.generate_greedy(&prompt, 1, eos, None)?;
            let said = base.decode(&got)?;
            let said = said.trim();
            let kind = if said == who.value(attribute) {
                0
            } else if ps.iter().any(|p| p.value(attribute) == said) {
                1
            } else {
                if others.len() < 6 {
                    others.push(format!("{} asked, said {said:?} (want {})", attribute.name(), who.value(attribute)));
                }
                2
            };
            tally[place][kind] += 1;
            by_attribute.entry(attribute.name()).or_default()[kind] += 1;
        }
    }
    println!("{people}-person documents ({variant}), {docs} of them: right / another person's value / other");
    for (place, t) in tally.iter().enumerate() {
        println!("  person {}: {:>3} / {:>3} / {:>3}", place + 1, t[0], t[1], t[2]);
    }
    for (a, t) in &by_attribute {
        println!("  {a:>8}: {:>3} / {:>3} / {:>3}", t[0], t[1], t[2]);
    }
    for o in &others {
        println!("  other: {o}");
    }
    // The held-out phrasing in context, one-person documents, by attribute: which wording the model cannot read.
    let mut heldout = std::collections::BTreeMap::<&str, [usize; 2]>::new();
    let mut missed = std::collections::BTreeSet::new();
    for _ in 0..200 {
        let p = world.reading_probe(&mut rng, Split::Fresh, 1, Phrasing::Heldout);
        let hit = engram_eval::score(&base.llama, &base.tokenizer, None, std::slice::from_ref(&p))?[0];
        let attribute = p.attribute.expect("reading probes have an attribute").name();
        let e = heldout.entry(attribute).or_default();
        e[0] += hit as usize;
        e[1] += 1;
        // What the model says instead, for the first miss of each attribute.
        if !hit && missed.insert(attribute) {
            let got = base.llama.generate_greedy(&base.encode(&p.prompt)?, 1, eos, None)?;
            let question = p.prompt.rsplit("</doc>").next().unwrap_or("").trim();
            println!("  held-out miss: {question} -> {:?} (want {})", base.decode(&got)?.trim(), p.answer);
        }
    }
    println!("held-out phrasing in context: {heldout:?} (right, asked)");
    // The skills suite by task, for comparison: copying needs the same look-back-and-copy attention as reading.
    for task in [SkillTask::Addition, SkillTask::PaddedAddition, SkillTask::Copy] {
        let probes: Vec<_> = (0..100).map(|_| world.skill_probe(&mut rng, task)).collect();
        let hits = engram_eval::score(&base.llama, &base.tokenizer, None, &probes)?;
        println!("skill {task:?}: {}/100", hits.iter().filter(|&&h| h).count());
        for p in probes.iter().take(3) {
            let ids = base.encode(&p.prompt)?;
            let got = base.llama.generate_greedy(&ids, 8, eos, None)?;
            println!("  {} -> {} (want {})", p.prompt, base.decode(&got)?, p.answer);
        }
    }
    Ok(())
}
