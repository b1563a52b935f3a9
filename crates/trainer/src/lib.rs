//! `engram train base`: trains the base model on the synthetic world.
//!
//! The mix: in-context reading (documents of reading-split people, then questions answered from the document, with
//! loss on the document too so repeated names train copying), biographies and closed-book questions of the `known`
//! people, and skill tasks. Packed rows, AdamW, warmup then a long constant phase then cosine decay. Checkpoints
//! (weights, optimizer moments, step, log) are written atomically so a stopped run resumes where it was.
#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod data;
pub mod optim;
pub mod tokenizer;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{Device, D};
use engram_eval::BaseReport;
use engram_model::{ForwardOptions, Llama, LlamaConfig};
use engram_world::World;
use serde::{Deserialize, Serialize};

pub use data::{Drill, Mix};
pub use optim::AdamWConfig;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Schedule {
    pub peak_lr: f64,
    pub warmup_steps: u64,
    /// Fraction of the run held at the peak before cosine decay.
    pub hold_fraction: f64,
    /// The final learning rate as a fraction of the peak.
    pub final_fraction: f64,
}

impl Schedule {
    pub fn lr(&self, step: u64, total: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let hold_end = (total as f64 * self.hold_fraction) as u64;
        if step < hold_end.max(self.warmup_steps) {
            return self.peak_lr;
        }
        let start = hold_end.max(self.warmup_steps);
        let p = (step - start) as f64 / (total - start).max(1) as f64;
        let cos = 0.5 * (1.0 + (std::f64::consts::PI * p.min(1.0)).cos());
        self.peak_lr * (self.final_fraction + (1.0 - self.final_fraction) * cos)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub seed: u64,
    pub steps: u64,
    pub rows: usize,
    pub row_len: usize,
    pub schedule: Schedule,
    pub adamw: AdamWConfig,
    pub mix: Mix,
    /// The model's shape; `vocab_size` is set from the tokenizer.
    pub model: LlamaConfig,
    #[serde(default)]
    pub init: engram_model::Init,
    /// A second stage: start from this model directory's weights (same shape) instead of `init`, with a fresh
    /// optimizer and this recipe's schedule. Relative paths are read from the working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<std::path::PathBuf>,
    pub eval_every: u64,
    pub eval_items: usize,
    pub checkpoint_every: u64,
}

impl TrainConfig {
    /// The shipped base model's recipe.
    pub fn base(seed: u64, steps: u64) -> Self {
        // Two to four questions per document and half weight on its text: the answers are what teach reading;
        // the text's repeated names keep teaching induction.
        let mix = Mix { short_docs_until: steps / 3, questions: [2, 4], reading_text_weight: 0.5, ..Mix::default() };
        Self {
            seed,
            steps,
            // Smaller batches, more steps: 448 tokens still hold an eight-person document with its questions.
            rows: 6,
            row_len: 448,
            schedule: Schedule { peak_lr: 2e-3, warmup_steps: 150, hold_fraction: 0.5, final_fraction: 0.05 },
            adamw: AdamWConfig::default(),
            mix,
            model: LlamaConfig::small(0),
            // With 0.02 at this width no run learned to read in context (attention stayed uniform).
            init: engram_model::Init::FanIn,
            init_from: None,
            eval_every: 300,
            eval_items: 60,
            checkpoint_every: 100,
        }
    }

