//! `engram bench load`: a cluster of real processes on loopback (a throwaway etcd unless `--etcd`, two coordinators
//! in high availability, workers, replicas) under `--clients` concurrent SDK clients that consolidate at a fixed
//! total rate and generate in a loop, for `--seconds` per phase: steady, a replica killed (SIGKILL) mid-run and
//! restarted, the leader coordinator killed mid-run and restarted as a follower. Reports throughput, p50/p99 and
//! errors per phase, then kills the leader `--failovers` times and reports the time from SIGKILL to the first
//! accepted request on the new leader.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;

#[derive(Args)]
pub struct LoadBenchArgs {
    /// Print one JSON object on stdout instead of tables.
    #[arg(long)]
    json: bool,
    /// Seconds per phase.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Concurrent SDK clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Consolidation requests per second, all clients together.
    #[arg(long, default_value_t = 10.0)]
    consolidate_rate: f64,
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Leader kills timed after the phases.
    #[arg(long, default_value_t = 5)]
    failovers: usize,
    /// Election lease of the coordinators, seconds.
    #[arg(long, default_value_t = 2)]
    election_ttl_s: u64,
    /// An etcd to use (HOST:PORT); by default a throwaway one on loopback.
    #[arg(long)]
    etcd: Option<String>,
    #[arg(long, default_value = "models/base")]
    model: PathBuf,
}

struct Proc(Option<Child>);

