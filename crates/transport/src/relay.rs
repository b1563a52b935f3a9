//! Pipelined broadcast: replicas relay each chunk downstream as soon as it arrived intact, so staging on N replicas
//! takes about size / bandwidth + depth x chunk time instead of N x size / bandwidth from one sender.
//!
//! The sender (the coordinator, or a replica relaying) holds a [`Relay`] over its children. The first chunk it sends a
//! child names the child's own subtree (`forward`), the fan-out and the child's deadline, so every node splits its list
//! the same way: fan-out 1 is a chain, k a k-ary tree. Every chunk a relay forwards is kept until the broadcast ends
//! (the data are shared `Bytes`), so that
//! - a child that reports a corrupt chunk (`DataLoss`) is sent the stream again (at most [`RESENDS`] times), and
//! - a child that dies or stalls mid-stream is passed over: its subtree is re-attached to this relay, which replays
//!   everything sent so far to the dead child's children. The dead child is reported failed (the coordinator marks it
//!   stale, and it catches up by pull).
//!
//! A relay's acknowledgement carries one [`StageOutcome`] per replica of its subtree, so a sender learns every
//! replica's result from its direct children alone. Each level gives its children a shorter deadline than its own, so
//! a replica that never acknowledges is reported failed before its ancestors' own deadlines pass.

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::collections::HashMap;
use std::sync::Mutex;

