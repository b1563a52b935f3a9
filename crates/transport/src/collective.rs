//! Staging over a collective broadcast: NCCL between GPUs, for replicas that advertise [`NCCL`].
//!
//! The coordinator is rank 0 of a group made for one staging; every replica of the group is sent a
//! `StageCollective` call naming the group and its rank, fetches the group's unique id from the coordinator's
//! rendezvous, joins, receives the delta into a staging buffer on its GPU and copies it to host memory (this build's
//! replicas keep their weights there), checks it against the delta's BLAKE3 and prepares it as a streamed delta would
//! be. Staging stays two-phase: only the bytes travel differently. A group that fails (a replica that never joins or
//! dies mid-broadcast makes the others time out: the communicator is aborted, never left hanging) falls back to
//! streaming for every replica of it that did not acknowledge, with a log line saying so.
//!
//! The data plane is the [`Collective`] trait, so everything up to the library boundary is tested without a GPU
//! ([`Local`], in-process); [`nccl::Nccl`] (feature `nccl`) is the real one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use async_trait::async_trait;
use engram_proto::v1::{replica_client::ReplicaClient, StageAck, StageCollectiveRequest};
use tonic::Status;

use crate::{buffers::Buffer, Broadcaster, GrpcStream, Received, Staging, Target};

/// A replica takes staged deltas over NCCL (it registered with this transport).
pub const NCCL: &str = "nccl";

/// The data plane of one broadcast group: every rank joins group `id` of `world` ranks; rank 0's bytes reach every
/// other rank's buffer. Each call is bounded by `timeout` in all: a rank that never joins or dies makes the others
/// fail, not hang. Blocking: called on blocking threads.
pub trait Collective: Send + Sync + 'static {
    /// A fresh group id, made by rank 0 (an NCCL unique id: [`crate::rendezvous::UNIQUE_ID_LEN`] bytes).
    fn new_id(&self) -> Result<Vec<u8>>;
    /// Rank 0: joins and sends `data`.
    fn send(&self, id: &[u8], world: usize, data: &[u8], timeout: Duration) -> Result<()>;
    /// Rank `rank` > 0: joins and receives into `buf` (its length is the delta's).
    fn receive(&self, id: &[u8], rank: usize, world: usize, buf: &mut [u8], timeout: Duration) -> Result<()>;
}

/// Where a group's ranks get its id: rank 0 posts it, the others wait for it (the coordinator's `NcclRendezvous`).
#[async_trait]
pub trait Meet: Send + Sync {
    async fn meet(&self, group: &str, rank: u32, world: u32, id: Vec<u8>, wait: Duration) -> Result<Vec<u8>>;
}

#[async_trait]
impl Meet for crate::rendezvous::Rendezvous {
    async fn meet(&self, group: &str, rank: u32, world: u32, id: Vec<u8>, wait: Duration) -> Result<Vec<u8>> {
        let r = crate::rendezvous::Rendezvous::meet(self, group, rank, world, id, wait).await;
        Ok(r.map_err(|s| anyhow!("{}", s.message()))?.0)
    }
}

/// The rendezvous of a coordinator reached over gRPC; with several addresses (coordinators in high availability)
/// the first that answers, which is the leader (followers refuse).
pub struct GrpcMeet {
    pub coordinators: Vec<String>,
}

#[async_trait]
impl Meet for GrpcMeet {
    async fn meet(&self, group: &str, rank: u32, world: u32, id: Vec<u8>, wait: Duration) -> Result<Vec<u8>> {
        use engram_proto::v1::{membership_client::MembershipClient, NcclRendezvousRequest};
        let mut last = anyhow!("no coordinator address");
        for address in &self.coordinators {
            let req = NcclRendezvousRequest {
                group: group.to_string(),
                rank,
                world,
                unique_id: id.clone(),
                wait_ms: wait.as_millis().min(u32::MAX as u128) as u32,
            };
            match MembershipClient::connect(address.clone()).await {
                Ok(mut c) => match c.nccl_rendezvous(req).await {
                    Ok(r) => return Ok(r.into_inner().unique_id),
                    Err(s) => last = anyhow!("rendezvous at {address}: {}", s.message()),
                },
                Err(e) => last = anyhow!("rendezvous at {address}: {e}"),
            }
        }
        Err(last)
    }
}

