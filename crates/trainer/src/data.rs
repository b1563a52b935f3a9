//! The training mix and packed batches.
//!
//! Each row of a batch holds whole samples back to back; every sample restarts its positions at 0 and a
//! block-diagonal causal mask keeps samples from seeing each other, so a packed row trains exactly what the
//! same samples would train one per row, without padding waste. A batch is a pure function of (seed, step), so a
//! resumed run sees the data it would have seen.

use anyhow::Result;
use candle_core::{Device, Tensor};
use engram_model::{Positions, Tokenizer};
use engram_world::{Asking, PairForm, Rng, Role, Sample, SampleKind, SkillTask, World, MAX_DOC_PEOPLE};
use serde::{Deserialize, Serialize};

/// Sampling weights of the kinds of training text, and loss weights of their roles. A field a recipe misspells is an
/// error, not silently the default.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mix {
    /// In-context reading: a document, then questions whose answers are in it.
    pub reading: f64,
    /// Biographies of known people.
    pub known_bio: f64,
    /// Closed-book questions about known people.
    pub closed_book: f64,
    /// Skill tasks.
    pub skill: f64,
    /// Relative frequency of reading documents with 1..=8 people.
    pub doc_people: [f64; MAX_DOC_PEOPLE],
    /// Curriculum: before step `short_docs_until`, reading documents use these frequencies instead (short documents
    /// first, so copying is learned before binding among many people).
    pub short_doc_people: [f64; MAX_DOC_PEOPLE],
    pub short_docs_until: u64,
    /// Loss weight of answer tokens relative to text tokens (1); prompts get 0.
    pub answer_weight: f32,
    /// Loss weight of a reading document's own text. Values in a document are unpredictable, and learning to
    /// predict them from the type prior competes with learning to copy them into answers.
    #[serde(default = "one")]
    pub reading_text_weight: f32,
    /// Fewest and most questions after a reading document.
    #[serde(default = "one_to_three")]
    pub questions: [usize; 2],
    /// Relative frequency of questions about each attribute after a reading document (city, year, employer, field,
    /// pet); absent: uniform. There are 100 years against 24-40 values of the others, so each year token is an
    /// answer far less often: an experiment knob for the year-reading failure (issue 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reading_attribute_weights: Option<[f64; 5]>,
    /// Also ask training questions in the world's extra paraphrases (never the held-out phrasing), so the model
    /// learns to read a question rather than match two templates per attribute.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paraphrases: bool,
    /// Fewest and most recaps after a reading document: one of its facts restated in a random biography phrasing,
    /// the value graded like an answer (dense practice at binding a value to its name).
    #[serde(default, skip_serializing_if = "no_recaps")]
    pub recaps: [usize; 2],
    /// Skill samples add in the fixed-width form (`SkillTask::PaddedAddition`) instead of the varying-width one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub padded_addition: bool,
    /// Recaps also use the world's fifth wording of each fact (`text::RECAP_WORDING`), the only trained text with the
    /// word "employer".
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub recap_wordings: bool,
    /// Binding drills (`World::binding_drill_sample`): short documents whose people share attribute types, every
    /// fact asked. Absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drill: Option<Drill>,
}

/// How often and how hard the binding drills are.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Drill {
    /// Relative frequency among the mix's sample kinds (reading, known_bio, closed_book, skill, drill).
    pub weight: f64,
    /// Fewest and most people per drill.
    pub people: [usize; 2],
    /// Fewest and most attributes stated (and asked) per person.
    pub attributes: [usize; 2],
    /// Drills only before this step; 0: the whole run.
    #[serde(default)]
    pub until: u64,
    /// The share of drills in pair-recall form (`World::pair_recall_sample`: names and values with no words
    /// between), which this model learns to bind where sentences leave it at chance; `attributes` does not apply
    /// to them. 0: sentences only.
    #[serde(default, skip_serializing_if = "no_pairs")]
    pub pairs: f64,
    /// The templates pair-recall drills draw their entries and questions from. Absent: the bare form.
    #[serde(default, skip_serializing_if = "is_bare")]
    pub pair_form: PairForm,
}

