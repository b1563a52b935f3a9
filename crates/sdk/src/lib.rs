//! Engram's client SDK.
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! let client = engram_sdk::Client::connect("http://127.0.0.1:7300").await?;
//! let job = client.consolidate("tenant-a", vec!["<doc> ... </doc>".into()], "request-1").await?;
//! let done = client.wait(&job.id).await?;
//! let replicas = engram_sdk::Replicas::connect(&["http://127.0.0.1:7310".to_string()]).await?;
//! let answer = replicas.generate("tenant-a", "Q : where does X work ? A :", 8).await?;
//! println!("{} (version {})", answer.text, answer.version);
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
pub use engram_proto::v1 as pb;
use pb::coordinator_client::CoordinatorClient;
use pb::replica_client::ReplicaClient;
pub use pb::{GenerateResponse, Job, JobState, Namespace, Version};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

/// How long `connect` keeps retrying a server that is not up yet.
pub const CONNECT_PATIENCE: Duration = Duration::from_secs(20);
/// How long `watch` waits for an unreachable coordinator to come back.
pub const WATCH_PATIENCE: Duration = Duration::from_secs(60);

async fn channel(address: &str) -> Result<Channel> {
    let endpoint = Endpoint::from_shared(address.to_string())
        .with_context(|| format!("{address:?} is not a URL like http://host:port"))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true);
    let start = std::time::Instant::now();
    let mut wait = Duration::from_millis(50);
    loop {
        match endpoint.connect().await {
            Ok(c) => return Ok(c),
            Err(e) if start.elapsed() < CONNECT_PATIENCE => {
                let _ = e;
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(1));
            }
            Err(e) => return Err(e).with_context(|| format!("connecting to {address}")),
        }
    }
}

/// Transient failures worth another try: the server is restarting or overloaded.
fn transient(s: &tonic::Status) -> bool {
    matches!(s.code(), Code::Unavailable | Code::ResourceExhausted | Code::Unknown)
}

/// A client of the coordinator.
#[derive(Clone)]
pub struct Client {
    inner: CoordinatorClient<Channel>,
    actor: String,
}

impl Client {
    /// Connects, retrying for up to [`CONNECT_PATIENCE`] while the coordinator starts.
    pub async fn connect(address: &str) -> Result<Self> {
        Ok(Self { inner: CoordinatorClient::new(channel(address).await?), actor: "sdk".into() })
    }

    /// Names who acts in the lineage's history (default `sdk`).
    pub fn with_actor(mut self, actor: &str) -> Self {
        self.actor = actor.to_string();
        self
    }

    pub fn raw(&self) -> CoordinatorClient<Channel> {
        self.inner.clone()
    }

    pub async fn create_namespace(&self, name: &str, base_model: &str) -> Result<Namespace, tonic::Status> {
        let r =
            pb::CreateNamespaceRequest { name: name.into(), base_model: base_model.into(), actor: self.actor.clone() };
        Ok(self.inner.clone().create_namespace(r).await?.into_inner())
    }

    /// Submits documents; retries transient failures with the same idempotency key, so the job exists once.
    pub async fn consolidate(
        &self,
        namespace: &str,
        documents: Vec<String>,
        idempotency_key: &str,
    ) -> Result<Job, tonic::Status> {
        self.consolidate_with(namespace, documents, idempotency_key, pb::ConsolidateOptions::default()).await
    }

