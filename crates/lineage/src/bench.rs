//! `engram bench lineage`: durable version creation, head compare-and-swap under contention, and how fast a
//! rollback reaches a watcher, measured on a live backend. Every loop is bounded in time and in count.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::blob::digest;
use crate::{Error, LineageStore, NewVersion, Result, VersionId};

#[derive(Debug, Clone, Serialize)]
pub struct BenchConfig {
    /// Wall time of each throughput case.
    pub seconds: f64,
    /// Writer counts for the creation cases, each on its own namespace.
    pub writers: Vec<usize>,
    /// Writers racing for one namespace's head.
    pub cas_writers: usize,
    /// Rollbacks timed until a watcher sees them.
    pub rollbacks: usize,
}

impl Default for BenchConfig {
    fn default() -> Self {
        Self { seconds: 3.0, writers: vec![1, 8, 64], cas_writers: 8, rollbacks: 300 }
    }
}

/// Most operations one case may issue, whatever the time budget.
const MAX_OPS: usize = 500_000;

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    fn of(mut v: Vec<Duration>) -> Self {
        v.sort();
        let q = |p: f64| {
            v.get(((p * v.len() as f64).ceil() as usize).saturating_sub(1)).map_or(0.0, |d| d.as_secs_f64() * 1e3)
        };
        Self { samples: v.len(), p50_ms: q(0.50), p99_ms: q(0.99), max_ms: q(1.0) }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CreateCase {
    pub writers: usize,
    pub versions: usize,
    pub seconds: f64,
    pub per_second: f64,
    pub latency: Latency,
}

#[derive(Debug, Clone, Serialize)]
pub struct CasCase {
    pub writers: usize,
    /// Compare-and-swap attempts (each after recording a candidate on the head it saw).
    pub attempts: usize,
    pub wins: usize,
    pub conflicts: usize,
    pub seconds: f64,
    pub attempts_per_second: f64,
    pub wins_per_second: f64,
    pub cas_latency: Latency,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackendReport {
    pub backend: String,
    pub creates: Vec<CreateCase>,
    pub head_cas: CasCase,
    /// From issuing a rollback to a watcher of the namespace receiving the new head.
    pub rollback_to_watcher: Latency,
}

fn version_for(ns: &str, parent: Option<&VersionId>, n: u64) -> NewVersion {
    NewVersion {
        namespace: ns.to_string(),
        parent: parent.cloned(),
        delta_hash: digest(format!("{ns}/{n}").as_bytes()),
        delta_size: 1,
        injector: "bench".into(),
        creator: "bench".into(),
        ..Default::default()
    }
}

async fn creates(store: &Arc<dyn LineageStore>, writers: usize, seconds: f64) -> Result<CreateCase> {
    let run = crate::now_ms();
    let names: Vec<String> = (0..writers).map(|i| format!("bench-create-{run}-{writers}-{i}")).collect();
    for n in &names {
        store.create_namespace(n, "bench-base", "bench").await?;
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let per_writer = MAX_OPS / writers;
    let mut tasks = Vec::new();
    for ns in names {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut parent: Option<VersionId> = None;
            while Instant::now() < deadline && lat.len() < per_writer {
                let t = Instant::now();
                let v = store.create_version(version_for(&ns, parent.as_ref(), lat.len() as u64)).await?;
                lat.push(t.elapsed());
                parent = Some(v.id);
            }
            Ok::<_, Error>(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.map_err(|e| Error::Unavailable(format!("bench writer: {e}")))??);
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(CreateCase {
        writers,
        versions: all.len(),
        seconds: secs,
        per_second: all.len() as f64 / secs,
        latency: Latency::of(all),
    })
}

async fn contended_cas(store: &Arc<dyn LineageStore>, writers: usize, seconds: f64) -> Result<CasCase> {
    let ns = format!("bench-cas-{}", crate::now_ms());
    store.create_namespace(&ns, "bench-base", "bench").await?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (store, ns) = (store.clone(), ns.clone());
        tasks.push(tokio::spawn(async move {
            let (mut wins, mut conflicts, mut lat) = (0usize, 0usize, Vec::new());
            let mut n = 0u64;
            while Instant::now() < deadline && lat.len() < MAX_OPS / writers {
                let head = store.namespace(&ns).await?.head;
                n += 1;
                let v = store.create_version(version_for(&ns, head.as_ref(), n * 1000 + w as u64)).await?;
                let t = Instant::now();
                match store.promote(&ns, head.as_ref(), &v.id, "bench").await {
                    Ok(_) => wins += 1,
                    Err(Error::Conflict(_)) => conflicts += 1,
                    Err(e) => return Err(e),
                }
                lat.push(t.elapsed());
            }
            Ok::<_, Error>((wins, conflicts, lat))
        }));
    }
    let (mut wins, mut conflicts, mut lat) = (0, 0, Vec::new());
    for t in tasks {
        let (w, c, l) = t.await.map_err(|e| Error::Unavailable(format!("bench writer: {e}")))??;
        wins += w;
        conflicts += c;
        lat.extend(l);
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(CasCase {
        writers,
        attempts: lat.len(),
        wins,
        conflicts,
        seconds: secs,
        attempts_per_second: lat.len() as f64 / secs,
        wins_per_second: wins as f64 / secs,
        cas_latency: Latency::of(lat),
    })
}

async fn wait_for(watch: &mut crate::HeadWatch, want: Option<VersionId>) -> Result<()> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), watch.next()).await {
            Ok(Some(Ok(c))) if c.head == want => return Ok(()),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => return Err(e),
            Ok(None) => return Err(Error::Unavailable("watch ended".into())),
            Err(_) => return Err(Error::Unavailable("watch delivered nothing for 10 s".into())),
        }
    }
}

