//! Hugging Face PEFT interchange: `adapter_config.json` + `adapter_model.safetensors` with PEFT's tensor names
//! (`base_model.model.model.layers.{i}.mlp.down_proj.lora_A.weight`), so `PeftModel.from_pretrained` loads an
//! Engram delta onto the exported base model unchanged. PEFT scales by `lora_alpha / r`; export sets
//! `lora_alpha = scale * r` (and per-module patterns where ranks differ).

use std::collections::HashMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::{assemble, malformed, read_tensors, write_tensors, Delta, Error, Meta, Result};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const PREFIX: &str = "base_model.model.model.layers.";

fn short(module: &str) -> &str {
    module.rsplit('.').next().unwrap_or(module)
}

/// Writes `delta` as a PEFT adapter directory. `base_model_path` goes into `base_model_name_or_path`.
pub fn export(delta: &Delta, dir: &Path, base_model_path: &str) -> Result<()> {
    if delta.memory.is_some() {
        return Err(Error::Invalid(
            "this delta carries side-memory entries, which PEFT cannot express; export a LoRA-only delta".into(),
        ));
    }
    let r = delta.rank();
    if r == 0 {
        return Err(Error::Invalid("an empty delta has nothing to export".into()));
    }
    let mut tensors = Vec::new();
    let (mut rank_pattern, mut alpha_pattern) = (serde_json::Map::new(), serde_json::Map::new());
    let mut layers: Vec<usize> = delta.adapters.keys().map(|(l, _)| *l).collect();
    layers.dedup();
    let mut targets: Vec<&str> = delta.adapters.keys().map(|(_, m)| short(m)).collect();
    targets.sort();
    targets.dedup();
    for ((layer, module), f) in &delta.adapters {
        let name = format!("{PREFIX}{layer}.{module}");
        tensors.push((format!("{name}.lora_A.weight"), vec![f.rank, f.in_dim], f.a.clone()));
        tensors.push((format!("{name}.lora_B.weight"), vec![f.out_dim, f.rank], f.b.clone()));
        if f.rank != r {
            let key = format!("model.layers.{layer}.{module}");
            rank_pattern.insert(key.clone(), json!(f.rank));
            alpha_pattern.insert(key, json!(delta.meta.scale * f.rank as f32));
        }
    }
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_path,
        "r": r,
        "lora_alpha": delta.meta.scale * r as f32,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "layers_to_transform": layers,
        "fan_in_fan_out": false,
        "bias": "none",
        "use_rslora": false,
        "inference_mode": true,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
    });
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(CONFIG_FILE), serde_json::to_string_pretty(&config).expect("json") + "\n")?;
    // Engram's provenance rides in the safetensors header, which PEFT ignores (unknown adapter_config keys make it
    // warn).
    let meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("engram.base_model".to_string(), delta.meta.base_model.clone()),
        ("engram.injector".to_string(), delta.meta.injector.clone()),
        ("engram.injector_version".to_string(), delta.meta.injector_version.clone()),
        ("engram.content_hash".to_string(), delta.content_hash()),
    ]);
    std::fs::write(dir.join(WEIGHTS_FILE), write_tensors(&tensors, meta)?)?;
    Ok(())
}

/// Reads a PEFT LoRA adapter directory. Per-module scaling that differs from the common one is folded into `B`.
/// `base_model` is the hash of the model it applies to (PEFT records only a name or path).
pub fn import(dir: &Path, base_model: &str) -> Result<Delta> {
    let cfg_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg_path)?;
    let cfg: Value = serde_json::from_str(&text).map_err(|e| malformed(format!("{}: {e}", cfg_path.display())))?;
    if cfg["peft_type"] != "LORA" {
        return Err(malformed(format!("{}: peft_type {} is not LORA", cfg_path.display(), cfg["peft_type"])));
    }
    let r = cfg["r"].as_f64().ok_or_else(|| malformed("adapter_config.json lacks r"))?;
    let alpha = cfg["lora_alpha"].as_f64().unwrap_or(r);
    let rslora = cfg["use_rslora"].as_bool().unwrap_or(false);
    let scaling = |alpha: f64, r: f64| if rslora { alpha / r.sqrt() } else { alpha / r };
    if cfg["fan_in_fan_out"].as_bool().unwrap_or(false) {
        return Err(Error::Invalid("fan_in_fan_out adapters (GPT-2 Conv1D) do not apply to Llama".into()));
    }
    let bytes = std::fs::read(dir.join(WEIGHTS_FILE))?;
    let (header, tensors) = read_tensors(&bytes)?;
    let mut adapters = assemble(tensors, |name| {
        let (layer, rest) = name.strip_prefix(PREFIX)?.split_once('.')?;
        let (module, which) = rest.strip_suffix(".weight")?.rsplit_once('.')?;
        let is_a = match which {
            "lora_A" => true,
            "lora_B" => false,
            _ => return None,
        };
        Some((layer.parse().ok()?, module.to_string(), is_a))
    })?;
    let common = scaling(alpha, r) as f32;
    for ((layer, module), f) in adapters.iter_mut() {
        let key = format!("model.layers.{layer}.{module}");
        let a = cfg["alpha_pattern"].get(&key).and_then(Value::as_f64).unwrap_or(alpha);
        let s = scaling(a, f.rank as f64) as f32;
        if (s - common).abs() > 1e-6 * common.abs().max(1.0) {
            let k = s / common;
            f.b.iter_mut().for_each(|v| *v *= k);
        }
    }
    let text = |k: &str, default: &str| header.get(&format!("engram.{k}")).cloned().unwrap_or_else(|| default.into());
    Ok(Delta {
        meta: Meta {
            base_model: base_model.to_string(),
            scale: common,
            injector: text("injector", "peft-import"),
            injector_version: text("injector_version", ""),
        },
        adapters,
        memory: None,
    })
}
