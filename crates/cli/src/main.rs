//! `engram`: the all-in-one command: the service (`up`, `demo`, `serve`), the world, training, evaluation and
//! benchmarks.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

mod bench_broadcast;
mod bench_load;
mod bench_service;
mod service;
use engram_world::{Phrasing, Rng, SkillTask, Split, World, SKILL_SUITE};

// candle allocates a fresh buffer per op; glibc's malloc page-faults on every one of them. The wrapper counts live
// heap bytes for the evaluations' peak-memory figures (two relaxed atomics per allocation).
#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc(mimalloc::MiMalloc);

struct CountingAlloc(mimalloc::MiMalloc);

// SAFETY: every call is forwarded unchanged to mimalloc; the counters only observe sizes.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let p = unsafe { self.0.alloc(layout) };
        if !p.is_null() {
            engram_eval::heap::allocated(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        let p = unsafe { self.0.alloc_zeroed(layout) };
        if !p.is_null() {
            engram_eval::heap::allocated(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        unsafe { self.0.dealloc(ptr, layout) };
        engram_eval::heap::freed(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { self.0.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            engram_eval::heap::freed(layout.size());
            engram_eval::heap::allocated(new_size);
        }
        p
    }
}

/// Engram turns what a language model reads into what it knows.
#[derive(Parser)]
#[command(name = "engram", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The main job on embedded defaults: a cluster in this process learns a fresh fact from a document, answers
    /// it with no document in context, and forgets it again on rollback; every answer names its version.
    Demo(service::DemoArgs),
    /// Coordinator, workers and replicas in one process on embedded defaults (redb lineage, local blob dir).
    Up(service::UpArgs),
    /// Run one service process.
    #[command(subcommand)]
    Serve(service::Serve),
    /// The synthetic knowledge world.
    #[command(subcommand)]
    World(WorldCommand),
    /// Train models.
    #[command(subcommand)]
    Train(TrainCommand),
    /// Evaluate models.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Benchmarks, each measured against a reference in the same run.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Turn a document into a LoRA delta: one hypernetwork forward pass, or context distillation.
    Inject {
        /// The document: text naming people of the world, e.g. one printed by `engram world sample`.
        #[arg(long)]
        doc: PathBuf,
        /// Output directory: `delta.safetensors` (native), and with --peft a PEFT adapter in `peft/`.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "models/base")]
        model: PathBuf,
        #[command(flatten)]
        hyper: HypernetArgs,
        /// Which injector writes the delta.
        #[arg(long, value_enum, default_value_t = InjectorKind::Hypernet)]
        injector: InjectorKind,
        /// Distillation steps (with --injector distill).
        #[arg(long, default_value_t = engram_inject::DistillConfig::default().steps)]
        steps: usize,
        /// Also write a Hugging Face PEFT adapter (adapter_config.json + adapter_model.safetensors).
        #[arg(long)]
        peft: bool,
    },
    /// Answer a question closed-book, optionally with an adapter applied (a directory from `engram inject`, native
    /// or PEFT).
    Ask {
        /// e.g. "where was Fenkin Drerusley born ?"
        question: String,
        #[arg(long, default_value = "models/base")]
        model: PathBuf,
        #[arg(long)]
        adapter: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum WorldCommand {
    /// Print samples of each split and task: known and fresh people, documents, questions, skills.
    Sample {
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// How many samples of each kind.
        #[arg(long, default_value_t = 2)]
        count: usize,
    },
}

#[derive(Subcommand)]
enum TrainCommand {
    /// Train the base model on the world (reading, known people, skills); writes a Hugging Face model directory.
    Base {
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 2400)]
        steps: u64,
        /// Output directory (config.json, model.safetensors, tokenizer.json, MODEL_CARD.md, checkpoint/).
        #[arg(long, default_value = "runs/base")]
        out: PathBuf,
        /// Continue from the checkpoint in the output directory.
        #[arg(long)]
        resume: bool,
        /// A tiny configuration that trains in seconds (for smoke tests).
        #[arg(long)]
        tiny: bool,
        /// Stop (with a checkpoint) after this step; continue later with --resume.
        #[arg(long)]
        stop_after: Option<u64>,
        /// Rows per batch (overrides the recipe).
        #[arg(long)]
        rows: Option<usize>,
        /// Tokens per packed row (overrides the recipe).
        #[arg(long)]
        row_len: Option<usize>,
        /// A whole recipe as JSON (the `config` object of a run's training.json), seed and steps included;
        /// replaces the built-in one.
        #[arg(long, conflicts_with = "tiny")]
        config: Option<PathBuf>,
    },
    /// Meta-train the Doc-to-LoRA hypernetwork on a base model (context distillation on reading-split people;
    /// the `fresh` people evaluations inject are never seen). Writes hypernet.json, hypernet.safetensors,
    /// MODEL_CARD.md, training.json and train_log.jsonl; checkpoints every few steps.
    Hypernet {
        /// The base model the hypernetwork reads and writes for.
        #[arg(long, default_value = "models/base")]
        model: PathBuf,
        #[arg(long, default_value = "runs/hypernet")]
        out: PathBuf,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 2000)]
        steps: u64,
        /// Continue from the checkpoint in the output directory.
        #[arg(long)]
        resume: bool,
        /// Stop (with a checkpoint) after this step; continue later with --resume.
        #[arg(long)]
        stop_after: Option<u64>,
        /// A small network and batch that train in seconds (smoke tests).
        #[arg(long)]
        tiny: bool,
        /// A whole meta-training config as JSON (the `config` object of a run's training.json).
        #[arg(long, conflicts_with = "tiny")]
        config: Option<PathBuf>,
    },
}

