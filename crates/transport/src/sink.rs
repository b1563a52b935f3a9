//! A replica that only stages: it receives, verifies and relays deltas like a serving replica and keeps nothing but
//! their hashes. `engram bench broadcast` runs these as its replicas (the tiny shipped model's deltas are ~1 MB; the
//! bench sends hundreds of MB), and the relay tests run them in-process.

use std::sync::{Arc, Mutex};

use engram_proto::v1::replica_server::{Replica, ReplicaServer};
use engram_proto::v1::{
    CommitAck, CommitRequest, GenerateRequest, GenerateResponse, ReplicaStatus, StageAck, StageChunk,
    StageCollectiveRequest, StageProgressRequest, StatusRequest,
};
use tonic::{Request, Response, Status, Streaming};

use crate::collective::{Collective, Meet};
use crate::relay::{receive, Connect, Partials};

/// What a sink staged: (version, the hash it checked the bytes against, as `Received::checked`), in order.
pub type Staged = Arc<Mutex<Vec<(String, String)>>>;

#[derive(Clone)]
pub struct Sink {
    pub staged: Staged,
    /// Stage calls received, failed ones included.
    pub attempts: Arc<std::sync::atomic::AtomicUsize>,
    /// For each delta staged, the byte its final stream started at (> 0: a resumed stream).
    pub resumed_from: Arc<Mutex<Vec<u64>>>,
    /// For each delta staged, how many replicas it relayed to (its subtree).
    pub relayed_to: Arc<Mutex<Vec<usize>>>,
    partials: Partials,
    connect: Connect,
    /// Staging over a collective besides streams: the data plane and where its groups meet.
    collective: Option<(Arc<dyn Collective>, Arc<dyn Meet>)>,
    /// For each delta staged, how it arrived: "stream" or "collective".
    pub arrived_by: Arc<Mutex<Vec<&'static str>>>,
    /// The codes of the collective stagings it refused.
    pub refused: Arc<Mutex<Vec<tonic::Code>>>,
}

impl Sink {
    pub fn new(connect: Connect) -> Self {
        Self {
            staged: Arc::default(),
            attempts: Arc::default(),
            resumed_from: Arc::default(),
            relayed_to: Arc::default(),
            partials: Partials::default(),
            connect,
            collective: None,
            arrived_by: Arc::default(),
            refused: Arc::default(),
        }
    }

    /// Also stages over `collective`, fetching group ids from `meet`.
    pub fn with_collective(mut self, collective: Arc<dyn Collective>, meet: Arc<dyn Meet>) -> Self {
        self.collective = Some((collective, meet));
        self
    }

    fn record(&self, received: &crate::Received, by: &'static str) {
        self.resumed_from.lock().expect("resumed").push(received.resumed_from);
        self.staged.lock().expect("staged").push((received.version.clone(), received.checked.clone()));
        self.arrived_by.lock().expect("arrived by").push(by);
    }

    pub fn server(self) -> ReplicaServer<Self> {
        ReplicaServer::new(self).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20)
    }
}

#[tonic::async_trait]
impl Replica for Sink {
    async fn stage(&self, request: Request<Streaming<StageChunk>>) -> Result<Response<StageAck>, Status> {
        self.attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut stream = request.into_inner();
        let (received, relay) = receive(&mut stream, self.connect.clone(), &self.partials).await?;
        self.relayed_to.lock().expect("relayed").push(relay.subtree_len());
        self.record(&received, "stream");
        let downstream = relay.finish().await;
        Ok(Response::new(StageAck {
            version: received.version,
            received: received.bytes.len() as u64,
            ready: true,
            downstream,
            error: String::new(),
        }))
    }

    async fn stage_collective(&self, request: Request<StageCollectiveRequest>) -> Result<Response<StageAck>, Status> {
        self.attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let Some((collective, meet)) = self.collective.clone() else {
            return Err(Status::failed_precondition("this sink stages no collective broadcasts"));
        };
        let received = crate::collective::receive(&request.into_inner(), collective, meet.as_ref())
            .await
            .inspect_err(|s| self.refused.lock().expect("refused").push(s.code()))?;
        self.record(&received, "collective");
        Ok(Response::new(StageAck {
            version: received.version,
            received: received.bytes.len() as u64,
            ready: true,
            ..Default::default()
        }))
    }

    async fn stage_progress(&self, request: Request<StageProgressRequest>) -> Result<Response<StageAck>, Status> {
        let r = request.into_inner();
        let received = self.partials.progress(&r.namespace, &r.version);
        Ok(Response::new(StageAck { version: r.version, received, ..Default::default() }))
    }

    async fn commit(&self, _: Request<CommitRequest>) -> Result<Response<CommitAck>, Status> {
        Err(Status::unimplemented("a staging sink serves nothing"))
    }

    async fn generate(&self, _: Request<GenerateRequest>) -> Result<Response<GenerateResponse>, Status> {
        Err(Status::unimplemented("a staging sink serves nothing"))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<ReplicaStatus>, Status> {
        Ok(Response::new(ReplicaStatus::default()))
    }
}