/// This process's GPU broadcast: NCCL on GPU 0 when built with the `nccl` feature and the CUDA driver, NCCL and a GPU
/// are present; otherwise none (logged once, with the reason: deltas then arrive by gRPC streaming).
pub fn this_gpu() -> Option<Arc<dyn Collective>> {
    static GPU: std::sync::OnceLock<Option<Arc<dyn Collective>>> = std::sync::OnceLock::new();
    GPU.get_or_init(|| {
        #[cfg(feature = "nccl")]
        match nccl::Nccl::open(0) {
            Ok(n) => {
                tracing::info!("NCCL staging available on GPU 0");
                return Some(Arc::new(n) as Arc<dyn Collective>);
            }
            Err(e) => tracing::info!("no NCCL staging ({e:#}); deltas travel by gRPC streaming"),
        }
        None
    })
    .clone()
}

/// A coordinator's broadcaster: `streaming`, wrapped in a [`CollectiveBroadcast`] when this process can use NCCL (its
/// groups meet at the coordinator's own rendezvous, `own_address`).
pub fn for_coordinator(streaming: Arc<dyn Broadcaster>, own_address: &str) -> Arc<dyn Broadcaster> {
    match this_gpu() {
        Some(gpu) => {
            let meet = Arc::new(GrpcMeet { coordinators: vec![own_address.to_string()] });
            Arc::new(CollectiveBroadcast::new(gpu, meet, streaming))
        }
        None => streaming,
    }
}

/// Receives one staged delta over a collective, as a replica (or a staging sink) answers `StageCollective`.
pub async fn receive(
    r: &StageCollectiveRequest,
    collective: Arc<dyn Collective>,
    meet: &dyn Meet,
) -> Result<Received, Status> {
    if r.rank == 0 || r.rank >= r.world || r.group.is_empty() {
        return Err(Status::invalid_argument(format!(
            "a collective staging names a group and a rank in 1..{} (got rank {} of group {:?})",
            r.world, r.rank, r.group
        )));
    }
    if r.delta_blake3.is_empty() || r.total_bytes > 64 << 30 {
        return Err(Status::invalid_argument("a collective staging needs the delta's BLAKE3 and a size up to 64 GiB"));
    }
    let deadline = Instant::now() + Duration::from_millis(r.deadline_ms.max(1));
    let id = meet
        .meet(&r.group, r.rank, r.world, Vec::new(), deadline.saturating_duration_since(Instant::now()))
        .await
        .map_err(|e| Status::unavailable(format!("joining group {}: {e:#}", r.group)))?;
    let (rank, world, len) = (r.rank as usize, r.world as usize, r.total_bytes as usize);
    let (buf, got) = tokio::task::spawn_blocking(move || -> Result<(Buffer, String)> {
        let mut buf = Buffer::zeroed(len);
        collective.receive(&id, rank, world, &mut buf, deadline.saturating_duration_since(Instant::now()))?;
        let got = engram_lineage::blob::transfer_hash(&buf);
        Ok((buf, got))
    })
    .await
    .map_err(|e| Status::internal(format!("collective receive task: {e}")))?
    .map_err(|e| Status::aborted(format!("collective broadcast of group {}: {e:#}", r.group)))?;
    if got != r.delta_blake3 {
        return Err(Status::data_loss(format!("the delta's BLAKE3 is {got}, the sender's {}", r.delta_blake3)));
    }
    Ok(Received {
        namespace: r.namespace.clone(),
        version: r.version.clone(),
        chain: r.chain.clone(),
        bytes: buf,
        hash: r.delta_sha256.clone(),
        checked: format!("blake3:{got}"),
        resumed_from: 0,
    })
}

/// How long a replica whose collective staging failed is streamed to instead (a group that cannot form would
/// otherwise cost half of every staging's timeout).
pub const COOL_DOWN: Duration = Duration::from_secs(300);

/// Stages over a [`Collective`] to the replicas that advertise [`NCCL`], and through `fallback` to the others and to
/// any that a failed group did not reach.
pub struct CollectiveBroadcast {
    collective: Arc<dyn Collective>,
    meet: Arc<dyn Meet>,
    fallback: Arc<dyn Broadcaster>,
    calls: GrpcStream,
    groups: AtomicU64,
    /// One group at a time, so that every rank meets groups in the same order (two groups waiting on each other's
    /// ranks would both time out).
    one_group: tokio::sync::Mutex<()>,
    /// Replicas whose collective staging failed, and when.
    cooling: Mutex<HashMap<String, Instant>>,
}

