//! How a version's delta reaches the serving replicas.
//!
//! Staging is two-phase whatever the transport: a [`Broadcaster`] stages the delta on every replica (each prepares
//! the new weights beside the served ones), then the coordinator moves the head with one compare-and-swap and the
//! replicas switch. [`GrpcStream`] streams the delta to each replica in checksummed chunks; the receiving side
//! verifies them with an [`Assembler`]. A replica that joined late or missed a version fetches what it lacks from the
//! blob store ([`pull`]).
#![forbid(unsafe_code)]

pub mod buffers;
pub mod collective;
pub mod lane;
pub mod pull;
pub mod relay;
pub mod rendezvous;
pub mod sink;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use async_trait::async_trait;
use bytes::Bytes;
use engram_proto::v1::{replica_client::ReplicaClient, StageAck, StageChunk, WholeHash};
use sha2::{Digest, Sha256};
use tonic::transport::{Channel, Endpoint};

/// Default chunk size: small enough that a receiver checks and relays one chunk while the next is on the wire (HTTP/2
/// buffers about 1 MiB per stream on the sending side), large enough that per-message overhead stays small. One
/// replica on loopback, 256 MB (`engram bench broadcast`, 2 cores, medians of 5): 256 KiB chunks 0.07 s, 1 MiB 0.10 s,
/// 4 MiB 0.12 s, against 0.07 s for a raw TCP copy.
pub const CHUNK_BYTES: usize = 256 << 10;

/// One version to stage.
#[derive(Debug, Clone)]
pub struct Staging {
    pub namespace: String,
    pub version: String,
    /// The version's ancestors, nearest first (empty: its parent is the bare base model).
    pub chain: Vec<String>,
    pub bytes: Bytes,
    /// SHA-256 (hex) of `bytes`.
    pub hash: String,
    /// BLAKE3 (hex) of `bytes` where it is known already (recorded with the version when its delta was made); else
    /// the sender hashes the chunks as it sends them.
    pub blake3: Option<String>,
}

/// A replica to stage on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub id: String,
    /// `http://host:port` of its Replica service.
    pub address: String,
    /// What it accepts for staging, as it registered: [`STREAM`], [`RELAY`] (empty: a stream only).
    pub transports: Vec<String>,
}

/// A replica takes a staged delta as one stream of chunks.
pub const STREAM: &str = "grpc-stream";
/// A replica also relays the chunks to the replicas named in the first one (pipelined broadcast).
pub const RELAY: &str = "grpc-relay";

impl Target {
    pub fn relays(&self) -> bool {
        self.transports.iter().any(|t| t == RELAY)
    }
}

#[async_trait]
pub trait Broadcaster: Send + Sync {
    fn name(&self) -> &'static str;
    /// Stages `item` on every target within `timeout`; one outcome per target, in order.
    async fn stage(&self, targets: &[Target], item: &Staging, timeout: Duration) -> Vec<Result<StageAck>>;
}

#[cfg(test)]
fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// What a receiver records as the hash it checked a whole delta against, for the bytes `bytes` sent by this crate's
/// senders (tests compare it with what replicas staged).
pub fn checked_hash(bytes: &[u8]) -> String {
    format!("blake3:{}", engram_lineage::blob::transfer_hash(bytes))
}

/// The chunks of `item`, each with its CRC-32; the last carries the whole delta's BLAKE3 and SHA-256 and its size.
/// Lazy: each chunk is checksummed (and the whole hashed) as it is taken, so the sender hashes while the first chunks
/// are already on their way.
pub fn chunks(item: &Staging, chunk_bytes: usize) -> Chunks {
    let chunk_bytes = chunk_bytes.max(1);
    let whole = if item.blake3.is_some() { None } else { Some(blake3::Hasher::new()) };
    Chunks { item: item.clone(), chunk_bytes, next: 0, n: item.bytes.len().div_ceil(chunk_bytes).max(1), whole }
}

/// The iterator [`chunks`] returns.
pub struct Chunks {
    item: Staging,
    chunk_bytes: usize,
    next: usize,
    n: usize,
    /// None: the item's BLAKE3 is known.
    whole: Option<blake3::Hasher>,
}

