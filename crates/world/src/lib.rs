//! The synthetic knowledge world Engram is taught and tested on.
//!
//! Invented people (syllable names, so no real-world knowledge applies) with five attributes, biographies in four
//! phrasings, documents of one to eight people, questions in three phrasings per attribute (one held out of all
//! training), and skill tasks that stand for capabilities unrelated to facts.
//!
//! Splits of people, fixed by [`WORLD_SEED`]:
//! - `known`: the base model memorises them (its prior knowledge);
//! - `fresh`: never in any training; evaluation and later injection draw from them;
//! - `reading`: name pairs used, with random attributes each time, to teach in-context reading.
//!
//! Pure: no IO. Everything is a function of a seed.

mod rng;
pub mod text;

pub use rng::Rng;
use serde::{Deserialize, Serialize};
use text::{HELDOUT_PHRASING, TRAINED_PHRASINGS};

/// Fixes the vocabulary, the names and the splits. Changing it invalidates every shipped model.
pub const WORLD_SEED: u64 = 0x456E_6772_616D;
pub const KNOWN_PEOPLE: usize = 200;
pub const FRESH_PEOPLE: usize = 1000;
pub const MAX_DOC_PEOPLE: usize = 8;

const SYLLABLES: [&str; 24] = [
    "ba", "dre", "gol", "kin", "lor", "mav", "nes", "pil", "quo", "rus", "sev", "tam", "ul", "vex", "wyn", "yor",
    "zan", "fen", "hal", "jus", "osk", "eld", "bry", "cael",
];
const FIRST_NAMES: usize = 64;
const LAST_NAMES: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Attribute {
    City,
    Year,
    Employer,
    Field,
    Pet,
}

impl Attribute {
    pub const ALL: [Attribute; 5] = [Self::City, Self::Year, Self::Employer, Self::Field, Self::Pet];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::City => "city",
            Self::Year => "year",
            Self::Employer => "employer",
            Self::Field => "field",
            Self::Pet => "pet",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Known,
    Fresh,
    Reading,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Person {
    pub first: String,
    pub last: String,
    /// Indexed by [`Attribute::index`].
    pub values: [String; 5],
}

impl Person {
    pub fn name(&self) -> String {
        format!("{} {}", self.first, self.last)
    }

    pub fn value(&self, attribute: Attribute) -> &str {
        &self.values[attribute.index()]
    }

    /// The biography in one phrasing: five sentences, each naming the person in full.
    pub fn bio(&self, phrasing: usize) -> String {
        let name = self.name();
        text::BIO_ORDER[phrasing]
            .iter()
            .map(|&a| text::bio_sentence(Attribute::ALL[a], phrasing, &name, &self.values[a]))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Who a piece of training text is for: the loss weight a trainer gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Read but not predicted (questions, task prompts).
    Prompt,
    /// Predicted as language (documents, biographies).
    Text,
    /// The graded part: an answer.
    Answer,
}

#[derive(Debug, Clone, Serialize)]
pub struct Segment {
    pub role: Role,
    pub text: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SampleKind {
    Reading,
    KnownBio,
    ClosedBook,
    Skill,
}

/// One training sample: text split by role. Starts with `<bos>`, ends with `<eos>`.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub kind: SampleKind,
    pub segments: Vec<Segment>,
}

impl Sample {
    pub fn text(&self) -> String {
        self.segments.iter().map(|s| s.text.as_str()).collect::<Vec<_>>().join(" ")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SkillTask {
    /// Multi-digit addition, digits written least-significant first (the order a small model can carry in).
    Addition,
    /// Repeat a random symbol sequence.
    Copy,
    /// Addition of two three-digit numbers written with leading zeros, digits least-significant first, and a
    /// four-digit sum: every digit sits at the same place in every problem, so digit i of the sum reads digits i
    /// (and i-1, for the carry) of both operands at fixed distances. Small transformers learn addition in this
    /// form (Lee et al. 2023, "Teaching arithmetic to small transformers"); with operands of varying length the
    /// shipped model never got a single sum right.
    PaddedAddition,
}

/// The skills every evaluation and canary asks, half each: fixed-width addition (the form a model this small can
/// learn; varying-width addition stayed at 0 in every shipped model up to the one trained with `base-read.json`)
/// and copying.
pub const SKILL_SUITE: [SkillTask; 2] = [SkillTask::PaddedAddition, SkillTask::Copy];

/// A graded question: greedy decoding of `prompt` must produce exactly `answer` (which ends in `<eos>`).
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    pub prompt: String,
    pub answer: String,
    pub attribute: Option<Attribute>,
}

/// What a reading sample asks after its document.
#[derive(Debug, Clone, Copy)]
pub struct Asking<'a> {
    /// Fewest and most questions.
    pub questions: [usize; 2],
    /// Relative frequency of each attribute (indexed like [`Attribute::ALL`]); `None`: uniform.
    pub attribute_weights: Option<&'a [f64; 5]>,
    /// Ask in [`text::PARAPHRASE`]'s wordings too.
    pub paraphrases: bool,
    /// Fewest and most recaps: facts of the document restated after it, value graded like an answer.
    pub recaps: [usize; 2],
    /// Recaps also use [`text::RECAP_WORDING`].
    pub recap_wordings: bool,
}

impl Default for Asking<'_> {
    fn default() -> Self {
        Self { questions: [1, 3], attribute_weights: None, paraphrases: false, recaps: [0, 0], recap_wordings: false }
    }
}

/// The shape of a pair-recall drill ([`World::pair_recall_sample`]): templates drawn at random, one per document
/// entry and one per question, so a curriculum can widen the gap between a name and its value, and between a name
/// and the answer, a word at a time while keeping the earlier forms in the mix.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairForm {
    /// A document entry, `{N}` the name and `{V}` the value (e.g. `{N} is {V} .`), or `{S}` for a biography
    /// sentence of the drill's attribute in any phrasing. Empty: `{N} {V}`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub docs: Vec<String>,
    /// A question, `{N}` the name (e.g. `{N} ? A :`), or `{Q}` for a trained question in its frame. Empty: `{N}`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prompts: Vec<String>,
}

