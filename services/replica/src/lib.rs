//! A serving replica. It serves every namespace of one base model from that namespace's head, and every answer names
//! the version that produced it.
//!
//! Weights are immutable: the served state of a namespace is one `Arc<Llama>` (base merged with the chain up to the
//! head). Staging builds the next version's weights beside it; a flip swaps the pointer, so a request runs wholly on
//! the old or wholly on the new weights. The replica flips when the coordinator commits, and also follows the
//! lineage's head watch, so a replica that missed a commit (or restarted) catches up from the blob store by itself.
//! Flips only move forward in the namespace's event sequence: a late commit never undoes a newer head.
#![forbid(unsafe_code)]

pub mod http;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use engram_lineage::{BlobStore, LineageStore, VersionId};
use engram_lora::Delta;
use engram_model::{BaseModel, Llama};
use engram_proto::v1::{
    membership_client::MembershipClient, replica_server, CommitAck, CommitRequest, GenerateRequest, GenerateResponse,
    HeartbeatRequest, RegisterReplicaRequest, ReplicaStatus, StageAck, StageChunk, StatusRequest,
};
use engram_transport::{pull, status};
use tonic::{Request, Response, Status, Streaming};

/// Longest generation a request may ask for.
pub const MAX_TOKENS: u32 = 64;
/// Longest prompt accepted, in bytes.
pub const MAX_PROMPT_BYTES: usize = 4096;

#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    pub id: String,
    /// `http://host:port` where the coordinator reaches this replica.
    pub advertise: String,
    /// The coordinator's Membership endpoint; `None` runs without registering (tests, tools).
    pub coordinator: Option<String>,
    /// Merged weights kept for recent versions (rollback to one of them is a pointer swap).
    pub cache_versions: usize,
}

/// What one namespace serves now.
#[derive(Clone)]
struct Served {
    version: Option<VersionId>,
    /// The namespace event sequence of the head move this serves; flips only go forward.
    seq: u64,
    model: Arc<Llama>,
}

struct Cache {
    cap: usize,
    order: VecDeque<VersionId>,
    models: HashMap<VersionId, Arc<Llama>>,
}

impl Cache {
    fn get(&mut self, id: &VersionId) -> Option<Arc<Llama>> {
        let m = self.models.get(id)?.clone();
        self.order.retain(|v| v != id);
        self.order.push_back(id.clone());
        Some(m)
    }

    fn put(&mut self, id: VersionId, m: Arc<Llama>) {
        self.order.retain(|v| *v != id);
        self.order.push_back(id.clone());
        self.models.insert(id, m);
        while self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.models.remove(&old);
            }
        }
    }
}

pub struct Replica {
    cfg: ReplicaConfig,
    base: Arc<BaseModel>,
    base_llama: Arc<Llama>,
    store: Arc<dyn LineageStore>,
    blobs: BlobStore,
    served: RwLock<HashMap<String, Served>>,
    /// Serialises flips per namespace.
    flips: tokio::sync::Mutex<()>,
    cache: Mutex<Cache>,
    /// Namespaces whose head this replica could not build; they refuse requests until it can.
    stale: Mutex<HashMap<String, String>>,
    ready: std::sync::atomic::AtomicBool,
    /// Channels to the replicas this one relays staged chunks to (pipelined broadcast).
    relay: engram_transport::relay::Connect,
    /// Staging streams that broke off, kept for a resume.
    partials: engram_transport::relay::Partials,
    /// The GPU broadcast this replica stages over besides streams (NCCL), when it has one.
    collective: Option<Arc<dyn engram_transport::collective::Collective>>,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| anyhow!("model task failed: {e}"))?
}

impl Replica {
    pub fn new(cfg: ReplicaConfig, base: Arc<BaseModel>, store: Arc<dyn LineageStore>, blobs: BlobStore) -> Arc<Self> {
        let base_llama = Arc::new(base.llama.clone());
        let cap = cfg.cache_versions.max(2);
        Arc::new(Self {
            cfg,
            base,
            base_llama,
            store,
            blobs,
            served: RwLock::new(HashMap::new()),
            flips: tokio::sync::Mutex::new(()),
            cache: Mutex::new(Cache { cap, order: VecDeque::new(), models: HashMap::new() }),
            stale: Mutex::new(HashMap::new()),
            ready: false.into(),
            relay: Arc::new(engram_transport::GrpcStream::default()).connector(),
            partials: Default::default(),
            collective: engram_transport::collective::this_gpu(),
        })
    }

