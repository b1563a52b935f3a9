//! The service commands: `engram serve coordinator|worker|replica` (one process each), `engram up` (all of them in
//! one process on embedded defaults) and `engram demo` (a whole learn-and-roll-back story against `up`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use engram_lineage::{BlobStore, LineageStore};
use engram_model::BaseModel;

#[derive(Subcommand)]
pub enum Serve {
    /// The coordinator: Coordinator and Membership gRPC services.
    Coordinator {
        #[arg(long, default_value = "127.0.0.1:7300")]
        listen: SocketAddr,
        /// Run in high availability: campaign for leadership in etcd (needs an etcd:// store); followers refuse
        /// calls with the leader's address and take over when its lease lapses.
        #[arg(long)]
        elect: bool,
        /// The address clients reach this coordinator at, as followers report it (default: http://<listen>).
        #[arg(long)]
        advertise: Option<String>,
        /// Leader lease in seconds: how long a dead leader holds on before a follower takes over.
        #[arg(long, default_value_t = 2)]
        election_ttl_s: i64,
        #[command(flatten)]
        stores: StoreArgs,
        #[command(flatten)]
        timing: TimingArgs,
    },
    /// A worker: pulls jobs and turns documents into deltas.
    Worker {
        #[arg(long, default_value = "http://127.0.0.1:7300")]
        coordinator: String,
        /// Member id (default: worker-<pid>).
        #[arg(long)]
        id: Option<String>,
        #[command(flatten)]
        stores: StoreArgs,
        #[command(flatten)]
        engine: EngineArgs,
    },
    /// A serving replica: Replica gRPC service (Generate, Stage, Commit, Status).
    Replica {
        #[arg(long, default_value = "127.0.0.1:7310")]
        listen: SocketAddr,
        /// Where the coordinator reaches it (default: http://<listen>).
        #[arg(long)]
        advertise: Option<String>,
        #[arg(long, default_value = "http://127.0.0.1:7300")]
        coordinator: String,
        /// Member id (default: replica-<port>).
        #[arg(long)]
        id: Option<String>,
        #[arg(long, default_value = "models/base")]
        model: PathBuf,
        /// Merged weights kept for recent versions.
        #[arg(long, default_value_t = 8)]
        cache_versions: usize,
        /// Also serve HTTP here: OpenAI-style POST /v1/completions (`model` = namespace) and GET /ready.
        #[arg(long)]
        http: Option<SocketAddr>,
        #[command(flatten)]
        stores: StoreArgs,
    },
}

#[derive(Args, Clone)]
pub struct StoreArgs {
    /// Lineage store: file://DIR (embedded; one process only) or etcd://HOST:PORT[,HOST:PORT][/PREFIX].
    #[arg(long, env = "ENGRAM_STORE", default_value = "file://.engram/lineage")]
    store: String,
    /// Blob store for deltas: file://DIR, memory:// (one process only) or s3://BUCKET[/PREFIX].
    #[arg(long, env = "ENGRAM_BLOBS", default_value = "file://.engram/blobs")]
    blobs: String,
}

#[derive(Args, Clone)]
pub struct TimingArgs {
    /// Lease of workers and replicas, in ms: a silent member is gone after this.
    #[arg(long, default_value_t = 5000)]
    pub(crate) lease_ms: u64,
    /// How long staging on the replicas may take before the slow ones are marked stale, in ms.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) stage_timeout_ms: u64,
    /// How deltas travel to the replicas: `chain` (each replica relays every chunk to the next as it arrives),
    /// `tree:K` (relayed down a K-ary tree), or `direct` (the coordinator streams to every replica itself).
    #[arg(long, default_value = "chain")]
    pub(crate) broadcast: String,
    /// Chunk size of a staged delta, KiB (each chunk carries its own CRC-32 and is relayed as soon as it arrived;
    /// the whole delta is checked against its BLAKE3).
    #[arg(long, default_value_t = 256)]
    pub(crate) stage_chunk_kb: usize,
    /// Replace a namespace's chain by one compaction version every this many versions (replicas then rebuild a
    /// head from the compactions and a short tail), offering documents the gate rejected meanwhile again; 0: never.
    #[arg(long, default_value_t = 100)]
    pub(crate) compact_every: usize,
}