impl PairForm {
    /// Why these templates cannot make a drill, if they cannot: an entry is `{S}` or holds `{N}` and `{V}` once each,
    /// a question is `{Q}` or holds `{N}` once, and no other `{...}` appears (a typo would otherwise train as text).
    pub fn check(&self) -> Result<(), String> {
        let holes = |t: &str| t.matches('{').count();
        for t in &self.docs {
            let ok = t == "{S}" || (t.matches("{N}").count() == 1 && t.matches("{V}").count() == 1 && holes(t) == 2);
            if !ok {
                return Err(format!(
                    "pair_form entry {t:?}: use {{S}}, or {{N}} and {{V}} once each and nothing else in braces"
                ));
            }
        }
        for t in &self.prompts {
            let ok = t == "{Q}" || (t.matches("{N}").count() == 1 && holes(t) == 1);
            if !ok {
                return Err(format!("pair_form question {t:?}: use {{Q}}, or {{N}} once and nothing else in braces"));
            }
        }
        Ok(())
    }
}

/// Which question phrasings a probe may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phrasing {
    Trained,
    Heldout,
}

#[derive(Debug, Clone)]
pub struct World {
    first_names: Vec<String>,
    last_names: Vec<String>,
    values: [Vec<String>; 5],
    known: Vec<Person>,
    fresh: Vec<Person>,
    reading_pairs: Vec<(usize, usize)>,
}

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}

impl World {
    pub fn new() -> Self {
        let mut rng = Rng::new(WORLD_SEED);
        let mut taken: std::collections::HashSet<String> =
            text::template_words().into_iter().map(str::to_string).collect();
        let mut coin = |rng: &mut Rng, syllables: usize, suffixes: &[&str], capital: bool, n: usize| {
            let mut out = Vec::with_capacity(n);
            while out.len() < n {
                let mut w: String = (0..syllables).map(|_| *rng.pick(&SYLLABLES)).collect();
                w.push_str(*rng.pick(suffixes));
                if capital {
                    w[..1].make_ascii_uppercase();
                }
                if taken.insert(w.clone()) {
                    out.push(w);
                }
            }
            out
        };
        let first_names = coin(&mut rng, 2, &[""], true, FIRST_NAMES);
        let last_names = coin(&mut rng, 2, &["son", "wyn", "ard", "ley", "ez"], true, LAST_NAMES);
        let values = [
            coin(&mut rng, 2, &["holm", "mere", "stad", "wick", "gard"], true, 40),
            (1900..2000).map(|y| y.to_string()).collect(),
            coin(&mut rng, 2, &["corp", "tek", "works", "labs"], true, 40),
            coin(&mut rng, 2, &["ology", "onics", "istry"], false, 24),
            coin(&mut rng, 2, &["ox", "ling", "et"], false, 24),
        ];

        let mut pairs: Vec<(usize, usize)> =
            (0..FIRST_NAMES).flat_map(|f| (0..LAST_NAMES).map(move |l| (f, l))).collect();
        rng.shuffle(&mut pairs);
        let mut world = World {
            first_names,
            last_names,
            values,
            known: Vec::new(),
            fresh: Vec::new(),
            reading_pairs: pairs[KNOWN_PEOPLE + FRESH_PEOPLE..].to_vec(),
        };
        world.known = pairs[..KNOWN_PEOPLE].iter().map(|&p| world.person(&mut rng, p)).collect();
        world.fresh =
            pairs[KNOWN_PEOPLE..KNOWN_PEOPLE + FRESH_PEOPLE].iter().map(|&p| world.person(&mut rng, p)).collect();
        world
    }

    fn person(&self, rng: &mut Rng, (first, last): (usize, usize)) -> Person {
        Person {
            first: self.first_names[first].clone(),
            last: self.last_names[last].clone(),
            values: std::array::from_fn(|a| rng.pick(&self.values[a]).clone()),
        }
    }

    pub fn known(&self) -> &[Person] {
        &self.known
    }

    pub fn fresh(&self) -> &[Person] {
        &self.fresh
    }

    pub fn values(&self, attribute: Attribute) -> &[String] {
        &self.values[attribute.index()]
    }

    /// A person for reading practice: a reading-split name with attributes drawn anew each time.
    pub fn reading_person(&self, rng: &mut Rng) -> Person {
        let pair = *rng.pick(&self.reading_pairs);
        self.person(rng, pair)
    }

