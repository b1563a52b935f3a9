//! `config.json` in the Hugging Face `LlamaForCausalLM` layout.

use serde::{Deserialize, Serialize};

use crate::{ModelError, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    #[serde(default = "default_architectures")]
    pub architectures: Vec<String>,
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Present in some checkpoints where it differs from `hidden_size / num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    /// An id or a list of ids in real checkpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<u32>,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "default_dtype")]
    pub torch_dtype: String,
}

/// Llama 3 frequency scaling (`"rope_type": "llama3"`); other kinds are refused at load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    pub factor: f64,
    #[serde(default = "one")]
    pub low_freq_factor: f64,
    #[serde(default = "four")]
    pub high_freq_factor: f64,
    #[serde(default = "default_orig")]
    pub original_max_position_embeddings: usize,
}

fn default_architectures() -> Vec<String> {
    vec!["LlamaForCausalLM".into()]
}
fn default_model_type() -> String {
    "llama".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_act() -> String {
    "silu".into()
}
fn default_dtype() -> String {
    "float32".into()
}
fn one() -> f64 {
    1.0
}
fn four() -> f64 {
    4.0
}
fn default_orig() -> usize {
    8192
}

impl LlamaConfig {
    /// A small config of the shape Engram ships; callers override fields.
    pub fn small(vocab_size: usize) -> Self {
        Self {
            architectures: default_architectures(),
            model_type: default_model_type(),
            hidden_size: 256,
            intermediate_size: 704,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: Some(4),
            head_dim: None,
            vocab_size,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            max_position_embeddings: 512,
            tie_word_embeddings: false,
            bos_token_id: None,
            eos_token_id: None,
            pad_token_id: None,
            hidden_act: default_act(),
            attention_bias: false,
            torch_dtype: default_dtype(),
        }
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Checks what the forward pass relies on, naming the offending field.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(ModelError::Config(msg));
        if !self.architectures.iter().any(|a| a == "LlamaForCausalLM") && self.model_type != "llama" {
            return bad(format!(
                "unsupported architecture {:?} (model_type {:?})",
                self.architectures, self.model_type
            ));
        }
        if self.hidden_act != "silu" {
            return bad(format!("hidden_act {:?} is not supported, only \"silu\"", self.hidden_act));
        }
        if self.attention_bias {
            return bad("attention_bias = true is not supported".into());
        }
        if self.num_attention_heads == 0
            || self.kv_heads() == 0
            || !self.num_attention_heads.is_multiple_of(self.kv_heads())
        {
            return bad(format!(
                "num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({})",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!("head_dim {} must be even for rotary positions", self.head_dim()));
        }
        if let Some(s) = &self.rope_scaling {
            if s.rope_type != "llama3" && s.rope_type != "default" {
                return bad(format!("rope_scaling type {:?} is not supported (llama3 or default)", s.rope_type));
            }
        }
        Ok(())
    }

    /// Inverse rotary frequencies, one per pair of head dimensions, with Llama 3 scaling when configured.
    pub fn inv_freq(&self) -> Vec<f32> {
        let hd = self.head_dim();
        let base: Vec<f64> = (0..hd / 2).map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / hd as f64)).collect();
        let Some(s) = self.rope_scaling.as_ref().filter(|s| s.rope_type == "llama3") else {
            return base.into_iter().map(|f| f as f32).collect();
        };
        let orig = s.original_max_position_embeddings as f64;
        let (low_wavelen, high_wavelen) = (orig / s.low_freq_factor, orig / s.high_freq_factor);
        base.into_iter()
            .map(|freq| {
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                let f = if wavelen < high_wavelen {
                    freq
                } else if wavelen > low_wavelen {
                    freq / s.factor
                } else {
                    let smooth = (orig / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * freq / s.factor + smooth * freq
                };
                f as f32
            })
            .collect()
    }

    pub fn param_count(&self) -> usize {
        let (d, i, v, hd) = (self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim());
        let q = self.num_attention_heads * hd;
        let kv = self.kv_heads() * hd;
        let layer = d * q + 2 * d * kv + q * d + 3 * d * i + 2 * d;
        let head = if self.tie_word_embeddings { 0 } else { v * d };
        v * d + self.num_hidden_layers * layer + d + head
    }
}