#[derive(Args)]
struct ModelArgs {
    /// A Hugging Face model directory.
    #[arg(long, default_value = "models/base")]
    model: PathBuf,
    /// Seed that draws the evaluation people from the held-out split.
    #[arg(long, default_value_t = engram_eval::DEFAULT_SEED)]
    seed: u64,
    /// Print one JSON object on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum InjectorKind {
    /// The meta-trained hypernetwork: one forward pass.
    Hypernet,
    /// Context distillation: AdamW steps on questions generated from the document.
    Distill,
}

#[derive(Args)]
struct HypernetArgs {
    /// The hypernetwork directory (hypernet.json + hypernet.safetensors) trained for --model.
    #[arg(long, default_value = "models/hypernet")]
    hypernet: PathBuf,
}

#[derive(Subcommand)]
enum EvalCommand {
    /// Injection quality, cost and side effects: no context vs in context vs distillation vs hypernetwork, on
    /// held-out fresh documents (one-person and four-person), latency against a prefill, peak memory, the
    /// distillation steps needed to match the hypernetwork, and canaries (known recall, reading, skills) with one
    /// delta applied.
    Inject {
        #[command(flatten)]
        args: ModelArgs,
        #[command(flatten)]
        hyper: HypernetArgs,
        /// One-person documents.
        #[arg(long, default_value_t = 200)]
        items: usize,
        /// Four-person documents.
        #[arg(long, default_value_t = 50)]
        multi_items: usize,
        /// Distillation steps of the baseline.
        #[arg(long, default_value_t = engram_inject::DistillConfig::default().steps)]
        distill_steps: usize,
        /// Documents on which distillation step counts are tried until they match the hypernetwork.
        #[arg(long, default_value_t = 20)]
        match_items: usize,
        /// Run distillation on only this many one-person documents (and a quarter as many four-person ones):
        /// it takes seconds per document on a CPU. Default: all.
        #[arg(long)]
        distill_items: Option<usize>,
    },
    /// One fact hidden at a random place in a distractor document of 1x, 2x and 4x the context window: closed-book
    /// accuracy after hypernetwork injection (documents are chunked), and peak memory at 1x vs 16x.
    Needle {
        #[command(flatten)]
        args: ModelArgs,
        #[command(flatten)]
        hyper: HypernetArgs,
        /// Documents per length.
        #[arg(long, default_value_t = 50)]
        items: usize,
    },
    /// Exact-match accuracy on in-context reading, closed-book recall and skills.
    Base {
        #[command(flatten)]
        args: ModelArgs,
        /// Probes per suite.
        #[arg(long, default_value_t = engram_eval::DEFAULT_ITEMS)]
        items: usize,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// The service: acknowledged consolidation requests/s and latency (durable before the reply), and seconds from
    /// request to live on every replica split into queue, inject, stage and commit; embedded store and etcd.
    Service(bench_service::ServiceBenchArgs),
    /// The service under load and faults: real processes (two coordinators in high availability, workers,
    /// replicas) under concurrent clients; throughput, p50/p99 and errors steady, with a replica killed, with the
    /// leader killed; then the leader failover time (SIGKILL -> first accepted request), p50/p99.
    Load(bench_load::LoadBenchArgs),
    /// Staging time against the number of replicas under the pipelined broadcast (chain or tree): the sender and each
    /// replica in their own network namespace on `tc`-shaped veth links (root; `--loopback` without); seconds per
    /// replica count, ratio of the most to one, throughput against a raw TCP copy over the same link and on loopback.
    Broadcast(bench_broadcast::BroadcastBenchArgs),
    /// A staging sink for `bench broadcast` (internal).
    #[command(hide = true)]
    BroadcastNode(bench_broadcast::NodeArgs),
    /// One broadcast for `bench broadcast` (internal).
    #[command(hide = true)]
    BroadcastSend(bench_broadcast::SendArgs),
    /// N documents injected one after another, the state carried from each to the next as the service carries a
    /// namespace's head. Every --eval-every documents: reliability (closed-book recall of every fact injected so
    /// far), generalization (held-out phrasing), locality (known recall, reading, skills relative to the base
    /// model; the minimum), weight drift, latency. Prints the curve; --json prints the report (the final row in
    /// `last`).
    Sequential {
        #[command(flatten)]
        args: ModelArgs,
        #[command(flatten)]
        hyper: HypernetArgs,
        /// Documents to inject.
        #[arg(long, default_value_t = 100)]
        n: usize,
        /// How each delta joins the chain: naive (add it), nullspace (project it off protected keys), memit (one
        /// least-squares solution meeting every accepted document's key-value requirements) or memory (one
        /// side-memory entry per person, read at the final residual).
        #[arg(long, default_value = "memit")]
        strategy: String,
        /// Memory strategy: added to each entry's threshold (the highest cosine a protected position reaches).
        #[arg(long, default_value_t = engram_compose::MemoryConfig::default().margin)]
        memory_margin: f32,
        /// Memory strategy: one entry per person instead of one per fact (person and attribute).
        #[arg(long)]
        memory_per_person: bool,
        /// Memory strategy: key and fit each entry on the world's extra question paraphrases too (false: the two
        /// trained phrasings only).
        #[arg(long, default_value_t = engram_compose::MemoryConfig::default().paraphrases, action = clap::ArgAction::Set)]
        memory_paraphrases: bool,
        /// Memory strategy: where the model's own top next-token probability is below this, an entry fires above
        /// the highest cosine of the protected positions the model is unsure of (0: the absolute threshold only).
        #[arg(long, default_value_t = engram_compose::MemoryConfig::default().gate)]
        memory_gate: f32,
        /// Memory strategy: reading and skill samples among the protected texts (beside every known person's
        /// questions and a biography each) whose positions set the thresholds.
        #[arg(long, default_value_t = engram_compose::MemoryConfig::default().protected_samples)]
        memory_protected_samples: usize,
        /// Memory strategy: added to each entry's unsure threshold.
        #[arg(long, default_value_t = engram_compose::MemoryConfig::default().unsure_margin)]
        memory_unsure_margin: f32,
        /// Memory strategy: key each fact on what sets its person apart, its questions' direction minus the
        /// attribute's centre over the known people's questions (false: the questions' direction itself).
        #[arg(long, action = clap::ArgAction::Set, default_value_t = engram_compose::MemoryConfig::default().attribute_centred)]
        memory_attribute_centred: bool,
        /// Memory strategy: each fact's answer is the base model's reading of the document in context (where it
        /// fits the context window); false: the candidate delta's answer.
        #[arg(long, action = clap::ArgAction::Set, default_value_t = engram_compose::MemoryConfig::default().read_in_context)]
        memory_read_in_context: bool,
        #[arg(long, value_enum, default_value_t = InjectorKind::Hypernet)]
        injector: InjectorKind,
        /// Distillation steps (with --injector distill).
        #[arg(long, default_value_t = engram_inject::DistillConfig::default().steps)]
        steps: usize,
        /// Evaluate every this many documents (default: n / 10).
        #[arg(long)]
        eval_every: Option<usize>,
        /// People per document.
        #[arg(long, default_value_t = 1)]
        people_per_doc: usize,
        /// Probes per locality suite.
        #[arg(long, default_value_t = 200)]
        locality_items: usize,
        /// Score every candidate on the capability gate's canaries and reject those that drop more than
        /// --max-drop points on any.
        #[arg(long)]
        gate: bool,
        /// Largest drop tolerated on any canary, in accuracy points (0-100).
        #[arg(long, default_value_t = 2.0)]
        max_drop: f64,
        /// Null-space strategy: share of each accepted injection's key energy added to the protected basis.
        #[arg(long, default_value_t = engram_compose::NullSpaceConfig::default().grow_energy)]
        grow_energy: f64,
        /// Null-space strategy: share of the protected keys' energy the initial basis holds.
        #[arg(long, default_value_t = engram_compose::NullSpaceConfig::default().energy)]
        energy: f64,
        /// Memit strategy: weight of the protected keys (known facts, reading, skills).
        #[arg(long, default_value_t = engram_compose::MemitConfig::default().lambda)]
        lambda: f64,
        /// Memit strategy: the candidate's outputs are required times this.
        #[arg(long, default_value_t = engram_compose::MemitConfig::default().target_scale)]
        target_scale: f64,
        /// Memit strategy: ridge on the weight change, relative to the mean key energy per dimension.
        #[arg(long, default_value_t = engram_compose::MemitConfig::default().mu)]
        mu: f64,
        /// Memit strategy: `locate` (search the residual change at the person's name that gives the candidate's
        /// answers, MEMIT) or `reproduce` (require the candidate's own outputs on its questions' keys).
        #[arg(long, default_value = "locate")]
        mode: String,
        /// Memit strategy, locate mode: the down_proj layers edited, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = engram_compose::MemitConfig::default().layers)]
        edit_layers: Vec<usize>,
        /// Memit strategy, locate mode: `last` (write each fact at its question's last token) or `subject`
        /// (one change at the person's name).
        #[arg(long, default_value = "last")]
        site: String,
        /// Memit (locate mode) and memory strategies: Adam steps and learning rate of the value search.
        #[arg(long, default_value_t = engram_compose::MemitConfig::default().search_steps)]
        search_steps: usize,
        #[arg(long, default_value_t = engram_compose::MemitConfig::default().search_lr)]
        search_lr: f64,
        /// Replace the chain by one compaction delta every this many accepted versions (0: never); the report
        /// checks the compacted state equals the head.
        #[arg(long, default_value_t = 100)]
        compact_every: usize,
        /// Write the curve as CSV here.
        #[arg(long)]
        csv: Option<PathBuf>,
        /// Write an SVG plot of reliability, generalization and locality here.
        #[arg(long)]
        plot: Option<PathBuf>,
    },
    /// The hypernetwork's injection latency against one prefill of the same document (the floor: the document
    /// must be read once), over one-person fresh documents, each injection timed right after its prefill; the time
    /// split into capture (the frozen model reading), hypernetwork and the rest.
    Inject {
        #[command(flatten)]
        args: ModelArgs,
        #[command(flatten)]
        hyper: HypernetArgs,
        /// One-person documents per round.
        #[arg(long, default_value_t = 200)]
        documents: usize,
        /// Passes over the documents (the ratio is reported per round and over all).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Forward-pass tokens/s of Engram's decoder against candle-transformers' Llama on the same weights.
    Forward {
        #[command(flatten)]
        args: ModelArgs,
        #[arg(long, default_value_t = 4)]
        batch: usize,
        #[arg(long, default_value_t = 256)]
        seq_len: usize,
        #[arg(long, default_value_t = 20)]
        rounds: usize,
    },
    /// Lineage store throughput and latency on the embedded store and on etcd: durable version creation with
    /// 1/8/64 writers, head compare-and-swap on one contended namespace, rollback-to-watcher latency.
    Lineage {
        /// Print one JSON object on stdout instead of tables.
        #[arg(long)]
        json: bool,
        /// Seconds per throughput case.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Rollbacks timed until a watcher sees them.
        #[arg(long, default_value_t = 300)]
        rollbacks: usize,
        /// An etcd to measure (HOST:PORT). By default the bench starts a throwaway one on loopback.
        #[arg(long)]
        etcd: Option<String>,
        /// Skip etcd.
        #[arg(long)]
        no_etcd: bool,
        /// Directory for the embedded store (default: a temporary directory; its disk decides fsync cost).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    engram_model::pin_thread_count();
    match Cli::parse().command {
        Command::World(WorldCommand::Sample { seed, count }) => world_sample(seed, count),
        Command::Train(TrainCommand::Base { seed, steps, out, resume, tiny, stop_after, rows, row_len, config }) => {
            let mut cfg = if let Some(path) = config {
                let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
                serde_json::from_str(&text).with_context(|| format!("{} is not a training recipe", path.display()))?
            } else if tiny {
                engram_trainer::TrainConfig::tiny(seed, steps)
            } else {
                engram_trainer::TrainConfig::base(seed, steps)
            };
            cfg.rows = rows.unwrap_or(cfg.rows);
            cfg.row_len = row_len.unwrap_or(cfg.row_len);
            let Some(s) = engram_trainer::train_until(&cfg, &out, resume, stop_after)? else {
                return Ok(());
            };
            println!(
                "trained {} steps, {} tokens in {:.0} s ({:.0} tokens/s); model in {}",
                s.steps,
                s.tokens,
                s.wall_s,
                s.tokens_per_s,
                s.out.display()
            );
            print!("{}", s.report.table());
            Ok(())
        }
        Command::Train(TrainCommand::Hypernet { model, out, seed, steps, resume, stop_after, tiny, config }) => {
            let base = load(&model)?;
            let cfg = if let Some(path) = config {
                let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
                serde_json::from_str(&text)
                    .with_context(|| format!("{} is not a meta-training config", path.display()))?
            } else if tiny {
                engram_inject::MetaConfig::tiny(&base, seed, steps)
            } else {
                engram_inject::MetaConfig::new(&base, seed, steps)
            };
            let Some(s) = engram_inject::train_hypernet(&base, &cfg, &out, resume, stop_after)? else {
                return Ok(());
            };
            let e = &s.final_eval;
            println!(
                "meta-trained {} steps in {:.0} s; hypernetwork in {}\n  closed_book_single {:.3}  heldout {:.3}  known_kept {:.3}  leak {:.3}  {:?}",
                s.steps, s.wall_s, s.out.display(), e.closed_book_single, e.closed_book_heldout, e.known_kept, e.leak, e.by_attribute
            );
            Ok(())
        }
        Command::Demo(a) => service::demo(a),
        Command::Up(a) => service::run_up(a),
        Command::Serve(s) => service::serve(s),
        Command::Eval(EvalCommand::Base { args, items }) => {
            let base = load(&args.model)?;
            let world = World::new();
            let report = engram_eval::evaluate_base(&base.llama, &base.tokenizer, &world, args.seed, items, |d, n| {
                if !args.json {
                    eprint!("\revaluating suite {d}/{n}");
                }
            })?;
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                eprintln!();
                print!("{}", report.table());
                show_answers(&base, &world, args.seed)?;
            }
            Ok(())
        }
        Command::Inject { doc, out, model, hyper, injector, steps, peft } => {
            inject(&doc, &out, &model, &hyper.hypernet, injector, steps, peft)
        }
        Command::Eval(EvalCommand::Inject {
            args,
            hyper,
            items,
            multi_items,
            distill_steps,
            match_items,
            distill_items,
        }) => {
            let base = load(&args.model)?;
            let inj = engram_inject::HyperInjector::load(&hyper.hypernet, &base)?;
            let cfg = engram_inject::evaluate::InjectEvalConfig {
                seed: args.seed,
                single_docs: items,
                multi_docs: multi_items,
                distill_docs: distill_items,
                distill: engram_inject::DistillConfig { steps: distill_steps, ..Default::default() },
                match_docs: match_items,
                match_steps: vec![5, 20, 80, 160],
                canary_deltas: 3,
                canary_items: 200,
            };
            let r = engram_inject::evaluate::evaluate_inject(&base, &inj, &cfg, |m| eprintln!("{m}"))?;
            if args.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("{}", serde_json::to_string_pretty(&r)?);
            }
            Ok(())
        }
        Command::Eval(EvalCommand::Needle { args, hyper, items }) => {
            let base = load(&args.model)?;
            let inj = engram_inject::HyperInjector::load(&hyper.hypernet, &base)?;
            let r = engram_inject::evaluate::evaluate_needle(&base, &inj, args.seed, items, |m| eprintln!("{m}"))?;
            if args.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("{}", serde_json::to_string_pretty(&r)?);
            }
            Ok(())
        }
        Command::Ask { question, model, adapter } => ask(&question, &model, adapter.as_deref()),
        Command::Bench(BenchCommand::Service(a)) => bench_service::run(a),
        Command::Bench(BenchCommand::Load(a)) => bench_load::run(a),
        Command::Bench(BenchCommand::Broadcast(a)) => bench_broadcast::run(a),
        Command::Bench(BenchCommand::BroadcastNode(a)) => bench_broadcast::node(a),
        Command::Bench(BenchCommand::BroadcastSend(a)) => bench_broadcast::send(a),
        Command::Bench(BenchCommand::Lineage { json, seconds, rollbacks, etcd, no_etcd, dir }) => {
            bench_lineage(json, seconds, rollbacks, etcd, no_etcd, dir)
        }
        Command::Bench(BenchCommand::Sequential {
            args,
            hyper,
            n,
            strategy,
            injector,
            steps,
            eval_every,
            people_per_doc,
            locality_items,
            gate,
            max_drop,
            grow_energy,
            energy,
            lambda,
            target_scale,
            mu,
            mode,
            edit_layers,
            site,
            search_steps,
            search_lr,
            memory_margin,
            memory_per_person,
            memory_paraphrases,
            memory_gate,
            memory_protected_samples,
            memory_unsure_margin,
            memory_attribute_centred,
            memory_read_in_context,
            compact_every,
            csv,
            plot,
        }) => {
            let base = load(&args.model)?;
            let t = std::time::Instant::now();
            let mut strategy: Box<dyn engram_compose::Strategy> = match strategy.as_str() {
                "nullspace" => Box::new(engram_compose::NullSpace::new(
                    &base.llama,
                    &base.tokenizer,
                    engram_compose::NullSpaceConfig { grow_energy, energy, ..Default::default() },
                )?),
                "memit" => Box::new(engram_compose::Memit::new(
                    &base.llama,
                    &base.tokenizer,
                    engram_compose::MemitConfig {
                        lambda,
                        target_scale,
                        mu,
                        mode: mode.parse()?,
                        layers: edit_layers,
                        site: site.parse()?,
                        search_steps,
                        search_lr,
                        ..Default::default()
                    },
                )?),
                "memory" => Box::new(engram_compose::SideMemoryStrategy::new(
                    &base.llama,
                    &base.tokenizer,
                    engram_compose::MemoryConfig {
                        margin: memory_margin,
                        per_fact: !memory_per_person,
                        paraphrases: memory_paraphrases,
                        gate: memory_gate,
                        protected_samples: memory_protected_samples,
                        unsure_margin: memory_unsure_margin,
                        attribute_centred: memory_attribute_centred,
                        read_in_context: memory_read_in_context,
                        search_steps,
                        search_lr,
                        ..Default::default()
                    },
                )?),
                other => engram_compose::strategy(other, &base.llama, &base.tokenizer)?,
            };
            let setup_s = t.elapsed().as_secs_f64();
            let inj: Box<dyn engram_inject::Injector + '_> = match injector {
                InjectorKind::Hypernet => Box::new(engram_inject::HyperInjector::load(&hyper.hypernet, &base)?),
                InjectorKind::Distill => Box::new(engram_inject::DistillInjector::new(
                    &base,
                    engram_inject::DistillConfig { steps, ..Default::default() },
                )),
            };
            let mut cfg = engram_compose::sequential::SequentialConfig::new(n);
            cfg.seed = args.seed;
            cfg.eval_every = eval_every.unwrap_or(cfg.eval_every);
            cfg.people_per_doc = people_per_doc;
            cfg.locality_items = locality_items;
            cfg.compact_every = compact_every;
            cfg.gate = gate.then(|| engram_compose::GateConfig { max_drop_points: max_drop, ..Default::default() });
            let r = engram_compose::sequential::run(&base, inj.as_ref(), strategy.as_mut(), setup_s, &cfg, &mut |p| {
                eprintln!(
                    "{:>5} docs  reliability {:.3}  generalization {:.3}  locality {:.3}  drift {:.3}  rejected {}  {:.0} s",
                    p.documents, p.reliability, p.generalization, p.locality, p.drift, p.rejected, p.elapsed_s
                )
            })?;
            if let Some(path) = csv {
                std::fs::write(&path, r.csv()).with_context(|| format!("writing {}", path.display()))?;
            }
            if let Some(path) = plot {
                std::fs::write(&path, engram_compose::plot::sequential(&[&r]))
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            if args.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                print!("{}", r.table());
            }
            Ok(())
        }
        Command::Bench(BenchCommand::Inject { args, hyper, documents, rounds }) => {
            let base = load(&args.model)?;
            let inj = engram_inject::HyperInjector::load(&hyper.hypernet, &base)?;
            let r =
                engram_inject::evaluate::bench_inject(&base, &inj, args.seed, documents, rounds, |m| eprintln!("{m}"))?;
            if args.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "injection vs prefill, {} documents ({:.0} tokens) x {} rounds\n  prefill p50   {:>7.2} ms ({:.2} on the injection's thread)\n  injection p50 {:>7.2} ms (p95 {:.2}): capture {:.2}, hypernetwork {:.2}, other {:.2}\n  ratio {:.3} over the faster prefill (per round {})",
                    r.documents, r.tokens_mean, r.rounds, r.prefill_ms_p50, r.prefill_injection_thread_ms_p50, r.latency_ms_p50, r.latency_ms_p95,
                    r.capture_ms_p50, r.hypernet_ms_p50, r.other_ms_p50, r.ratio,
                    r.ratio_per_round.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>().join(", ")
                );
            }
            Ok(())
        }
        Command::Bench(BenchCommand::Forward { args, batch, seq_len, rounds }) => {
            let base = load(&args.model)?;
            let r = engram_eval::bench::forward(&base.llama, args.seed, batch, seq_len, rounds)?;
            if args.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "forward, batch {} x {} tokens, {} rounds\n  engram              {:>10.0} tokens/s\n  candle-transformers {:>10.0} tokens/s\n  ratio {:.3}  (max |logit diff| {:.2e})",
                    r.batch, r.seq_len, r.rounds, r.engram_tokens_per_s, r.reference_tokens_per_s, r.ratio, r.max_abs_logit_diff
                );
            }
            Ok(())
        }
    }
}