    /// `n` distinct people drawn from `split` (reading people get fresh attributes).
    pub fn draw_people(&self, rng: &mut Rng, split: Split, n: usize) -> Vec<Person> {
        let mut out: Vec<Person> = Vec::with_capacity(n);
        while out.len() < n {
            let p = match split {
                Split::Known => rng.pick(&self.known).clone(),
                Split::Fresh => rng.pick(&self.fresh).clone(),
                Split::Reading => self.reading_person(rng),
            };
            if out.iter().all(|q| q.first != p.first || q.last != p.last) {
                out.push(p);
            }
        }
        out
    }

    /// `n` people with distinct names whom no training ever saw with these attributes: the `fresh` split in a
    /// seeded order, then (past its 1000) reading-split names with newly drawn attributes. What a sequential
    /// benchmark injects one after another.
    pub fn new_people(&self, rng: &mut Rng, n: usize) -> Vec<Person> {
        let mut out = self.fresh.clone();
        rng.shuffle(&mut out);
        out.truncate(n);
        let mut pairs = self.reading_pairs.clone();
        rng.shuffle(&mut pairs);
        for &pair in pairs.iter().take(n.saturating_sub(out.len())) {
            let p = self.person(rng, pair);
            out.push(p);
        }
        out
    }

    /// How many distinct people [`World::new_people`] can return.
    pub fn new_people_limit(&self) -> usize {
        self.fresh.len() + self.reading_pairs.len()
    }

    /// Every word the world can produce: the tokenizer's vocabulary, specials first, in a stable order.
    pub fn vocabulary(&self) -> Vec<String> {
        let mut words: Vec<String> = text::SPECIAL.iter().map(|s| s.to_string()).collect();
        words.extend(text::template_words().into_iter().map(str::to_string));
        words.extend((0..10).map(|d| d.to_string()));
        words.extend(self.first_names.iter().cloned());
        words.extend(self.last_names.iter().cloned());
        for v in &self.values {
            words.extend(v.iter().cloned());
        }
        let mut seen = std::collections::HashSet::new();
        words.retain(|w| seen.insert(w.clone()));
        words
    }

    /// A document about `people`: their biographies (random phrasings), optionally with distractor sentences.
    pub fn document(&self, rng: &mut Rng, people: &[Person], distractors: bool) -> String {
        let mut parts = vec!["<doc>".to_string()];
        for p in people {
            if distractors && rng.chance(0.3) {
                parts.push(self.distractor(rng));
            }
            parts.push(p.bio(rng.below(text::BIO_ORDER.len())));
        }
        if distractors && rng.chance(0.3) {
            parts.push(self.distractor(rng));
        }
        parts.push("</doc>".to_string());
        parts.join(" ")
    }

    /// `n` distractor sentences (facts about no one), e.g. the haystack of a needle test.
    pub fn distractors(&self, rng: &mut Rng, n: usize) -> String {
        (0..n).map(|_| self.distractor(rng)).collect::<Vec<_>>().join(" ")
    }

    fn distractor(&self, rng: &mut Rng) -> String {
        let a = rng.below(5);
        text::fill(text::DISTRACTOR[a], "", rng.pick(&self.values[a]).as_str())
    }

    /// A random question about `person`: its attribute, the prompt `Q : ... A :` and the answer `value <eos>`.
    pub fn question_for(&self, rng: &mut Rng, person: &Person, phrasing: Phrasing) -> (Attribute, String, String) {
        let attribute = *rng.pick(&Attribute::ALL);
        self.question_about(rng, person, attribute, phrasing)
    }

    /// A question about `attribute` of `person` in a phrasing drawn from `phrasing`, and its answer.
    pub fn question_about(
        &self,
        rng: &mut Rng,
        person: &Person,
        attribute: Attribute,
        phrasing: Phrasing,
    ) -> (Attribute, String, String) {
        let p = match phrasing {
            Phrasing::Trained => *rng.pick(&TRAINED_PHRASINGS),
            Phrasing::Heldout => HELDOUT_PHRASING,
        };
        let q = text::framed(&text::question(attribute, p, &person.name()));
        (attribute, q, format!("{} <eos>", person.value(attribute)))
    }

    // ---- training samples ----

    /// A document of 1..=8 reading people followed by 1..=3 questions about them (trained phrasings only).
    pub fn reading_sample(&self, rng: &mut Rng, people: usize) -> Sample {
        self.reading_sample_with(rng, people, [1, 3])
    }

    /// A reading document followed by `questions[0]..=questions[1]` questions about its people.
    pub fn reading_sample_with(&self, rng: &mut Rng, people: usize, questions: [usize; 2]) -> Sample {
        self.reading_sample_asking(rng, people, &Asking { questions, ..Asking::default() })
    }