impl Proc {
    fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(args: &[String], log: &Path) -> Result<Proc> {
    let exe = std::env::current_exe()?;
    let child = Command::new(exe)
        .args(args)
        .env("ENGRAM_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .context("starting an engram process")?;
    Ok(Proc(Some(child)))
}

fn free_port() -> Result<u16> {
    engram_lineage::local_etcd::free_loopback_port().ok_or_else(|| anyhow::anyhow!("no free loopback port"))
}

#[derive(Serialize, Default, Clone)]
struct Latency {
    ok: usize,
    errors: usize,
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
}

#[derive(Serialize)]
struct Phase {
    name: String,
    seconds: f64,
    consolidate: Latency,
    generate: Latency,
}

#[derive(Serialize)]
struct Failover {
    samples: usize,
    lease_s: u64,
    p50_s: f64,
    p99_s: f64,
    max_s: f64,
}

fn summarize(mut ms: Vec<f64>, errors: usize, seconds: f64) -> Latency {
    ms.sort_by(f64::total_cmp);
    let q = |p: f64| if ms.is_empty() { f64::NAN } else { ms[((ms.len() - 1) as f64 * p).round() as usize] };
    Latency { ok: ms.len(), errors, per_second: ms.len() as f64 / seconds, p50_ms: q(0.5), p99_ms: q(0.99) }
}

struct Cluster {
    dir: PathBuf,
    coordinators: Vec<(String, Vec<String>, Proc)>,
    replicas: Vec<(Vec<String>, Proc)>,
    _workers: Vec<Proc>,
    both: String,
    replica_urls: Vec<String>,
}

impl Cluster {
    /// Index of the coordinator that answers as leader.
    async fn leader(&self) -> Result<usize> {
        for (i, (url, _, p)) in self.coordinators.iter().enumerate() {
            if p.0.is_none() {
                continue;
            }
            let c = engram_sdk::Client::connect(url).await?;
            if c.replicas("").await.is_ok() {
                return Ok(i);
            }
        }
        bail!("no coordinator leads")
    }

    fn restart_coordinator(&mut self, i: usize) -> Result<()> {
        let (_, args, p) = &mut self.coordinators[i];
        *p = spawn(args, &self.dir.join(format!("coordinator-{i}-again.log")))?;
        Ok(())
    }
}

/// Runs the load for `seconds`; `fault` runs once halfway.
async fn phase(a: &LoadBenchArgs, c: &mut Cluster, name: &str, fault: Option<&str>) -> Result<Phase> {
    let stop = Arc::new(AtomicBool::new(false));
    let cons = Arc::new(Mutex::new((Vec::new(), 0usize)));
    let gens = Arc::new(Mutex::new((Vec::new(), 0usize)));
    let world = engram_world::World::new();
    let mut rng = engram_world::Rng::derive(17, name.len() as u64);
    let people = world.new_people(&mut rng, 50);
    let docs: Arc<Vec<String>> =
        Arc::new(people.iter().map(|p| world.document(&mut rng, std::slice::from_ref(p), false)).collect());
    let question =
        format!("Q : {} A :", engram_world::text::question(engram_world::Attribute::Employer, 0, &people[0].name()));
    let every = Duration::from_secs_f64(a.clients as f64 / a.consolidate_rate.max(0.01));
    let mut tasks = Vec::new();
    for k in 0..a.clients {
        let client = engram_sdk::Client::connect(&c.both).await?;
        let replicas = engram_sdk::Replicas::connect(&c.replica_urls).await?;
        let (stop, cons, gens, docs, question, name) =
            (stop.clone(), cons.clone(), gens.clone(), docs.clone(), question.clone(), name.to_string());
        tasks.push(tokio::spawn(async move {
            let mut next = Instant::now() + every.mul_f64(k as f64 / 8.0);
            let mut i = 0usize;
            while !stop.load(Ordering::SeqCst) {
                if Instant::now() >= next {
                    next += every;
                    let t = Instant::now();
                    let key = format!("load-{name}-{k}-{i}");
                    let r = client.consolidate("load", vec![docs[i % docs.len()].clone()], &key).await;
                    let mut c = cons.lock().expect("stats");
                    match r {
                        Ok(_) => c.0.push(t.elapsed().as_secs_f64() * 1e3),
                        Err(_) => c.1 += 1,
                    }
                    i += 1;
                }
                let t = Instant::now();
                let r = replicas.generate("load", &question, 4).await;
                let mut g = gens.lock().expect("stats");
                match r {
                    Ok(_) => g.0.push(t.elapsed().as_secs_f64() * 1e3),
                    Err(_) => g.1 += 1,
                }
            }
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(a.seconds / 2.0)).await;
    match fault {
        Some("replica") => {
            c.replicas[0].1.kill();
            tokio::time::sleep(Duration::from_secs(1)).await;
            let args = c.replicas[0].0.clone();
            c.replicas[0].1 = spawn(&args, &c.dir.join("replica-0-again.log"))?;
        }
        Some("leader") => {
            let l = c.leader().await?;
            c.coordinators[l].2.kill();
            tokio::time::sleep(Duration::from_millis(500)).await;
            c.restart_coordinator(l)?;
        }
        _ => {}
    }
    tokio::time::sleep(Duration::from_secs_f64(a.seconds / 2.0)).await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await?;
    }
    let secs = start.elapsed().as_secs_f64();
    let (cm, ce) = std::mem::take(&mut *cons.lock().expect("stats"));
    let (gm, ge) = std::mem::take(&mut *gens.lock().expect("stats"));
    Ok(Phase {
        name: name.into(),
        seconds: secs,
        consolidate: summarize(cm, ce, secs),
        generate: summarize(gm, ge, secs),
    })
}

async fn failovers(a: &LoadBenchArgs, c: &mut Cluster) -> Result<Failover> {
    let mut samples = Vec::new();
    for n in 0..a.failovers {
        let l = c.leader().await?;
        c.coordinators[l].2.kill();
        let killed = Instant::now();
        let mut k = 0;
        loop {
            k += 1;
            let probe = engram_sdk::Client::connect(&c.both).await?;
            let key = format!("failover-{n}-{k}");
            let req = probe.consolidate("load", vec!["<doc> probe </doc>".into()], &key);
            if tokio::time::timeout(Duration::from_secs(1), req).await.is_ok_and(|r| r.is_ok()) {
                break;
            }
            if killed.elapsed() > Duration::from_secs(60) {
                bail!("no coordinator took over within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        samples.push(killed.elapsed().as_secs_f64());
        c.restart_coordinator(l)?;
        // Let the restarted one come up as a follower before the next kill.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    samples.sort_by(f64::total_cmp);
    let q = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    Ok(Failover { samples: samples.len(), lease_s: a.election_ttl_s, p50_s: q(0.5), p99_s: q(0.99), max_s: q(1.0) })
}

pub fn run(a: LoadBenchArgs) -> Result<()> {
    if a.failovers == 0 {
        bail!("--failovers must be at least 1");
    }
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().to_path_buf();
    let mut local = None;
    let store = match &a.etcd {
        Some(hp) => format!("etcd://{hp}/engram-load-{}", engram_lineage::now_ms()),
        None => {
            let e = engram_lineage::local_etcd::LocalEtcd::start()
                .context("starting a throwaway etcd (is etcd installed?)")?;
            let url = e.url("/engram-load");
            local = Some(e);
            url
        }
    };
    let blobs = format!("file://{}", dir.join("blobs").display());
    let model = a.model.display().to_string();
    let common = |v: &mut Vec<String>| v.extend(["--store".into(), store.clone(), "--blobs".into(), blobs.clone()]);
    let ports = [free_port()?, free_port()?];
    let urls: Vec<String> = ports.iter().map(|p| format!("http://127.0.0.1:{p}")).collect();
    let both = urls.join(",");
    let mut coordinators = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let ttl = a.election_ttl_s.to_string();
        let mut args: Vec<String> =
            ["serve", "coordinator", "--elect", "--election-ttl-s", &ttl, "--lease-ms", "2000", "--listen"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        args.push(format!("127.0.0.1:{p}"));
        common(&mut args);
        let proc = spawn(&args, &dir.join(format!("coordinator-{i}.log")))?;
        coordinators.push((urls[i].clone(), args, proc));
    }
    let mut replicas = Vec::new();
    let mut replica_urls = Vec::new();
    for i in 0..a.replicas {
        let port = free_port()?;
        let mut args: Vec<String> =
            vec!["serve".into(), "replica".into(), "--listen".into(), format!("127.0.0.1:{port}")];
        args.extend([
            "--coordinator".into(),
            both.clone(),
            "--id".into(),
            format!("replica-{i}"),
            "--model".into(),
            model.clone(),
        ]);
        common(&mut args);
        replicas.push((args.clone(), spawn(&args, &dir.join(format!("replica-{i}.log")))?));
        replica_urls.push(format!("http://127.0.0.1:{port}"));
    }
    let mut workers = Vec::new();
    for i in 0..a.workers {
        let mut args: Vec<String> = vec!["serve".into(), "worker".into(), "--coordinator".into(), both.clone()];
        args.extend(["--id".into(), format!("worker-{i}"), "--model".into(), model.clone()]);
        common(&mut args);
        workers.push(spawn(&args, &dir.join(format!("worker-{i}.log")))?);
    }
    let mut cluster = Cluster { dir: dir.clone(), coordinators, replicas, _workers: workers, both, replica_urls };
    let rt = tokio::runtime::Runtime::new()?;
    let report = rt.block_on(async {
        let base = engram_model::BaseModel::load(&a.model, &candle_core::Device::Cpu)?;
        let client = engram_sdk::Client::connect(&cluster.both).await?;
        let start = Instant::now();
        while client.create_namespace("load", &base.hash).await.is_err() {
            if start.elapsed() > Duration::from_secs(60) {
                bail!("no coordinator was elected within 60 s (logs in {})", dir.display());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        loop {
            let rs = client.replicas("").await.unwrap_or_default();
            if rs.len() == a.replicas && rs.iter().all(|r| r.ready) {
                break;
            }
            if start.elapsed() > Duration::from_secs(300) {
                bail!("replicas not ready within 300 s (logs in {})", dir.display());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut phases = Vec::new();
        for (name, fault) in [("steady", None), ("replica killed", Some("replica")), ("leader killed", Some("leader"))]
        {
            if !a.json {
                eprintln!("phase {name:?}: {} clients for {} s ...", a.clients, a.seconds);
            }
            phases.push(phase(&a, &mut cluster, name, fault).await?);
        }
        if !a.json {
            eprintln!("{} leader failovers ...", a.failovers);
        }
        let f = failovers(&a, &mut cluster).await?;
        anyhow::Ok((phases, f))
    })?;
    drop(cluster);
    drop(rt);
    drop(local);
    let (phases, failover) = report;
    if a.json {
        println!("{}", serde_json::to_string(&serde_json::json!({ "phases": phases, "failover": failover }))?);
        return Ok(());
    }
    println!(
        "{:<15} {:>8} {:>8} {:>9} {:>9} {:>9}   {:>8} {:>8} {:>9} {:>9} {:>9}",
        "phase", "cons ok", "errors", "per s", "p50 ms", "p99 ms", "gen ok", "errors", "per s", "p50 ms", "p99 ms"
    );
    for p in &phases {
        let (c, g) = (&p.consolidate, &p.generate);
        println!(
            "{:<15} {:>8} {:>8} {:>9.1} {:>9.1} {:>9.1}   {:>8} {:>8} {:>9.1} {:>9.1} {:>9.1}",
            p.name, c.ok, c.errors, c.per_second, c.p50_ms, c.p99_ms, g.ok, g.errors, g.per_second, g.p50_ms, g.p99_ms
        );
    }
    println!(
        "\nleader failover (SIGKILL -> first accepted request), {} samples, lease {} s: p50 {:.2} s, p99 {:.2} s, max {:.2} s",
        failover.samples, failover.lease_s, failover.p50_s, failover.p99_s, failover.max_s
    );
    Ok(())
}