fn load(dir: &std::path::Path) -> Result<engram_model::BaseModel> {
    engram_model::BaseModel::load(dir, &candle_core::Device::Cpu)
        .with_context(|| format!("loading model from {}", dir.display()))
}

/// A few questions answered in front of the user, so the table is not all they see.
fn show_answers(base: &engram_model::BaseModel, world: &World, seed: u64) -> Result<()> {
    let mut rng = Rng::derive(seed, 99);
    let eos = base.token_id("<eos>")?;
    println!("\nsample answers:");
    let probes = [
        ("in context", world.reading_probe(&mut rng, Split::Fresh, 2, Phrasing::Trained)),
        ("held-out phrasing", world.reading_probe(&mut rng, Split::Fresh, 1, Phrasing::Heldout)),
        ("closed book, known", world.closed_book_probe(&mut rng, Split::Known, Phrasing::Trained)),
        ("closed book, fresh", world.closed_book_probe(&mut rng, Split::Fresh, Phrasing::Trained)),
        ("skill", world.skill_probe(&mut rng, SKILL_SUITE[0])),
    ];
    for (label, p) in probes {
        let ids = base.encode(&p.prompt)?;
        let got = base.decode(&base.llama.generate_greedy(&ids, 8, eos, None)?)?;
        let mark = if got == p.answer { "ok" } else { "WRONG" };
        println!("  [{label}] {}\n    -> {got}   (expected {}; {mark})", p.prompt, p.answer);
    }
    Ok(())
}

