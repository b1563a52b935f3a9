//! A Llama-family decoder on candle.
//!
//! - Reads and writes the Hugging Face layout (`config.json`, `model.safetensors` or sharded
//!   `model.safetensors.index.json`, `tokenizer.json`), so the code that runs the shipped toy model also runs a real
//!   Llama checkpoint.
//! - One forward pass ([`Llama::forward`]) serves training, evaluation, injection and serving; it takes optional LoRA
//!   adapters on any linear module (shared or per example), can return every layer's residual-stream input, and uses
//!   only differentiable kernels unless asked for the fused inference ones.
//! - Greedy generation with a KV cache.
#![forbid(unsafe_code)]

mod config;
mod init;
mod llama;
pub mod lora;
mod memory;
mod softmax;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
pub use config::{LlamaConfig, RopeScaling};
pub use init::Init;
pub use llama::{ForwardOptions, ForwardOutput, Kernels, KvCache, Llama, Positions};
pub use lora::{LoraAdapter, LoraSet, Module};
pub use memory::SideMemory;
use sha2::Digest;
pub use softmax::softmax_last_dim;
pub use tokenizers::Tokenizer;

/// Fixes candle's CPU thread count for this process (and its children) at the count candle would pick itself.
///
/// candle-core 0.11 asks for the count on every matmul and, unless `RAYON_NUM_THREADS` is set, recounts physical
/// cores by parsing `/proc/cpuinfo` each time: on this project's small model that parse was ~30% of a hypernetwork
/// pass and ~20% of a prefill. Call at the start of `main`, before any other thread exists (it sets an environment
/// variable).
pub fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: invalid json: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("invalid config: {0}")]
    Config(String),
    #[error("invalid lora adapter: {0}")]
    Lora(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("invalid input: {0}")]
    Input(String),
}

pub type Result<T> = std::result::Result<T, ModelError>;

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io { path: path.to_path_buf(), source }
}

pub fn read_config(dir: &Path) -> Result<LlamaConfig> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    let cfg: LlamaConfig = serde_json::from_str(&text).map_err(|source| ModelError::Json { path, source })?;
    cfg.validate()?;
    Ok(cfg)
}

/// The safetensors files of a model directory: one file, or the shards named by the index.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(WEIGHTS_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(WEIGHTS_INDEX_FILE);
    let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| ModelError::Json { path: index.clone(), source })?;
    let map = json["weight_map"]
        .as_object()
        .ok_or_else(|| ModelError::Config(format!("{}: no weight_map", index.display())))?;
    let mut files: Vec<PathBuf> = map.values().filter_map(|v| v.as_str()).map(|f| dir.join(f)).collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// Loads every tensor of a model directory into memory, converted to `dtype`.
pub fn load_tensors(dir: &Path, dtype: DType, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut all = HashMap::new();
    for file in weight_files(dir)? {
        for (name, t) in candle_core::safetensors::load(&file, device)? {
            all.insert(name, t.to_dtype(dtype)?);
        }
    }
    Ok(all)
}

