//! The coordinator: Engram's front door and the only writer of heads.
//!
//! - `Consolidate` validates the request, records the job in the lineage store (idempotency key -> the same job,
//!   never twice) and only then acknowledges it.
//! - Workers pull jobs under leases. One job per namespace runs at a time: each delta is composed onto the head it
//!   was handed, so a namespace's chain is sequential by nature; namespaces run in parallel. A job whose worker's
//!   lease lapses is queued again, and its late result is refused by the attempt fence.
//! - A finished delta becomes a candidate version; it is staged on every live replica of the namespace (two-phase,
//!   through a [`Broadcaster`]), then the head moves with one compare-and-swap and the replicas flip. A replica that
//!   fails to stage is marked stale and catches up from the blob store by itself; it never blocks the others.
//! - On start, every unfinished job in the store is resumed: nothing acknowledged is lost to a restart.
//! - Every `compact_every` versions the chain is replaced by one compaction version, published like any other, and
//!   documents the capability gate rejected on that chain are submitted again (see [`Coordinator::compact_if_due`]).
#![forbid(unsafe_code)]

pub mod convert;
pub use engram_transport::rendezvous;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use engram_lineage::{self as lin, BlobStore, Job, JobOptions, JobState, LineageStore, NewVersion, VersionId};
use engram_proto::v1 as pb;
use engram_proto::v1::{coordinator_server, membership_server};
use engram_transport::{status, Broadcaster, Staging, Target};
use tokio::sync::{broadcast, Notify};
use tonic::{Request, Response, Status};

#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// Lease of a worker or replica: a member silent this long is gone.
    pub lease_ttl: Duration,
    /// How long staging on the replicas may take before the slow ones are marked stale.
    pub stage_timeout: Duration,
    pub max_documents: usize,
    pub max_document_bytes: usize,
    /// Recorded as the actor of head moves the coordinator makes on its own.
    pub actor: String,
    /// When the chain above a namespace's last compaction reaches this many versions, the coordinator replaces it by
    /// one compaction version (a replica then applies compactions plus a short tail, not every version ever made),
    /// and offers the documents the gate rejected on that chain again. 0: never.
    pub compact_every: usize,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(5),
            stage_timeout: Duration::from_secs(10),
            max_documents: 16,
            max_document_bytes: 64 * 1024,
            actor: "coordinator".into(),
            compact_every: 100,
        }
    }
}

struct Member {
    lease_id: u64,
    expires: Instant,
    /// Workers: base models loaded. Replicas: unused.
    base_models: Vec<String>,
    /// Replicas: where their Replica service listens.
    address: String,
    transports: Vec<String>,
}

#[derive(Default)]
struct State {
    /// Per namespace, queued job ids in submission order.
    queues: BTreeMap<String, VecDeque<String>>,
    /// Namespace -> base model, for matching jobs to workers.
    bases: HashMap<String, String>,
    /// Namespaces with a job running or staging, and which job.
    busy: HashMap<String, String>,
    /// Job id -> (worker, attempt) of the hand-out whose result is awaited.
    running: HashMap<String, (String, u32)>,
    workers: HashMap<String, Member>,
    replicas: HashMap<String, Member>,
    /// Replicas that missed a staging, per namespace (cleared when they stage again).
    stale: HashMap<String, HashSet<String>>,
    next_lease: u64,
    /// Where the round-robin over namespaces continues.
    cursor: String,
    /// Per namespace, the head last seen and how many versions lie above its last compaction: saves walking the
    /// chain after every job.
    uncompacted: HashMap<String, (VersionId, usize)>,
}

pub struct Coordinator {
    cfg: CoordinatorConfig,
    store: Arc<dyn LineageStore>,
    blobs: BlobStore,
    broadcaster: Arc<dyn Broadcaster>,
    state: Mutex<State>,
    /// Woken when a job is queued or a namespace frees up.
    wake: Notify,
    /// Every job change, for `WatchJob`.
    changes: broadcast::Sender<Job>,
    channels: Mutex<HashMap<String, tonic::transport::Channel>>,
    /// `None`: this coordinator leads (the only one, or the election's winner). `Some(addr)`: a follower; `addr` is
    /// the leader's address as the election reports it (empty while unknown).
    follower_of: std::sync::RwLock<Option<String>>,
    /// NCCL unique ids of GPU broadcast groups (bootstrap over gRPC).
    nccl: rendezvous::Rendezvous,
}

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

fn lineage(e: lin::Error) -> Status {
    status(&e.into())
}

impl Coordinator {
    /// A coordinator over `store`; call [`Coordinator::recover`] before serving.
    pub fn new(
        cfg: CoordinatorConfig,
        store: Arc<dyn LineageStore>,
        blobs: BlobStore,
        broadcaster: Arc<dyn Broadcaster>,
    ) -> Arc<Self> {
        let (changes, _) = broadcast::channel(4096);
        Arc::new(Self {
            cfg,
            store,
            blobs,
            broadcaster,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            changes,
            channels: Mutex::new(HashMap::new()),
            follower_of: std::sync::RwLock::new(None),
            nccl: Default::default(),
        })
    }

    /// Refuses the call unless this coordinator leads; the error names the leader, so clients go there.
    fn lead(&self) -> Result<(), Status> {
        match &*self.follower_of.read().expect("role") {
            None => Ok(()),
            Some(leader) => Err(Status::unavailable(format!(
                "this coordinator is a follower; the leader is {}",
                if leader.is_empty() { "being elected" } else { leader }
            ))),
        }
    }

