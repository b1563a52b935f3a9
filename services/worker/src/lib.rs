//! A worker: pulls consolidation jobs from the coordinator under a lease and turns each into a delta.
//!
//! For a job it needs the namespace's head as the job saw it: the merged weights (rebuilt from the blob store when
//! this worker did not make the head itself) and the composition strategy's state after that head (restored from
//! the blob the head version names). Then, for each document: the injector's candidate, the strategy's composed
//! delta, and, unless the job forces it, the capability gate on the state with it. The delta and the strategy's
//! new state go to the blob store; the coordinator records the version. Candle work runs on blocking threads.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use engram_compose::{Gate, GateConfig, Strategy};
use engram_inject::{DistillConfig, DistillInjector, HyperInjector, Injector};
use engram_lineage::{BlobStore, LineageStore, VersionId};
use engram_lora::Delta;
use engram_model::{BaseModel, Llama};
use engram_proto::v1 as pb;
use engram_proto::v1::membership_client::MembershipClient;
use engram_transport::pull;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub id: String,
    /// The coordinator's address, `http://host:port`.
    pub coordinator: String,
    /// Composition strategy (`memit`, `memory`, `nullspace`, `naive`).
    pub strategy: String,
    /// Run the capability gate on every candidate (a job's `force` skips it).
    pub gate: bool,
    pub gate_items: usize,
    /// Default injector: `hypernet` or `distill`.
    pub injector: String,
    pub hypernet: PathBuf,
    /// Where the strategy's initial state is cached per base model (measuring protected keys takes a while);
    /// `None`: no cache.
    pub cache: Option<PathBuf>,
}

/// The strategy on the bare base model: from the cache when it holds one for this model and strategy, else built
/// (and cached).
fn initial_strategy(base: &BaseModel, cfg: &WorkerConfig) -> Result<Box<dyn Strategy>> {
    let file = cfg.cache.as_ref().map(|d| d.join(format!("{}-{}.setup", cfg.strategy, &base.hash[..16])));
    if let Some(f) = &file {
        if let Ok(bytes) = std::fs::read(f) {
            match engram_compose::restored_strategy(&cfg.strategy, &base.llama, &base.tokenizer, &bytes) {
                Ok(s) => return Ok(s),
                Err(e) => tracing::warn!("ignoring cached strategy state {}: {e:#}", f.display()),
            }
        }
    }
    let s = engram_compose::strategy(&cfg.strategy, &base.llama, &base.tokenizer)?;
    if let Some(f) = &file {
        // Written aside and renamed, so a concurrent reader never sees half a file.
        let tmp = f.with_extension(format!("tmp{}-{}", std::process::id(), cfg.id));
        let written = std::fs::create_dir_all(f.parent().expect("cache file has a directory"))
            .and_then(|_| std::fs::write(&tmp, s.setup().unwrap_or_default()))
            .and_then(|_| std::fs::rename(&tmp, f));
        if let Err(e) = written {
            tracing::warn!("cannot cache the strategy state in {}: {e}", f.display());
        }
    }
    Ok(s)
}

/// What one job produced.
pub struct Outcome {
    pub delta: Delta,
    pub metrics: std::collections::BTreeMap<String, f64>,
    pub rejected: bool,
    pub state: Vec<u8>,
    pub inject_ms: f64,
    pub compose_ms: f64,
}

/// A namespace head and its merged weights.
type Head = (Option<VersionId>, Arc<Llama>);

/// The model-side work, shared by the job loop's blocking tasks.
pub struct Engine {
    base: &'static BaseModel,
    hyper: HyperInjector<'static>,
    strategy: Mutex<Box<dyn Strategy>>,
    /// The strategy's state on the bare base model.
    initial: Vec<u8>,
    gate: Option<Gate>,
    /// Per namespace: the head the strategy and `heads` currently hold.
    current: Mutex<Option<(String, Option<VersionId>)>>,
    /// Per namespace: the last head's merged weights.
    heads: Mutex<HashMap<String, Head>>,
}