impl CollectiveBroadcast {
    pub fn new(collective: Arc<dyn Collective>, meet: Arc<dyn Meet>, fallback: Arc<dyn Broadcaster>) -> Self {
        Self {
            collective,
            meet,
            fallback,
            calls: GrpcStream::default(),
            groups: AtomicU64::new(0),
            one_group: Default::default(),
            cooling: Default::default(),
        }
    }

    /// Whether `target` is staged over the collective now: it advertises it and has not failed lately.
    fn on_collective(&self, target: &Target) -> bool {
        let cooling = self.cooling.lock().expect("cooling").get(&target.id).is_some_and(|at| at.elapsed() < COOL_DOWN);
        target.transports.iter().any(|t| t == NCCL) && !cooling
    }

    /// One group over `members`: Ok(ack) or the failure, per member.
    async fn group(&self, members: &[Target], item: &Staging, until: Instant) -> Vec<Result<StageAck>> {
        let n = self.groups.fetch_add(1, Ordering::Relaxed);
        let group = format!("{}/{}#{n}", item.namespace, item.version);
        let world = members.len() + 1;
        let fail_all =
            |e: anyhow::Error| -> Vec<Result<StageAck>> { members.iter().map(|_| Err(anyhow!("{e:#}"))).collect() };
        let Some(blake3) = item.blake3.clone() else {
            return fail_all(anyhow!("the version has no recorded BLAKE3"));
        };
        let collective = self.collective.clone();
        let id = match tokio::task::spawn_blocking(move || collective.new_id()).await {
            Ok(Ok(id)) => id,
            Ok(Err(e)) => return fail_all(e),
            Err(e) => return fail_all(anyhow!("{e}")),
        };
        if let Err(e) = self.meet.meet(&group, 0, world as u32, id.clone(), Duration::ZERO).await {
            return fail_all(e.context("posting the group id"));
        }
        let left = || until.saturating_duration_since(Instant::now());
        let (collective, bytes) = (self.collective.clone(), item.bytes.clone());
        let timeout = left();
        let root = tokio::task::spawn_blocking(move || collective.send(&id, world, &bytes, timeout));
        let calls = members.iter().enumerate().map(|(k, t)| {
            let req = StageCollectiveRequest {
                namespace: item.namespace.clone(),
                version: item.version.clone(),
                chain: item.chain.clone(),
                total_bytes: item.bytes.len() as u64,
                delta_sha256: item.hash.clone(),
                delta_blake3: blake3.clone(),
                group: group.clone(),
                rank: k as u32 + 1,
                world: world as u32,
                deadline_ms: left().as_millis().max(1) as u64,
            };
            async move {
                let channel = self.calls.channel(&t.address)?;
                let mut client = ReplicaClient::new(channel);
                // A little past the replica's own deadline: its answer says why it failed.
                let ack = tokio::time::timeout(left() + Duration::from_secs(1), client.stage_collective(req))
                    .await
                    .map_err(|_| anyhow!("replica {} did not answer before the deadline", t.id))?
                    .with_context(|| format!("collective staging on replica {}", t.id))?
                    .into_inner();
                if !ack.ready {
                    bail!("replica {} is not ready: {}", t.id, ack.error);
                }
                Ok::<StageAck, anyhow::Error>(ack)
            }
        });
        let (root, acks) = tokio::join!(root, futures::future::join_all(calls));
        match root {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(group, "the collective broadcast failed at the root (aborted): {e:#}"),
            Err(e) => tracing::warn!(group, "the collective broadcast task failed: {e}"),
        }
        acks
    }
}

