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

/// The connection broke under a call (the server died or closed it): tonic reports `Cancelled` with the transport
/// error as its source. Whether the server acted on the call is unknown, so only reads may repeat it.
fn connection_lost(s: &tonic::Status) -> bool {
    s.code() == Code::Cancelled
        && std::error::Error::source(s).is_some_and(|e| e.downcast_ref::<tonic::transport::Error>().is_some())
}

/// A client of the coordinator (or of several: the one that leads answers, the others redirect by refusing).
#[derive(Clone)]
pub struct Client {
    endpoints: Vec<CoordinatorClient<Channel>>,
    /// The endpoint that answered last.
    current: std::sync::Arc<AtomicUsize>,
    actor: String,
}

impl Client {
    /// Connects to `address` (`http://host:port`, or several separated by commas for coordinators in high
    /// availability). One address: retries for up to [`CONNECT_PATIENCE`] while the coordinator starts. Several:
    /// connects lazily, and each call goes to the one that answers as leader.
    pub async fn connect(address: &str) -> Result<Self> {
        let addresses: Vec<&str> = address.split(',').map(str::trim).filter(|a| !a.is_empty()).collect();
        let endpoints = match addresses.as_slice() {
            [] => bail!("no coordinator address"),
            [one] => vec![CoordinatorClient::new(channel(one).await?)],
            many => many
                .iter()
                .map(|a| {
                    let e = Endpoint::from_shared(a.to_string()).with_context(|| format!("{a:?} is not a URL"))?;
                    Ok(CoordinatorClient::new(
                        e.connect_timeout(Duration::from_secs(2)).tcp_nodelay(true).connect_lazy(),
                    ))
                })
                .collect::<Result<Vec<_>>>()?,
        };
        Ok(Self { endpoints, current: Default::default(), actor: "sdk".into() })
    }

    /// Runs `f` on the coordinator that answered last; on an unavailable one (down, or a follower), on the next.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, tonic::Status>
    where
        F: Fn(CoordinatorClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let n = self.endpoints.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = None;
        for k in 0..n {
            let i = (start + k) % n;
            match f(self.endpoints[i].clone()).await {
                Ok(r) => {
                    self.current.store(i, Ordering::Relaxed);
                    return Ok(r.into_inner());
                }
                Err(s) if transient(&s) => last = Some(s),
                Err(s) => return Err(s),
            }
        }
        Err(last.expect("at least one endpoint"))
    }

    /// Names who acts in the lineage's history (default `sdk`).
    pub fn with_actor(mut self, actor: &str) -> Self {
        self.actor = actor.to_string();
        self
    }

    /// The generated client of the coordinator that answered last.
    pub fn raw(&self) -> CoordinatorClient<Channel> {
        self.endpoints[self.current.load(Ordering::Relaxed) % self.endpoints.len()].clone()
    }

    pub async fn create_namespace(&self, name: &str, base_model: &str) -> Result<Namespace, tonic::Status> {
        let r =
            pb::CreateNamespaceRequest { name: name.into(), base_model: base_model.into(), actor: self.actor.clone() };
        self.call(|mut c| {
            let r = r.clone();
            async move { c.create_namespace(r).await }
        })
        .await
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
            let attempt = self.call(|mut c| {
                let r = r.clone();
                async move { c.consolidate(r).await }
            });
            match attempt.await {
                Ok(j) => return Ok(j),
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
        let id = id.to_string();
        self.call(|mut c| {
            let r = pb::GetJobRequest { id: id.clone() };
            async move { c.get_job(r).await }
        })
        .await
    }

    /// Follows a job until it is final (live, rejected or failed) and returns it; `on_change` sees every state.
    /// Rides out a coordinator restart: a broken stream or an unavailable coordinator is retried for up to
    /// [`WATCH_PATIENCE`].
    pub async fn watch(&self, id: &str, mut on_change: impl FnMut(&Job)) -> Result<Job> {
        use futures::StreamExt;
        let mut since_ok = std::time::Instant::now();
        loop {
            let i = self.current.load(Ordering::Relaxed) % self.endpoints.len();
            let opened = self.endpoints[i].clone().watch_job(pb::GetJobRequest { id: id.into() }).await;
            if matches!(&opened, Err(s) if transient(s)) {
                // Down or a follower: the next call goes to the next coordinator.
                self.current.store((i + 1) % self.endpoints.len(), Ordering::Relaxed);
            }
            match opened {
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
        self.call(|mut c| {
            let r = r.clone();
            async move { c.rollback(r).await }
        })
        .await
    }

    pub async fn versions(&self, namespace: &str, limit: u32) -> Result<pb::ListVersionsResponse, tonic::Status> {
        let r = pb::ListVersionsRequest { namespace: namespace.into(), limit };
        self.call(|mut c| {
            let r = r.clone();
            async move { c.list_versions(r).await }
        })
        .await
    }

    pub async fn replicas(&self, namespace: &str) -> Result<Vec<pb::ReplicaInfo>, tonic::Status> {
        let r = pb::ListReplicasRequest { namespace: namespace.into() };
        let out = self.call(|mut c| {
            let r = r.clone();
            async move { c.list_replicas(r).await }
        });
        Ok(out.await?.replicas)
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
                // A replica that dies mid-request surfaces as `Cancelled` from the transport; generation is a read,
                // so the next replica may answer it.
                Err(s) if transient(&s) || connection_lost(&s) => last = Some(s),
                Err(s) => return Err(s),
            }
        }
        Err(last.unwrap_or_else(|| tonic::Status::unavailable("no replica answered")))
    }
}