impl Engine {
    /// Loads the injector, the strategy and (optionally) the gate for `base`. The base model lives as long as the
    /// process: the injector borrows it.
    pub fn new(base: &'static BaseModel, cfg: &WorkerConfig) -> Result<Self> {
        let hyper = HyperInjector::load(&cfg.hypernet, base)
            .with_context(|| format!("loading the hypernetwork from {}", cfg.hypernet.display()))?;
        let t = Instant::now();
        let strategy = initial_strategy(base, cfg)?;
        let initial = strategy.save()?;
        let gate = if cfg.gate {
            Some(Gate::new(&base.llama, &base.tokenizer, GateConfig { items: cfg.gate_items, ..Default::default() })?)
        } else {
            None
        };
        tracing::info!(
            "worker engine ready in {:.1}s (strategy {}, gate {})",
            t.elapsed().as_secs_f64(),
            cfg.strategy,
            cfg.gate
        );
        Ok(Self {
            base,
            hyper,
            strategy: Mutex::new(strategy),
            initial,
            gate,
            current: Mutex::new(None),
            heads: Mutex::new(HashMap::new()),
        })
    }

    pub fn base(&self) -> &'static BaseModel {
        self.base
    }

    /// Brings the strategy and the head weights to `head` of `namespace`, from the stores when needed.
    async fn prepare(
        &self,
        store: &dyn LineageStore,
        blobs: &BlobStore,
        namespace: &str,
        head: Option<&VersionId>,
    ) -> Result<()> {
        let cached = self.heads.lock().expect("heads").get(namespace).cloned();
        if cached.as_ref().map(|(h, _)| h.as_ref()) != Some(head) {
            // Pull only what lies above the weights this worker already holds for the namespace, when they are an
            // ancestor of the head (another worker made the versions since); else from the base model.
            let held = cached.as_ref().and_then(|(h, m)| h.clone().map(|h| (h, m.clone())));
            let (from, chain) = match head {
                Some(h) => pull::missing(store, blobs, h, |id| held.as_ref().is_some_and(|(c, _)| c == id)).await?,
                None => (None, Vec::new()),
            };
            let start = match (&from, &held) {
                (Some(_), Some((_, m))) => (**m).clone(),
                _ => self.base.llama.clone(),
            };
            // Merging is candle work: off the async threads.
            let base = self.base;
            let model = tokio::task::spawn_blocking(move || {
                let mut model = start;
                for (v, d) in &chain {
                    base.check_delta(d).with_context(|| format!("version {}", v.id.short()))?;
                    model = model.merged(&[d])?;
                }
                anyhow::Ok(model)
            })
            .await
            .map_err(|e| anyhow!("merge task failed: {e}"))??;
            self.heads.lock().expect("heads").insert(namespace.to_string(), (head.cloned(), Arc::new(model)));
        }
        let want = Some((namespace.to_string(), head.cloned()));
        if *self.current.lock().expect("current") != want {
            let state = match head {
                None => self.initial.clone(),
                Some(h) => match store.version(h).await?.composer_state {
                    Some(hash) => {
                        blobs.get(&hash).await.with_context(|| format!("composer state of {}", h.short()))?.to_vec()
                    }
                    None => self.initial.clone(),
                },
            };
            self.strategy.lock().expect("strategy").restore(&state).context("restoring the composer state")?;
            *self.current.lock().expect("current") = want;
        }
        Ok(())
    }

    /// Injects and composes `documents` onto the prepared head of `namespace`. Blocking.
    fn consolidate(&self, namespace: &str, documents: &[String], injector: &str, force: bool) -> Result<Outcome> {
        let (head_id, head) = self.heads.lock().expect("heads").get(namespace).cloned().context("head not prepared")?;
        let mut strategy = self.strategy.lock().expect("strategy");
        let mut model = (*head).clone();
        let mut composed = Vec::new();
        let mut metrics = std::collections::BTreeMap::new();
        let (mut inject_ms, mut compose_ms) = (0.0, 0.0);
        // From here the strategy's state moves past the head: whatever happens, it no longer matches `current`.
        *self.current.lock().expect("current") = None;
        for (i, doc) in documents.iter().enumerate() {
            let t = Instant::now();
            let candidate = match injector {
                "" | "hypernet" => self.hyper.inject(doc)?.delta,
                "distill" => DistillInjector::new(self.base, DistillConfig::default()).inject(doc)?.delta,
                other => bail!("unknown injector {other:?}"),
            };
            inject_ms += t.elapsed().as_secs_f64() * 1e3;
            let t = Instant::now();
            let delta = strategy.compose(&model, doc, candidate).with_context(|| format!("document {i}"))?;
            compose_ms += t.elapsed().as_secs_f64() * 1e3;
            let next = model.merged(&[&delta])?;
            if let (Some(gate), false) = (&self.gate, force) {
                let report = gate.check(&next, &self.base.tokenizer)?;
                metrics = report.metrics();
                if !report.passed {
                    tracing::info!(
                        namespace,
                        "gate refused document {i}: {} dropped {:.1} points",
                        report.worst.0,
                        report.worst.1
                    );
                    return Ok(Outcome { delta, metrics, rejected: true, state: Vec::new(), inject_ms, compose_ms });
                }
            }
            strategy.accepted(&next, doc)?;
            model = next;
            composed.push(delta);
        }
        let delta = if composed.len() == 1 {
            composed.pop().expect("one")
        } else {
            let meta = composed[0].meta.clone();
            Delta::compact(&composed.iter().collect::<Vec<_>>(), meta)?
        };
        let state = strategy.save()?;
        // The next job on this namespace most likely builds on this delta: keep its weights, keyed by the id the
        // coordinator will give the version.
        let hash = engram_lineage::blob::digest(&delta.encode()?);
        let next_id = VersionId::derive(head_id.as_ref(), &hash, &self.base.hash);
        self.heads.lock().expect("heads").insert(namespace.to_string(), (Some(next_id.clone()), Arc::new(model)));
        *self.current.lock().expect("current") = Some((namespace.to_string(), Some(next_id)));
        Ok(Outcome { delta, metrics, rejected: false, state, inject_ms, compose_ms })
    }
}