    /// A reading document of `people` reading-split people, then what `asking` says to ask about it.
    pub fn reading_sample_asking(&self, rng: &mut Rng, people: usize, asking: &Asking) -> Sample {
        let people = self.draw_people(rng, Split::Reading, people);
        let doc = self.document(rng, &people, true);
        let mut segments = vec![Segment { role: Role::Text, text: format!("<bos> {doc}") }];
        let mut questions = rng.range(asking.questions[0], asking.questions[1]);
        let mut recaps = if asking.recaps[1] > 0 { rng.range(asking.recaps[0], asking.recaps[1]) } else { 0 };
        while questions + recaps > 0 {
            // Recaps and questions interleave at random, so neither has a fixed place after the document.
            let recap = recaps > 0 && (questions == 0 || rng.below(questions + recaps) < recaps);
            let who = rng.pick(&people);
            if recap {
                recaps -= 1;
                segments.extend(self.recap(rng, who, asking.recap_wordings));
                continue;
            }
            questions -= 1;
            let attribute = match asking.attribute_weights {
                None => *rng.pick(&Attribute::ALL),
                Some(w) => Attribute::ALL[rng.weighted(w)],
            };
            let (_, q, a) = self.training_question(rng, who, attribute, asking.paraphrases);
            segments.push(Segment { role: Role::Prompt, text: q });
            // Every answer ends in `<eos>`, as in evaluation, even when another question follows.
            segments.push(Segment { role: Role::Answer, text: a });
        }
        Sample { kind: SampleKind::Reading, segments }
    }

    /// A binding drill: `people` reading people, each stated by the same `attributes` attributes only (one sentence
    /// each, in random phrasings), then every one of those facts asked, in random order. With every person sharing
    /// the attribute types, finding a value of the asked type is worth 1/`people`: only tying the value to the named
    /// person answers. Short documents put many graded answers in a step (the dense multi-query recall that small
    /// transformers learn binding from, Zoology's MQAR) where a reading sample's 1-8 five-sentence biographies have
    /// two to four.
    pub fn binding_drill_sample(&self, rng: &mut Rng, people: usize, attributes: usize, paraphrases: bool) -> Sample {
        let people = self.draw_people(rng, Split::Reading, people);
        let mut asked = Attribute::ALL.to_vec();
        rng.shuffle(&mut asked);
        asked.truncate(attributes.clamp(1, Attribute::ALL.len()));
        let mut doc = vec!["<doc>".to_string()];
        let mut facts = Vec::new();
        for (i, p) in people.iter().enumerate() {
            let mut order = asked.clone();
            rng.shuffle(&mut order);
            for a in order {
                let phrasing = rng.below(text::BIO_ORDER.len());
                doc.push(text::bio_sentence(a, phrasing, &p.name(), p.value(a)));
                facts.push((i, a));
            }
        }
        doc.push("</doc>".to_string());
        rng.shuffle(&mut facts);
        let mut segments = vec![Segment { role: Role::Text, text: format!("<bos> {}", doc.join(" ")) }];
        for (i, a) in facts {
            let (_, q, answer) = self.training_question(rng, &people[i], a, paraphrases);
            segments.push(Segment { role: Role::Prompt, text: q });
            segments.push(Segment { role: Role::Answer, text: answer });
        }
        Sample { kind: SampleKind::Reading, segments }
    }

    /// A pair-recall drill, binding in its barest form (Zoology's MQAR): `people` reading people as name-value pairs
    /// of one attribute with no words between (`<doc> C D Y A B X </doc>`), then each name alone, answered by its
    /// value. An induction head (find the earlier last name, copy the token after it) answers it, where a sentence
    /// puts words between the name and its value and the question puts words after the name. `form` widens either
    /// gap (see [`PairForm`]); its default is the bare form.
    pub fn pair_recall_sample(&self, rng: &mut Rng, people: usize, form: &PairForm) -> Sample {
        let people = self.draw_people(rng, Split::Reading, people);
        let attribute = *rng.pick(&Attribute::ALL);
        let (document, asked) = self.pair_recall(rng, &people, attribute, form);
        let mut segments = vec![Segment { role: Role::Text, text: format!("<bos> {document}") }];
        for (i, prompt) in asked {
            segments.push(Segment { role: Role::Prompt, text: prompt });
            segments.push(Segment { role: Role::Answer, text: format!("{} <eos>", people[i].value(attribute)) });
        }
        Sample { kind: SampleKind::Reading, segments }
    }

