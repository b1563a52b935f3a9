//! `engram bench service`: what the service costs, on the embedded store and on etcd.
//!
//! - **Acknowledgement**: `--clients` concurrent SDK clients send `Consolidate` for `--seconds`, each request with its
//!   own idempotency key; a request counts when the coordinator acknowledged it, i.e. after the job is durable in the
//!   lineage store. The namespace is over a base model no worker has, so the jobs stay queued and only the front
//!   door is measured.
//! - **End to end**: `--docs` documents consolidated one after another on a cluster (one worker, `--replicas`
//!   replicas); each from the request to the job being live (staged, head moved, committed on every replica), split
//!   into queue, inject (+compose), stage and commit.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;

use crate::service::{up, EngineArgs, TimingArgs, UpArgs};

#[derive(Args)]
pub struct ServiceBenchArgs {
    /// Print one JSON object on stdout instead of tables.
    #[arg(long)]
    json: bool,
    /// Seconds of the acknowledgement flood per backend.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Concurrent clients in the acknowledgement flood.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Documents consolidated end to end per backend.
    #[arg(long, default_value_t = 10)]
    docs: usize,
    /// Serving replicas in the end-to-end cluster.
    #[arg(long, default_value_t = 2)]
    replicas: usize,
    /// An etcd to measure (HOST:PORT). By default the bench starts a throwaway one on loopback.
    #[arg(long)]
    etcd: Option<String>,
    /// Skip etcd.
    #[arg(long)]
    no_etcd: bool,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(Serialize)]
struct Ack {
    clients: usize,
    seconds: f64,
    accepted: usize,
    errors: usize,
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
}

#[derive(Serialize, Default)]
struct Phases {
    total_ms: f64,
    queue_ms: f64,
    inject_ms: f64,
    stage_ms: f64,
    commit_ms: f64,
}

#[derive(Serialize)]
struct EndToEnd {
    docs: usize,
    replicas: usize,
    live: usize,
    mean: Phases,
    p50_total_ms: f64,
    max_total_ms: f64,
}

#[derive(Serialize)]
struct Backend {
    backend: String,
    ack: Ack,
    end_to_end: EndToEnd,
}

async fn ack_flood(coordinator: &str, ns: &str, clients: usize, seconds: f64) -> Result<Ack> {
    let doc =
        "<doc> Golhal Kineldley was born in Oskruswick . Golhal Kineldley works for Bryquocorp . </doc>".to_string();
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let client = engram_sdk::Client::connect(coordinator).await?;
        let (doc, ns) = (doc.clone(), ns.to_string());
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut errors) = (Vec::new(), 0usize);
            let mut i = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                match client.consolidate(&ns, vec![doc.clone()], &format!("bench-{c}-{i}")).await {
                    Ok(_) => lat.push(t.elapsed().as_secs_f64() * 1e3),
                    Err(_) => errors += 1,
                }
                i += 1;
            }
            (lat, errors)
        }));
    }
    let start = Instant::now();
    let (mut lat, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (l, e) = t.await?;
        lat.extend(l);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64().max(seconds);
    lat.sort_by(f64::total_cmp);
    Ok(Ack {
        clients,
        seconds: elapsed,
        accepted: lat.len(),
        errors,
        per_second: lat.len() as f64 / elapsed,
        p50_ms: engram_eval::percentile(&lat, 0.5),
        p99_ms: engram_eval::percentile(&lat, 0.99),
    })
}

async fn end_to_end(coordinator: &str, ns: &str, docs: usize, replicas: usize) -> Result<EndToEnd> {
    let client = engram_sdk::Client::connect(coordinator).await?;
    let world = engram_world::World::new();
    let mut rng = engram_world::Rng::derive(5, 0xBE7C);
    let people = world.new_people(&mut rng, docs);
    let mut rows = Vec::new();
    for (i, p) in people.iter().enumerate() {
        let doc = world.document(&mut rng, std::slice::from_ref(p), false);
        let t = Instant::now();
        let job = client.consolidate(ns, vec![doc], &format!("e2e-{i}")).await?;
        let done = client.wait(&job.id).await?;
        let total = t.elapsed().as_secs_f64() * 1e3;
        if done.state() != engram_sdk::JobState::Live {
            anyhow::bail!("job {} ended {:?}: {}", done.id, done.state(), done.error);
        }
        let tm = done.timings.unwrap_or_default();
        rows.push(Phases {
            total_ms: total,
            queue_ms: tm.queue_ms,
            inject_ms: tm.inject_ms,
            stage_ms: tm.stage_ms,
            commit_ms: tm.commit_ms,
        });
    }
    let n = rows.len().max(1) as f64;
    let mean = Phases {
        total_ms: rows.iter().map(|r| r.total_ms).sum::<f64>() / n,
        queue_ms: rows.iter().map(|r| r.queue_ms).sum::<f64>() / n,
        inject_ms: rows.iter().map(|r| r.inject_ms).sum::<f64>() / n,
        stage_ms: rows.iter().map(|r| r.stage_ms).sum::<f64>() / n,
        commit_ms: rows.iter().map(|r| r.commit_ms).sum::<f64>() / n,
    };
    let mut totals: Vec<f64> = rows.iter().map(|r| r.total_ms).collect();
    totals.sort_by(f64::total_cmp);
    Ok(EndToEnd {
        docs,
        replicas,
        live: rows.len(),
        mean,
        p50_total_ms: engram_eval::percentile(&totals, 0.5),
        max_total_ms: totals.last().copied().unwrap_or(f64::NAN),
    })
}