#[async_trait]
impl Broadcaster for CollectiveBroadcast {
    fn name(&self) -> &'static str {
        "collective"
    }

    async fn stage(&self, targets: &[Target], item: &Staging, timeout: Duration) -> Vec<Result<StageAck>> {
        let start = Instant::now();
        let on_it: Vec<usize> = (0..targets.len()).filter(|&i| self.on_collective(&targets[i])).collect();
        let others: Vec<usize> = (0..targets.len()).filter(|i| !on_it.contains(i)).collect();
        let pick = |ix: &[usize]| ix.iter().map(|&i| targets[i].clone()).collect::<Vec<_>>();
        // The group gets half the time: a failed one leaves the rest for streaming to its members.
        let group = async {
            if on_it.is_empty() {
                return Vec::new();
            }
            let _one = self.one_group.lock().await;
            self.group(&pick(&on_it), item, start + timeout / 2).await
        };
        let streaming = pick(&others);
        let (grouped, streamed) = tokio::join!(group, self.fallback.stage(&streaming, item, timeout));
        let mut out: Vec<Option<Result<StageAck>>> = (0..targets.len()).map(|_| None).collect();
        for (&i, r) in others.iter().zip(streamed) {
            out[i] = Some(r);
        }
        let mut retry = Vec::new();
        for (&i, r) in on_it.iter().zip(grouped) {
            match r {
                Ok(ack) => out[i] = Some(Ok(ack)),
                Err(e) => {
                    tracing::warn!(
                        replica = %targets[i].id,
                        "collective staging failed, streaming instead (and for {COOL_DOWN:?}): {e:#}"
                    );
                    self.cooling.lock().expect("cooling").insert(targets[i].id.clone(), Instant::now());
                    retry.push(i);
                }
            }
        }
        if !retry.is_empty() {
            let left = timeout.saturating_sub(start.elapsed());
            for (&i, r) in retry.iter().zip(self.fallback.stage(&pick(&retry), item, left).await) {
                out[i] = Some(r);
            }
        }
        out.into_iter().map(|r| r.unwrap_or_else(|| Err(anyhow!("not staged")))).collect()
    }
}

/// An in-process [`Collective`] with NCCL's semantics (every rank must join; the root's bytes reach every rank; a
/// missing rank makes the others time out), for tests and drills without a GPU. Groups are shared through clones.
#[derive(Clone, Default)]
pub struct Local {
    groups: Arc<Mutex<HashMap<Vec<u8>, Arc<Group>>>>,
    ids: Arc<AtomicU64>,
    /// Fault injection: flip one bit of what this rank receives.
    corrupt_rank: Option<usize>,
}

#[derive(Default)]
struct Group {
    state: Mutex<GroupState>,
    changed: Condvar,
}

#[derive(Default)]
struct GroupState {
    joined: usize,
    data: Option<bytes::Bytes>,
    taken: usize,
    aborted: Option<String>,
}

impl Local {
    /// The same groups, but rank `rank` receives one bit flipped (fault injection).
    pub fn corrupting(&self, rank: usize) -> Self {
        Self { corrupt_rank: Some(rank), ..self.clone() }
    }

    fn group(&self, id: &[u8]) -> Arc<Group> {
        self.groups.lock().expect("groups").entry(id.to_vec()).or_default().clone()
    }

    /// Joins, then waits until `done` holds (or the group is aborted, or time runs out: then it aborts it).
    fn wait<'g>(
        g: &'g Group,
        world: usize,
        until: Instant,
        what: &str,
        mut done: impl FnMut(&GroupState) -> bool,
    ) -> Result<std::sync::MutexGuard<'g, GroupState>> {
        let mut s = g.state.lock().expect("group");
        loop {
            if let Some(why) = &s.aborted {
                bail!("the group was aborted: {why}");
            }
            if s.joined == world && done(&s) {
                return Ok(s);
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let why = format!("timed out {what} ({} of {world} ranks joined)", s.joined);
                s.aborted = Some(why.clone());
                g.changed.notify_all();
                bail!("{why}");
            }
            s = g.changed.wait_timeout(s, left).expect("group").0;
        }
    }
}

impl Collective for Local {
    fn new_id(&self) -> Result<Vec<u8>> {
        let n = self.ids.fetch_add(1, Ordering::Relaxed);
        let mut id = vec![0u8; crate::rendezvous::UNIQUE_ID_LEN];
        id[..8].copy_from_slice(&n.to_le_bytes());
        id[8..12].copy_from_slice(&std::process::id().to_le_bytes());
        Ok(id)
    }

    fn send(&self, id: &[u8], world: usize, data: &[u8], timeout: Duration) -> Result<()> {
        let (g, until) = (self.group(id), Instant::now() + timeout);
        {
            let mut s = g.state.lock().expect("group");
            s.joined += 1;
            s.data = Some(bytes::Bytes::copy_from_slice(data));
            g.changed.notify_all();
        }
        let done = Self::wait(&g, world, until, "broadcasting", |s| s.taken + 1 == world).map(|_| ());
        // Receivers hold the group while they copy; nobody looks it up again.
        self.groups.lock().expect("groups").remove(id);
        done
    }