pub struct Worker {
    cfg: WorkerConfig,
    engine: Arc<Engine>,
    store: Arc<dyn LineageStore>,
    blobs: BlobStore,
}

impl Worker {
    pub fn new(cfg: WorkerConfig, engine: Arc<Engine>, store: Arc<dyn LineageStore>, blobs: BlobStore) -> Self {
        Self { cfg, engine, store, blobs }
    }

    /// Registers, then pulls and runs jobs until `stop` is set; re-registers whenever the lease lapsed or the
    /// coordinator restarted.
    /// With several coordinator addresses (comma-separated), a session that ends (the leader died, or this one is a
    /// follower) continues with the next.
    pub async fn run(&self, stop: Arc<std::sync::atomic::AtomicBool>) -> Result<()> {
        let addresses: Vec<String> = self.cfg.coordinator.split(',').map(|a| a.trim().to_string()).collect();
        let mut i = 0;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            if let Err(e) = self.session(&addresses[i % addresses.len()], &stop).await {
                tracing::warn!(worker = %self.cfg.id, "coordinator session ended: {e:#}; reconnecting");
                i += 1;
                tokio::time::sleep(Duration::from_millis(if addresses.len() > 1 { 100 } else { 500 })).await;
            }
        }
        Ok(())
    }

    async fn session(&self, address: &str, stop: &std::sync::atomic::AtomicBool) -> Result<()> {
        let mut client = MembershipClient::connect(address.to_string()).await?;
        let lease = client
            .register_worker(pb::RegisterWorkerRequest {
                id: self.cfg.id.clone(),
                base_models: vec![self.engine.base.hash.clone()],
                injectors: vec!["hypernet".into(), "distill".into()],
                device: format!("{:?}", self.engine.base.llama.device()),
            })
            .await?
            .into_inner();
        tracing::info!(worker = %self.cfg.id, "registered (lease {})", lease.lease_id);
        // Heartbeats run beside the job loop, so a long injection keeps the lease.
        let beat = {
            let mut c = client.clone();
            let (member, lease_id, every) =
                (self.cfg.id.clone(), lease.lease_id, Duration::from_millis((lease.ttl_ms / 3).max(50) as u64));
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    if c.heartbeat(pb::HeartbeatRequest { member: member.clone(), lease_id }).await.is_err() {
                        return;
                    }
                }
            })
        };
        let result = async {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if beat.is_finished() {
                    bail!("lease lost");
                }
                let a = client
                    .next_job(pb::NextJobRequest {
                        worker: self.cfg.id.clone(),
                        lease_id: lease.lease_id,
                        wait_ms: 1000,
                    })
                    .await?
                    .into_inner();
                let Some(job) = a.job.clone() else { continue };
                tracing::info!(job = %job.id, "job taken (attempt {})", job.attempts);
                let mut report = self.run_job(&a).await;
                // The store or blob store briefly unavailable (an etcd member dying, a leader election) is not the
                // job's fault: try again here before reporting a failure, which would be final.
                for wait in [1, 2, 4] {
                    match &report {
                        Err(e) if transient(e) => {
                            tracing::warn!(job = %job.id, "transient failure, trying again in {wait} s: {e:#}");
                            tokio::time::sleep(Duration::from_secs(wait)).await;
                            report = self.run_job(&a).await;
                        }
                        _ => break,
                    }
                }
                let mut req = pb::CompleteJobRequest {
                    worker: self.cfg.id.clone(),
                    lease_id: lease.lease_id,
                    job: job.id.clone(),
                    attempt: a.attempt,
                    ..Default::default()
                };
                match report {
                    Ok((o, delta_ref, state_hash)) => {
                        req.outcome = Some(pb::complete_job_request::Outcome::Delta(delta_ref));
                        req.metrics = o.metrics.into_iter().collect();
                        req.rejected = o.rejected;
                        req.inject_ms = o.inject_ms;
                        req.composer_state = state_hash;
                    }
                    Err(e) => {
                        tracing::warn!(job = %job.id, "job failed: {e:#}");
                        req.outcome = Some(pb::complete_job_request::Outcome::Error(format!("{e:#}")));
                    }
                }
                if let Err(s) = client.complete_job(req).await {
                    tracing::warn!(job = %job.id, "result refused: {}", s.message());
                }
            }
            Ok(())
        }
        .await;
        beat.abort();
        result
    }

    async fn run_job(&self, a: &pb::JobAssignment) -> Result<(Outcome, pb::DeltaRef, String)> {
        let job = a.job.as_ref().context("assignment without a job")?;
        if a.base_model != self.engine.base.hash {
            bail!("job {} is for base model {}, this worker has {}", job.id, a.base_model, self.engine.base.hash);
        }
        let head = if a.head.is_empty() { None } else { Some(VersionId::parse(&a.head)?) };
        let t = Instant::now();
        self.engine.prepare(self.store.as_ref(), &self.blobs, &job.namespace, head.as_ref()).await?;
        let prepare_ms = t.elapsed().as_secs_f64() * 1e3;
        let engine = self.engine.clone();
        let (ns, docs) = (job.namespace.clone(), a.documents.clone());
        let started = t;
        let o = a.options.clone().unwrap_or_default();
        let injector = if o.injector.is_empty() { self.cfg.injector.clone() } else { o.injector };
        let force = o.force;
        let outcome = tokio::task::spawn_blocking(move || engine.consolidate(&ns, &docs, &injector, force))
            .await
            .map_err(|e| anyhow!("injection task failed: {e}"))??;
        let mut outcome = outcome;
        outcome.metrics.insert("worker.inject_ms".into(), outcome.inject_ms);
        outcome.metrics.insert("worker.compose_ms".into(), outcome.compose_ms);
        let bytes = outcome.delta.encode()?;
        let size = bytes.len() as u64;
        let blake3 = engram_lineage::blob::transfer_hash(&bytes);
        let hash = self.blobs.put(Bytes::from(bytes)).await?;
        let state_hash = if outcome.state.is_empty() {
            String::new()
        } else {
            self.blobs.put(Bytes::from(outcome.state.clone())).await?
        };
        tracing::info!(job = %job.id, "delta {} ({size} bytes) in {:.0} ms (prepare {prepare_ms:.0} ms)", &hash[..12], t.elapsed().as_secs_f64() * 1e3);
        let delta_ref = pb::DeltaRef { hash, bytes: size, injector: outcome.delta.meta.injector.clone(), blake3 };
        // What the job's timings call "inject": the worker's whole time on it.
        outcome.inject_ms = started.elapsed().as_secs_f64() * 1e3;
        Ok((outcome, delta_ref, state_hash))
    }
}

/// An error worth trying again: the lineage or blob store was unavailable.
fn transient(e: &anyhow::Error) -> bool {
    e.chain().any(|c| matches!(c.downcast_ref::<engram_lineage::Error>(), Some(engram_lineage::Error::Unavailable(_))))
}