fn world_sample(seed: u64, count: usize) -> Result<()> {
    let world = World::new();
    let mut rng = Rng::new(seed);
    let show = |title: &str, items: Vec<String>| {
        println!("== {title}");
        for i in items {
            println!("  {i}");
        }
    };
    let people = |split: Split, rng: &mut Rng| -> Vec<String> {
        world
            .draw_people(rng, split, count)
            .iter()
            .map(|p| serde_json::to_string(p).expect("person serialises"))
            .collect()
    };
    show("known people (memorised by the base model)", people(Split::Known, &mut rng));
    show("fresh people (never in training; injected later)", people(Split::Fresh, &mut rng));
    show("reading documents (training: 1-8 reading people, questions with answers)", {
        (0..count).map(|i| world.reading_sample(&mut rng, 1 + i * 3 % 8).text()).collect()
    });
    show("reading with paraphrased questions and recaps (recipes with `paraphrases` and `recaps`)", {
        let asking =
            engram_world::Asking { paraphrases: true, recaps: [1, 2], recap_wordings: true, ..Default::default() };
        (0..count).map(|i| world.reading_sample_asking(&mut rng, 1 + i % 3, &asking).text()).collect()
    });
    show("binding drills (recipes with `drill`: people sharing attribute types, every fact asked)", {
        (0..count).map(|i| world.binding_drill_sample(&mut rng, 2 + i % 3, 1 + i % 2, false).text()).collect()
    });
    show("known-person biography (training)", (0..count).map(|_| world.known_bio_sample(&mut rng).text()).collect());
    show("closed-book question (training)", (0..count).map(|_| world.closed_book_sample(&mut rng).text()).collect());
    show("held-out question phrasing (evaluation only)", {
        (0..count)
            .map(|_| {
                let p = world.reading_probe(&mut rng, Split::Fresh, 1, Phrasing::Heldout);
                format!("{} {}", p.prompt, p.answer)
            })
            .collect()
    });
    show("skills", {
        (0..count)
            .flat_map(|_| [SkillTask::Addition, SkillTask::PaddedAddition, SkillTask::Copy])
            .map(|t| {
                let p = world.skill_probe(&mut rng, t);
                format!("{} {}", p.prompt, p.answer)
            })
            .collect()
    });
    Ok(())
}