#[derive(Args, Clone)]
pub struct EngineArgs {
    #[arg(long, default_value = "models/base")]
    pub(crate) model: PathBuf,
    #[arg(long, default_value = "models/hypernet")]
    pub(crate) hypernet: PathBuf,
    /// How each delta joins the chain: memory (default: one side-memory entry per fact, no weight moves; holds
    /// thousands of documents), memit (one least-squares weight edit; holds about fifty people), nullspace or naive.
    #[arg(long, default_value = "memory")]
    pub(crate) strategy: String,
    /// Run the capability gate on every candidate (a job's `force` option skips it).
    #[arg(long)]
    pub(crate) gate: bool,
    /// Probes per gate canary.
    #[arg(long, default_value_t = 100)]
    pub(crate) gate_items: usize,
    /// Default injector: hypernet or distill.
    #[arg(long, default_value = "hypernet")]
    pub(crate) injector: String,
    /// cpu, or cuda (needs a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
    /// Cache of the strategy's setup per base model (measuring its protected positions takes ~30 s; about 100 MB
    /// for the memory strategy on the shipped model).
    #[arg(long, env = "ENGRAM_CACHE", default_value = ".engram/cache")]
    pub(crate) cache: PathBuf,
}

#[derive(Args, Clone)]
pub struct UpArgs {
    /// State directory for the embedded lineage and blobs (ignored for what --store/--blobs name).
    #[arg(long, default_value = ".engram")]
    pub(crate) dir: PathBuf,
    /// Lineage store URL (default: file://<dir>/lineage).
    #[arg(long)]
    pub(crate) store: Option<String>,
    /// Blob store URL (default: file://<dir>/blobs).
    #[arg(long)]
    pub(crate) blobs: Option<String>,
    /// Coordinator address; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:7300")]
    pub(crate) listen: SocketAddr,
    /// First replica's address; the others take the next ports (port 0: free ones).
    #[arg(long, default_value = "127.0.0.1:7310")]
    pub(crate) replica_listen: SocketAddr,
    #[arg(long, default_value_t = 1)]
    pub(crate) replicas: usize,
    /// First replica's HTTP address (POST /v1/completions, GET /ready); the others take the next ports.
    #[arg(long)]
    pub(crate) http: Option<SocketAddr>,
    #[arg(long, default_value_t = 1)]
    pub(crate) workers: usize,
    /// Namespace created (over --model) if missing.
    #[arg(long, default_value = "default")]
    pub(crate) namespace: String,
    #[command(flatten)]
    pub(crate) engine: EngineArgs,
    #[command(flatten)]
    pub(crate) timing: TimingArgs,
}

pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ENGRAM_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("warn,engram_coordinator=info,engram_worker=info,engram_replica=info")
    });
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

fn device(name: &str) -> Result<candle_core::Device> {
    match name {
        "cpu" => Ok(candle_core::Device::Cpu),
        "cuda" => candle_core::Device::new_cuda(0)
            .context("--device cuda: no usable CUDA device (or a build without the `cuda` feature)"),
        other => bail!("--device {other:?}: expected cpu or cuda"),
    }
}

fn load_base(model: &std::path::Path, dev: &candle_core::Device) -> Result<&'static BaseModel> {
    let base = BaseModel::load(model, dev).with_context(|| format!("loading model from {}", model.display()))?;
    // Workers' injectors borrow the base model for the life of the process.
    Ok(Box::leak(Box::new(base)))
}

async fn stores(store: &str, blobs: &str) -> Result<(Arc<dyn LineageStore>, BlobStore)> {
    let s = engram_lineage::open(store).await.with_context(|| format!("opening lineage store {store}"))?;
    let b = BlobStore::open(blobs).with_context(|| format!("opening blob store {blobs}"))?;
    Ok((s, b))
}

/// The coordinator's broadcaster: `--broadcast` over gRPC, and NCCL to the replicas that advertise it when this
/// process can use NCCL (its NCCL groups meet at its own rendezvous, reached at `listen`).
fn broadcaster(timing: &TimingArgs, listen: SocketAddr) -> Result<std::sync::Arc<dyn engram_transport::Broadcaster>> {
    let streaming = engram_transport::broadcaster(&timing.broadcast, timing.stage_chunk_kb << 10)?;
    let own = match listen.ip() {
        ip if ip.is_unspecified() => format!("http://127.0.0.1:{}", listen.port()),
        _ => format!("http://{listen}"),
    };
    Ok(engram_transport::collective::for_coordinator(streaming, &own))
}