use engram_proto::v1::{
    replica_client::ReplicaClient, StageAck, StageChunk, StageOutcome, StageProgressRequest, StageTarget,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

use crate::{Assembler, Received};

/// Times a child is sent the whole stream again after it reported a corrupt chunk.
pub const RESENDS: u32 = 2;
/// Chunks queued per child before the relay waits for it (back-pressure: a slow child slows its relay).
const QUEUE: usize = 8;

/// Opens channels to replicas by address (the caller's cache).
pub type Connect = Arc<dyn Fn(&str) -> anyhow::Result<Channel> + Send + Sync>;

/// `targets` in at most `fanout` contiguous groups, as equal as possible: each group's first target is a child, the
/// rest is what that child relays to.
pub fn split(targets: &[StageTarget], fanout: usize) -> Vec<(StageTarget, Vec<StageTarget>)> {
    let k = fanout.max(1).min(targets.len());
    let mut out = Vec::with_capacity(k);
    let mut start = 0;
    for g in 0..k {
        let len = targets.len() / k + usize::from(g < targets.len() % k);
        out.push((targets[start].clone(), targets[start + 1..start + len].to_vec()));
        start += len;
    }
    out
}

/// The deadline a relay gives its children: a tenth (at least 200 ms) less than its own, so it can still report a
/// child that missed it.
fn child_deadline(own: Instant) -> Instant {
    let left = own.saturating_duration_since(Instant::now());
    own - (left / 10).max(Duration::from_millis(200)).min(left)
}

struct Child {
    target: StageTarget,
    subtree: Vec<StageTarget>,
    tx: Option<mpsc::Sender<StageChunk>>,
    call: JoinHandle<Result<StageAck, tonic::Status>>,
    /// Index into `sent` of the next chunk it gets.
    next: usize,
    resends: u32,
    /// A replacement: ask how much it already holds before sending (it may resume a broken stream).
    probe: bool,
}

/// One node's outgoing side of a pipelined broadcast.
pub struct Relay {
    fanout: usize,
    connect: Connect,
    deadline: Option<Instant>,
    sent: Vec<StageChunk>,
    children: Vec<Child>,
    outcomes: Vec<StageOutcome>,
    /// Fault injection for tests: flip one bit of this chunk index, once, on its way to the first child.
    corrupt: Option<usize>,
}

impl Relay {
    /// A relay to `targets` (split by `fanout`) that must have every acknowledgement by `deadline`.
    pub fn new(targets: &[StageTarget], fanout: usize, deadline: Option<Instant>, connect: Connect) -> Self {
        let mut me = Self {
            fanout: fanout.max(1),
            connect,
            deadline,
            sent: Vec::new(),
            children: Vec::new(),
            outcomes: Vec::new(),
            corrupt: None,
        };
        for (target, subtree) in split(targets, me.fanout) {
            me.attach(target, subtree, 0, false);
        }
        me
    }

    /// The relay a receiver builds from the first chunk it got: to its `forward` list, by its fan-out and deadline.
    pub fn from_first_chunk(first: &StageChunk, connect: Connect) -> Self {
        let deadline = (first.deadline_ms > 0).then(|| Instant::now() + Duration::from_millis(first.deadline_ms));
        let mut me = Self::new(&first.forward, first.fanout as usize, deadline, connect);
        // Fault injection for tests and drills (a replica process): corrupt one chunk on its way downstream.
        me.corrupt = std::env::var("ENGRAM_FAULT_CORRUPT_CHUNK").ok().and_then(|v| v.parse().ok());
        me
    }

    /// Flips one bit of chunk `index` on its way to the first child, once (fault injection for tests).
    pub fn corrupting(mut self, index: usize) -> Self {
        self.corrupt = Some(index);
        self
    }

    /// How many replicas this node relays to, directly or through its children.
    pub fn subtree_len(&self) -> usize {
        self.children.iter().map(|c| 1 + c.subtree.len()).sum()
    }

    /// When this node's acknowledgement is due (its parent waits a little longer).
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    fn attach(&mut self, target: StageTarget, subtree: Vec<StageTarget>, resends: u32, probe: bool) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let call = match (self.connect)(&target.address) {
            Ok(channel) => {
                let mut client =
                    ReplicaClient::new(channel).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20);
                tokio::spawn(async move {
                    client.stage(tokio_stream::wrappers::ReceiverStream::new(rx)).await.map(|r| r.into_inner())
                })
            }
            Err(e) => {
                let msg = format!("{e:#}");
                tokio::spawn(async move { Err(tonic::Status::unavailable(msg)) })
            }
        };
        self.children.push(Child { target, subtree, tx: Some(tx), call, next: 0, resends, probe });
    }

    /// Where a replacement child resumes: the chunk at the offset it already holds from a broken stream, or 0.
    async fn resume_point(&self, c: usize) -> usize {
        let Some(first) = self.sent.first() else { return 0 };
        let ask = || async {
            let channel = (self.connect)(&self.children[c].target.address).ok()?;
            let req = StageProgressRequest { namespace: first.namespace.clone(), version: first.version.clone() };
            ReplicaClient::new(channel).stage_progress(req).await.ok().map(|r| r.into_inner().received)
        };
        let bound = self.deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(5));
        // An orphan may not have noticed yet that its stream broke (its upstream just died): ask again briefly.
        for _ in 0..3 {
            if let Ok(Some(offset)) = tokio::time::timeout_at(bound.into(), ask()).await {
                if offset > 0 {
                    return self.sent.iter().position(|s| s.offset == offset).unwrap_or(0);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        0
    }

    /// Chunk `i` as child `c` gets it: the first one names the child's subtree, fan-out and deadline.
    fn for_child(&mut self, i: usize, c: usize) -> StageChunk {
        let mut out = self.sent[i].clone();
        out.forward.clear();
        out.deadline_ms = 0;
        if i == 0 {
            out.forward = self.children[c].subtree.clone();
            out.fanout = self.fanout as u32;
            if let Some(d) = self.deadline {
                out.deadline_ms = child_deadline(d).saturating_duration_since(Instant::now()).as_millis().max(1) as u64;
            }
        }
        if c == 0 && self.corrupt == Some(i) && !out.data.is_empty() {
            self.corrupt = None; // once
            let mut data = out.data.to_vec();
            data[0] ^= 1;
            out.data = data.into();
        }
        out
    }

    /// Forwards one chunk (verified by the caller) to every child, recovering from children that fail meanwhile.
    pub async fn forward(&mut self, chunk: StageChunk) {
        self.accept(chunk);
        self.pump().await;
    }

    /// Takes a chunk to forward without sending it yet (`pump` sends it).
    fn accept(&mut self, chunk: StageChunk) {
        self.sent.push(chunk);
    }

    /// Sends every child what it has not had yet; a child whose stream broke or stalled past the deadline is
    /// replaced (resent, or its subtree re-attached), and the replacements are caught up in turn.
    async fn pump(&mut self) {
        loop {
            let mut broken = Vec::new();
            for c in 0..self.children.len() {
                if self.children[c].probe && !self.sent.is_empty() {
                    self.children[c].probe = false;
                    let from = self.resume_point(c).await;
                    if from > 0 {
                        let offset = self.sent[from].offset;
                        tracing::info!(replica = %self.children[c].target.id, "resuming its stream at byte {offset}");
                    }
                    self.children[c].next = from;
                }
                while self.children[c].next < self.sent.len() {
                    let chunk = self.for_child(self.children[c].next, c);
                    let Some(tx) = self.children[c].tx.clone() else { break };
                    let sent = match self.deadline {
                        Some(d) => tokio::time::timeout_at(d.into(), tx.send(chunk)).await.map_err(|_| "stalled"),
                        None => Ok(tx.send(chunk).await),
                    };
                    match sent {
                        Ok(Ok(())) => self.children[c].next += 1,
                        Ok(Err(_)) => {
                            broken.push((c, None));
                            break;
                        }
                        Err(why) => {
                            broken.push((c, Some(why)));
                            break;
                        }
                    }
                }
            }
            if broken.is_empty() {
                return;
            }
            for (c, why) in broken.into_iter().rev() {
                let mut child = self.children.remove(c);
                child.tx = None;
                let ended = match (why, self.deadline) {
                    (Some(_), _) => None,
                    // Its stream is gone, so its call is ending; bounded all the same.
                    (None, Some(d)) => tokio::time::timeout_at(d.into(), &mut child.call).await.ok(),
                    (None, None) => Some((&mut child.call).await),
                };
                let err = match ended {
                    Some(r) => call_error(r),
                    None => {
                        child.call.abort();
                        tonic::Status::deadline_exceeded("stalled: took no chunk before the deadline")
                    }
                };
                self.replace(child, err);
            }
        }
    }

    /// A child failed with `err`: send it the stream again (a corrupt chunk) or re-attach its subtree (it died).
    fn replace(&mut self, child: Child, err: tonic::Status) {
        if err.code() == tonic::Code::DataLoss && child.resends < RESENDS {
            tracing::warn!(replica = %child.target.id, "it received a corrupt chunk; sending it the stream again: {}", err.message());
            self.attach(child.target, child.subtree, child.resends + 1, true);
            return;
        }
        tracing::warn!(
            replica = %child.target.id,
            "relaying to it failed; re-attaching its {} replica(s) here: {}",
            child.subtree.len(),
            err.message()
        );
        self.outcomes.push(StageOutcome {
            id: child.target.id.clone(),
            ok: false,
            error: format!("{}: {}", child.target.address, err.message()),
            received: 0,
        });
        for (target, subtree) in split(&child.subtree, self.fanout) {
            self.attach(target, subtree, 0, true);
        }
    }

    /// Ends every child's stream and collects their acknowledgements (a child that fails now is replaced and the
    /// replacements acknowledged in turn). Returns one outcome per replica of this subtree.
    pub async fn finish(mut self) -> Vec<StageOutcome> {
        loop {
            self.pump().await;
            for ch in &mut self.children {
                ch.tx = None; // end of stream
            }
            let mut failed = Vec::new();
            for mut ch in std::mem::take(&mut self.children) {
                let res = match self.deadline {
                    Some(d) => match tokio::time::timeout_at(d.into(), &mut ch.call).await {
                        Ok(r) => r,
                        Err(_) => {
                            ch.call.abort();
                            // No time left to re-attach: the child and everything it relays to are reported failed.
                            let why = format!("no acknowledgement from {} before the deadline", ch.target.id);
                            for t in std::iter::once(&ch.target).chain(&ch.subtree) {
                                let error = why.clone();
                                self.outcomes.push(StageOutcome { id: t.id.clone(), ok: false, error, received: 0 });
                            }
                            continue;
                        }
                    },
                    None => (&mut ch.call).await,
                };
                match res {
                    Ok(Ok(ack)) => {
                        let id = ch.target.id.clone();
                        self.outcomes.push(StageOutcome {
                            id,
                            ok: ack.ready,
                            error: ack.error,
                            received: ack.received,
                        });
                        self.outcomes.extend(ack.downstream);
                    }
                    other => failed.push((ch, call_error(other))),
                }
            }
            if failed.is_empty() {
                return self.outcomes;
            }
            for (ch, err) in failed {
                self.replace(ch, err);
            }
        }
    }
}

/// Streams that broke off mid-way, kept so that a sender can resume them (`StageProgress`): the assembly so far and
/// the relay it was feeding, whose streams to the replicas below stay open meanwhile.
#[derive(Clone, Default)]
pub struct Partials(Arc<Mutex<HashMap<(String, String), Parked>>>);

struct Parked {
    asm: Assembler,
    relay: Relay,
    at: Instant,
}

/// How long a broken stream is kept for a resume.
const PARK_FOR: Duration = Duration::from_secs(30);

impl Partials {
    /// Bytes held of `version` from a broken stream (0: none).
    pub fn progress(&self, namespace: &str, version: &str) -> u64 {
        let mut map = self.0.lock().expect("partials");
        map.retain(|_, p| p.at.elapsed() < PARK_FOR);
        map.get(&(namespace.to_string(), version.to_string())).map_or(0, |p| p.asm.received())
    }

    fn park(&self, asm: Assembler, relay: Relay) {
        if asm.received() == 0 || asm.done {
            return;
        }
        tracing::warn!(version = %asm.version, "staging stream broke off after {} bytes; kept {PARK_FOR:?} for a resume", asm.received());
        let key = (asm.namespace.clone(), asm.version.clone());
        let mut map = self.0.lock().expect("partials");
        map.retain(|_, p| p.at.elapsed() < PARK_FOR);
        map.insert(key, Parked { asm, relay, at: Instant::now() });
    }

    fn take(&self, namespace: &str, version: &str) -> Option<Parked> {
        self.0.lock().expect("partials").remove(&(namespace.to_string(), version.to_string()))
    }
}

/// Receives one staged delta, relaying every intact chunk downstream as soon as it arrived (to the first chunk's
/// `forward` list). A corrupt chunk ends the stream with `DataLoss` before it is relayed; a stream that breaks off is
/// parked in `partials`, so the sender (or whoever replaces it) resumes at the offset reached. Returns the verified
/// delta and the relay; the caller finishes the relay (collects its children's acknowledgements) while it prepares
/// the delta.
pub async fn receive(
    stream: &mut Streaming<StageChunk>,
    connect: Connect,
    partials: &Partials,
) -> Result<(Received, Relay), Status> {
    // Parks whatever was received on every way out but success, including this future being dropped: the server
    // drops a handler whose client's connection died, which is exactly when a resume is wanted.
    struct Held<'a> {
        partials: &'a Partials,
        state: Option<(Assembler, Relay)>,
    }
    impl Drop for Held<'_> {
        fn drop(&mut self) {
            if let Some((asm, relay)) = self.state.take() {
                self.partials.park(asm, relay);
            }
        }
    }
    let mut held = Held { partials, state: None };
    let mut resumed_from = 0;
    // Fault injection for tests and drills: a slow relay (so a kill lands mid-stream).
    let delay =
        std::env::var("ENGRAM_FAULT_RELAY_DELAY_MS").ok().and_then(|v| v.parse().ok()).map(Duration::from_millis);
    loop {
        let chunk = match stream.message().await {
            Ok(Some(c)) => c,
            Ok(None) => {
                let received = held.state.as_ref().map_or(0, |(a, _)| a.received());
                return Err(Status::invalid_argument(format!(
                    "stream ended after {received} bytes without its last chunk"
                )));
            }
            Err(e) => return Err(e),
        };
        if held.state.is_none() {
            held.state = Some(if chunk.offset > 0 {
                let p = partials.take(&chunk.namespace, &chunk.version).filter(|p| p.asm.received() == chunk.offset);
                let p = p.ok_or_else(|| {
                    Status::failed_precondition(format!(
                        "a stream of {} resuming at byte {}, but no broken stream of it ends there",
                        chunk.version, chunk.offset
                    ))
                })?;
                tracing::info!(version = %chunk.version, "resuming a staged delta at byte {}", chunk.offset);
                resumed_from = chunk.offset;
                (p.asm, p.relay)
            } else {
                tracing::info!(version = %chunk.version, "receiving a staged delta; relaying it to {} replica(s)", chunk.forward.len());
                (Assembler::default(), Relay::from_first_chunk(&chunk, connect.clone()))
            });
        }
        let (asm, relay) = held.state.as_mut().expect("set above");
        // A corrupt chunk is not taken: what came before it stays held, for a resume. The assembly and the relay
        // take each chunk together, with no await between, so a cancelled handler parks them in step.
        let mut chunk = chunk;
        // What a relay holds is its own copy, so the decoder reuses its buffer for the next message; a leaf forwards
        // nothing and holds no data.
        let leaf = relay.subtree_len() == 0;
        if !leaf {
            chunk.data = crate::buffers::chunk(&chunk.data);
        }
        let done = asm.push(&chunk)?;
        if leaf {
            chunk.data = bytes::Bytes::new();
        }
        relay.accept(chunk);
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        relay.pump().await;
        if let Some(mut received) = done {
            let (_, relay) = held.state.take().expect("set above");
            received.resumed_from = resumed_from;
            return Ok((received, relay));
        }
    }
}

fn call_error(r: Result<Result<StageAck, tonic::Status>, tokio::task::JoinError>) -> tonic::Status {
    match r {
        Ok(Err(status)) => status,
        Ok(Ok(_)) => tonic::Status::internal("acknowledged before its stream ended"),
        Err(e) => tonic::Status::internal(format!("stage call: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(n: usize) -> Vec<StageTarget> {
        (0..n).map(|i| StageTarget { id: format!("r{i}"), address: format!("http://h{i}") }).collect()
    }

    #[test]
    fn split_makes_chains_and_balanced_trees() {
        let t = targets(7);
        let chain = split(&t, 1);
        assert_eq!(chain.len(), 1);
        assert_eq!((chain[0].0.id.as_str(), chain[0].1.len()), ("r0", 6));
        let tree = split(&t, 3);
        let shape: Vec<(String, usize)> = tree.iter().map(|(h, rest)| (h.id.clone(), rest.len())).collect();
        assert_eq!(shape, [("r0".into(), 2), ("r3".into(), 1), ("r5".into(), 1)]);
        assert_eq!(split(&t[..2], 4).len(), 2, "never more children than targets");
        assert!(split(&[], 2).is_empty());
    }
}