    /// The document of a pair-recall drill about `attribute` of `people`, and each person asked once in random
    /// order (index into `people`, prompt): shared by training and `binding_probe`, so both see the same forms.
    pub fn pair_recall(
        &self,
        rng: &mut Rng,
        people: &[Person],
        attribute: Attribute,
        form: &PairForm,
    ) -> (String, Vec<(usize, String)>) {
        let pick = |rng: &mut Rng, forms: &[String], bare: &'static str| -> String {
            if forms.is_empty() {
                bare.to_string()
            } else {
                rng.pick(forms).clone()
            }
        };
        let entries: Vec<String> = people
            .iter()
            .map(|p| {
                let template = pick(rng, &form.docs, "{N} {V}");
                let template = if template == "{S}" {
                    text::BIO[attribute.index()][rng.below(text::BIO_ORDER.len())].to_string()
                } else {
                    template
                };
                text::fill(&template, &p.name(), p.value(attribute))
            })
            .collect();
        let mut order: Vec<usize> = (0..people.len()).collect();
        rng.shuffle(&mut order);
        let asked = order
            .into_iter()
            .map(|i| {
                let template = pick(rng, &form.prompts, "{N}");
                let prompt = if template == "{Q}" {
                    self.training_question(rng, &people[i], attribute, false).1
                } else {
                    text::fill(&template, &people[i].name(), "")
                };
                (i, prompt)
            })
            .collect();
        (format!("<doc> {} </doc>", entries.join(" ")), asked)
    }

    /// A training question about a random attribute of `person` (see [`World::training_question`]).
    pub fn training_question_for(
        &self,
        rng: &mut Rng,
        person: &Person,
        paraphrases: bool,
    ) -> (Attribute, String, String) {
        let attribute = *rng.pick(&Attribute::ALL);
        self.training_question(rng, person, attribute, paraphrases)
    }

    /// A question for training: a trained phrasing, or with `paraphrases` also one of [`text::PARAPHRASE`].
    pub fn training_question(
        &self,
        rng: &mut Rng,
        person: &Person,
        attribute: Attribute,
        paraphrases: bool,
    ) -> (Attribute, String, String) {
        let extra = &text::PARAPHRASE[attribute.index()];
        if !paraphrases {
            return self.question_about(rng, person, attribute, Phrasing::Trained);
        }
        let k = rng.below(TRAINED_PHRASINGS.len() + extra.len());
        let q = match k.checked_sub(TRAINED_PHRASINGS.len()) {
            Some(i) => text::fill(extra[i], &person.name(), ""),
            None => text::question(attribute, TRAINED_PHRASINGS[k], &person.name()),
        };
        (attribute, text::framed(&q), format!("{} <eos>", person.value(attribute)))
    }

    /// One fact of `who` restated after the document in a random biography phrasing, the value graded like an
    /// answer: a binding exercise with the answer in the text itself (find this name's sentence about this
    /// attribute, however it was phrased, and copy its value).
    fn recap(&self, rng: &mut Rng, who: &Person, extra_wording: bool) -> [Segment; 3] {
        let attribute = *rng.pick(&Attribute::ALL);
        let wordings = text::BIO_ORDER.len() + usize::from(extra_wording);
        let template = match rng.below(wordings) {
            k if k < text::BIO_ORDER.len() => text::BIO[attribute.index()][k],
            _ => text::RECAP_WORDING[attribute.index()],
        };
        let (before, after) = template.split_once("{V}").expect("every biography sentence has a value");
        [
            Segment { role: Role::Text, text: text::fill(before, &who.name(), "").trim_end().to_string() },
            Segment { role: Role::Answer, text: who.value(attribute).to_string() },
            Segment { role: Role::Text, text: after.trim().to_string() },
        ]
    }

    pub fn known_bio_sample(&self, rng: &mut Rng) -> Sample {
        let p = rng.pick(&self.known);
        let text = format!("<bos> {} <eos>", p.bio(rng.below(text::BIO_ORDER.len())));
        Sample { kind: SampleKind::KnownBio, segments: vec![Segment { role: Role::Text, text }] }
    }

    pub fn closed_book_sample(&self, rng: &mut Rng) -> Sample {
        self.closed_book_sample_asking(rng, false)
    }

    /// A closed-book question about a known person, with `paraphrases` also in [`text::PARAPHRASE`]'s wordings.
    pub fn closed_book_sample_asking(&self, rng: &mut Rng, paraphrases: bool) -> Sample {
        let p = rng.pick(&self.known).clone();
        let attribute = *rng.pick(&Attribute::ALL);
        let (_, q, a) = self.training_question(rng, &p, attribute, paraphrases);
        Sample {
            kind: SampleKind::ClosedBook,
            segments: vec![
                Segment { role: Role::Prompt, text: format!("<bos> {q}") },
                Segment { role: Role::Answer, text: a },
            ],
        }
    }

    pub fn skill_sample(&self, rng: &mut Rng) -> Sample {
        self.skill_sample_of(rng, SkillTask::Addition)
    }

    /// A skill sample: `addition` (one of the addition tasks) or copying, each half the time.
    pub fn skill_sample_of(&self, rng: &mut Rng, addition: SkillTask) -> Sample {
        let task = if rng.chance(0.5) { addition } else { SkillTask::Copy };
        let probe = self.skill_probe(rng, task);
        Sample {
            kind: SampleKind::Skill,
            segments: vec![
                Segment { role: Role::Prompt, text: probe.prompt },
                Segment { role: Role::Answer, text: probe.answer },
            ],
        }
    }

    // ---- reading a document back ----

    /// The people a text names (a first name followed by a last name), in order of first mention.
    pub fn names_in(&self, text: &str) -> Vec<String> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let mut out: Vec<String> = Vec::new();
        for w in words.windows(2) {
            if self.first_names.iter().any(|f| f == w[0]) && self.last_names.iter().any(|l| l == w[1]) {
                let name = format!("{} {}", w[0], w[1]);
                if !out.contains(&name) {
                    out.push(name);
                }
            }
        }
        out
    }

    /// Every trained-phrasing question about `name`, as prompts ending in `A :` (never the held-out phrasing:
    /// what trains on these must not see the evaluation's wording).
    pub fn questions_about(&self, name: &str) -> Vec<(Attribute, String)> {
        self.questions_about_with(name, false)
    }

    /// [`World::questions_about`], with `paraphrases` also every wording of [`text::PARAPHRASE`] (still never the
    /// held-out phrasing).
    pub fn questions_about_with(&self, name: &str, paraphrases: bool) -> Vec<(Attribute, String)> {
        let mut out = Vec::new();
        for a in Attribute::ALL {
            for p in TRAINED_PHRASINGS {
                out.push((a, text::framed(&text::question(a, p, name))));
            }
            if paraphrases {
                for t in text::PARAPHRASE[a.index()] {
                    out.push((a, text::framed(&text::fill(t, name, ""))));
                }
            }
        }
        out
    }

    // ---- graded probes ----

    /// In-context reading: a document of `people` drawn from `split`, one question about one of them.
    pub fn reading_probe(&self, rng: &mut Rng, split: Split, people: usize, phrasing: Phrasing) -> Probe {
        let people = self.draw_people(rng, split, people);
        let doc = self.document(rng, &people, false);
        let who = rng.pick(&people).clone();
        let (attribute, q, answer) = self.question_for(rng, &who, phrasing);
        Probe { prompt: format!("<bos> {doc} {q}"), answer, attribute: Some(attribute) }
    }

    /// Closed book: a question with no document.
    pub fn closed_book_probe(&self, rng: &mut Rng, split: Split, phrasing: Phrasing) -> Probe {
        let who = self.draw_people(rng, split, 1).remove(0);
        self.closed_book_probe_for(rng, &who, phrasing)
    }

    /// Every trained-phrasing question about `who`, closed book (ten: five attributes x two phrasings).
    pub fn closed_book_probes_all(&self, who: &Person) -> Vec<Probe> {
        self.questions_about(&who.name())
            .into_iter()
            .map(|(a, q)| Probe {
                prompt: format!("<bos> {q}"),
                answer: format!("{} <eos>", who.value(a)),
                attribute: Some(a),
            })
            .collect()
    }

    /// One held-out-phrasing question per attribute about `who`, closed book: generalisation probes.
    pub fn closed_book_probes_heldout(&self, who: &Person) -> Vec<Probe> {
        Attribute::ALL
            .into_iter()
            .map(|a| Probe {
                prompt: format!("<bos> {}", text::framed(&text::question(a, HELDOUT_PHRASING, &who.name()))),
                answer: format!("{} <eos>", who.value(a)),
                attribute: Some(a),
            })
            .collect()
    }

    pub fn closed_book_probe_for(&self, rng: &mut Rng, who: &Person, phrasing: Phrasing) -> Probe {
        let (attribute, q, answer) = self.question_for(rng, who, phrasing);
        Probe { prompt: format!("<bos> {q}"), answer, attribute: Some(attribute) }
    }

    pub fn skill_probe(&self, rng: &mut Rng, task: SkillTask) -> Probe {
        match task {
            SkillTask::Addition => {
                let a = rng.below(1000);
                let b = rng.below(1000);
                let prompt = format!("<bos> add {} + {} =", reversed_digits(a), reversed_digits(b));
                Probe { prompt, answer: format!("{} <eos>", reversed_digits(a + b)), attribute: None }
            }
            SkillTask::PaddedAddition => {
                let (a, b) = (rng.below(1000), rng.below(1000));
                let digits = |n: usize, width: usize| -> String {
                    format!("{n:0width$}").chars().rev().map(String::from).collect::<Vec<_>>().join(" ")
                };
                let prompt = format!("<bos> add {} + {} =", digits(a, 3), digits(b, 3));
                Probe { prompt, answer: format!("{} <eos>", digits(a + b, 4)), attribute: None }
            }
            SkillTask::Copy => {
                let n = rng.range(3, 8);
                let seq: Vec<&str> = (0..n).map(|_| *rng.pick(text::COPY_SYMBOLS)).collect();
                let seq = seq.join(" ");
                Probe { prompt: format!("<bos> copy {seq} =>"), answer: format!("{seq} <eos>"), attribute: None }
            }
        }
    }
}