    fn receive(&self, id: &[u8], rank: usize, world: usize, buf: &mut [u8], timeout: Duration) -> Result<()> {
        let (g, until) = (self.group(id), Instant::now() + timeout);
        g.state.lock().expect("group").joined += 1;
        g.changed.notify_all();
        let mut s = Self::wait(&g, world, until, "receiving", |s| s.data.is_some())?;
        let data = s.data.clone().expect("waited for it");
        if data.len() != buf.len() {
            bail!("rank 0 sent {} bytes, rank {rank} expected {}", data.len(), buf.len());
        }
        buf.copy_from_slice(&data);
        if self.corrupt_rank == Some(rank) && !buf.is_empty() {
            buf[0] ^= 1;
        }
        s.taken += 1;
        g.changed.notify_all();
        Ok(())
    }
}

/// NCCL as the [`Collective`]: a staging buffer on this process's GPU, a communicator per group (non-blocking,
/// polled against the deadline, aborted on drop).
#[cfg(feature = "nccl")]
pub mod nccl {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use anyhow::{Context, Result};
    use cudarc::driver::{CudaContext, CudaStream};
    use engram_nccl::{Communicator, UniqueId};

    pub struct Nccl {
        stream: Arc<CudaStream>,
        /// One group at a time: two communicators' kernels on one stream, enqueued in different orders on
        /// different ranks, would wait for each other forever.
        one: std::sync::Mutex<()>,
    }

    impl Nccl {
        /// NCCL on GPU `device`, when the libraries and the GPU are there (the error says what is missing).
        pub fn open(device: usize) -> Result<Self> {
            engram_nccl::probe()?;
            let ctx = CudaContext::new(device).with_context(|| format!("CUDA context on GPU {device}"))?;
            Ok(Self { stream: ctx.new_stream().context("CUDA stream")?, one: Default::default() })
        }
    }

    impl super::Collective for Nccl {
        fn new_id(&self) -> Result<Vec<u8>> {
            Ok(UniqueId::new()?.to_bytes())
        }

        fn send(&self, id: &[u8], world: usize, data: &[u8], timeout: Duration) -> Result<()> {
            let until = Instant::now() + timeout;
            let _one = self.one.lock().unwrap_or_else(|e| e.into_inner());
            let left = || until.saturating_duration_since(Instant::now());
            let mut dev = self.stream.clone_htod(data)?;
            let id = UniqueId::from_bytes(id)?;
            let mut comm = Communicator::init(self.stream.clone(), &id, 0, world, left())?;
            comm.broadcast(&mut dev, 0, left())?;
            Ok(())
        }

        fn receive(&self, id: &[u8], rank: usize, world: usize, buf: &mut [u8], timeout: Duration) -> Result<()> {
            let until = Instant::now() + timeout;
            let _one = self.one.lock().unwrap_or_else(|e| e.into_inner());
            let left = || until.saturating_duration_since(Instant::now());
            let mut dev = self.stream.alloc_zeros::<u8>(buf.len())?;
            let id = UniqueId::from_bytes(id)?;
            let mut comm = Communicator::init(self.stream.clone(), &id, rank, world, left())?;
            comm.broadcast(&mut dev, 0, left())?;
            self.stream.memcpy_dtoh(&dev, buf)?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_collective_delivers_to_every_rank_or_times_out_when_one_is_missing() {
        let c = Local::default();
        let id = c.new_id().unwrap();
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 13) as u8).collect();
        let ranks: Vec<_> = (1..4)
            .map(|r| {
                let (c, id) = (c.clone(), id.clone());
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 5000];
                    c.receive(&id, r, 4, &mut buf, Duration::from_secs(5)).map(|_| buf)
                })
            })
            .collect();
        c.send(&id, 4, &data, Duration::from_secs(5)).unwrap();
        for r in ranks {
            assert_eq!(r.join().unwrap().unwrap(), data);
        }
        // Rank 3 never joins: the others time out instead of hanging.
        let id = c.new_id().unwrap();
        let start = Instant::now();
        let one = {
            let (c, id) = (c.clone(), id.clone());
            std::thread::spawn(move || c.receive(&id, 1, 3, &mut [0u8; 10], Duration::from_millis(800)))
        };
        let err = c.send(&id, 3, &[1; 10], Duration::from_millis(800)).unwrap_err();
        assert!(err.to_string().contains("of 3 ranks joined"), "{err}");
        assert!(one.join().unwrap().is_err());
        assert!(start.elapsed() < Duration::from_secs(3));
    }
}