async fn backend(a: &ServiceBenchArgs, name: &str, store: String, dir: &std::path::Path) -> Result<Backend> {
    let up_args = UpArgs {
        dir: dir.to_path_buf(),
        store: Some(store),
        blobs: Some(format!("file://{}", dir.join("blobs").display())),
        listen: "127.0.0.1:0".parse()?,
        replica_listen: "127.0.0.1:0".parse()?,
        replicas: a.replicas,
        http: None,
        workers: 1,
        namespace: "bench-e2e".into(),
        engine: a.engine.clone(),
        timing: TimingArgs {
            lease_ms: 5000,
            stage_timeout_ms: 10_000,
            broadcast: "chain".into(),
            stage_chunk_kb: 256,
            compact_every: 100,
        },
    };
    let u = up(&up_args).await.with_context(|| format!("starting the {name} cluster"))?;
    if !a.json {
        eprintln!("{name}: end to end, {} documents ...", a.docs);
    }
    let e2e = end_to_end(&u.coordinator, &u.namespace, a.docs, a.replicas).await?;
    // A namespace over a base model no worker has: its jobs stay queued, so only acknowledgement is measured.
    let client = engram_sdk::Client::connect(&u.coordinator).await?;
    client.create_namespace("bench-ack", &"0".repeat(64)).await?;
    if !a.json {
        eprintln!("{name}: acknowledgement flood, {} clients for {} s ...", a.clients, a.seconds);
    }
    let ack = ack_flood(&u.coordinator, "bench-ack", a.clients, a.seconds).await?;
    Ok(Backend { backend: name.to_string(), ack, end_to_end: e2e })
}

pub fn run(a: ServiceBenchArgs) -> Result<()> {
    if std::env::var_os("ENGRAM_LOG").is_none() {
        std::env::set_var("ENGRAM_LOG", "error");
    }
    crate::service::init_tracing();
    let rt = tokio::runtime::Runtime::new()?;
    let mut out = Vec::new();
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("embedded");
    out.push(rt.block_on(backend(&a, "embedded", format!("file://{}", dir.join("lineage").display()), &dir))?);
    if !a.no_etcd {
        let mut local = None;
        let url = match &a.etcd {
            Some(hp) => format!("etcd://{hp}/engram-bench-{}", engram_lineage::now_ms()),
            None => {
                let e = engram_lineage::local_etcd::LocalEtcd::start()
                    .context("starting a throwaway etcd (is etcd installed?)")?;
                let url = e.url("/engram-bench");
                local = Some(e);
                url
            }
        };
        let dir = tmp.path().join("etcd");
        out.push(rt.block_on(backend(&a, "etcd", url, &dir))?);
        drop(local);
    }
    // The clusters run on this runtime's tasks; dropping it stops them.
    drop(rt);
    if a.json {
        println!("{}", serde_json::to_string(&serde_json::json!({ "backends": out }))?);
        return Ok(());
    }
    println!("acknowledged consolidation requests (durable before the reply)");
    println!(
        "{:<9} {:>8} {:>9} {:>7} {:>10} {:>8} {:>8}",
        "backend", "clients", "accepted", "errors", "per second", "p50 ms", "p99 ms"
    );
    for b in &out {
        let k = &b.ack;
        println!(
            "{:<9} {:>8} {:>9} {:>7} {:>10.0} {:>8.2} {:>8.2}",
            b.backend, k.clients, k.accepted, k.errors, k.per_second, k.p50_ms, k.p99_ms
        );
    }
    println!("\nend to end: request -> live on every replica (mean ms)");
    println!(
        "{:<9} {:>5} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9}",
        "backend", "docs", "replicas", "total", "queue", "inject", "stage", "commit", "p50 total"
    );
    for b in &out {
        let e = &b.end_to_end;
        let m = &e.mean;
        println!(
            "{:<9} {:>5} {:>9} {:>8.0} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>9.0}",
            b.backend, e.live, e.replicas, m.total_ms, m.queue_ms, m.inject_ms, m.stage_ms, m.commit_ms, e.p50_total_ms
        );
    }
    Ok(())
}