    /// A configuration that trains in seconds, for tests.
    pub fn tiny(seed: u64, steps: u64) -> Self {
        let mut c = Self::base(seed, steps);
        c.rows = 4;
        c.row_len = 128;
        c.model.hidden_size = 32;
        c.model.intermediate_size = 64;
        c.model.num_hidden_layers = 2;
        c.model.num_attention_heads = 4;
        c.model.num_key_value_heads = Some(2);
        c.schedule.warmup_steps = 5;
        c.mix.doc_people = [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        c.eval_every = steps;
        c.eval_items = 10;
        c.checkpoint_every = 5;
        c
    }
}

/// One line of the training log (`train_log.jsonl`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogLine {
    pub step: u64,
    pub elapsed_s: f64,
    pub lr: f64,
    pub loss: f64,
    pub grad_norm: f64,
    pub tokens: u64,
    pub tokens_per_s: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointState {
    step: u64,
    elapsed_s: f64,
    tokens: u64,
    config: TrainConfig,
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub config: TrainConfig,
    pub parameters: usize,
    pub steps: u64,
    pub tokens: u64,
    pub wall_s: f64,
    pub tokens_per_s: f64,
    pub final_loss: f64,
    pub report: BaseReport,
    pub out: PathBuf,
}

const CHECKPOINT: &str = "checkpoint";
const LOG_FILE: &str = "train_log.jsonl";

/// Trains (or resumes) into `out`, which ends up a Hugging Face model directory with a model card.
pub fn train(cfg: &TrainConfig, out: &Path, resume: bool) -> Result<TrainSummary> {
    Ok(train_until(cfg, out, resume, None)?.expect("a run without a stop step finishes"))
}

/// Like [`train`], but stops after step `stop_after` (with a checkpoint) and returns `None` if that comes before
/// the end: a run can be done in installments, and tests can interrupt one.
pub fn train_until(
    cfg: &TrainConfig,
    out: &Path,
    resume: bool,
    stop_after: Option<u64>,
) -> Result<Option<TrainSummary>> {
    if let Some(d) = &cfg.mix.drill {
        d.pair_form.check().map_err(anyhow::Error::msg)?;
    }
    let device = Device::Cpu;
    let world = World::new();
    let tok = tokenizer::build(&world)?;
    let mut model_cfg = cfg.model.clone();
    model_cfg.vocab_size = tok.get_vocab_size(true);
    model_cfg.bos_token_id = tok.token_to_id("<bos>");
    model_cfg.eos_token_id = tok.token_to_id("<eos>").map(serde_json::Value::from);
    model_cfg.pad_token_id = tok.token_to_id("<pad>");
    model_cfg.max_position_embeddings = model_cfg.max_position_embeddings.max(cfg.row_len);
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;

    let (model, varmap) = Llama::init_trainable_with(&model_cfg, cfg.seed, cfg.init, &device)?;
    let vars = varmap.data().lock().expect("varmap lock").clone();
    let mut opt = optim::AdamW::new(&vars, cfg.adamw.clone())?;
    let parameters: usize = vars.values().map(|v| v.elem_count()).sum();

    let ckpt = out.join(CHECKPOINT);
    let (mut step, mut elapsed_before, mut tokens) = (0u64, 0.0f64, 0u64);
    if let Some(state) = checkpoint::resume_state::<CheckpointState>(&ckpt, resume, cfg)? {
        let mut vm = varmap.clone();
        vm.load(ckpt.join(engram_model::WEIGHTS_FILE))?;
        opt.load(&ckpt.join("optimizer.safetensors"), state.step)?;
        (step, elapsed_before, tokens) = (state.step, state.elapsed_s, state.tokens);
        eprintln!("resuming from step {step} ({tokens} tokens, {elapsed_before:.0} s)");
    } else {
        // A fresh run starts a fresh log.
        let _ = std::fs::remove_file(out.join(LOG_FILE));
        if let Some(from) = &cfg.init_from {
            let weights = from.join(engram_model::WEIGHTS_FILE);
            let mut vm = varmap.clone();
            vm.load(&weights).with_context(|| {
                format!("starting from {}: its weights must have this recipe's model shape", weights.display())
            })?;
            eprintln!("starting from the weights in {}", from.display());
        }
    }

    eprintln!(
        "training base model: {parameters} parameters, d={} layers={} heads={}/{} vocab={}, {} steps of {}x{} tokens, seed {}",
        model_cfg.hidden_size,
        model_cfg.num_hidden_layers,
        model_cfg.num_attention_heads,
        model_cfg.kv_heads(),
        model_cfg.vocab_size,
        cfg.steps,
        cfg.rows,
        cfg.row_len,
        cfg.seed
    );
    let bar = progress_bar(cfg.steps, step);
    let mut log = std::fs::OpenOptions::new().create(true).append(true).open(out.join(LOG_FILE))?;
    let start = Instant::now();
    let start_tokens = tokens;
    let mut last_loss = f64::NAN;
    let mut window = (0.0f64, 0u32);
    // ENGRAM_PROFILE=1 prints where each step's time goes (batch building, forward, backward, update).
    let profile = std::env::var_os("ENGRAM_PROFILE").is_some();
    while step < cfg.steps {
        let lr = cfg.schedule.lr(step, cfg.steps);
        let t0 = Instant::now();
        let batch = data::batch(&world, &tok, &cfg.mix, cfg.seed, step, cfg.rows, cfg.row_len, &device)?;
        let t1 = Instant::now();
        let logits = model.forward(&batch.ids, &batch.positions, &ForwardOptions::default())?.logits;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let picked = logp.gather(&batch.targets.unsqueeze(D::Minus1)?, D::Minus1)?.squeeze(D::Minus1)?;
        let total_w = batch.weights.sum_all()?;
        let loss = (picked * &batch.weights)?.sum_all()?.neg()?.broadcast_div(&total_w)?;
        last_loss = loss.to_scalar::<f32>()? as f64;
        let t2 = Instant::now();
        let grads = loss.backward()?;
        let t3 = Instant::now();
        let grad_norm = opt.update(&grads, lr)?;
        if profile {
            eprintln!("batch {:?} fwd {:?} bwd {:?} opt {:?}", t1 - t0, t2 - t1, t3 - t2, t3.elapsed());
        }
        step += 1;
        tokens += batch.tokens as u64;
        window = (window.0 + last_loss, window.1 + 1);
        let elapsed = elapsed_before + start.elapsed().as_secs_f64();
        let tps = (tokens - start_tokens) as f64 / start.elapsed().as_secs_f64();
        bar.set_position(step);
        bar.set_message(format!("loss {last_loss:.3} lr {lr:.2e} {tps:.0} tok/s"));

        let eval_now = step % cfg.eval_every == 0 || step == cfg.steps;
        if step % 25 == 0 || eval_now {
            let eval = if eval_now {
                let r = engram_eval::evaluate_base(&model, &tok, &world, cfg.seed ^ step, cfg.eval_items, |_, _| {})?;
                Some(serde_json::to_value(&r)?)
            } else {
                None
            };
            let line = LogLine {
                step,
                elapsed_s: elapsed,
                lr,
                loss: window.0 / window.1.max(1) as f64,
                grad_norm,
                tokens,
                tokens_per_s: tps,
                eval,
            };
            window = (0.0, 0);
            writeln!(log, "{}", serde_json::to_string(&line)?)?;
            let mut text = format!(
                "step {step}/{} loss {:.4} lr {lr:.2e} grad {grad_norm:.2} {tps:.0} tok/s {elapsed:.0} s",
                cfg.steps, line.loss
            );
            if let Some(e) = &line.eval {
                let keys = engram_eval::SUITES;
                let parts: Vec<String> =
                    keys.iter().map(|k| format!("{k} {:.2}", e[*k].as_f64().unwrap_or(0.0))).collect();
                text += &format!("\n  eval: {}", parts.join(" "));
            }
            bar.suspend(|| eprintln!("{text}"));
        }
        let stop_now = stop_after == Some(step);
        if step % cfg.checkpoint_every == 0 || step == cfg.steps || stop_now {
            let state = CheckpointState { step, elapsed_s: elapsed, tokens, config: cfg.clone() };
            save_checkpoint(&model, &opt, &ckpt, &state)?;
        }
        if stop_now && step < cfg.steps {
            bar.finish_and_clear();
            eprintln!("stopped after step {step}; continue with --resume");
            return Ok(None);
        }
    }
    bar.finish_and_clear();

    let wall_s = elapsed_before + start.elapsed().as_secs_f64();
    model.save(out)?;
    std::fs::write(out.join(engram_model::TOKENIZER_FILE), tokenizer::tokenizer_json(&world))?;
    eprintln!("final evaluation ({} items per suite, seed {})", engram_eval::DEFAULT_ITEMS, engram_eval::DEFAULT_SEED);
    let report = engram_eval::evaluate_base(
        &model,
        &tok,
        &world,
        engram_eval::DEFAULT_SEED,
        engram_eval::DEFAULT_ITEMS,
        |_, _| {},
    )?;
    let summary = TrainSummary {
        config: cfg.clone(),
        parameters,
        steps: step,
        tokens,
        wall_s,
        tokens_per_s: tokens as f64 / wall_s.max(1e-9),
        final_loss: last_loss,
        report,
        out: out.to_path_buf(),
    };
    std::fs::write(out.join("training.json"), serde_json::to_string_pretty(&summary)? + "\n")?;
    std::fs::write(out.join("MODEL_CARD.md"), model_card(&summary, &model_cfg))?;
    Ok(Some(summary))
}

fn save_checkpoint(model: &Llama, opt: &optim::AdamW, dir: &Path, state: &CheckpointState) -> Result<()> {
    checkpoint::replace_dir(dir, |tmp| {
        model.save(tmp)?;
        opt.save(&tmp.join("optimizer.safetensors"))?;
        std::fs::write(tmp.join("state.json"), serde_json::to_string_pretty(state)?)?;
        Ok(())
    })
}

/// A progress bar on a terminal, nothing otherwise (logs keep their own lines).
pub fn progress_bar(total: u64, at: u64) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total).with_position(at);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {msg} eta {eta}").expect("valid template"),
    );
    bar
}