impl Iterator for Chunks {
    type Item = StageChunk;

    fn next(&mut self) -> Option<StageChunk> {
        let (i, item) = (self.next, &self.item);
        if i >= self.n {
            return None;
        }
        self.next += 1;
        let total = item.bytes.len();
        let (lo, hi) = (i * self.chunk_bytes, ((i + 1) * self.chunk_bytes).min(total));
        let data = item.bytes.slice(lo..hi);
        if let Some(h) = &mut self.whole {
            h.update(&data);
        }
        let last = i + 1 == self.n;
        let blake3 = || match (&item.blake3, &self.whole) {
            (Some(known), _) => known.clone(),
            (None, Some(h)) => h.finalize().to_hex().to_string(),
            (None, None) => unreachable!("one of the two is set"),
        };
        Some(StageChunk {
            namespace: item.namespace.clone(),
            version: item.version.clone(),
            // The chain travels once, with the first chunk.
            chain: if i == 0 { item.chain.clone() } else { Vec::new() },
            offset: lo as u64,
            chunk_crc32: crc32fast::hash(&data),
            data,
            last,
            delta_sha256: if last { item.hash.clone() } else { String::new() },
            delta_blake3: if last { blake3() } else { String::new() },
            whole_hash: WholeHash::Blake3 as i32,
            // On every chunk: the receiver sizes its buffer once from the first.
            total_bytes: total as u64,
            ..Default::default()
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.n - self.next;
        (left, Some(left))
    }
}

/// Receives one version's chunks in order and checks every one of them (CRC-32) and the whole (BLAKE3, or SHA-256
/// from an older sender: hashed as the chunks arrive, no second pass over the delta).
#[derive(Default)]
pub struct Assembler {
    namespace: String,
    version: String,
    chain: Vec<String>,
    kind: WholeHash,
    buf: buffers::Buffer,
    whole: Option<Hasher>,
    done: bool,
}

/// One hash function over the whole delta.
enum Algorithm {
    Sha256(Sha256),
    Blake3(Box<blake3::Hasher>),
}

impl Algorithm {
    fn new(kind: WholeHash) -> Self {
        match kind {
            WholeHash::Sha256 => Self::Sha256(Sha256::new()),
            WholeHash::Blake3 => Self::Blake3(Box::default()),
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            Self::Sha256(h) => h.update(bytes),
            Self::Blake3(h) => {
                h.update(bytes);
            }
        }
    }

    fn finish(self) -> String {
        match self {
            Self::Sha256(h) => hex::encode(h.finalize()),
            Self::Blake3(h) => h.finalize().to_hex().to_string(),
        }
    }
}

/// The whole delta's hash over a stream of chunks: on a thread of its own where there are cores to spare (1.7x
/// faster staging on 16 cores with SHA-256), inline on a machine of two or fewer (where the extra thread only adds
/// contention).
enum Hasher {
    Inline(Algorithm),
    Thread { tx: std::sync::mpsc::Sender<Bytes>, thread: std::thread::JoinHandle<String> },
}

impl Hasher {
    fn start(kind: WholeHash) -> Self {
        let mut h = Algorithm::new(kind);
        if std::thread::available_parallelism().map_or(1, |n| n.get()) <= 2 {
            return Self::Inline(h);
        }
        let (tx, rx) = std::sync::mpsc::channel::<Bytes>();
        let thread = std::thread::spawn(move || {
            for chunk in rx {
                h.update(&chunk);
            }
            h.finish()
        });
        Self::Thread { tx, thread }
    }

    fn update(&mut self, chunk: &Bytes) {
        match self {
            Self::Inline(h) => h.update(chunk),
            Self::Thread { tx, .. } => {
                let _ = tx.send(chunk.clone());
            }
        }
    }

    fn finish(self) -> String {
        match self {
            Self::Inline(h) => h.finish(),
            Self::Thread { tx, thread } => {
                drop(tx);
                thread.join().unwrap_or_default()
            }
        }
    }
}

/// A fully received, verified delta.
#[derive(Debug)]
pub struct Received {
    pub namespace: String,
    pub version: String,
    pub chain: Vec<String>,
    pub bytes: buffers::Buffer,
    /// The SHA-256 (hex) that names `bytes`. From a sender that checks with BLAKE3 it is the one the sender verified
    /// when it read the delta from the blob store, and the BLAKE3 checked here ties it to these bytes; from an older
    /// sender it was computed here.
    pub hash: String,
    /// The hash the whole was checked against here, `blake3:<hex>` or `sha256:<hex>`.
    pub checked: String,
    /// Where the stream that completed it started (> 0: it resumed a broken one).
    pub resumed_from: u64,
}

impl Assembler {
    /// Bytes received intact so far.
    pub fn received(&self) -> u64 {
        self.buf.len() as u64
    }

    /// Takes the next chunk; returns the delta when it was the last. A corrupt chunk or whole is `DataLoss` (sending
    /// again may fix it); a malformed stream `InvalidArgument`.
    pub fn push(&mut self, c: &StageChunk) -> std::result::Result<Option<Received>, tonic::Status> {
        let invalid = |m: String| tonic::Status::invalid_argument(m);
        let corrupt = |m: String| tonic::Status::data_loss(m);
        if self.done {
            return Err(invalid("chunk after the last one".into()));
        }
        if self.buf.is_empty() && self.version.is_empty() {
            if c.version.is_empty() || c.namespace.is_empty() {
                return Err(invalid("the first chunk must name the namespace and version".into()));
            }
            self.namespace = c.namespace.clone();
            self.version = c.version.clone();
            self.chain = c.chain.clone();
            self.kind = c.whole_hash();
            // One buffer for the whole delta (no regrowth copies), within reason for a claimed size.
            self.buf = buffers::Buffer::with_capacity((c.total_bytes as usize).min(64 << 30));
        } else if c.version != self.version || c.namespace != self.namespace {
            let (ns, v) = (&self.namespace, &self.version);
            return Err(invalid(format!("chunk for {}/{} in a stream of {ns}/{v}", c.namespace, c.version)));
        } else if c.whole_hash() != self.kind {
            return Err(invalid(format!("chunk at offset {} names another whole-delta hash than the first", c.offset)));
        }
        if c.offset != self.buf.len() as u64 {
            return Err(invalid(format!("chunk at offset {} but {} bytes received so far", c.offset, self.buf.len())));
        }
        let actual = crc32fast::hash(&c.data);
        if actual != c.chunk_crc32 {
            let sender = c.chunk_crc32;
            return Err(corrupt(format!(
                "chunk at offset {} is corrupt: its CRC-32 is {actual:08x}, the sender's {sender:08x}",
                c.offset
            )));
        }
        let kind = self.kind;
        self.whole.get_or_insert_with(|| Hasher::start(kind)).update(&c.data);
        self.buf.extend_from_slice(&c.data);
        if !c.last {
            return Ok(None);
        }
        self.done = true;
        if c.total_bytes != self.buf.len() as u64 {
            return Err(invalid(format!("the delta is {} bytes, {} arrived", c.total_bytes, self.buf.len())));
        }
        let whole = self.whole.take().unwrap_or_else(|| Hasher::start(self.kind)).finish();
        let (name, tag, sender) = match self.kind {
            WholeHash::Blake3 => ("BLAKE3", "blake3", &c.delta_blake3),
            WholeHash::Sha256 => ("SHA-256", "sha256", &c.delta_sha256),
        };
        if &whole != sender {
            return Err(corrupt(format!("the delta's {name} is {whole}, the sender's {sender}")));
        }
        Ok(Some(Received {
            namespace: std::mem::take(&mut self.namespace),
            version: std::mem::take(&mut self.version),
            chain: std::mem::take(&mut self.chain),
            bytes: std::mem::take(&mut self.buf),
            hash: c.delta_sha256.clone(),
            checked: format!("{tag}:{whole}"),
            resumed_from: 0,
        }))
    }
}

/// Streams the delta to every replica at once over gRPC, in checksummed chunks.
#[derive(Clone)]
pub struct GrpcStream {
    chunk_bytes: usize,
    channels: std::sync::Arc<Mutex<HashMap<String, Channel>>>,
}

impl Default for GrpcStream {
    fn default() -> Self {
        Self::new(CHUNK_BYTES)
    }
}

impl GrpcStream {
    pub fn new(chunk_bytes: usize) -> Self {
        Self { chunk_bytes: chunk_bytes.max(1), channels: Default::default() }
    }

    /// A lazily connecting channel per address, reused across stagings.
    pub fn channel(&self, address: &str) -> Result<Channel> {
        let mut map = self.channels.lock().expect("channel map");
        if let Some(c) = map.get(address) {
            return Ok(c.clone());
        }
        let c = Endpoint::from_shared(address.to_string())
            .with_context(|| format!("replica address {address:?}"))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy();
        map.insert(address.to_string(), c.clone());
        Ok(c)
    }

    async fn stage_one(&self, target: &Target, chunks: Vec<StageChunk>) -> Result<StageAck> {
        let mut client = ReplicaClient::new(self.channel(&target.address)?)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let ack = client
            .stage(tokio_stream::iter(chunks))
            .await
            .with_context(|| format!("staging on replica {} at {}", target.id, target.address))?;
        Ok(ack.into_inner())
    }
}

#[async_trait]
impl Broadcaster for GrpcStream {
    fn name(&self) -> &'static str {
        "grpc-stream"
    }

    async fn stage(&self, targets: &[Target], item: &Staging, timeout: Duration) -> Vec<Result<StageAck>> {
        let (me, t, it) = (self.clone(), targets.to_vec(), item.clone());
        from_lane(targets.len(), lane::run(async move { me.stage_here(&t, &it, timeout).await }).await)
    }
}

/// One failure per target when the staging thread could not run a broadcast.
fn from_lane(targets: usize, outcome: Result<Vec<Result<StageAck>>>) -> Vec<Result<StageAck>> {
    outcome.unwrap_or_else(|e| (0..targets).map(|_| Err(anyhow::anyhow!("{e:#}"))).collect())
}

impl GrpcStream {
    /// [`Broadcaster::stage`] on the calling task (the staging thread's).
    async fn stage_here(&self, targets: &[Target], item: &Staging, timeout: Duration) -> Vec<Result<StageAck>> {
        if targets.is_empty() {
            return Vec::new(); // without cutting (and hashing) the delta for nobody
        }
        // Cut once for every target, off the staging thread (other broadcasts share it).
        let (whole, size) = (item.clone(), self.chunk_bytes);
        let chunks: Vec<StageChunk> = match tokio::task::spawn_blocking(move || chunks(&whole, size).collect()).await {
            Ok(c) => c,
            Err(e) => return targets.iter().map(|_| Err(anyhow::anyhow!("cutting the delta: {e}"))).collect(),
        };
        let each = targets.iter().map(|t| {
            let chunks = chunks.clone();
            async move {
                match tokio::time::timeout(timeout, self.stage_one(t, chunks)).await {
                    Ok(r) => r,
                    Err(_) => bail!("replica {} did not stage within {timeout:?}", t.id),
                }
            }
        });
        futures::future::join_all(each).await
    }