impl Llama {
    /// Loads `config.json` and the weights of a Hugging Face model directory. The weights are constants: no
    /// gradients are tracked into them.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let cfg = read_config(dir)?;
        let tensors = load_tensors(dir, dtype, device)?;
        let vb = VarBuilder::from_tensors(tensors, dtype, device);
        Llama::new(&cfg, vb)
    }

    /// Writes `config.json` and `model.safetensors` (tensors in name order, so equal weights give equal bytes).
    pub fn save(&self, dir: &Path) -> Result<()> {
        if let Some(m) = self.memory() {
            return Err(ModelError::Input(format!(
                "this model state has {} side-memory entries, which a Hugging Face checkpoint cannot hold; save its \
                 delta chain instead",
                m.entries()
            )));
        }
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let cfg_path = dir.join(CONFIG_FILE);
        let json = serde_json::to_string_pretty(self.config()).expect("config serialises");
        std::fs::write(&cfg_path, json + "\n").map_err(io_err(&cfg_path))?;
        let tensors: HashMap<String, Tensor> = self.named_tensors().into_iter().collect();
        let tmp = dir.join(format!("{WEIGHTS_FILE}.tmp"));
        candle_core::safetensors::save(&tensors, &tmp)?;
        let dst = dir.join(WEIGHTS_FILE);
        std::fs::rename(&tmp, &dst).map_err(io_err(&dst))?;
        Ok(())
    }

    /// Greedy decoding with a KV cache: feeds `prompt`, then appends the arg-max token until `stop` or `max_new`
    /// tokens. Returns the generated tokens (including `stop` when reached).
    pub fn generate_greedy(
        &self,
        prompt: &[u32],
        max_new: usize,
        stop: u32,
        lora: Option<&LoraSet>,
    ) -> Result<Vec<u32>> {
        if prompt.is_empty() {
            return Err(ModelError::Input("empty prompt".into()));
        }
        let max_new = max_new.min(self.config().max_position_embeddings.saturating_sub(prompt.len()));
        let opts = ForwardOptions { lora, ..ForwardOptions::inference() };
        let mut cache = KvCache::new(self.config());
        let mut next = Tensor::new(prompt, self.device())?.unsqueeze(0)?;
        let mut out = Vec::new();
        for _ in 0..max_new {
            let logits = self.forward_cached(&next, &mut cache, &opts)?.logits;
            let token = logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?[0];
            out.push(token);
            if token == stop {
                break;
            }
            next = Tensor::new(&[token], self.device())?.unsqueeze(0)?;
        }
        Ok(out)
    }
}

/// A model directory as Engram uses it: the decoder and its tokenizer.
pub struct BaseModel {
    pub llama: Llama,
    pub tokenizer: Tokenizer,
    /// SHA-256 of the weight files, in hex: names the base model in lineage and adapters.
    pub hash: String,
}

impl BaseModel {
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let llama = Llama::load(dir, DType::F32, device)?;
        let tok_path = dir.join(TOKENIZER_FILE);
        let tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", tok_path.display())))?;
        let vocab = tokenizer.get_vocab_size(true);
        if vocab > llama.config().vocab_size {
            return Err(ModelError::Config(format!(
                "tokenizer has {vocab} tokens but the model's vocab_size is {}",
                llama.config().vocab_size
            )));
        }
        let mut hasher = sha2::Sha256::new();
        for f in weight_files(dir)? {
            hasher.update(std::fs::read(&f).map_err(io_err(&f))?);
        }
        Ok(Self { llama, tokenizer, hash: hex::encode(hasher.finalize()) })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        encode(&self.tokenizer, text)
    }

    /// Checks a delta before it may touch these weights: made for this model (by hash), shapes and layers that
    /// exist, finite values, rank at most the weight's smaller side, per-layer norm at most `1e4`.
    pub fn check_delta(&self, delta: &engram_lora::Delta) -> Result<()> {
        let cfg = self.llama.config();
        let shape = |m: &str| Module::from_path(m).map(|m| m.dims(cfg));
        let max_rank = Module::ALL
            .iter()
            .map(|m| {
                let (i, o) = m.dims(cfg);
                i.min(o)
            })
            .max()
            .unwrap_or(0);
        delta
            .validate(&self.hash, cfg.num_hidden_layers, shape, max_rank, 1e4)
            .map_err(|e| ModelError::Lora(e.to_string()))?;
        match &delta.memory {
            Some(m) if m.hidden != cfg.hidden_size => Err(ModelError::Lora(format!(
                "memory entries are for hidden size {}, the model's is {}",
                m.hidden, cfg.hidden_size
            ))),
            _ => Ok(()),
        }
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, false).map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    pub fn token_id(&self, token: &str) -> Result<u32> {
        self.tokenizer
            .token_to_id(token)
            .ok_or_else(|| ModelError::Tokenizer(format!("token {token:?} is not in the vocabulary")))
    }
}

/// Encodes without adding special tokens: Engram's texts spell out `<bos>` and `<eos>` themselves.
pub fn encode(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let enc = tokenizer.encode(text, false).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    Ok(enc.get_ids().to_vec())
}