/// `347` -> `"7 4 3"`.
pub fn reversed_digits(n: usize) -> String {
    n.to_string().chars().rev().map(|c| c.to_string()).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pair_recall_drill_asks_every_name_once_for_the_value_right_after_it() {
        let w = World::new();
        let mut rng = Rng::derive(6, 2);
        for _ in 0..20 {
            let s = w.pair_recall_sample(&mut rng, 3, &PairForm::default());
            let doc: Vec<&str> = s.segments[0].text.split_whitespace().collect();
            assert_eq!((doc[0], doc[1], doc[doc.len() - 1], doc.len()), ("<bos>", "<doc>", "</doc>", 3 + 3 * 3));
            let asked: Vec<_> = s.segments[1..].chunks(2).collect();
            assert_eq!(asked.len(), 3);
            for qa in asked {
                assert_eq!((qa[0].role, qa[1].role), (Role::Prompt, Role::Answer));
                let name: Vec<&str> = qa[0].text.split_whitespace().collect();
                let at = doc.windows(2).position(|p| p == name.as_slice()).expect("the asked name is in the document");
                assert_eq!(qa[1].text, format!("{} <eos>", doc[at + 2]));
            }
        }
        // Templates widen the prompt around the name and put words between a name and its value; `{S}` is a
        // biography sentence, `{Q}` a trained question.
        let form = PairForm { docs: vec!["{N} is {V} .".into()], prompts: vec!["{N} ? A :".into()] };
        let s = w.pair_recall_sample(&mut rng, 2, &form);
        assert!(s.segments[0].text.matches(" is ").count() == 2, "{}", s.segments[0].text);
        assert!(s.segments.iter().filter(|g| g.role == Role::Prompt).all(|g| g.text.ends_with(" ? A :")));
        let form = PairForm { docs: vec!["{S}".into()], prompts: vec!["{Q}".into()] };
        assert_eq!(form.check(), Ok(()));
        for bad in [
            PairForm { docs: vec!["{S} .".into()], ..PairForm::default() },
            PairForm { docs: vec!["{N} is .".into()], ..PairForm::default() },
            PairForm { prompts: vec!["{n} ?".into()], ..PairForm::default() },
            PairForm { prompts: vec!["{N} {V} ?".into()], ..PairForm::default() },
        ] {
            assert!(bad.check().is_err(), "{bad:?} passed");
        }
        let s = w.pair_recall_sample(&mut rng, 2, &form);
        assert!(s.segments[0].text.matches(" . ").count() == 2, "{}", s.segments[0].text);
        assert!(s.segments.iter().filter(|g| g.role == Role::Prompt).all(|g| g.text.starts_with("Q : ")));
        for qa in s.segments[1..].chunks(2) {
            assert!(s.segments[0].text.contains(qa[1].text.trim_end_matches(" <eos>")));
        }
    }

    #[test]
    fn weighted_reading_questions_follow_their_weights() {
        let w = World::new();
        let mut rng = Rng::derive(6, 1);
        let only_years = [0.0, 1.0, 0.0, 0.0, 0.0];
        let asking = Asking { questions: [2, 4], attribute_weights: Some(&only_years), ..Asking::default() };
        for _ in 0..20 {
            let s = w.reading_sample_asking(&mut rng, 2, &asking);
            for q in s.segments.iter().filter(|g| g.role == Role::Prompt) {
                assert!(q.text.contains("born ?") && !q.text.contains("where"), "not a year question: {}", q.text);
            }
        }
    }

    #[test]
    fn paraphrases_add_no_word_and_recaps_grade_the_named_persons_value() {
        let w = World::new();
        let before: std::collections::HashSet<&str> = text::template_words().into_iter().collect();
        for t in text::PARAPHRASE.iter().flatten().chain(&text::RECAP_WORDING) {
            for word in t.split_whitespace().filter(|x| *x != "{N}" && *x != "{V}") {
                assert!(before.contains(word), "paraphrase word {word:?} is new to the vocabulary");
            }
        }
        let mut rng = Rng::new(3);
        let asking = Asking {
            questions: [1, 3],
            attribute_weights: None,
            paraphrases: true,
            recaps: [1, 3],
            recap_wordings: true,
        };
        let (mut recaps, mut paraphrased, mut recap_worded) = (0, 0, 0);
        for _ in 0..200 {
            let s = w.reading_sample_asking(&mut rng, 3, &asking);
            let doc = &s.segments[0].text;
            for (i, seg) in s.segments.iter().enumerate().skip(1) {
                if seg.role == Role::Answer && !seg.text.ends_with("<eos>") {
                    // A recap: the text before names a person of the document whose sentence has this value.
                    recaps += 1;
                    let name: Vec<&str> = s.segments[i - 1]
                        .text
                        .split_whitespace()
                        .filter(|t| t.starts_with(char::is_uppercase))
                        .collect();
                    let name = name.join(" ");
                    assert!(doc.contains(&name), "recap about {name:?}, who is not in the document");
                    let stem = s.segments[i - 1].text.replace(&name, "{N}");
                    if text::RECAP_WORDING.iter().any(|t| stem.ends_with(t.split_once(" {V}").unwrap().0)) {
                        recap_worded += 1;
                    }
                    assert!(doc.contains(&format!(" {} ", seg.text)), "recap value {} not in the document", seg.text);
                }
                if seg.role == Role::Prompt
                    && !text::QUESTION.iter().flatten().any(|q| {
                        let (a, b) = q.split_once("{N}").unwrap();
                        seg.text.contains(a.trim()) && seg.text.contains(b.trim())
                    })
                {
                    paraphrased += 1;
                }
            }
        }
        assert!(recaps > 200 && paraphrased > 100, "recaps {recaps}, paraphrased questions {paraphrased}");
        assert!(recap_worded > 20, "only {recap_worded} of {recaps} recaps used the extra wording");
    }

    #[test]
    fn a_binding_drill_asks_every_fact_of_people_who_share_attribute_types() {
        let w = World::new();
        let mut rng = Rng::new(11);
        for _ in 0..100 {
            let people = rng.range(2, 4);
            let attributes = rng.range(1, 2);
            let s = w.binding_drill_sample(&mut rng, people, attributes, true);
            let doc = &s.segments[0].text;
            let names = w.names_in(doc);
            assert_eq!(names.len(), people, "{doc}");
            let sentences = doc.matches(" . ").count();
            assert_eq!(sentences, people * attributes, "one sentence per fact: {doc}");
            let answers: Vec<_> = s.segments.iter().filter(|g| g.role == Role::Answer).collect();
            assert_eq!(answers.len(), people * attributes, "every fact asked once");
            for (i, seg) in s.segments.iter().enumerate().skip(1).step_by(2) {
                let asked = w.names_in(&seg.text);
                assert_eq!(asked.len(), 1, "one person per question: {}", seg.text);
                let value = s.segments[i + 1].text.trim_end_matches(" <eos>");
                // The asked person's own sentence carries the value.
                let own = doc.split(" . ").find(|t| t.contains(&asked[0]) && t.contains(&format!(" {value}")));
                assert!(own.is_some(), "{value} is not in a sentence about {}: {doc}", asked[0]);
            }
        }
    }

    #[test]
    fn world_is_deterministic_and_splits_are_disjoint() {
        let a = World::new();
        let b = World::new();
        assert_eq!(a.known(), b.known());
        assert_eq!(a.fresh(), b.fresh());
        let names = |ps: &[Person]| ps.iter().map(Person::name).collect::<std::collections::HashSet<_>>();
        let (known, fresh) = (names(a.known()), names(a.fresh()));
        assert_eq!(known.len(), KNOWN_PEOPLE);
        assert_eq!(fresh.len(), FRESH_PEOPLE);
        assert!(known.is_disjoint(&fresh));
        let mut rng = Rng::new(3);
        for _ in 0..2000 {
            let p = a.reading_person(&mut rng);
            assert!(!known.contains(&p.name()) && !fresh.contains(&p.name()), "{}", p.name());
        }
    }

    #[test]
    fn every_generated_word_is_in_the_vocabulary() {
        let w = World::new();
        let vocab: std::collections::HashSet<String> = w.vocabulary().into_iter().collect();
        let mut rng = Rng::new(11);
        let mut texts = Vec::new();
        for n in 1..=MAX_DOC_PEOPLE {
            texts.push(w.reading_sample(&mut rng, n).text());
        }
        for _ in 0..200 {
            texts.push(w.known_bio_sample(&mut rng).text());
            texts.push(w.closed_book_sample(&mut rng).text());
            texts.push(w.skill_sample(&mut rng).text());
            let p = w.reading_probe(&mut rng, Split::Fresh, 4, Phrasing::Heldout);
            texts.push(format!("{} {}", p.prompt, p.answer));
        }
        for t in texts {
            for word in t.split_whitespace() {
                assert!(vocab.contains(word), "{word:?} missing from vocabulary (in {t:?})");
            }
        }
    }

    #[test]
    fn answers_are_single_words_and_held_out_phrasing_never_trains() {
        let w = World::new();
        let mut rng = Rng::new(5);
        let heldout: Vec<String> = text::QUESTION
            .iter()
            .map(|q| q[HELDOUT_PHRASING].replace("{N}", "").split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        for _ in 0..500 {
            let asking = Asking { paraphrases: true, recaps: [1, 2], ..Asking::default() };
            for s in [
                w.reading_sample(&mut rng, 3),
                w.closed_book_sample(&mut rng),
                w.reading_sample_asking(&mut rng, 3, &asking),
                w.closed_book_sample_asking(&mut rng, true),
            ] {
                for seg in s.segments.iter().filter(|s| s.role == Role::Prompt) {
                    let stripped: String = seg
                        .text
                        .split_whitespace()
                        .filter(|t| !t.chars().next().unwrap().is_uppercase() || *t == "Q" || *t == "A")
                        .collect::<Vec<_>>()
                        .join(" ");
                    for h in &heldout {
                        assert!(!stripped.contains(h.as_str()), "held-out phrasing {h:?} in training: {stripped}");
                    }
                }
            }
            let p = w.closed_book_probe(&mut rng, Split::Known, Phrasing::Trained);
            assert_eq!(p.answer.split_whitespace().count(), 2, "{}", p.answer);
        }
    }

    #[test]
    fn padded_addition_puts_every_digit_in_its_place() {
        let w = World::new();
        let mut rng = Rng::new(10);
        for _ in 0..100 {
            let p = w.skill_probe(&mut rng, SkillTask::PaddedAddition);
            let words: Vec<&str> = p.prompt.split_whitespace().collect();
            assert_eq!((words.len(), words[1], words[5], words[9]), (10, "add", "+", "="), "{}", p.prompt);
            let number =
                |ds: &[&str]| ds.iter().rev().map(|d| d.to_string()).collect::<String>().parse::<usize>().unwrap();
            let answer: Vec<&str> = p.answer.split_whitespace().collect();
            assert_eq!(answer.len(), 5, "{}", p.answer);
            assert_eq!(number(&words[2..5]) + number(&words[6..9]), number(&answer[..4]), "{} {}", p.prompt, p.answer);
        }
    }

    #[test]
    fn addition_is_correct_in_reversed_digits() {
        assert_eq!(reversed_digits(347), "7 4 3");
        let w = World::new();
        let mut rng = Rng::new(9);
        for _ in 0..100 {
            let p = w.skill_probe(&mut rng, SkillTask::Addition);
            let nums: Vec<usize> = p
                .prompt
                .trim_start_matches("<bos> add ")
                .trim_end_matches(" =")
                .split(" + ")
                .map(|s| s.split(' ').rev().collect::<String>().parse().unwrap())
                .collect();
            let sum: usize = p.answer.trim_end_matches(" <eos>").split(' ').rev().collect::<String>().parse().unwrap();
            assert_eq!(nums[0] + nums[1], sum);
        }
    }
}