    pub async fn consolidate_with(
        &self,
        namespace: &str,
        documents: Vec<String>,
        idempotency_key: &str,
        options: pb::ConsolidateOptions,
    ) -> Result<Job, tonic::Status> {
        let r = pb::ConsolidateRequest {
            namespace: namespace.into(),
            documents: documents.into_iter().map(String::into_bytes).collect(),
            idempotency_key: idempotency_key.into(),
            options: Some(options),
            actor: self.actor.clone(),
        };
        let mut tries = 0;
        loop {
            match self.inner.clone().consolidate(r.clone()).await {
                Ok(j) => return Ok(j.into_inner()),
                // Up to ~15 s in all: long enough for a coordinator to restart.
                Err(s) if transient(&s) && tries < 8 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis((100 << tries).min(3000))).await;
                }
                Err(s) => return Err(s),
            }
        }
    }

    pub async fn job(&self, id: &str) -> Result<Job, tonic::Status> {
        Ok(self.inner.clone().get_job(pb::GetJobRequest { id: id.into() }).await?.into_inner())
    }

    /// Follows a job until it is final (live, rejected or failed) and returns it; `on_change` sees every state.
    /// Rides out a coordinator restart: a broken stream or an unavailable coordinator is retried for up to
    /// [`WATCH_PATIENCE`].
    pub async fn watch(&self, id: &str, mut on_change: impl FnMut(&Job)) -> Result<Job> {
        use futures::StreamExt;
        let mut since_ok = std::time::Instant::now();
        loop {
            match self.inner.clone().watch_job(pb::GetJobRequest { id: id.into() }).await {
                Ok(stream) => {
                    let mut stream = stream.into_inner();
                    while let Some(item) = stream.next().await {
                        match item {
                            Ok(j) => {
                                since_ok = std::time::Instant::now();
                                on_change(&j);
                                if is_final(&j) {
                                    return Ok(j);
                                }
                            }
                            Err(s) if transient(&s) => break,
                            Err(s) => return Err(s.into()),
                        }
                    }
                }
                Err(s) if transient(&s) => {}
                Err(s) => return Err(s.into()),
            }
            if since_ok.elapsed() > WATCH_PATIENCE {
                bail!("lost the coordinator for over {WATCH_PATIENCE:?} while watching job {id}");
            }
            // The stream ended early (the coordinator restarted): look again shortly.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// [`Client::watch`] without a callback.
    pub async fn wait(&self, id: &str) -> Result<Job> {
        self.watch(id, |_| {}).await
    }

    /// Moves the head back to `to` (a version id, prefix or tag; empty: the bare base model).
    pub async fn rollback(&self, namespace: &str, to: &str, reason: &str) -> Result<Namespace, tonic::Status> {
        let r = pb::RollbackRequest {
            namespace: namespace.into(),
            to: to.into(),
            reason: reason.into(),
            actor: self.actor.clone(),
        };
        Ok(self.inner.clone().rollback(r).await?.into_inner())
    }

    pub async fn versions(&self, namespace: &str, limit: u32) -> Result<pb::ListVersionsResponse, tonic::Status> {
        Ok(self
            .inner
            .clone()
            .list_versions(pb::ListVersionsRequest { namespace: namespace.into(), limit })
            .await?
            .into_inner())
    }

    pub async fn replicas(&self, namespace: &str) -> Result<Vec<pb::ReplicaInfo>, tonic::Status> {
        let r = pb::ListReplicasRequest { namespace: namespace.into() };
        Ok(self.inner.clone().list_replicas(r).await?.into_inner().replicas)
    }
}

pub fn is_final(j: &Job) -> bool {
    matches!(j.state(), JobState::Live | JobState::Rejected | JobState::Failed)
}

/// Generation over a set of replicas: round-robin, and a replica that is down or catching up is skipped.
pub struct Replicas {
    clients: Vec<ReplicaClient<Channel>>,
    next: AtomicUsize,
}

impl Replicas {
    pub async fn connect(addresses: &[String]) -> Result<Self> {
        if addresses.is_empty() {
            bail!("no replica addresses");
        }
        let mut clients = Vec::new();
        for a in addresses {
            clients.push(ReplicaClient::new(channel(a).await?));
        }
        Ok(Self { clients, next: AtomicUsize::new(0) })
    }

    /// Greedy generation from the namespace's head; the response names the version that produced it.
    pub async fn generate(
        &self,
        namespace: &str,
        prompt: &str,
        max_tokens: u32,
    ) -> Result<GenerateResponse, tonic::Status> {
        let r = pb::GenerateRequest { namespace: namespace.into(), prompt: prompt.into(), max_tokens };
        let n = self.clients.len();
        let mut last = None;
        for _ in 0..2 * n {
            let i = self.next.fetch_add(1, Ordering::Relaxed) % n;
            match self.clients[i].clone().generate(r.clone()).await {
                Ok(a) => return Ok(a.into_inner()),
                Err(s) if transient(&s) => last = Some(s),
                Err(s) => return Err(s),
            }
        }
        Err(last.unwrap_or_else(|| tonic::Status::unavailable("no replica answered")))
    }
}