    /// This stream's channel cache as a relay's way to open channels.
    pub fn connector(&self) -> relay::Connect {
        let me = self.clone();
        std::sync::Arc::new(move |address: &str| me.channel(address))
    }
}

/// What this process can stage over, for a replica's start-up log: the gRPC relay always; NCCL when built with the
/// `nccl` feature and the CUDA driver, NCCL and a GPU are present (otherwise the reason, and the fallback).
pub fn staging_transports() -> String {
    #[cfg(feature = "nccl")]
    let nccl = match engram_nccl::probe() {
        Ok(rt) => format!("NCCL available ({rt}): replicas that advertise it are staged over it, into a GPU buffer copied to host memory (where this build keeps weights)"),
        Err(e) => format!("{e}; staging falls back to gRPC streaming"),
    };
    #[cfg(not(feature = "nccl"))]
    let nccl = "built without the nccl feature; staging uses gRPC streaming".to_string();
    format!("gRPC relay (chain/tree/direct); {nccl}")
}

/// A gRPC server builder for services that receive staged deltas. HTTP/2's default 64 KiB flow-control window makes
/// a sender wait for a window update every 64 KiB of a 1 MiB chunk; with 8 MiB per stream (16 MiB per connection)
/// a chunk and its successors travel without stalls.
pub fn server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(16 << 20)
        .max_frame_size(1 << 20)
        .tcp_nodelay(true)
}