fn coordinator_config(t: &TimingArgs) -> engram_coordinator::CoordinatorConfig {
    engram_coordinator::CoordinatorConfig {
        lease_ttl: std::time::Duration::from_millis(t.lease_ms),
        stage_timeout: std::time::Duration::from_millis(t.stage_timeout_ms),
        compact_every: t.compact_every,
        ..Default::default()
    }
}

fn worker_config(id: String, coordinator: String, e: &EngineArgs) -> engram_worker::WorkerConfig {
    engram_worker::WorkerConfig {
        id,
        coordinator,
        strategy: e.strategy.clone(),
        gate: e.gate,
        gate_items: e.gate_items,
        injector: e.injector.clone(),
        hypernet: e.hypernet.clone(),
        cache: Some(e.cache.clone()),
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

pub fn serve(cmd: Serve) -> Result<()> {
    init_tracing();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        match cmd {
            Serve::Coordinator { listen, elect, advertise, election_ttl_s, stores: s, timing } => {
                let (store, blobs) = stores(&s.store, &s.blobs).await?;
                let listener =
                    tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
                let addr = listener.local_addr()?;
                let c = engram_coordinator::Coordinator::new(
                    coordinator_config(&timing),
                    store,
                    blobs,
                    broadcaster(&timing, addr)?,
                );
                eprintln!("coordinator listening on {addr}");
                if !elect {
                    c.recover().await?;
                    return engram_coordinator::serve(c, listener, shutdown_signal()).await;
                }
                let (endpoints, prefix) = engram_lineage::etcd_url(&s.store)
                    .context("--elect needs an etcd:// lineage store (the embedded one serves a single coordinator)")?;
                let advertise = advertise.unwrap_or_else(|| format!("http://{addr}"));
                let candidate =
                    engram_lineage::election::Candidate::connect(&endpoints, &prefix, &advertise, election_ttl_s)
                        .await?;
                let server = tokio::spawn(engram_coordinator::serve(c.clone(), listener, shutdown_signal()));
                tokio::select! {
                    r = c.campaign(candidate) => {
                        // Lost the lease: never act as leader again in this process; a supervisor restarts it.
                        let why = r.err().unwrap_or_else(|| anyhow::anyhow!("campaign ended"));
                        eprintln!("engram coordinator: {why:#}");
                        std::process::exit(3);
                    }
                    r = server => r?,
                }
            }
            Serve::Worker { coordinator, id, stores: s, engine } => {
                let (store, blobs) = stores(&s.store, &s.blobs).await?;
                let id = id.unwrap_or_else(|| format!("worker-{}", std::process::id()));
                let cfg = worker_config(id, coordinator, &engine);
                let dev = device(&engine.device)?;
                let base = load_base(&engine.model, &dev)?;
                let e = {
                    let cfg = cfg.clone();
                    tokio::task::spawn_blocking(move || engram_worker::Engine::new(base, &cfg)).await??
                };
                let w = engram_worker::Worker::new(cfg, Arc::new(e), store, blobs);
                let stop = Arc::new(AtomicBool::new(false));
                let s2 = stop.clone();
                tokio::spawn(async move {
                    shutdown_signal().await;
                    s2.store(true, std::sync::atomic::Ordering::SeqCst);
                });
                eprintln!("worker running");
                w.run(stop).await
            }
            Serve::Replica { listen, advertise, coordinator, id, model, cache_versions, http, stores: s } => {
                let (store, blobs) = stores(&s.store, &s.blobs).await?;
                let listener =
                    tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
                let addr = listener.local_addr()?;
                let base = Arc::new(BaseModel::load(&model, &candle_core::Device::Cpu)?);
                let cfg = engram_replica::ReplicaConfig {
                    id: id.unwrap_or_else(|| format!("replica-{}", addr.port())),
                    advertise: advertise.unwrap_or_else(|| format!("http://{addr}")),
                    coordinator: Some(coordinator),
                    cache_versions,
                };
                let r = engram_replica::Replica::new(cfg, base, store, blobs);
                r.start().await?;
                if let Some(h) = http {
                    let l = tokio::net::TcpListener::bind(h).await.with_context(|| format!("binding {h}"))?;
                    eprintln!("replica HTTP on {}", l.local_addr()?);
                    tokio::spawn(engram_replica::http::serve(r.clone(), l));
                }
                eprintln!("replica listening on {addr}");
                eprintln!("staging transports: {}", engram_transport::staging_transports());
                engram_replica::serve(r, listener, shutdown_signal()).await
            }
        }
    })
}

