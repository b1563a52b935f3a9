//! `engram bench forward`: this crate's forward against candle-transformers' Llama on the same weights.

use std::time::{Duration, Instant};

use anyhow::Result;
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::llama as reference;
use engram_model::{ForwardOptions, Llama, Positions};
use engram_world::Rng;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct ForwardBench {
    pub seed: u64,
    pub batch: usize,
    pub seq_len: usize,
    pub rounds: usize,
    /// Tokens per second of Engram's forward (fused inference kernels, prefill, last-position logits).
    pub engram_tokens_per_s: f64,
    /// Tokens per second of candle-transformers' `llama::Llama::forward` on the same weights and inputs.
    pub reference_tokens_per_s: f64,
    /// `engram_tokens_per_s / reference_tokens_per_s`.
    pub ratio: f64,
    /// Largest absolute difference between the two models' logits on the benchmark inputs.
    pub max_abs_logit_diff: f32,
}

/// Times both forwards on `rounds` random batches, interleaved so that both see the same machine conditions.
pub fn forward(model: &Llama, seed: u64, batch: usize, seq_len: usize, rounds: usize) -> Result<ForwardBench> {
    let cfg = model.config();
    let seq_len = seq_len.min(cfg.max_position_embeddings);
    let their_cfg: reference::LlamaConfig = serde_json::from_value(serde_json::to_value(cfg)?)?;
    let their_cfg = their_cfg.into_config(false);
    let vb = VarBuilder::from_tensors(model.named_tensors().into_iter().collect(), DType::F32, model.device());
    let theirs = reference::Llama::load(vb, &their_cfg)?;

    let mut rng = Rng::new(seed);
    let inputs: Vec<Tensor> = (0..rounds + 1)
        .map(|_| {
            let ids: Vec<u32> = (0..batch * seq_len).map(|_| rng.below(cfg.vocab_size) as u32).collect();
            Tensor::from_vec(ids, (batch, seq_len), model.device())
        })
        .collect::<candle_core::Result<_>>()?;
    let opts = ForwardOptions::inference();
    let ours = |x: &Tensor| model.forward(x, &Positions::From(0), &opts).map(|o| o.logits);
    let run_theirs = |x: &Tensor| -> candle_core::Result<Tensor> {
        let mut cache = reference::Cache::new(false, DType::F32, &their_cfg, model.device())?;
        theirs.forward(x, 0, &mut cache)
    };

    // Round 0 warms both up and checks they agree.
    let diff = (ours(&inputs[0])? - run_theirs(&inputs[0])?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let (mut t_ours, mut t_theirs) = (Duration::ZERO, Duration::ZERO);
    for (i, x) in inputs[1..].iter().enumerate() {
        // Alternate which goes first so neither always inherits a warm cache.
        for first in [i % 2 == 0, i % 2 != 0] {
            let start = Instant::now();
            if first {
                ours(x)?;
                t_ours += start.elapsed();
            } else {
                run_theirs(x)?;
                t_theirs += start.elapsed();
            }
        }
    }
    let tokens = (batch * seq_len * rounds) as f64;
    let engram = tokens / t_ours.as_secs_f64();
    let reference = tokens / t_theirs.as_secs_f64();
    Ok(ForwardBench {
        seed,
        batch,
        seq_len,
        rounds,
        engram_tokens_per_s: engram,
        reference_tokens_per_s: reference,
        ratio: engram / reference,
        max_abs_logit_diff: diff,
    })
}