#[derive(serde::Serialize)]
struct LineageBench {
    config: engram_lineage::bench::BenchConfig,
    embedded: engram_lineage::bench::BackendReport,
    etcd: Option<engram_lineage::bench::BackendReport>,
    /// Why etcd was not measured, when it was not.
    etcd_skipped: Option<String>,
}

fn bench_lineage(
    json: bool,
    seconds: f64,
    rollbacks: usize,
    etcd: Option<String>,
    no_etcd: bool,
    dir: Option<PathBuf>,
) -> Result<()> {
    use engram_lineage::bench;
    let cfg = bench::BenchConfig { seconds, rollbacks, ..Default::default() };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let progress = |m: &str| eprintln!("{m}");
        let tmp = tempfile::tempdir()?;
        let dir = dir.unwrap_or_else(|| tmp.path().to_path_buf());
        let embedded = {
            let store = engram_lineage::open(&format!("file://{}", dir.display())).await?;
            bench::run(store, &cfg, progress).await?
        };
        let mut local = None;
        let endpoint = match (no_etcd, etcd) {
            (true, _) => Err("--no-etcd".to_string()),
            (false, Some(e)) => Ok(e),
            (false, None) => match engram_lineage::local_etcd::LocalEtcd::start() {
                Ok(l) => {
                    let e = l.endpoint();
                    local = Some(l);
                    Ok(e)
                }
                Err(e) => Err(format!("could not start a local etcd: {e}")),
            },
        };
        let (etcd, etcd_skipped) = match endpoint {
            Ok(e) => {
                let store = engram_lineage::open(&format!("etcd://{e}/engram-bench")).await?;
                (Some(bench::run(store, &cfg, progress).await?), None)
            }
            Err(why) => (None, Some(why)),
        };
        drop(local);
        let report = LineageBench { config: cfg.clone(), embedded, etcd, etcd_skipped };
        if json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            print_lineage_bench(&report);
        }
        anyhow::Ok(())
    })
}

