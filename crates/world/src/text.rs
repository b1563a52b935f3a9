//! Every sentence the world can say. One table per purpose, so the vocabulary can be derived from them.
//!
//! `{N}` is a person's full name, `{V}` an attribute value. All text is space-separated words: the tokenizer is
//! word-level and every name and value is one word, so every factual answer is one token.

use crate::Attribute;

/// Biography sentences: `BIO[attribute][phrasing]`. A value always follows the name it belongs to.
pub const BIO: [[&str; 4]; 5] = [
    [
        "{N} was born in {V} .",
        "{N} comes from the city of {V} .",
        "the birthplace of {N} is {V} .",
        "{N} grew up in {V} , the city of birth .",
    ],
    [
        "{N} was born in the year {V} .",
        "the birth year of {N} is {V} .",
        "{N} first saw the world in {V} .",
        "{N} has a birthday from the year {V} .",
    ],
    ["{N} works for {V} .", "{N} is employed by {V} .", "{N} has a job at {V} .", "{N} draws a salary from {V} ."],
    ["{N} studies {V} .", "{N} is an expert in {V} .", "{N} did research on {V} .", "{N} teaches classes in {V} ."],
    ["{N} has a pet {V} .", "{N} owns a {V} .", "{N} takes care of a {V} at home .", "{N} lives with a {V} ."],
];

/// The order of attributes in each biography phrasing.
pub const BIO_ORDER: [[usize; 5]; 4] = [[0, 1, 2, 3, 4], [2, 3, 0, 1, 4], [4, 0, 1, 3, 2], [1, 0, 4, 2, 3]];

/// Questions: `QUESTION[attribute][phrasing]`. Phrasing `HELDOUT_PHRASING` never appears in any training data.
pub const QUESTION: [[&str; 3]; 5] = [
    ["where was {N} born ?", "which city is {N} from ?", "what is the birthplace of {N} ?"],
    ["when was {N} born ?", "in which year was {N} born ?", "what is the birth year of {N} ?"],
    ["where does {N} work ?", "which company employs {N} ?", "who is the employer of {N} ?"],
    ["what does {N} study ?", "what is the field of {N} ?", "which subject is {N} an expert in ?"],
    ["what pet does {N} have ?", "which animal does {N} own ?", "what animal lives with {N} ?"],
];

/// More trained ways to ask, used only by training samples that opt in (a recipe's `paraphrases`): a model that has
/// seen each attribute asked many ways, in frames shared across attributes, can be tested on whether it reads a
/// question it never saw. Evaluation keeps asking in `QUESTION`'s phrasings. Only words the other tables already
/// use, so the vocabulary is unchanged.
pub const PARAPHRASE: [[&str; 3]; 5] = [
    ["{N} was born in which city ?", "what is the city of birth of {N} ?", "{N} comes from which city ?"],
    ["{N} was born in which year ?", "what year was {N} born in ?", "{N} has a birthday from which year ?"],
    ["{N} works for which company ?", "who employs {N} ?", "{N} is employed by which company ?"],
    ["{N} studies which subject ?", "in which field is {N} an expert ?", "{N} does research on what ?"],
    ["{N} has which animal ?", "what is the pet of {N} ?", "{N} takes care of which animal ?"],
];

/// A fifth way to state each fact, used only in recaps by recipes that opt in (`Asking::recap_wordings`). The
/// employer one matters: without it the word "employer" occurs only in the held-out question, so its embedding
/// never trains and the held-out employer question is read at 0.30 against 0.65-1.00 for the others. Like
/// `PARAPHRASE`, only words the other tables already use.
pub const RECAP_WORDING: [&str; 5] = [
    "{N} is from the city of {V} .",
    "the year of birth of {N} is {V} .",
    "the employer of {N} is {V} .",
    "the field of {N} is {V} .",
    "the pet of {N} is a {V} .",
];

pub const HELDOUT_PHRASING: usize = 2;
pub const TRAINED_PHRASINGS: [usize; 2] = [0, 1];

/// Sentences that mention a value but no person: a reader must bind answers to names, not to the nearest value.
pub const DISTRACTOR: [&str; 5] = [
    "the weather in {V} was mild today .",
    "the year {V} was a quiet one .",
    "{V} opened a new office .",
    "many people study {V} these days .",
    "a {V} was seen near the river .",
];

/// Words used by formats and skill tasks.
pub const FORMAT_WORDS: &[&str] = &["Q", ":", "A", "add", "+", "=", "copy", "=>"];
pub const SPECIAL: [&str; 6] = ["<pad>", "<unk>", "<bos>", "<eos>", "<doc>", "</doc>"];
pub const COPY_SYMBOLS: &[&str] = &["a", "b", "c", "d", "e", "f", "g", "h", "j", "k", "m", "n", "p", "r", "s", "t"];

pub fn fill(template: &str, name: &str, value: &str) -> String {
    template.replace("{N}", name).replace("{V}", value)
}

pub fn bio_sentence(attribute: Attribute, phrasing: usize, name: &str, value: &str) -> String {
    fill(BIO[attribute.index()][phrasing], name, value)
}

/// A question in the prompt frame every question is asked in: `Q : <question> A :`.
pub fn framed(question: &str) -> String {
    format!("Q : {question} A :")
}

pub fn question(attribute: Attribute, phrasing: usize, name: &str) -> String {
    fill(QUESTION[attribute.index()][phrasing], name, "")
}

/// Every fixed word of every table, in a stable order.
pub fn template_words() -> Vec<&'static str> {
    let tables = BIO.iter().flatten().chain(QUESTION.iter().flatten()).chain(DISTRACTOR.iter());
    // PARAPHRASE adds no word (a test holds it to that), so it is not listed: the token ids stay those of every
    // shipped tokenizer.
    let mut words: Vec<&'static str> = Vec::new();
    for t in tables {
        for w in t.split_whitespace() {
            if w != "{N}" && w != "{V}" && !words.contains(&w) {
                words.push(w);
            }
        }
    }
    for w in FORMAT_WORDS.iter().chain(COPY_SYMBOLS) {
        if !words.contains(w) {
            words.push(w);
        }
    }
    words
}