/// A running all-in-one cluster.
pub struct Up {
    pub coordinator: String,
    pub replicas: Vec<String>,
    pub namespace: String,
}

/// Starts coordinator, workers and replicas in this process; returns once every replica is ready.
pub async fn up(a: &UpArgs) -> Result<Up> {
    let store_url = a.store.clone().unwrap_or_else(|| format!("file://{}", a.dir.join("lineage").display()));
    let blob_url = a.blobs.clone().unwrap_or_else(|| format!("file://{}", a.dir.join("blobs").display()));
    let (store, blobs) = stores(&store_url, &blob_url).await?;
    let dev = device(&a.engine.device)?;
    let base = load_base(&a.engine.model, &dev)?;
    match store.namespace(&a.namespace).await {
        Ok(ns) if ns.base_model != base.hash => {
            bail!(
                "namespace {:?} is over another base model ({}); pick another --namespace",
                a.namespace,
                ns.base_model
            )
        }
        Ok(_) => {}
        Err(engram_lineage::Error::NotFound(_)) => {
            store.create_namespace(&a.namespace, &base.hash, "engram-up").await?;
        }
        Err(e) => return Err(e.into()),
    }
    let listener = tokio::net::TcpListener::bind(a.listen).await.with_context(|| format!("binding {}", a.listen))?;
    let c = engram_coordinator::Coordinator::new(
        coordinator_config(&a.timing),
        store.clone(),
        blobs.clone(),
        broadcaster(&a.timing, listener.local_addr()?)?,
    );
    c.recover().await?;
    let coordinator = format!("http://{}", listener.local_addr()?);
    tokio::spawn(engram_coordinator::serve(c, listener, std::future::pending()));

    let mut replicas = Vec::new();
    for i in 0..a.replicas {
        let mut addr = a.replica_listen;
        if addr.port() != 0 {
            addr.set_port(addr.port() + i as u16);
        }
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
        let addr = listener.local_addr()?;
        let cfg = engram_replica::ReplicaConfig {
            id: format!("replica-{i}"),
            advertise: format!("http://{addr}"),
            coordinator: Some(coordinator.clone()),
            cache_versions: 8,
        };
        let r = engram_replica::Replica::new(cfg, Arc::new(base_clone(base)), store.clone(), blobs.clone());
        r.start().await?;
        if let Some(mut h) = a.http {
            if h.port() != 0 {
                h.set_port(h.port() + i as u16);
            }
            let l = tokio::net::TcpListener::bind(h).await.with_context(|| format!("binding {h}"))?;
            tracing::info!("replica-{i} HTTP on {}", l.local_addr()?);
            tokio::spawn(engram_replica::http::serve(r.clone(), l));
        }
        tokio::spawn(engram_replica::serve(r, listener, std::future::pending()));
        replicas.push(format!("http://{addr}"));
    }
    for i in 0..a.workers {
        let cfg = worker_config(format!("worker-{i}"), coordinator.clone(), &a.engine);
        let e = {
            let cfg = cfg.clone();
            tokio::task::spawn_blocking(move || engram_worker::Engine::new(base, &cfg)).await??
        };
        let w = engram_worker::Worker::new(cfg, Arc::new(e), store.clone(), blobs.clone());
        tokio::spawn(async move { w.run(Arc::new(AtomicBool::new(false))).await });
    }
    Ok(Up { coordinator, replicas, namespace: a.namespace.clone() })
}

fn base_clone(b: &BaseModel) -> BaseModel {
    BaseModel { llama: b.llama.clone(), tokenizer: b.tokenizer.clone(), hash: b.hash.clone() }
}