fn print_lineage_bench(r: &LineageBench) {
    for b in std::iter::once(&r.embedded).chain(r.etcd.as_ref()) {
        println!("{}", b.backend);
        for c in &b.creates {
            println!(
                "  create   {:>3} writers  {:>8.0} versions/s  p50 {:>6.2} ms  p99 {:>6.2} ms  ({} versions)",
                c.writers, c.per_second, c.latency.p50_ms, c.latency.p99_ms, c.versions
            );
        }
        let h = &b.head_cas;
        println!(
            "  head CAS {:>3} writers  {:>8.0} attempts/s  {:.0} wins/s  {} conflicts  p99 {:.2} ms",
            h.writers, h.attempts_per_second, h.wins_per_second, h.conflicts, h.cas_latency.p99_ms
        );
        let w = &b.rollback_to_watcher;
        println!(
            "  rollback -> watcher    p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  ({} rollbacks)",
            w.p50_ms, w.p99_ms, w.max_ms, w.samples
        );
    }
    if let Some(why) = &r.etcd_skipped {
        println!("etcd not measured: {why}");
    }
}

fn inject(
    doc: &std::path::Path,
    out: &std::path::Path,
    model: &std::path::Path,
    hypernet: &std::path::Path,
    kind: InjectorKind,
    steps: usize,
    peft: bool,
) -> Result<()> {
    use engram_inject::Injector;
    let text = std::fs::read_to_string(doc).with_context(|| format!("reading {}", doc.display()))?;
    let base = load(model)?;
    let injector: Box<dyn Injector> = match kind {
        InjectorKind::Hypernet => Box::new(engram_inject::HyperInjector::load(hypernet, &base)?),
        InjectorKind::Distill => {
            let cfg = engram_inject::DistillConfig { steps, ..Default::default() };
            Box::new(engram_inject::DistillInjector::new(&base, cfg))
        }
    };
    let injection = injector.inject(text.trim()).with_context(|| format!("injecting {}", doc.display()))?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(out.join(DELTA_FILE), injection.delta.encode()?)?;
    if peft {
        engram_lora::peft::export(&injection.delta, &out.join("peft"), &model.display().to_string())?;
    }
    println!(
        "{}: {} delta, rank {}, {} steps in {:.0} ms, content hash {}",
        out.display(),
        injection.delta.meta.injector,
        injection.delta.rank(),
        injection.steps,
        injection.seconds * 1e3,
        injection.delta.content_hash()
    );
    Ok(())
}