fn is_bare(f: &PairForm) -> bool {
    *f == PairForm::default()
}

fn no_pairs(p: &f64) -> bool {
    *p == 0.0
}

fn no_recaps(r: &[usize; 2]) -> bool {
    r[1] == 0
}

fn one_to_three() -> [usize; 2] {
    [1, 3]
}

fn one() -> f32 {
    1.0
}

impl Default for Mix {
    fn default() -> Self {
        Self {
            reading: 0.45,
            known_bio: 0.15,
            closed_book: 0.25,
            skill: 0.15,
            doc_people: [3.0, 2.0, 2.0, 3.0, 1.0, 1.0, 1.0, 1.0],
            short_doc_people: [2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            short_docs_until: 0,
            answer_weight: 5.0,
            reading_text_weight: 1.0,
            questions: one_to_three(),
            reading_attribute_weights: None,
            paraphrases: false,
            recaps: [0, 0],
            padded_addition: false,
            recap_wordings: false,
            drill: None,
        }
    }
}

impl Mix {
    pub fn sample(&self, world: &World, rng: &mut Rng, step: u64) -> Sample {
        let kinds = [self.reading, self.known_bio, self.closed_book, self.skill];
        // Recipes without drills draw from the four kinds exactly as before drills existed.
        let kind = match &self.drill {
            Some(d) if d.until == 0 || step < d.until => {
                rng.weighted(&[kinds[0], kinds[1], kinds[2], kinds[3], d.weight])
            }
            _ => rng.weighted(&kinds),
        };
        if kind == 4 {
            let d = self.drill.as_ref().expect("kind 4 is drawn only with drills");
            let people = rng.range(d.people[0], d.people[1]);
            if d.pairs > 0.0 && rng.chance(d.pairs) {
                return world.pair_recall_sample(rng, people, &d.pair_form);
            }
            let attributes = rng.range(d.attributes[0], d.attributes[1]);
            return world.binding_drill_sample(rng, people, attributes, self.paraphrases);
        }
        match kind {
            0 => {
                let freq = if step < self.short_docs_until { &self.short_doc_people } else { &self.doc_people };
                let people = 1 + rng.weighted(freq);
                let asking = Asking {
                    questions: self.questions,
                    attribute_weights: self.reading_attribute_weights.as_ref(),
                    paraphrases: self.paraphrases,
                    recaps: self.recaps,
                    recap_wordings: self.recap_wordings,
                };
                world.reading_sample_asking(rng, people, &asking)
            }
            1 => world.known_bio_sample(rng),
            2 => world.closed_book_sample_asking(rng, self.paraphrases),
            _ if self.padded_addition => world.skill_sample_of(rng, SkillTask::PaddedAddition),
            _ => world.skill_sample(rng),
        }
    }
}

/// One tokenized sample: ids and the loss weight of predicting each id.
struct Encoded {
    ids: Vec<u32>,
    weights: Vec<f32>,
}

fn encode(tokenizer: &Tokenizer, sample: &Sample, mix: &Mix) -> Result<Encoded> {
    let text_weight = if sample.kind == SampleKind::Reading { mix.reading_text_weight } else { 1.0 };
    let mut ids = Vec::new();
    let mut weights = Vec::new();
    for seg in &sample.segments {
        let seg_ids = engram_model::encode(tokenizer, &seg.text)?;
        let w = match seg.role {
            Role::Prompt => 0.0,
            Role::Text => text_weight,
            Role::Answer => mix.answer_weight,
        };
        weights.extend(std::iter::repeat_n(w, seg_ids.len()));
        ids.extend(seg_ids);
    }
    Ok(Encoded { ids, weights })
}

/// A packed batch ready for the forward pass.
pub struct Batch {
    pub ids: Tensor,
    pub positions: Positions,
    /// `batch x seq` u32: the next token at each position (0 where there is none).
    pub targets: Tensor,
    /// `batch x seq` f32: loss weight of each target (0 on padding, prompts and sample ends).
    pub weights: Tensor,
    /// Real (non-padding) tokens.
    pub tokens: usize,
}

pub fn batch(
    world: &World,
    tokenizer: &Tokenizer,
    mix: &Mix,
    seed: u64,
    step: u64,
    rows: usize,
    row_len: usize,
    device: &Device,
) -> Result<Batch> {
    let pad = tokenizer.token_to_id("<pad>").unwrap_or(0);
    let mut rng = Rng::derive(seed, step);
    let (mut ids, mut pos, mut tgt, mut wts) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut mask = vec![f32::NEG_INFINITY; rows * row_len * row_len];
    let mut tokens = 0;
    // First fit: a sample that does not fit the space left in a row waits for a later row, and smaller samples
    // fill the gap. A row closes after a few misses in a row.
    let mut waiting: std::collections::VecDeque<Encoded> = std::collections::VecDeque::new();
    for r in 0..rows {
        let mut used = 0;
        let mut misses = 0;
        let mut from_queue = waiting.len();
        while misses < 4 && used < row_len {
            let s = if from_queue > 0 {
                from_queue -= 1;
                waiting.pop_front().expect("counted")
            } else {
                encode(tokenizer, &mix.sample(world, &mut rng, step), mix)?
            };
            if s.ids.len() > row_len {
                continue;
            }
            if used + s.ids.len() > row_len {
                waiting.push_back(s);
                misses += 1;
                continue;
            }
            let n = s.ids.len();
            for i in 0..n {
                ids.push(s.ids[i]);
                pos.push(i as u32);
                let (t, w) = if i + 1 < n { (s.ids[i + 1], s.weights[i + 1]) } else { (0, 0.0) };
                tgt.push(t);
                wts.push(w);
                let q = used + i;
                let row = &mut mask[(r * row_len + q) * row_len..][..row_len];
                row[used..=q].fill(0.0);
            }
            used += n;
            tokens += n;
        }
        for q in used..row_len {
            ids.push(pad);
            pos.push(0);
            tgt.push(0);
            wts.push(0.0);
            mask[(r * row_len + q) * row_len + q] = 0.0;
        }
    }
    let shape = (rows, row_len);
    Ok(Batch {
        ids: Tensor::from_vec(ids, shape, device)?,
        positions: Positions::Packed {
            positions: Tensor::from_vec(pos, shape, device)?,
            mask: Tensor::from_vec(mask, (rows, 1, row_len, row_len), device)?,
        },
        targets: Tensor::from_vec(tgt, shape, device)?,
        weights: Tensor::from_vec(wts, shape, device)?,
        tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_deterministic_packed_and_masked() {
        let world = World::new();
        let tok = crate::tokenizer::build(&world).unwrap();
        let mix = Mix::default();
        let a = batch(&world, &tok, &mix, 7, 3, 4, 320, &Device::Cpu).unwrap();
        let b = batch(&world, &tok, &mix, 7, 3, 4, 320, &Device::Cpu).unwrap();
        assert_eq!(a.ids.to_vec2::<u32>().unwrap(), b.ids.to_vec2::<u32>().unwrap());
        let c = batch(&world, &tok, &mix, 7, 4, 4, 320, &Device::Cpu).unwrap();
        assert_ne!(a.ids.to_vec2::<u32>().unwrap(), c.ids.to_vec2::<u32>().unwrap());
        // First-fit packing leaves little padding.
        assert!(a.tokens as f64 > 0.9 * 4.0 * 320.0, "{} real tokens", a.tokens);
        let Positions::Packed { positions, mask } = &a.positions else { panic!("not packed") };
        let pos = positions.to_vec2::<u32>().unwrap();
        let mask = mask.squeeze(1).unwrap().to_vec3::<f32>().unwrap();
        let bos = tok.token_to_id("<bos>").unwrap();
        let ids = a.ids.to_vec2::<u32>().unwrap();
        for r in 0..4 {
            for q in 0..320 {
                // A sample starts at position 0 with <bos> and sees only itself.
                if pos[r][q] == 0 && ids[r][q] == bos {
                    assert!(q == 0 || mask[r][q][q - 1].is_infinite());
                }
                assert_eq!(mask[r][q][q], 0.0);
                assert!(mask[r][q][q + 1..].iter().all(|m| m.is_infinite()));
            }
        }
    }
}