    pub fn id(&self) -> &str {
        &self.cfg.id
    }

    /// Loads the head of every namespace of this replica's base model and follows their head watches; registers
    /// with the coordinator when one is configured. Ready once every head is served.
    pub async fn start(self: &Arc<Self>) -> Result<()> {
        for ns in self.store.namespaces().await? {
            if ns.base_model == self.base.hash {
                self.follow(&ns.name).await?;
            }
        }
        self.ready.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(addr) = self.cfg.coordinator.clone() {
            let me = self.clone();
            tokio::spawn(async move { me.membership(addr).await });
        }
        Ok(())
    }

    /// Starts serving `namespace` from its head and following its head watch.
    async fn follow(self: &Arc<Self>, namespace: &str) -> Result<()> {
        if self.served.read().expect("served").contains_key(namespace) {
            return Ok(());
        }
        let mut watch = self.store.watch_head(namespace).await?;
        let first = watch.next().await.context("head watch closed at once")??;
        self.flip(namespace, first.head.as_ref(), first.seq).await?;
        let me = self.clone();
        let ns = namespace.to_string();
        tokio::spawn(async move {
            while let Some(change) = watch.next().await {
                match change {
                    Ok(h) => {
                        if let Err(e) = me.flip(&ns, h.head.as_ref(), h.seq).await {
                            tracing::warn!(namespace = %ns, "cannot serve head {:?}: {e:#}", h.head);
                            me.mark_stale(&ns, &e);
                            me.catch_up(ns.clone());
                        }
                    }
                    Err(e) => tracing::warn!(namespace = %ns, "head watch: {e}"),
                }
            }
        });
        Ok(())
    }

    fn mark_stale(&self, ns: &str, e: &anyhow::Error) {
        self.stale.lock().expect("stale").insert(ns.to_string(), format!("{e:#}"));
    }

