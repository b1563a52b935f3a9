//! The world's tokenizer: a standard Hugging Face `tokenizer.json` with a word-level model over the world's
//! vocabulary (every name and attribute value is one token, so every factual answer is one token).

use std::str::FromStr;

use anyhow::{anyhow, Result};
use engram_model::Tokenizer;
use engram_world::{text::SPECIAL, World};
use serde_json::{json, Map, Value};

/// The `tokenizer.json` text for `world`.
pub fn tokenizer_json(world: &World) -> String {
    let words = world.vocabulary();
    let vocab: Map<String, Value> = words.iter().enumerate().map(|(i, w)| (w.clone(), json!(i))).collect();
    let added: Vec<Value> = SPECIAL
        .iter()
        .map(|s| {
            json!({"id": words.iter().position(|w| w == s).expect("specials are in the vocabulary"),
                   "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    serde_json::to_string_pretty(&doc).expect("json serialises") + "\n"
}

pub fn build(world: &World) -> Result<Tokenizer> {
    Tokenizer::from_str(&tokenizer_json(world)).map_err(|e| anyhow!("building tokenizer: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use engram_world::Rng;

    #[test]
    fn round_trips_world_text_without_unknowns() {
        let world = World::new();
        let tok = build(&world).unwrap();
        let unk = tok.token_to_id("<unk>").unwrap();
        let mut rng = Rng::new(1);
        for n in [1, 4, 8] {
            let text = world.reading_sample(&mut rng, n).text();
            let ids = engram_model::encode(&tok, &text).unwrap();
            assert_eq!(ids.len(), text.split_whitespace().count());
            assert!(!ids.contains(&unk), "{text}");
            assert_eq!(tok.decode(&ids, false).unwrap(), text);
        }
        assert_eq!(engram_model::encode(&tok, "<bos> Q :").unwrap()[0], tok.token_to_id("<bos>").unwrap());
    }
}