const DELTA_FILE: &str = "delta.safetensors";

/// Reads an adapter directory: Engram's native delta, or a PEFT adapter.
fn read_adapter(dir: &std::path::Path, base: &engram_model::BaseModel) -> Result<engram_lora::Delta> {
    let native = dir.join(DELTA_FILE);
    let delta = if native.exists() {
        engram_lora::Delta::decode(&std::fs::read(&native)?).with_context(|| format!("reading {}", native.display()))?
    } else if dir.join(engram_lora::peft::CONFIG_FILE).exists() {
        engram_lora::peft::import(dir, &base.hash).with_context(|| format!("reading PEFT adapter {}", dir.display()))?
    } else {
        anyhow::bail!("{} holds neither {DELTA_FILE} nor a PEFT adapter_config.json", dir.display());
    };
    let cfg = base.llama.config();
    let shape = |m: &str| engram_model::Module::from_path(m).map(|m| m.dims(cfg));
    delta
        .validate(&base.hash, cfg.num_hidden_layers, shape, 256, 1e4)
        .with_context(|| format!("adapter {} does not fit this model", dir.display()))?;
    Ok(delta)
}

fn ask(question: &str, model: &std::path::Path, adapter: Option<&std::path::Path>) -> Result<()> {
    let base = load(model)?;
    let lora = match adapter {
        Some(dir) => Some(engram_model::LoraSet::from_delta(&read_adapter(dir, &base)?, base.llama.device())?),
        None => None,
    };
    // The world's questions separate punctuation by spaces.
    let q = question.replace('?', " ?");
    let q = q.split_whitespace().collect::<Vec<_>>().join(" ");
    let prompt = base.encode(&format!("<bos> Q : {q} A :"))?;
    let unk = base.token_id("<unk>")?;
    if prompt.contains(&unk) {
        anyhow::bail!(
            "the question has words outside the model's vocabulary (see `engram world sample` for its phrasing)"
        );
    }
    let eos = base.token_id("<eos>")?;
    let answer = base.llama.generate_greedy(&prompt, 8, eos, lora.as_ref())?;
    let text = base.decode(&answer)?;
    println!("{}", text.trim_end_matches("<eos>").trim());
    Ok(())
}