fn model_card(s: &TrainSummary, model: &LlamaConfig) -> String {
    let r = &s.report;
    let c = &s.config;
    format!(
        "# Engram base model\n\n\
A {params}-parameter Llama-architecture decoder trained from scratch by `engram train base` on Engram's synthetic \
world (crates/world), to read documents about invented people and answer questions about them, recall the \
`known` people from memory, and do multi-digit addition and sequence copying; it is never shown the `fresh` people \
that later get injected. The evaluation below says how far it got.\n\n\
## Architecture\n\n\
| field | value |\n|---|---|\n| hidden_size | {d} |\n| layers | {l} |\n| heads (kv) | {h} ({kv}) |\n\
| intermediate_size | {i} |\n| vocab_size | {v} (word level) |\n| max_position_embeddings | {mp} |\n\
| parameters | {params} |\n\n\
## Training\n\n\
| field | value |\n|---|---|\n| data seed | {seed} |\n| steps | {steps} |\n| batch | {rows} rows x {row_len} tokens, packed |\n\
| tokens | {tokens} |\n| wall time | {wall:.0} s ({wall_min:.1} min) on 2 CPU cores |\n| throughput | {tps:.0} tokens/s |\n\
| final loss | {loss:.4} |\n| peak lr | {lr} (warmup {wu}, hold {hold}, cosine to {fin}x) |\n\
| mix | reading {mr}, known bios {mb}, closed-book {mc}, skills {ms}; answer weight {aw}; {qlo}-{qhi} questions per \
document, document text weight {tw}{sd}{extras} |\n| init | {init} |\n\n\
Reproduce: `engram train base --config <file> --out <dir>`, the file holding the `config` object of `training.json` \
beside this card (resumable with `--resume`). The per-step log is `train_log.jsonl` beside this card when trained \
locally.\n\n\
## Evaluation\n\n\
`engram eval base --seed {eseed}` ({items} items per suite, people drawn from the held-out `fresh` split):\n\n\
| suite | exact match |\n|---|---|\n| icl_single | {a:.3} |\n| icl_multi | {b:.3} |\n| icl_heldout_phrasing | {cc:.3} |\n\
| closed_book_known | {dd:.3} |\n| closed_book_fresh | {e:.3} |\n| skills | {f:.3} |\n\n\
icl_single by attribute: {attrs}\n",
        params = s.parameters,
        d = model.hidden_size,
        l = model.num_hidden_layers,
        h = model.num_attention_heads,
        kv = model.kv_heads(),
        i = model.intermediate_size,
        v = model.vocab_size,
        mp = model.max_position_embeddings,
        seed = c.seed,
        steps = s.steps,
        rows = c.rows,
        row_len = c.row_len,
        tokens = s.tokens,
        wall = s.wall_s,
        wall_min = s.wall_s / 60.0,
        tps = s.tokens_per_s,
        loss = s.final_loss,
        lr = c.schedule.peak_lr,
        wu = c.schedule.warmup_steps,
        hold = c.schedule.hold_fraction,
        fin = c.schedule.final_fraction,
        mr = c.mix.reading,
        mb = c.mix.known_bio,
        mc = c.mix.closed_book,
        ms = c.mix.skill,
        aw = c.mix.answer_weight,
        sd = match c.mix.short_docs_until {
            0 => String::new(),
            n => format!("; 1-2 person documents until step {n}"),
        },
        qlo = c.mix.questions[0],
        qhi = c.mix.questions[1],
        tw = c.mix.reading_text_weight,
        extras = [
            c.mix.paraphrases.then(|| "; questions also in the world's extra paraphrases".to_string()),
            (c.mix.recaps[1] > 0).then(|| format!("; {}-{} recaps per document", c.mix.recaps[0], c.mix.recaps[1])),
            c.mix.padded_addition.then(|| "; fixed-width addition".to_string()),
            c.mix.recap_wordings.then(|| "; recaps also in a fifth wording per fact".to_string()),
            c.mix.drill.as_ref().map(|d| {
                format!(
                    "; binding drills at weight {} ({}-{} people sharing {}-{} attributes{})",
                    d.weight,
                    d.people[0],
                    d.people[1],
                    d.attributes[0],
                    d.attributes[1],
                    if d.until > 0 { format!(", until step {}", d.until) } else { String::new() }
                )
            }),
        ]
        .into_iter()
        .flatten()
        .collect::<String>(),
        init = match &c.init_from {
            Some(from) => format!("the weights of {}", from.display()),
            None => format!("{:?}", c.init),
        },
        eseed = r.seed,
        items = r.items,
        a = r.icl_single,
        b = r.icl_multi,
        cc = r.icl_heldout_phrasing,
        dd = r.closed_book_known,
        e = r.closed_book_fresh,
        f = r.skills,
        attrs = r.icl_single_by_attribute.iter().map(|(k, v)| format!("{k} {v:.2}")).collect::<Vec<_>>().join(", "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_holds_and_decays() {
        let s = Schedule { peak_lr: 1.0, warmup_steps: 10, hold_fraction: 0.5, final_fraction: 0.1 };
        assert!((s.lr(0, 100) - 0.1).abs() < 1e-9);
        assert_eq!(s.lr(10, 100), 1.0);
        assert_eq!(s.lr(49, 100), 1.0);
        assert!(s.lr(75, 100) < 1.0 && s.lr(75, 100) > 0.1);
        assert!((s.lr(100, 100) - 0.1).abs() < 1e-9);
    }
}