    /// Retries building the store's head until it is served.
    fn catch_up(self: &Arc<Self>, ns: String) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let Ok(n) = me.store.namespace(&ns).await else { continue };
                match me.flip(&ns, n.head.as_ref(), n.seq).await {
                    Ok(()) => return,
                    Err(e) => tracing::debug!(namespace = %ns, "still catching up: {e:#}"),
                }
            }
        });
    }

    /// The merged weights of `version`, from the cache or rebuilt from the nearest cached ancestor with the
    /// deltas read from the blob store.
    pub async fn materialize(&self, version: Option<&VersionId>) -> Result<Arc<Llama>> {
        let Some(v) = version else { return Ok(self.base_llama.clone()) };
        if let Some(m) = self.cache.lock().expect("cache").get(v) {
            return Ok(m);
        }
        let cached: std::collections::HashSet<VersionId> =
            self.cache.lock().expect("cache").models.keys().cloned().collect();
        let (from, chain) = pull::missing(self.store.as_ref(), &self.blobs, v, |id| cached.contains(id)).await?;
        let mut model = match &from {
            Some(id) => self.cache.lock().expect("cache").get(id).context("cached ancestor evicted meanwhile")?,
            None => self.base_llama.clone(),
        };
        for (ver, delta) in chain {
            self.base.check_delta(&delta).with_context(|| format!("version {}", ver.id.short()))?;
            let parent = model.clone();
            model = Arc::new(blocking(move || Ok(parent.merged(&[&delta])?)).await?);
            self.cache.lock().expect("cache").put(ver.id.clone(), model.clone());
        }
        Ok(model)
    }

    /// Serves `version` for `namespace` if `seq` is newer than what it serves.
    async fn flip(&self, namespace: &str, version: Option<&VersionId>, seq: u64) -> Result<()> {
        let _one = self.flips.lock().await;
        if let Some(cur) = self.served.read().expect("served").get(namespace) {
            if cur.seq >= seq {
                return Ok(());
            }
        }
        let model = self.materialize(version).await?;
        self.served
            .write()
            .expect("served")
            .insert(namespace.to_string(), Served { version: version.cloned(), seq, model });
        self.stale.lock().expect("stale").remove(namespace);
        tracing::info!(replica = %self.cfg.id, namespace, "serving {}", version.map_or("base", |v| v.short()));
        Ok(())
    }

    /// Receives a staged version: checks every chunk and the whole, that the bytes are a delta for this base
    /// model, and that the version id names exactly this parent, delta and base model; builds its weights.
    /// Receives a staged delta (relaying each intact chunk to the replicas named in the first one as it arrives),
    /// then verifies and prepares it while the relayed replicas acknowledge.
    async fn stage_chunks(&self, mut stream: Streaming<StageChunk>) -> Result<StageAck, Status> {
        let (received, relay) =
            engram_transport::relay::receive(&mut stream, self.relay.clone(), &self.partials).await?;
        let (version, len) = (received.version.clone(), received.bytes.len() as u64);
        // Prepared by this node's deadline or reported not ready: a slow replica must not hold back the outcomes of
        // the replicas it relayed to.
        let deadline = relay.deadline();
        let own = async {
            match deadline {
                Some(d) => tokio::time::timeout_at(d.into(), self.prepare_staged(received))
                    .await
                    .unwrap_or_else(|_| Err(Status::deadline_exceeded("not prepared before the deadline"))),
                None => self.prepare_staged(received).await,
            }
        };
        let (own, downstream) = tokio::join!(own, relay.finish());
        match own {
            Ok(mut ack) => {
                ack.downstream = downstream;
                Ok(ack)
            }
            Err(status) if downstream.is_empty() => Err(status),
            Err(status) => {
                Ok(StageAck { version, received: len, ready: false, downstream, error: status.message().to_string() })
            }
        }
    }

    async fn prepare_staged(&self, received: engram_transport::Received) -> Result<StageAck, Status> {
        let invalid = |e: String| Status::invalid_argument(e);
        let version = VersionId::parse(&received.version).map_err(|e| invalid(e.to_string()))?;
        let parent =
            received.chain.first().map(|p| VersionId::parse(p)).transpose().map_err(|e| invalid(e.to_string()))?;
        // The SHA-256 naming the bytes the assembler checked (see `Received::hash`).
        let hash = received.hash.clone();
        if VersionId::derive(parent.as_ref(), &hash, &self.base.hash) != version {
            return Err(invalid(format!(
                "version {} does not name this delta on parent {} over base model {}",
                version.short(),
                engram_lineage::ops::show(&parent),
                &self.base.hash[..12]
            )));
        }
        let delta = Delta::decode(&received.bytes).map_err(|e| invalid(format!("not a delta: {e}")))?;
        self.base.check_delta(&delta).map_err(|e| invalid(format!("delta for version {}: {e}", version.short())))?;
        // Fault injection for tests and drills: a replica that acknowledges staging late.
        if let Some(ms) = std::env::var("ENGRAM_FAULT_STAGE_DELAY_MS").ok().and_then(|v| v.parse::<u64>().ok()) {
            tracing::warn!(version = %version.short(), "holding the stage acknowledgement for {ms} ms (ENGRAM_FAULT_STAGE_DELAY_MS)");
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let parent_model = self.materialize(parent.as_ref()).await.map_err(|e| status(&e))?;
        let model = blocking(move || Ok(parent_model.merged(&[&delta])?)).await.map_err(|e| status(&e))?;
        self.cache.lock().expect("cache").put(version.clone(), Arc::new(model));
        Ok(StageAck {
            version: version.to_string(),
            received: received.bytes.len() as u64,
            ready: true,
            downstream: Vec::new(),
            error: String::new(),
        })
    }

    /// Generates from the namespace's served weights; returns the text and the version that produced it.
    pub async fn generate(
        self: &Arc<Self>,
        namespace: &str,
        prompt: &str,
        max_tokens: u32,
    ) -> Result<GenerateResponse, Status> {
        if prompt.trim().is_empty() {
            return Err(Status::invalid_argument("the prompt is empty"));
        }
        if prompt.len() > MAX_PROMPT_BYTES {
            return Err(Status::invalid_argument(format!(
                "the prompt is {} bytes; at most {MAX_PROMPT_BYTES}",
                prompt.len()
            )));
        }
        if max_tokens > MAX_TOKENS {
            return Err(Status::invalid_argument(format!("max_tokens {max_tokens} above {MAX_TOKENS}")));
        }
        if let Some(why) = self.stale.lock().expect("stale").get(namespace) {
            return Err(Status::unavailable(format!("namespace {namespace:?} is catching up on this replica: {why}")));
        }
        let served = self.served.read().expect("served").get(namespace).cloned();
        let served = match served {
            Some(s) => s,
            None => {
                let ns = self.store.namespace(namespace).await.map_err(|e| status(&e.into()))?;
                if ns.base_model != self.base.hash {
                    return Err(Status::failed_precondition(format!(
                        "namespace {namespace:?} is over base model {}, this replica serves {}",
                        &ns.base_model[..12.min(ns.base_model.len())],
                        &self.base.hash[..12]
                    )));
                }
                self.follow(namespace).await.map_err(|e| status(&e))?;
                self.served
                    .read()
                    .expect("served")
                    .get(namespace)
                    .cloned()
                    .ok_or_else(|| Status::internal("not served"))?
            }
        };
        // The world's text separates punctuation by spaces; answers follow "A :".
        let text = prompt.replace('?', " ?");
        let mut text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        if !text.starts_with("<bos>") {
            text = format!("<bos> {text}");
        }
        let ids = self.base.encode(&text).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let unk = self.base.token_id("<unk>").map_err(|e| Status::internal(e.to_string()))?;
        if ids.contains(&unk) {
            return Err(Status::invalid_argument("the prompt has words outside the model's vocabulary"));
        }
        let eos = self.base.token_id("<eos>").map_err(|e| Status::internal(e.to_string()))?;
        let max = if max_tokens == 0 { 16 } else { max_tokens } as usize;
        let (model, base) = (served.model.clone(), self.base.clone());
        let out = blocking(move || {
            let out = model.generate_greedy(&ids, max, eos, None)?;
            Ok((base.decode(&out)?, out.len()))
        })
        .await
        .map_err(|e| status(&e))?;
        let text = out.0.trim_end_matches("<eos>").trim().to_string();
        Ok(GenerateResponse {
            text,
            version: served.version.map(|v| v.to_string()).unwrap_or_default(),
            tokens: out.1 as u32,
        })
    }

    pub fn status(&self) -> ReplicaStatus {
        let serving = self
            .served
            .read()
            .expect("served")
            .iter()
            .map(|(ns, s)| (ns.clone(), s.version.as_ref().map(|v| v.to_string()).unwrap_or_default()))
            .collect::<HashMap<_, _>>();
        let mut serving: std::collections::HashMap<String, String> = serving;
        for ns in self.stale.lock().expect("stale").keys() {
            serving.insert(ns.clone(), "stale".into());
        }
        let cache = self.cache.lock().expect("cache");
        ReplicaStatus {
            id: self.cfg.id.clone(),
            ready: self.ready.load(std::sync::atomic::Ordering::SeqCst),
            serving,
            staged: Vec::new(),
            cached: cache.order.iter().map(|v| v.to_string()).collect(),
        }
    }

    /// Registers with the coordinator and keeps the lease alive; registers again when it lapsed.
    /// With several coordinator addresses (comma-separated), tries the next one whenever one fails or refuses.
    async fn membership(self: Arc<Self>, address: String) {
        let addresses: Vec<String> = address.split(',').map(|a| a.trim().to_string()).collect();
        let mut i = 0;
        let mut client: Option<MembershipClient<tonic::transport::Channel>> = None;
        let mut lease: Option<(u64, u32)> = None;
        loop {
            let address = &addresses[i % addresses.len()];
            let wait = match self.membership_step(address, &mut client, &mut lease).await {
                Ok(()) => lease.map_or(1000, |(_, ttl)| (ttl / 3).max(100)) as u64,
                Err(e) => {
                    tracing::debug!(replica = %self.cfg.id, "coordinator: {e:#}");
                    lease = None;
                    client = None;
                    i += 1;
                    if addresses.len() > 1 {
                        100
                    } else {
                        500
                    }
                }
            };
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
    }

    async fn membership_step(
        &self,
        address: &str,
        client: &mut Option<MembershipClient<tonic::transport::Channel>>,
        lease: &mut Option<(u64, u32)>,
    ) -> Result<()> {
        if client.is_none() {
            *client = Some(MembershipClient::connect(address.to_string()).await?);
        }
        let c = client.as_mut().expect("connected");
        match lease {
            Some((id, _)) => {
                let r = c.heartbeat(HeartbeatRequest { member: self.cfg.id.clone(), lease_id: *id }).await;
                if let Err(s) = r {
                    bail!("heartbeat: {s}");
                }
            }
            None => {
                let namespaces = self.served.read().expect("served").keys().cloned().collect();
                let l = c
                    .register_replica(RegisterReplicaRequest {
                        id: self.cfg.id.clone(),
                        address: self.cfg.advertise.clone(),
                        namespaces,
                        transports: self.transports(),
                    })
                    .await?
                    .into_inner();
                *lease = Some((l.lease_id, l.ttl_ms));
            }
        }
        Ok(())
    }
}

impl Replica {
    /// What this replica accepts deltas over, as it registers.
    fn transports(&self) -> Vec<String> {
        let mut t = vec![engram_transport::STREAM.to_string(), engram_transport::RELAY.to_string()];
        if self.collective.is_some() {
            t.push(engram_transport::collective::NCCL.to_string());
        }
        t
    }

    async fn stage_collective(&self, r: engram_proto::v1::StageCollectiveRequest) -> Result<StageAck, Status> {
        let Some(collective) = self.collective.clone() else {
            return Err(Status::failed_precondition("this replica stages no collective broadcasts (no NCCL here)"));
        };
        let coordinators = self.cfg.coordinator.iter().flat_map(|c| c.split(',')).map(str::to_string).collect();
        let meet = engram_transport::collective::GrpcMeet { coordinators };
        let received = engram_transport::collective::receive(&r, collective, &meet).await?;
        self.prepare_staged(received).await
    }
}

/// The Replica gRPC service over a [`Replica`].
pub struct Service(pub Arc<Replica>);

#[tonic::async_trait]
impl replica_server::Replica for Service {
    async fn stage(&self, request: Request<Streaming<StageChunk>>) -> Result<Response<StageAck>, Status> {
        self.0.stage_chunks(request.into_inner()).await.map(Response::new)
    }

    async fn stage_collective(
        &self,
        request: Request<engram_proto::v1::StageCollectiveRequest>,
    ) -> Result<Response<StageAck>, Status> {
        self.0.stage_collective(request.into_inner()).await.map(Response::new)
    }

    async fn stage_progress(
        &self,
        request: Request<engram_proto::v1::StageProgressRequest>,
    ) -> Result<Response<StageAck>, Status> {
        let r = request.into_inner();
        let received = self.0.partials.progress(&r.namespace, &r.version);
        Ok(Response::new(StageAck { version: r.version, received, ..Default::default() }))
    }

    async fn commit(&self, request: Request<CommitRequest>) -> Result<Response<CommitAck>, Status> {
        let r = request.into_inner();
        let ns = self.0.store.namespace(&r.namespace).await.map_err(|e| status(&e.into()))?;
        let want = if r.version.is_empty() {
            None
        } else {
            Some(VersionId::parse(&r.version).map_err(|e| status(&e.into()))?)
        };
        // The store is the truth: a commit flips to the head the store names, and only forward.
        if ns.head != want {
            return Err(Status::failed_precondition(format!(
                "commit of {} but the head of {:?} is {}",
                engram_lineage::ops::show(&want),
                r.namespace,
                engram_lineage::ops::show(&ns.head)
            )));
        }
        if !self.0.served.read().expect("served").contains_key(&r.namespace) {
            self.0.follow(&r.namespace).await.map_err(|e| status(&e))?;
        }
        self.0.flip(&r.namespace, want.as_ref(), ns.seq).await.map_err(|e| status(&e))?;
        Ok(Response::new(CommitAck { namespace: r.namespace, version: r.version }))
    }

    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<GenerateResponse>, Status> {
        let r = request.into_inner();
        self.0.generate(&r.namespace, &r.prompt, r.max_tokens).await.map(Response::new)
    }

    async fn status(&self, _request: Request<StatusRequest>) -> Result<Response<ReplicaStatus>, Status> {
        Ok(Response::new(self.0.status()))
    }
}

/// Serves the Replica service (with health and reflection) on `listener` until `shutdown` resolves.
pub async fn serve(
    replica: Arc<Replica>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<replica_server::ReplicaServer<Service>>().await;
    let svc = replica_server::ReplicaServer::new(Service(replica))
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    engram_transport::server()
        .add_service(health_service)
        .add_service(engram_proto::reflection()?)
        .add_service(svc)
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}