async fn rollback_watch(store: &Arc<dyn LineageStore>, rounds: usize) -> Result<Latency> {
    let ns = format!("bench-watch-{}", crate::now_ms());
    store.create_namespace(&ns, "bench-base", "bench").await?;
    let root = store.create_version(version_for(&ns, None, 0)).await?.id;
    store.promote(&ns, None, &root, "bench").await?;
    let mut watch = store.watch_head(&ns).await?;
    wait_for(&mut watch, Some(root.clone())).await?;
    let mut lat = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let v = store.create_version(version_for(&ns, Some(&root), i as u64 + 1)).await?;
        store.promote(&ns, Some(&root), &v.id, "bench").await?;
        wait_for(&mut watch, Some(v.id.clone())).await?;
        let t = Instant::now();
        store.rollback(&ns, Some(&v.id), Some(&root), "bench", "benchmark rollback").await?;
        wait_for(&mut watch, Some(root.clone())).await?;
        lat.push(t.elapsed());
    }
    Ok(Latency::of(lat))
}

/// Runs every case against `store`, reporting progress through `progress`.
pub async fn run(
    store: Arc<dyn LineageStore>,
    cfg: &BenchConfig,
    mut progress: impl FnMut(&str),
) -> Result<BackendReport> {
    let mut out = Vec::new();
    for &w in &cfg.writers {
        progress(&format!("{}: creating versions with {w} writers", store.describe()));
        out.push(creates(&store, w, cfg.seconds).await?);
    }
    progress(&format!("{}: {} writers racing for one head", store.describe(), cfg.cas_writers));
    let head_cas = contended_cas(&store, cfg.cas_writers, cfg.seconds).await?;
    progress(&format!("{}: {} rollbacks under a watcher", store.describe(), cfg.rollbacks));
    let rollback_to_watcher = rollback_watch(&store, cfg.rollbacks).await?;
    Ok(BackendReport { backend: store.describe(), creates: out, head_cas, rollback_to_watcher })
}