/// The broadcaster a `--broadcast` value names: `direct`, `chain` or `tree:K`, cutting deltas into `chunk_bytes`.
pub fn broadcaster(spec: &str, chunk_bytes: usize) -> Result<std::sync::Arc<dyn Broadcaster>> {
    Ok(match spec {
        "direct" => std::sync::Arc::new(GrpcStream::new(chunk_bytes)),
        "chain" => std::sync::Arc::new(Pipelined::new(1, chunk_bytes)),
        _ => match spec.strip_prefix("tree:").map(str::parse::<usize>) {
            Some(Ok(k)) if k >= 1 => std::sync::Arc::new(Pipelined::new(k, chunk_bytes)),
            _ => bail!("--broadcast {spec:?}: expected direct, chain or tree:K with K >= 1"),
        },
    })
}

/// Pipelined broadcast ([`relay`]): the sender streams each chunk to `fanout` replicas, and every replica relays it on
/// to its part of the rest as soon as it arrived intact. Fan-out 1 is a chain. Staging stays two-phase: this only
/// changes how the bytes travel.
#[derive(Clone)]
pub struct Pipelined {
    fanout: usize,
    chunk_bytes: usize,
    channels: GrpcStream,
}

impl Pipelined {
    pub fn new(fanout: usize, chunk_bytes: usize) -> Self {
        let chunk_bytes = chunk_bytes.max(1);
        Self { fanout: fanout.max(1), chunk_bytes, channels: GrpcStream::new(chunk_bytes) }
    }
}