pub fn run_up(a: UpArgs) -> Result<()> {
    init_tracing();
    tokio::runtime::Runtime::new()?.block_on(async move {
        let u = up(&a).await?;
        eprintln!(
            "engram up: coordinator {} · replicas {} · namespace {:?}",
            u.coordinator,
            u.replicas.join(", "),
            u.namespace
        );
        eprintln!("state in {} · Ctrl-C stops", a.dir.display());
        shutdown_signal().await;
        Ok(())
    })
}

#[derive(Args)]
pub struct DemoArgs {
    #[command(flatten)]
    up: UpArgs,
    /// Seed that picks the fresh person the demo teaches.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

/// Before, consolidate, after, log, rollback, after rollback: what Engram is for, in one run.
pub fn demo(mut a: DemoArgs) -> Result<()> {
    if std::env::var_os("ENGRAM_LOG").is_none() {
        // The story is the output; service logs only when something is wrong.
        std::env::set_var("ENGRAM_LOG", "warn");
    }
    init_tracing();
    // A throwaway cluster on free ports, unless told otherwise.
    let tmp = tempfile::tempdir()?;
    if a.up.dir.as_path() == std::path::Path::new(".engram") {
        a.up.dir = tmp.path().to_path_buf();
    }
    a.up.listen.set_port(0);
    a.up.replica_listen.set_port(0);
    a.up.namespace = "demo".into();
    tokio::runtime::Runtime::new()?.block_on(async move {
        println!(
            "starting coordinator, worker and replica (embedded lineage in {}; the first run measures the memory \
             strategy's protected positions, ~30 s, cached in {}) ...",
            a.up.dir.display(),
            a.up.engine.cache.display()
        );
        let u = up(&a.up).await?;
        let client = engram_sdk::Client::connect(&u.coordinator).await?.with_actor("demo");
        let replicas = engram_sdk::Replicas::connect(&u.replicas).await?;
        let world = engram_world::World::new();
        let mut rng = engram_world::Rng::derive(a.seed, 0xDE40);
        let person = world.new_people(&mut rng, 1).remove(0);
        let doc = world.document(&mut rng, std::slice::from_ref(&person), false);
        let attribute = engram_world::Attribute::Employer;
        let question = engram_world::text::question(attribute, 0, &person.name());
        let truth = person.value(attribute).to_string();
        let prompt = format!("Q : {question} A :");
        let ask = |label: &'static str| {
            let (replicas, prompt, truth) = (&replicas, prompt.clone(), truth.clone());
            async move {
                let r = replicas.generate("demo", &prompt, 8).await?;
                let version = if r.version.is_empty() {
                    "base model".to_string()
                } else {
                    format!("version {}", &r.version[..12])
                };
                let verdict = if r.text == truth { "right" } else { "wrong" };
                println!("  {label:<16} {:<14} ({verdict}; served by {version})", r.text);
                anyhow::Ok(r)
            }
        };
        println!("\nthe question: {question}   (the truth: {truth})");
        ask("before:").await?;
        println!("\nconsolidating the document, with no document in any later prompt:\n  {doc}");
        let job = client.consolidate("demo", vec![doc.clone()], &format!("demo-{}", a.seed)).await?;
        let done = client.watch(&job.id, |j| println!("  job {} {:?}", j.id, j.state())).await?;
        if done.state() != engram_sdk::JobState::Live {
            bail!("the job ended {:?}: {}", done.state(), done.error);
        }
        let t = done.timings.unwrap_or_default();
        println!(
            "  queue {:.0} ms · inject {:.0} ms · stage {:.0} ms · commit {:.0} ms",
            t.queue_ms, t.inject_ms, t.stage_ms, t.commit_ms
        );
        ask("after:").await?;
        println!("\nengramctl log demo:");
        let log = client.versions("demo", 0).await?;
        for v in &log.versions {
            let head = if v.id == log.head { " <- head" } else { "" };
            println!(
                "  {}  {:<11} parent {:<12} injector {}{head}",
                &v.id[..12],
                v.status,
                if v.parent.is_empty() { "base" } else { &v.parent[..12] },
                v.injector
            );
        }
        println!("\nrolling back to the base model ...");
        client.rollback("demo", "", "demo: undo the consolidation").await?;
        ask("after rollback:").await?;
        Ok(())
    })
}