    /// Runs as a follower until elected, then leads: fences every store write with the election key, resumes every
    /// unfinished job and serves. Returns when leadership is lost, after which the process must not act as leader
    /// again (the caller exits; a supervisor restarts it as a follower).
    #[cfg(feature = "etcd")]
    pub async fn campaign(self: &Arc<Self>, candidate: engram_lineage::election::Candidate) -> Result<()> {
        *self.follower_of.write().expect("role") = Some(String::new());
        let candidate = Arc::new(candidate);
        let watcher = {
            let (me, c) = (self.clone(), candidate.clone());
            tokio::spawn(async move {
                loop {
                    if let Ok(leader) = c.leader().await {
                        let mut role = me.follower_of.write().expect("role");
                        if role.is_some() {
                            *role = Some(leader.unwrap_or_default());
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            })
        };
        let mut won = loop {
            match candidate.campaign().await {
                Ok(w) => break w,
                Err(e) => {
                    tracing::warn!("campaign failed, trying again: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        };
        watcher.abort();
        self.store.set_fence(Some(won.fence.clone()));
        self.recover().await?;
        *self.follower_of.write().expect("role") = None;
        tracing::info!("elected leader (election key revision {})", won.fence.revision);
        while !*won.lost.borrow() {
            if won.lost.changed().await.is_err() {
                break;
            }
        }
        *self.follower_of.write().expect("role") = Some(String::new());
        anyhow::bail!("lost the coordinator lease; stepping down")
    }

    pub fn store(&self) -> &Arc<dyn LineageStore> {
        &self.store
    }

    /// Resumes every unfinished job in the store and starts the lease reaper.
    pub async fn recover(self: &Arc<Self>) -> Result<()> {
        for ns in self.store.namespaces().await? {
            self.state.lock().expect("state").bases.insert(ns.name, ns.base_model);
        }
        let mut resumed = 0;
        for job in self.store.jobs().await? {
            match job.state {
                JobState::Queued => self.enqueue(&job, false),
                JobState::Running => {
                    // Its worker belonged to the previous coordinator's leases: queue it again.
                    let mut j = job.clone();
                    j.state = JobState::Queued;
                    j.updated_ms = lin::now_ms();
                    let j = self.store.update_job(j, JobState::Running, job.attempts).await?;
                    self.enqueue(&j, false);
                }
                JobState::Staging => {
                    self.state.lock().expect("state").busy.insert(job.namespace.clone(), job.id.clone());
                    let me = self.clone();
                    tokio::spawn(async move { me.publish(job).await });
                }
                _ => continue,
            }
            resumed += 1;
        }
        if resumed > 0 {
            tracing::info!("resumed {resumed} unfinished jobs");
        }
        let me = self.clone();
        tokio::spawn(async move { me.reap().await });
        Ok(())
    }

    fn enqueue(&self, job: &Job, front: bool) {
        let mut st = self.state.lock().expect("state");
        let q = st.queues.entry(job.namespace.clone()).or_default();
        if !q.contains(&job.id) {
            if front {
                q.push_front(job.id.clone());
            } else {
                q.push_back(job.id.clone());
            }
        }
        drop(st);
        self.wake.notify_waiters();
    }

    fn changed(&self, job: &Job) {
        let _ = self.changes.send(job.clone());
    }

    /// Validates and records a consolidation request; returns the job (an earlier one for a repeated key).
    pub async fn consolidate(&self, r: pb::ConsolidateRequest) -> Result<Job, Status> {
        lin::validate_name("namespace", &r.namespace).map_err(|e| invalid(e.to_string()))?;
        let ns = match self.store.namespace(&r.namespace).await {
            Ok(ns) => ns,
            Err(lin::Error::NotFound(_)) => {
                return Err(invalid(format!("unknown namespace {:?}; create it first", r.namespace)))
            }
            Err(e) => return Err(lineage(e)),
        };
        if r.documents.is_empty() {
            return Err(invalid("no documents to consolidate"));
        }
        if r.documents.len() > self.cfg.max_documents {
            return Err(invalid(format!(
                "{} documents; at most {} per request",
                r.documents.len(),
                self.cfg.max_documents
            )));
        }
        let mut documents = Vec::with_capacity(r.documents.len());
        for (i, d) in r.documents.into_iter().enumerate() {
            if d.len() > self.cfg.max_document_bytes {
                return Err(invalid(format!(
                    "document {i} is {} bytes; at most {}",
                    d.len(),
                    self.cfg.max_document_bytes
                )));
            }
            let text = String::from_utf8(d).map_err(|e| {
                invalid(format!("document {i} is not valid UTF-8 (at byte {})", e.utf8_error().valid_up_to()))
            })?;
            if text.trim().is_empty() {
                return Err(invalid(format!("document {i} is empty")));
            }
            documents.push(text);
        }
        if r.idempotency_key.len() > 256 {
            return Err(invalid("the idempotency key is longer than 256 bytes"));
        }
        let key = if r.idempotency_key.is_empty() {
            // No key: every request is its own job.
            format!("auto-{}-{}", lin::now_ms(), lin::blob::digest(documents.concat().as_bytes()))
        } else {
            r.idempotency_key
        };
        let o = r.options.unwrap_or_default();
        if !o.injector.is_empty() && !["hypernet", "distill"].contains(&o.injector.as_str()) {
            return Err(invalid(format!("unknown injector {:?}; expected hypernet or distill", o.injector)));
        }
        let options = JobOptions { rank: o.rank, force: o.force, injector: o.injector };
        let actor = if r.actor.is_empty() { "client".to_string() } else { r.actor };
        let job = Job::new(&r.namespace, &key, documents, options, &actor);
        let (job, created) = self.store.submit_job(job).await.map_err(lineage)?;
        if created {
            self.state.lock().expect("state").bases.insert(ns.name.clone(), ns.base_model.clone());
            self.enqueue(&job, false);
            self.changed(&job);
        }
        Ok(job)
    }

    fn check_lease(&self, members: &HashMap<String, Member>, id: &str, lease: u64) -> Result<(), Status> {
        match members.get(id) {
            Some(m) if m.lease_id == lease && m.expires > Instant::now() => Ok(()),
            _ => Err(Status::not_found(format!("no live lease {lease} for {id:?}; register again"))),
        }
    }

    fn lease(&self, st: &mut State) -> (u64, Instant) {
        st.next_lease += 1;
        (st.next_lease, Instant::now() + self.cfg.lease_ttl)
    }

    fn lease_msg(&self, member: &str, id: u64) -> pb::Lease {
        pb::Lease {
            member: member.to_string(),
            lease_id: id,
            expires_ms: (lin::now_ms() + self.cfg.lease_ttl.as_millis() as u64) as i64,
            ttl_ms: self.cfg.lease_ttl.as_millis() as u32,
        }
    }

    /// Takes the next job a worker may run: the oldest queued job of a namespace with nothing in flight, over a
    /// base model the worker has, namespaces taken in turn.
    fn take(&self, worker: &str) -> Option<(String, String)> {
        let mut st = self.state.lock().expect("state");
        let models = st.workers.get(worker)?.base_models.clone();
        let names: Vec<String> = st.queues.keys().cloned().collect();
        let start = names.iter().position(|n| *n > st.cursor).unwrap_or(0);
        for i in 0..names.len() {
            let ns = &names[(start + i) % names.len()];
            if st.busy.contains_key(ns) || st.queues[ns].is_empty() {
                continue;
            }
            if !st.bases.get(ns).is_some_and(|b| models.contains(b)) {
                continue;
            }
            let id = st.queues.get_mut(ns).and_then(VecDeque::pop_front)?;
            st.busy.insert(ns.clone(), id.clone());
            st.cursor = ns.clone();
            return Some((ns.clone(), id));
        }
        None
    }

    fn release(&self, namespace: &str, job: &str) {
        let mut st = self.state.lock().expect("state");
        if st.busy.get(namespace).is_some_and(|j| j == job) {
            st.busy.remove(namespace);
        }
        drop(st);
        self.wake.notify_waiters();
    }

    /// Long poll for a job (see `Membership.NextJob`).
    pub async fn next_job(&self, r: pb::NextJobRequest) -> Result<pb::JobAssignment, Status> {
        let deadline = Instant::now() + Duration::from_millis(r.wait_ms.min(30_000) as u64);
        loop {
            {
                let st = self.state.lock().expect("state");
                self.check_lease(&st.workers, &r.worker, r.lease_id)?;
            }
            let notified = self.wake.notified();
            if let Some((ns, id)) = self.take(&r.worker) {
                match self.hand_out(&r.worker, &ns, &id).await {
                    Ok(a) => return Ok(a),
                    Err(e) => {
                        tracing::warn!(job = %id, "could not hand out: {e:#}");
                        self.release(&ns, &id);
                        continue;
                    }
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(pb::JobAssignment::default());
            }
            let _ = tokio::time::timeout(left, notified).await;
        }
    }

    async fn hand_out(&self, worker: &str, ns: &str, id: &str) -> Result<pb::JobAssignment> {
        let job = self.store.job(id).await?;
        if job.state != JobState::Queued {
            anyhow::bail!("job {id} is {:?}, not queued", job.state);
        }
        let namespace = self.store.namespace(ns).await?;
        let mut j = job.clone();
        j.state = JobState::Running;
        j.attempts += 1;
        j.worker = worker.to_string();
        j.base_head = namespace.head.clone();
        j.updated_ms = lin::now_ms();
        j.timings.queue_ms = j.updated_ms.saturating_sub(j.created_ms) as f64;
        let j = self.store.update_job(j, JobState::Queued, job.attempts).await?;
        self.state.lock().expect("state").running.insert(j.id.clone(), (worker.to_string(), j.attempts));
        self.changed(&j);
        Ok(pb::JobAssignment {
            job: Some(convert::job(&j)),
            documents: j.documents.clone(),
            base_model: namespace.base_model,
            head: j.base_head.as_ref().map(|h| h.to_string()).unwrap_or_default(),
            attempt: j.attempts,
            options: Some(pb::ConsolidateOptions {
                rank: j.options.rank,
                force: j.options.force,
                injector: j.options.injector.clone(),
            }),
        })
    }

    /// A worker's result. Only the current attempt's result counts.
    pub async fn complete(self: &Arc<Self>, r: pb::CompleteJobRequest) -> Result<Job, Status> {
        {
            let mut st = self.state.lock().expect("state");
            self.check_lease(&st.workers, &r.worker, r.lease_id)?;
            match st.running.get(&r.job) {
                Some((w, a)) if *w == r.worker && *a == r.attempt => {
                    st.running.remove(&r.job);
                }
                _ => {
                    return Err(Status::failed_precondition(format!(
                        "job {} attempt {} is not running on {:?} (re-queued or finished meanwhile)",
                        r.job, r.attempt, r.worker
                    )))
                }
            }
        }
        let job = self.store.job(&r.job).await.map_err(lineage)?;
        let result = self.record(&job, r).await;
        match result {
            Ok(j) => {
                self.changed(&j);
                if j.state == JobState::Staging {
                    let me = self.clone();
                    let jj = j.clone();
                    tokio::spawn(async move { me.publish(jj).await });
                } else {
                    self.release(&j.namespace, &j.id);
                }
                Ok(j)
            }
            Err(e) => {
                // Could not record the result: the job runs again.
                tracing::warn!(job = %job.id, "recording the result failed, re-queueing: {e:#}");
                self.requeue(&job).await;
                Err(status(&e))
            }
        }
    }

    async fn record(&self, job: &Job, r: pb::CompleteJobRequest) -> Result<Job> {
        let mut j = job.clone();
        j.updated_ms = lin::now_ms();
        j.timings.inject_ms = r.inject_ms;
        match r.outcome {
            Some(pb::complete_job_request::Outcome::Delta(d)) => {
                let new = NewVersion {
                    namespace: job.namespace.clone(),
                    parent: job.base_head.clone(),
                    delta_hash: d.hash.clone(),
                    delta_size: d.bytes,
                    delta_blake3: (!d.blake3.is_empty()).then(|| d.blake3.clone()),
                    injector: d.injector.clone(),
                    job_id: job.id.clone(),
                    document_digests: job.document_digests.clone(),
                    gate_metrics: r.metrics.into_iter().collect(),
                    creator: format!("worker:{}", r.worker),
                    composer_state: (!r.composer_state.is_empty()).then_some(r.composer_state),
                    ..Default::default()
                };
                if !self.blobs.exists(&new.delta_hash).await? {
                    anyhow::bail!("the worker reported delta {} but the blob store does not hold it", new.delta_hash);
                }
                let id = VersionId::derive(
                    new.parent.as_ref(),
                    &new.delta_hash,
                    &self.store.namespace(&job.namespace).await?.base_model,
                );
                let v = match self.store.create_version(new).await {
                    Ok(v) => v,
                    // The same delta on the same parent from an earlier attempt: the same version.
                    Err(lin::Error::AlreadyExists(_)) => self.store.version(&id).await?,
                    Err(e) => return Err(e.into()),
                };
                j.version = Some(v.id.clone());
                if r.rejected {
                    if v.status == lin::Status::Candidate {
                        self.store.reject(&v.id, &self.cfg.actor, "the capability gate refused it").await?;
                    }
                    j.state = JobState::Rejected;
                    j.error = "the capability gate refused the candidate (see the version's metrics)".into();
                } else {
                    j.state = JobState::Staging;
                }
            }
            Some(pb::complete_job_request::Outcome::Error(e)) => {
                j.state = JobState::Failed;
                j.error = e;
            }
            None => {
                j.state = JobState::Failed;
                j.error = "the worker reported neither a delta nor an error".into();
            }
        }
        Ok(self.store.update_job(j, JobState::Running, job.attempts).await?)
    }

    async fn requeue(&self, job: &Job) {
        let Ok(cur) = self.store.job(&job.id).await else { return };
        if cur.state.is_final() || cur.state == JobState::Queued {
            self.release(&cur.namespace, &cur.id);
            return;
        }
        let mut j = cur.clone();
        j.state = JobState::Queued;
        j.updated_ms = lin::now_ms();
        match self.store.update_job(j, cur.state, cur.attempts).await {
            Ok(j) => {
                self.changed(&j);
                self.release(&j.namespace, &j.id);
                self.enqueue(&j, true);
            }
            Err(e) => tracing::error!(job = %job.id, "cannot re-queue: {e}"),
        }
    }

    fn targets(&self) -> Vec<Target> {
        let st = self.state.lock().expect("state");
        let now = Instant::now();
        let mut t: Vec<Target> = st
            .replicas
            .iter()
            .filter(|(_, m)| m.expires > now)
            .map(|(id, m)| Target { id: id.clone(), address: m.address.clone(), transports: m.transports.clone() })
            .collect();
        t.sort_by(|a, b| a.id.cmp(&b.id));
        t
    }

    /// Stages a version on every live replica, then moves the head (compare-and-swap) and commits everywhere.
    /// Returns the staging and commit times in ms.
    async fn stage_and_promote(
        &self,
        ns: &str,
        version: &lin::Version,
        expected: Option<&VersionId>,
        actor: &str,
    ) -> Result<(f64, f64)> {
        let t0 = Instant::now();
        let bytes = self.blobs.get(&version.delta_hash).await?;
        let mut item = Staging {
            namespace: ns.to_string(),
            version: version.id.to_string(),
            chain: version.parent.iter().map(|p| p.to_string()).collect(),
            hash: version.delta_hash.clone(),
            bytes,
            blake3: version.delta_blake3.clone(),
        };
        let targets = self.targets();
        // The recorded BLAKE3 came from the worker: checked here beside the staging (off its path). A wrong one
        // (a worker's bug, version skew) would make every replica refuse the delta for good; it is staged again with
        // the right one instead.
        let check = item.blake3.is_some().then(|| {
            let b = item.bytes.clone();
            tokio::task::spawn_blocking(move || lin::blob::transfer_hash(&b))
        });
        let mut outcomes = self.broadcaster.stage(&targets, &item, self.cfg.stage_timeout).await;
        if let Some(check) = check {
            let actual = check.await.context("hashing the delta")?;
            if item.blake3.as_deref() != Some(actual.as_str()) {
                tracing::error!(
                    version = %version.id.short(),
                    "the version was recorded with BLAKE3 {} but its delta hashes to {actual}; staging it again",
                    item.blake3.as_deref().unwrap_or_default()
                );
                item.blake3 = Some(actual);
                outcomes = self.broadcaster.stage(&targets, &item, self.cfg.stage_timeout).await;
            }
        }
        let mut staged = Vec::new();
        for (t, o) in targets.iter().zip(outcomes) {
            let mut st = self.state.lock().expect("state");
            match o {
                Ok(_) => {
                    staged.push(t.clone());
                    st.stale.entry(ns.to_string()).or_default().remove(&t.id);
                }
                Err(e) => {
                    tracing::warn!(replica = %t.id, version = %version.id.short(), "staging failed, marked stale: {e:#}");
                    st.stale.entry(ns.to_string()).or_default().insert(t.id.clone());
                }
            }
        }
        let stage_ms = t0.elapsed().as_secs_f64() * 1e3;
        let t1 = Instant::now();
        self.store.promote(ns, expected, &version.id, actor).await?;
        self.commit_all(ns, Some(&version.id), &staged).await;
        Ok((stage_ms, t1.elapsed().as_secs_f64() * 1e3))
    }

    /// Tells replicas to flip to the namespace's new head (they also follow the store's head watch).
    async fn commit_all(&self, ns: &str, version: Option<&VersionId>, targets: &[Target]) {
        let req = pb::CommitRequest {
            namespace: ns.to_string(),
            version: version.map(|v| v.to_string()).unwrap_or_default(),
        };
        let each = targets.iter().map(|t| {
            let req = req.clone();
            async move {
                let ch = self.broadcaster_channel(&t.address)?;
                let mut c = pb::replica_client::ReplicaClient::new(ch);
                tokio::time::timeout(self.cfg.stage_timeout, c.commit(req)).await.context("commit timed out")??;
                anyhow::Ok(())
            }
        });
        for (t, r) in targets.iter().zip(futures::future::join_all(each).await) {
            if let Err(e) = r {
                tracing::warn!(replica = %t.id, "commit failed (it catches up from the head watch): {e:#}");
            }
        }
    }

    /// A lazily connecting channel per replica address, reused by every commit and status call.
    fn broadcaster_channel(&self, address: &str) -> Result<tonic::transport::Channel> {
        let mut map = self.channels.lock().expect("channels");
        if let Some(c) = map.get(address) {
            return Ok(c.clone());
        }
        let c = tonic::transport::Endpoint::from_shared(address.to_string())?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy();
        map.insert(address.to_string(), c.clone());
        Ok(c)
    }

    /// Takes a staging job to its end: its version live everywhere, or the job queued again when the head moved
    /// under it (a rollback meanwhile). Other failures are retried; the job stays `staging` in the store, so a
    /// restarted coordinator resumes it too.
    async fn publish(self: Arc<Self>, job: Job) {
        loop {
            match self.publish_once(&job).await {
                Ok(j) => {
                    self.changed(&j);
                    // Still holding the namespace: no job composes onto a head the compaction is about to replace.
                    if let Err(e) = self.compact_if_due(&j.namespace).await {
                        tracing::warn!(namespace = %j.namespace, "compaction failed; the chain stays as it is and is tried again after the next job: {e:#}");
                    }
                    self.release(&j.namespace, &j.id);
                    return;
                }
                Err(e)
                    if e.chain().any(|c| matches!(c.downcast_ref::<lin::Error>(), Some(lin::Error::Conflict(_)))) =>
                {
                    tracing::info!(job = %job.id, "head moved during the job; composing it again on the new head: {e:#}");
                    self.requeue(&job).await;
                    return;
                }
                Err(e) => {
                    tracing::warn!(job = %job.id, "publishing failed, retrying: {e:#}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    async fn publish_once(&self, job: &Job) -> Result<Job> {
        let id = job.version.clone().context("a staging job without a version")?;
        let v = self.store.version(&id).await?;
        let mut j = job.clone();
        match v.status {
            lin::Status::Candidate => {
                let actor = format!("job:{}", job.id);
                let (stage_ms, commit_ms) =
                    self.stage_and_promote(&job.namespace, &v, job.base_head.as_ref(), &actor).await?;
                j.timings.stage_ms = stage_ms;
                j.timings.commit_ms = commit_ms;
            }
            // A previous coordinator moved the head and stopped before recording it.
            lin::Status::Live | lin::Status::Superseded | lin::Status::RolledBack => {}
            lin::Status::Rejected => anyhow::bail!("version {} was rejected", id.short()),
        }
        j.state = JobState::Live;
        j.updated_ms = lin::now_ms();
        Ok(self.store.update_job(j, JobState::Staging, job.attempts).await?)
    }

    /// The versions above the namespace's last compaction (or its base), newest first; at most `limit` of them
    /// (0: all), which is enough to tell that a compaction is not due.
    async fn uncompacted(&self, head: &VersionId, limit: usize) -> Result<Vec<lin::Version>> {
        let mut chain = Vec::new();
        let mut cur = Some(head.clone());
        while let Some(id) = cur {
            if limit > 0 && chain.len() == limit {
                break;
            }
            let v = self.store.version(&id).await?;
            if !v.compacts.is_empty() {
                break;
            }
            cur = v.parent.clone();
            chain.push(v);
        }
        Ok(chain)
    }

    /// After a version went live: when `compact_every` versions lie above the namespace's last compaction, offers
    /// the documents the gate rejected while they were the head again (new jobs; the rejected ones stay final), then
    /// replaces the chain by one compaction version and publishes it like a job's (staged everywhere, one head CAS).
    /// It serves what the chain served, keeps the tip's composer state, and rollback still reaches every version it
    /// replaced. A crash at any point leaves the chain as it was (a half-made compaction is an unpublished candidate,
    /// and the re-offers are idempotent), so the next job's completion tries again.
    pub async fn compact_if_due(&self, ns: &str) -> Result<()> {
        let every = self.cfg.compact_every;
        if every == 0 {
            return Ok(());
        }
        let Some(head) = self.store.namespace(ns).await?.head else { return Ok(()) };
        let known = self.state.lock().expect("state").uncompacted.get(ns).cloned();
        let count = match known {
            Some((h, n)) if h == head => n,
            // One more above the head counted last (the usual case after a job): one read, not a walk.
            Some((h, n)) if self.store.version(&head).await?.parent.as_ref() == Some(&h) && n + 1 < every => n + 1,
            _ => self.uncompacted(&head, every).await?.len(),
        };
        if count < every {
            self.state.lock().expect("state").uncompacted.insert(ns.to_string(), (head, count));
            return Ok(());
        }
        let mut chain = self.uncompacted(&head, 0).await?;
        if chain.len() < every {
            // The count was stale: the store says the chain is shorter.
            self.state.lock().expect("state").uncompacted.insert(ns.to_string(), (head, chain.len()));
            return Ok(());
        }
        chain.reverse();
        let parent = chain[0].parent.clone();
        let t = Instant::now();
        self.reoffer_rejected(ns, parent.as_ref(), &chain).await?;
        let mut blobs = Vec::with_capacity(chain.len());
        for v in &chain {
            blobs.push((v.id.clone(), self.blobs.get(&v.delta_hash).await?));
        }
        let n = chain.len();
        // Decoding, summing and encoding the chain is CPU work (dense sums of every adapted weight): off the runtime.
        let (bytes, blake3) = tokio::task::spawn_blocking(move || -> Result<(Vec<u8>, String)> {
            let deltas = blobs
                .iter()
                .map(|(id, b)| {
                    engram_lora::Delta::decode(b).with_context(|| format!("delta of version {}", id.short()))
                })
                .collect::<Result<Vec<_>>>()?;
            let meta = engram_lora::Meta {
                injector: "compaction".into(),
                injector_version: format!("{n} versions"),
                ..deltas[0].meta.clone()
            };
            let bytes = engram_lora::Delta::compact(&deltas.iter().collect::<Vec<_>>(), meta)?.encode()?;
            let blake3 = lin::blob::transfer_hash(&bytes);
            Ok((bytes, blake3))
        })
        .await
        .context("compaction task")??;
        let delta_size = bytes.len() as u64;
        let delta_hash = self.blobs.put(bytes.into()).await?;
        let tip = chain.last().expect("n >= every > 0");
        let new = NewVersion {
            namespace: ns.to_string(),
            parent: parent.clone(),
            delta_hash,
            delta_size,
            delta_blake3: Some(blake3),
            injector: "compaction".into(),
            document_digests: chain.iter().flat_map(|v| v.document_digests.iter().cloned()).collect(),
            creator: format!("{}:compaction", self.cfg.actor),
            // The same served state: a worker composing onto the compaction continues from the tip's state.
            composer_state: tip.composer_state.clone(),
            compacts: chain.iter().map(|v| v.id.clone()).collect(),
            ..Default::default()
        };
        let id = VersionId::derive(parent.as_ref(), &new.delta_hash, &tip.base_model);
        let v = match self.store.create_version(new).await {
            Ok(v) => v,
            Err(lin::Error::AlreadyExists(_)) => self.store.version(&id).await?,
            Err(e) => return Err(e.into()),
        };
        if v.status == lin::Status::Candidate {
            let actor = format!("{}:compaction", self.cfg.actor);
            self.stage_and_promote(ns, &v, Some(&tip.id), &actor).await?;
        }
        self.state.lock().expect("state").uncompacted.insert(ns.to_string(), (v.id.clone(), 0));
        tracing::info!(namespace = ns, version = %v.id.short(), "compacted {n} versions in {:?}", t.elapsed());
        Ok(())
    }

    /// Submits again, as new jobs, the documents of jobs the gate rejected on `parent` or on a version of `chain`
    /// (idempotency key `reoffer:<job>`, so a crash and a second try submit nothing twice).
    async fn reoffer_rejected(&self, ns: &str, parent: Option<&VersionId>, chain: &[lin::Version]) -> Result<()> {
        let heads: HashSet<Option<VersionId>> =
            std::iter::once(parent.cloned()).chain(chain.iter().map(|v| Some(v.id.clone()))).collect();
        for job in self.store.jobs().await? {
            if job.namespace != ns || job.state != JobState::Rejected || !heads.contains(&job.base_head) {
                continue;
            }
            let again = Job::new(
                ns,
                &format!("reoffer:{}", job.id),
                job.documents.clone(),
                job.options.clone(),
                &format!("{}:reoffer", self.cfg.actor),
            );
            let (again, created) = self.store.submit_job(again).await?;
            if created {
                tracing::info!(namespace = ns, job = %job.id, again = %again.id, "rejected documents offered again");
                self.enqueue(&again, false);
                self.changed(&again);
            }
        }
        Ok(())
    }

    /// Every 100 ms: forgets members whose lease lapsed and re-queues the jobs of lapsed workers.
    async fn reap(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let lost: Vec<(String, String)> = {
                let mut st = self.state.lock().expect("state");
                let now = Instant::now();
                let dead: Vec<String> =
                    st.workers.iter().filter(|(_, m)| m.expires <= now).map(|(k, _)| k.clone()).collect();
                for w in &dead {
                    st.workers.remove(w);
                    tracing::warn!(worker = %w, "worker lease lapsed");
                }
                st.replicas.retain(|id, m| {
                    let live = m.expires > now;
                    if !live {
                        tracing::warn!(replica = %id, "replica lease lapsed");
                    }
                    live
                });
                let lost: Vec<(String, String)> = st
                    .running
                    .iter()
                    .filter(|(_, (w, _))| dead.contains(w))
                    .map(|(j, (w, _))| (j.clone(), w.clone()))
                    .collect();
                for (j, _) in &lost {
                    st.running.remove(j);
                }
                lost
            };
            for (id, worker) in lost {
                if let Ok(job) = self.store.job(&id).await {
                    tracing::warn!(job = %id, worker = %worker, "its worker is gone; queued again");
                    self.requeue(&job).await;
                }
            }
        }
    }

    pub async fn rollback(&self, r: pb::RollbackRequest) -> Result<lin::Namespace, Status> {
        let ns = self.store.namespace(&r.namespace).await.map_err(|e| match e {
            lin::Error::NotFound(m) => invalid(m),
            e => lineage(e),
        })?;
        let to = if r.to.is_empty() {
            None
        } else {
            Some(self.store.resolve(Some(&r.namespace), &r.to).await.map_err(lineage)?)
        };
        let reason = if r.reason.trim().is_empty() { "rollback requested".to_string() } else { r.reason };
        let actor = if r.actor.is_empty() { "operator".to_string() } else { r.actor };
        self.store.rollback(&r.namespace, ns.head.as_ref(), to.as_ref(), &actor, &reason).await.map_err(lineage)?;
        self.commit_all(&r.namespace, to.as_ref(), &self.targets()).await;
        self.store.namespace(&r.namespace).await.map_err(lineage)
    }

    pub async fn promote(&self, r: pb::PromoteRequest) -> Result<lin::Namespace, Status> {
        let ns = self.store.namespace(&r.namespace).await.map_err(lineage)?;
        let id = self.store.resolve(Some(&r.namespace), &r.version).await.map_err(lineage)?;
        let v = self.store.version(&id).await.map_err(lineage)?;
        let expected = if r.expected_head.is_empty() {
            ns.head.clone()
        } else {
            Some(self.store.resolve(Some(&r.namespace), &r.expected_head).await.map_err(lineage)?)
        };
        let actor = if r.actor.is_empty() { "operator".to_string() } else { r.actor };
        self.stage_and_promote(&r.namespace, &v, expected.as_ref(), &actor).await.map_err(|e| status(&e))?;
        self.store.namespace(&r.namespace).await.map_err(lineage)
    }

    async fn replicas(&self, namespace: &str) -> Vec<pb::ReplicaInfo> {
        type Members = Vec<(String, String, Vec<String>, Instant)>;
        let (members, stale): (Members, HashMap<String, HashSet<String>>) = {
            let st = self.state.lock().expect("state");
            let m = st.replicas.iter().map(|(id, m)| (id.clone(), m.address.clone(), m.transports.clone(), m.expires));
            (m.collect(), st.stale.clone())
        };
        let stale = &stale;
        let each = members.into_iter().map(|(id, address, transports, expires)| async move {
            let status = async {
                let mut c = pb::replica_client::ReplicaClient::new(self.broadcaster_channel(&address)?);
                anyhow::Ok(
                    tokio::time::timeout(Duration::from_secs(1), c.status(pb::StatusRequest {})).await??.into_inner(),
                )
            }
            .await
            .ok();
            let mut serving: HashMap<String, String> = status.as_ref().map(|s| s.serving.clone()).unwrap_or_default();
            if !namespace.is_empty() {
                serving.retain(|ns, _| ns == namespace);
            }
            // A replica that missed a staging is stale until it serves the head again (it catches up by itself).
            let missed: Vec<String> =
                serving.keys().filter(|ns| stale.get(*ns).is_some_and(|s| s.contains(&id))).cloned().collect();
            for ns in missed {
                let head = self.store.namespace(&ns).await.ok().and_then(|n| n.head).map(|h| h.to_string());
                let v = serving.get_mut(&ns).expect("listed");
                if Some(v.as_str()) != head.as_deref().or(Some("")) {
                    *v = format!("stale:{v}");
                }
            }
            let left = expires.saturating_duration_since(Instant::now()).as_millis() as u64;
            pb::ReplicaInfo {
                id,
                address,
                serving,
                ready: status.is_some_and(|s| s.ready),
                lease_expires_ms: (lin::now_ms() + left) as i64,
                transports,
            }
        });
        let mut out = futures::future::join_all(each).await;
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }
}

/// The Coordinator gRPC service.
pub struct CoordinatorService(pub Arc<Coordinator>);

type JobStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::Job, Status>> + Send>>;

#[tonic::async_trait]
impl coordinator_server::Coordinator for CoordinatorService {
    async fn create_namespace(
        &self,
        r: Request<pb::CreateNamespaceRequest>,
    ) -> Result<Response<pb::Namespace>, Status> {
        self.0.lead()?;
        let r = r.into_inner();
        if r.base_model.len() != 64 || !r.base_model.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(invalid(format!(
                "base model {:?} is not a lowercase hex SHA-256 of the model's weights",
                r.base_model
            )));
        }
        let actor = if r.actor.is_empty() { "operator" } else { &r.actor };
        let ns = self.0.store.create_namespace(&r.name, &r.base_model, actor).await.map_err(lineage)?;
        self.0.state.lock().expect("state").bases.insert(ns.name.clone(), ns.base_model.clone());
        Ok(Response::new(convert::namespace(&ns)))
    }

    async fn consolidate(&self, r: Request<pb::ConsolidateRequest>) -> Result<Response<pb::Job>, Status> {
        self.0.lead()?;
        self.0.consolidate(r.into_inner()).await.map(|j| Response::new(convert::job(&j)))
    }

    async fn get_job(&self, r: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        self.0.lead()?;
        let j = self.0.store.job(&r.into_inner().id).await.map_err(lineage)?;
        Ok(Response::new(convert::job(&j)))
    }

    type WatchJobStream = JobStream;

    async fn watch_job(&self, r: Request<pb::GetJobRequest>) -> Result<Response<JobStream>, Status> {
        self.0.lead()?;
        let id = r.into_inner().id;
        // Subscribe before reading, so no change falls between the read and the stream.
        let mut rx = self.0.changes.subscribe();
        let first = self.0.store.job(&id).await.map_err(lineage)?;
        let store = self.0.store.clone();
        let stream = async_stream(move |tx| async move {
            let mut last = first.clone();
            if tx.send(Ok(convert::job(&first))).await.is_err() || first.state.is_final() {
                return;
            }
            loop {
                let next = match rx.recv().await {
                    Ok(j) if j.id == id => j,
                    Ok(_) => continue,
                    // Fell behind: read the record instead.
                    Err(broadcast::error::RecvError::Lagged(_)) => match store.job(&id).await {
                        Ok(j) => j,
                        Err(_) => return,
                    },
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if next == last {
                    continue;
                }
                last = next.clone();
                if tx.send(Ok(convert::job(&next))).await.is_err() || next.state.is_final() {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn list_versions(
        &self,
        r: Request<pb::ListVersionsRequest>,
    ) -> Result<Response<pb::ListVersionsResponse>, Status> {
        self.0.lead()?;
        let r = r.into_inner();
        let limit = (r.limit > 0).then_some(r.limit as usize);
        let ns = self.0.store.namespace(&r.namespace).await.map_err(lineage)?;
        let versions = self.0.store.log(&r.namespace, limit).await.map_err(lineage)?;
        Ok(Response::new(pb::ListVersionsResponse {
            versions: versions.iter().map(convert::version).collect(),
            head: ns.head.map(|h| h.to_string()).unwrap_or_default(),
        }))
    }

    async fn get_version(&self, r: Request<pb::GetVersionRequest>) -> Result<Response<pb::Version>, Status> {
        self.0.lead()?;
        let r = r.into_inner();
        let ns = (!r.namespace.is_empty()).then_some(r.namespace.as_str());
        let id = self.0.store.resolve(ns, &r.version).await.map_err(lineage)?;
        Ok(Response::new(convert::version(&self.0.store.version(&id).await.map_err(lineage)?)))
    }

    async fn rollback(&self, r: Request<pb::RollbackRequest>) -> Result<Response<pb::Namespace>, Status> {
        self.0.lead()?;
        self.0.rollback(r.into_inner()).await.map(|n| Response::new(convert::namespace(&n)))
    }

    async fn promote(&self, r: Request<pb::PromoteRequest>) -> Result<Response<pb::Namespace>, Status> {
        self.0.lead()?;
        self.0.promote(r.into_inner()).await.map(|n| Response::new(convert::namespace(&n)))
    }

    async fn list_replicas(
        &self,
        r: Request<pb::ListReplicasRequest>,
    ) -> Result<Response<pb::ListReplicasResponse>, Status> {
        self.0.lead()?;
        Ok(Response::new(pb::ListReplicasResponse { replicas: self.0.replicas(&r.into_inner().namespace).await }))
    }
}

/// A stream fed by a task through a channel.
fn async_stream<F, Fut>(f: F) -> JobStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::Job, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// The Membership gRPC service (workers and replicas).
pub struct MembershipService(pub Arc<Coordinator>);

#[tonic::async_trait]
impl membership_server::Membership for MembershipService {
    async fn register_worker(&self, r: Request<pb::RegisterWorkerRequest>) -> Result<Response<pb::Lease>, Status> {
        self.0.lead()?;
        let r = r.into_inner();
        if r.id.is_empty() || r.base_models.is_empty() {
            return Err(invalid("a worker registers with an id and the base models it has loaded"));
        }
        let mut st = self.0.state.lock().expect("state");
        let (lease_id, expires) = self.0.lease(&mut st);
        st.workers.insert(
            r.id.clone(),
            Member { lease_id, expires, base_models: r.base_models, address: String::new(), transports: r.injectors },
        );
        drop(st);
        tracing::info!(worker = %r.id, "worker registered");
        self.0.wake.notify_waiters();
        Ok(Response::new(self.0.lease_msg(&r.id, lease_id)))
    }

    async fn register_replica(&self, r: Request<pb::RegisterReplicaRequest>) -> Result<Response<pb::Lease>, Status> {
        self.0.lead()?;
        let r = r.into_inner();
        if r.id.is_empty() || r.address.is_empty() {
            return Err(invalid("a replica registers with an id and the address of its Replica service"));
        }
        let mut st = self.0.state.lock().expect("state");
        let (lease_id, expires) = self.0.lease(&mut st);
        st.replicas.insert(
            r.id.clone(),
            Member { lease_id, expires, base_models: Vec::new(), address: r.address, transports: r.transports },
        );
        drop(st);
        tracing::info!(replica = %r.id, "replica registered");
        Ok(Response::new(self.0.lease_msg(&r.id, lease_id)))
    }

    async fn heartbeat(&self, r: Request<pb::HeartbeatRequest>) -> Result<Response<pb::Lease>, Status> {
        self.0.lead()?;
        let r = r.into_inner();
        let ttl = self.0.cfg.lease_ttl;
        let renewed = {
            let mut st = self.0.state.lock().expect("state");
            let now = Instant::now();
            let st = &mut *st;
            let renewed =
                [&mut st.workers, &mut st.replicas].into_iter().any(|members| match members.get_mut(&r.member) {
                    Some(m) if m.lease_id == r.lease_id && m.expires > now => {
                        m.expires = now + ttl;
                        true
                    }
                    _ => false,
                });
            renewed
        };
        if renewed {
            return Ok(Response::new(self.0.lease_msg(&r.member, r.lease_id)));
        }
        Err(Status::not_found(format!("no live lease {} for {:?}; register again", r.lease_id, r.member)))
    }

    async fn next_job(&self, r: Request<pb::NextJobRequest>) -> Result<Response<pb::JobAssignment>, Status> {
        self.0.lead()?;
        self.0.next_job(r.into_inner()).await.map(Response::new)
    }

    async fn nccl_rendezvous(
        &self,
        r: Request<pb::NcclRendezvousRequest>,
    ) -> Result<Response<pb::NcclRendezvousReply>, Status> {
        self.0.lead()?;
        let r = r.into_inner();
        let wait = Duration::from_millis(r.wait_ms as u64);
        let (unique_id, world) = self.0.nccl.meet(&r.group, r.rank, r.world, r.unique_id, wait).await?;
        Ok(Response::new(pb::NcclRendezvousReply { unique_id, world }))
    }

    async fn complete_job(&self, r: Request<pb::CompleteJobRequest>) -> Result<Response<pb::Job>, Status> {
        self.0.lead()?;
        self.0.complete(r.into_inner()).await.map(|j| Response::new(convert::job(&j)))
    }
}

/// Serves Coordinator and Membership (with health and reflection) on `listener` until `shutdown` resolves.
pub async fn serve(
    coordinator: Arc<Coordinator>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<coordinator_server::CoordinatorServer<CoordinatorService>>().await;
    health.set_serving::<membership_server::MembershipServer<MembershipService>>().await;
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(engram_proto::reflection()?)
        .add_service(
            coordinator_server::CoordinatorServer::new(CoordinatorService(coordinator.clone()))
                .max_decoding_message_size(16 << 20),
        )
        .add_service(
            membership_server::MembershipServer::new(MembershipService(coordinator))
                .max_decoding_message_size(16 << 20),
        )
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}