#[async_trait]
impl Broadcaster for Pipelined {
    fn name(&self) -> &'static str {
        if self.fanout == 1 {
            "chain"
        } else {
            "tree"
        }
    }

    async fn stage(&self, targets: &[Target], item: &Staging, timeout: Duration) -> Vec<Result<StageAck>> {
        let (me, t, it) = (self.clone(), targets.to_vec(), item.clone());
        from_lane(targets.len(), lane::run(async move { me.stage_here(&t, &it, timeout).await }).await)
    }
}

impl Pipelined {
    async fn stage_here(&self, targets: &[Target], item: &Staging, timeout: Duration) -> Vec<Result<StageAck>> {
        // Only replicas that advertise relaying go into the chain or tree (one that does not, an older version
        // during a rolling upgrade say, would leave its part of the chain without data); the others get their own
        // stream from here.
        let list: Vec<_> = targets
            .iter()
            .filter(|t| t.relays())
            .map(|t| engram_proto::v1::StageTarget { id: t.id.clone(), address: t.address.clone() })
            .collect();
        let direct: Vec<Target> = targets.iter().filter(|t| !t.relays()).cloned().collect();
        let deadline = std::time::Instant::now() + timeout;
        let pipelined = async {
            if list.is_empty() {
                return Vec::new(); // without cutting (and checksumming) the delta for nobody
            }
            let mut relay = relay::Relay::new(&list, self.fanout, Some(deadline), self.channels.connector());
            for c in chunks(item, self.chunk_bytes) {
                relay.forward(c).await;
            }
            relay.finish().await
        };
        let (outcomes, direct_acks) = tokio::join!(pipelined, self.channels.stage_here(&direct, item, timeout));
        let mut direct_acks: HashMap<String, Result<StageAck>> =
            direct.iter().map(|t| t.id.clone()).zip(direct_acks).collect();
        targets
            .iter()
            .map(|t| match outcomes.iter().find(|o| o.id == t.id) {
                _ if !t.relays() => direct_acks.remove(&t.id).unwrap_or_else(|| Err(anyhow::anyhow!("not staged"))),
                Some(o) if o.ok => Ok(StageAck {
                    version: item.version.clone(),
                    received: o.received,
                    ready: true,
                    downstream: Vec::new(),
                    error: String::new(),
                }),
                Some(o) => bail!("replica {}: {}", t.id, o.error),
                None => bail!("no relay reported on replica {}", t.id),
            })
            .collect()
    }
}

/// An error as a gRPC status: the lineage's kinds map to their codes (a refused request stays a refusal, not an
/// internal error); anything else is `Internal`. The message keeps the whole context chain.
pub fn status(e: &anyhow::Error) -> tonic::Status {
    use engram_lineage::Error as L;
    let msg = format!("{e:#}");
    match e.chain().find_map(|c| c.downcast_ref::<L>()) {
        Some(L::NotFound(_)) => tonic::Status::not_found(msg),
        Some(L::AlreadyExists(_)) => tonic::Status::already_exists(msg),
        Some(L::Conflict(_)) => tonic::Status::aborted(msg),
        Some(L::Invalid(_)) => tonic::Status::invalid_argument(msg),
        Some(L::Unavailable(_)) | Some(L::Fenced(_)) => tonic::Status::unavailable(msg),
        Some(L::Corrupt(_)) | None => tonic::Status::internal(msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(bytes: &[u8]) -> Staging {
        Staging {
            namespace: "ns".into(),
            version: "v".into(),
            chain: vec!["p".into()],
            bytes: Bytes::copy_from_slice(bytes),
            hash: sha256(bytes),
            blake3: None,
        }
    }

    #[test]
    fn chunks_reassemble_and_corruption_is_named() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let cs: Vec<_> = chunks(&item(&data), 3000).collect();
        assert_eq!(cs.len(), 4);
        assert!(cs[1].chain.is_empty() && cs[3].last && !cs[2].last);
        let mut a = Assembler::default();
        let mut out = None;
        for c in cs.clone() {
            out = a.push(&c).unwrap();
        }
        let r = out.expect("the last chunk completes the delta");
        assert_eq!((r.bytes.to_vec(), r.chain, r.version.as_str()), (data.clone(), vec!["p".to_string()], "v"));
        assert_eq!((r.hash, r.checked), (sha256(&data), checked_hash(&data)));

        let mut bad = cs.clone();
        let mut flipped = bad[2].data.to_vec();
        flipped[5] ^= 1;
        bad[2].data = flipped.into();
        let mut a = Assembler::default();
        let err = bad.into_iter().map(|c| a.push(&c)).find_map(Result::err).unwrap();
        assert!(err.to_string().contains("offset 6000 is corrupt"), "{err}");

        // Missing chunk: the offset no longer lines up.
        let mut a = Assembler::default();
        a.push(&cs[0]).unwrap();
        assert!(a.push(&cs[2]).unwrap_err().to_string().contains("offset"));
        // A sender that predates BLAKE3: the receiver hashes with SHA-256.
        let mut old = cs.clone();
        for c in &mut old {
            c.whole_hash = WholeHash::Sha256 as i32;
            c.delta_blake3.clear();
        }
        let mut a = Assembler::default();
        let r = old.iter().cloned().map(|c| a.push(&c).unwrap()).last().flatten().unwrap();
        assert_eq!((r.bytes.to_vec(), r.checked), (data.clone(), format!("sha256:{}", sha256(&data))));
        // Intact chunks but a whole that is not the sender's: data loss, named by the hash that caught it.
        let mut forged = cs.clone();
        forged[3].delta_blake3 = "0".repeat(64);
        let mut a = Assembler::default();
        let err = forged.into_iter().map(|c| a.push(&c)).find_map(Result::err).unwrap();
        assert_eq!(err.code(), tonic::Code::DataLoss);
        assert!(err.message().contains("BLAKE3"), "{err}");
        // A stream that switches hash midway is malformed.
        let mut mixed = cs.clone();
        mixed[1].whole_hash = WholeHash::Sha256 as i32;
        let mut a = Assembler::default();
        let err = mixed.into_iter().map(|c| a.push(&c)).find_map(Result::err).unwrap();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        // An empty delta is one chunk.
        let mut a = Assembler::default();
        assert_eq!(a.push(&chunks(&item(b""), 10).next().unwrap()).unwrap().unwrap().bytes.len(), 0);
    }
}
