//! Pipelined broadcast over real gRPC on loopback: staging sinks (replicas that only stage) relay to each other in a
//! chain or tree; a corrupted chunk is detected and sent again; a relay that dies mid-stream is passed over and its
//! subtree re-attached. Each sink runs on its own runtime and thread, so killing one closes its sockets as a crashed
//! process's would.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use engram_proto::v1::{StageOutcome, StageTarget};
use engram_transport::relay::Relay;
use engram_transport::rendezvous::Rendezvous;
use engram_transport::sink::Sink;
use engram_transport::{
    checked_hash, chunks, collective, Broadcaster, GrpcStream, Pipelined, Staging, Target, RELAY, STREAM,
};
use sha2::{Digest, Sha256};

struct Node {
    target: StageTarget,
    sink: Sink,
    kill: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Node {
    fn start(i: usize) -> Self {
        Self::start_with(i, Sink::new(Arc::new(GrpcStream::default()).connector()))
    }

    fn start_with(i: usize, sink: Sink) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        let (kill, killed) = tokio::sync::oneshot::channel::<()>();
        let server = sink.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                let serve = engram_transport::server().add_service(server.server()).serve_with_incoming(incoming);
                tokio::select! {
                    _ = serve => {}
                    _ = killed => {}
                }
            });
            // Dropping the runtime drops every connection task: the peers see their streams reset.
            rt.shutdown_background();
        });
        Self { target: StageTarget { id: format!("r{i}"), address }, sink, kill: Some(kill), thread: Some(thread) }
    }

    fn kill(&mut self) {
        if let Some(k) = self.kill.take() {
            let _ = k.send(());
            self.thread.take().unwrap().join().unwrap();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

fn item(len: usize) -> Staging {
    let bytes: Vec<u8> = (0..len as u64).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    Staging {
        namespace: "ns".into(),
        version: "v1".into(),
        chain: vec![],
        hash: hex::encode(Sha256::digest(&bytes)),
        blake3: None,
        bytes: Bytes::from(bytes),
    }
}

fn root(nodes: &[&Node], fanout: usize) -> Relay {
    let targets: Vec<StageTarget> = nodes.iter().map(|n| n.target.clone()).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    Relay::new(&targets, fanout, Some(deadline), Arc::new(GrpcStream::default()).connector())
}

async fn send_all(mut relay: Relay, item: &Staging) -> Vec<StageOutcome> {
    for c in chunks(item, 64 << 10) {
        relay.forward(c).await;
    }
    relay.finish().await
}

fn outcome<'a>(outcomes: &'a [StageOutcome], n: &Node) -> &'a StageOutcome {
    outcomes.iter().find(|o| o.id == n.target.id).unwrap_or_else(|| panic!("no outcome for {}", n.target.id))
}

fn staged(n: &Node) -> Vec<(String, String)> {
    n.sink.staged.lock().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_and_a_tree_deliver_every_byte_to_every_replica() {
    let it = item(2 << 20);
    for fanout in [1, 2] {
        let nodes: Vec<Node> = (0..7).map(Node::start).collect();
        let outcomes = send_all(root(&nodes.iter().collect::<Vec<_>>(), fanout), &it).await;
        assert_eq!(outcomes.len(), 7, "fan-out {fanout}: one outcome per replica: {outcomes:?}");
        for n in &nodes {
            let o = outcome(&outcomes, n);
            assert!(o.ok && o.received == it.bytes.len() as u64, "fan-out {fanout}: {o:?}");
            assert_eq!(
                staged(n),
                vec![(it.version.clone(), checked_hash(&it.bytes))],
                "fan-out {fanout}: {}",
                n.target.id
            );
            assert_eq!(n.sink.attempts.load(Ordering::SeqCst), 1);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_chunk_is_detected_and_sent_again() {
    let it = item(1 << 20);
    let nodes: Vec<Node> = (0..3).map(Node::start).collect();
    // Chunk 5 reaches the first replica with one bit flipped.
    let outcomes = send_all(root(&nodes.iter().collect::<Vec<_>>(), 1).corrupting(5), &it).await;
    assert!(outcomes.iter().all(|o| o.ok), "{outcomes:?}");
    assert_eq!(nodes[0].sink.attempts.load(Ordering::SeqCst), 2, "the corrupt stream was not sent again");
    // Sent again from the damaged chunk on, not from the start.
    assert_eq!(*nodes[0].sink.resumed_from.lock().unwrap(), vec![5 * (64 << 10)]);
    for n in &nodes {
        // Nothing but the true delta was ever staged anywhere.
        assert_eq!(staged(n), vec![(it.version.clone(), checked_hash(&it.bytes))], "{}", n.target.id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_mid_stream_is_passed_over_and_its_subtree_reattached() {
    let it = item(2 << 20); // 32 chunks of 64 KiB
    let mut nodes: Vec<Node> = (0..5).map(Node::start).collect();
    let mut relay = root(&nodes.iter().collect::<Vec<_>>(), 1); // the chain r0 r1 r2 r3 r4
    for (i, c) in chunks(&it, 64 << 10).into_iter().enumerate() {
        relay.forward(c).await;
        if i == 10 {
            tokio::time::sleep(Duration::from_millis(100)).await; // let the chunks flow down the chain
            assert_eq!(nodes[3].sink.attempts.load(Ordering::SeqCst), 1, "r3 was not receiving yet");
            nodes[2].kill();
        }
    }
    let outcomes = relay.finish().await;
    assert!(!outcome(&outcomes, &nodes[2]).ok, "the dead relay reported ok");
    for i in [0, 1, 3, 4] {
        assert!(outcome(&outcomes, &nodes[i]).ok, "{:?}", outcome(&outcomes, &nodes[i]));
        assert_eq!(staged(&nodes[i]), vec![(it.version.clone(), checked_hash(&it.bytes))], "r{i}");
    }
    // r3 lost its stream from r2; r1 resumed it where it broke off, and r3 kept relaying to r4 on the stream it had.
    assert_eq!(nodes[3].sink.attempts.load(Ordering::SeqCst), 2);
    let resumed = nodes[3].sink.resumed_from.lock().unwrap().clone();
    assert!(resumed.len() == 1 && resumed[0] > 0, "r3 was not resumed: {resumed:?}");
    assert_eq!(nodes[4].sink.attempts.load(Ordering::SeqCst), 1, "r4's stream should never have broken");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_that_do_not_relay_get_their_own_stream() {
    // r1 registered as a stream-only replica (an older version during a rolling upgrade): the chain is r0 -> r2, and
    // r1 is streamed to directly.
    let it = item(1 << 20);
    let nodes: Vec<Node> = (0..3).map(Node::start).collect();
    let targets: Vec<Target> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| Target {
            id: n.target.id.clone(),
            address: n.target.address.clone(),
            transports: if i == 1 { vec![STREAM.into()] } else { vec![STREAM.into(), RELAY.into()] },
        })
        .collect();
    let acks = Pipelined::new(1, 64 << 10).stage(&targets, &it, Duration::from_secs(30)).await;
    for (n, a) in nodes.iter().zip(&acks) {
        assert!(a.is_ok(), "{}: {a:?}", n.target.id);
        assert_eq!(staged(n), vec![(it.version.clone(), checked_hash(&it.bytes))], "{}", n.target.id);
    }
    let relayed: Vec<Vec<usize>> = nodes.iter().map(|n| n.sink.relayed_to.lock().unwrap().clone()).collect();
    assert_eq!(relayed, vec![vec![1], vec![0], vec![0]], "r0 should relay to r2 only");
}

/// Sinks that also stage over an in-process collective (NCCL's semantics), meeting at one rendezvous.
fn collective_nodes(n: usize, first: usize, c: &collective::Local, meet: &Arc<Rendezvous>) -> Vec<Node> {
    (first..first + n)
        .map(|i| {
            let sink = Sink::new(Arc::new(GrpcStream::default()).connector());
            Node::start_with(i, sink.with_collective(Arc::new(c.clone()), meet.clone()))
        })
        .collect()
}

fn with_transports(nodes: &[Node], transports: &[&str]) -> Vec<Target> {
    let transports: Vec<String> = transports.iter().map(|t| t.to_string()).collect();
    nodes
        .iter()
        .map(|n| Target { id: n.target.id.clone(), address: n.target.address.clone(), transports: transports.clone() })
        .collect()
}

fn recorded(mut it: Staging) -> Staging {
    it.blake3 = Some(engram_lineage::blob::transfer_hash(&it.bytes));
    it
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_that_advertise_nccl_are_staged_over_it_and_the_others_by_stream() {
    let it = recorded(item(1 << 20));
    let (c, meet) = (collective::Local::default(), Arc::new(Rendezvous::default()));
    let gpu = collective_nodes(3, 0, &c, &meet);
    let cpu: Vec<Node> = (3..5).map(Node::start).collect();
    let mut targets = with_transports(&gpu, &[STREAM, RELAY, collective::NCCL]);
    targets.extend(with_transports(&cpu, &[STREAM, RELAY]));
    let b = collective::CollectiveBroadcast::new(Arc::new(c), meet, Arc::new(Pipelined::new(1, 64 << 10)));
    let acks = b.stage(&targets, &it, Duration::from_secs(20)).await;
    for (t, a) in targets.iter().zip(&acks) {
        let a = a.as_ref().unwrap_or_else(|e| panic!("{}: {e:#}", t.id));
        assert!(a.ready && a.received == it.bytes.len() as u64, "{}: {a:?}", t.id);
    }
    for n in gpu.iter().chain(&cpu) {
        assert_eq!(staged(n), vec![(it.version.clone(), checked_hash(&it.bytes))], "{}", n.target.id);
    }
    assert!(gpu.iter().all(|n| *n.sink.arrived_by.lock().unwrap() == vec!["collective"]));
    assert!(cpu.iter().all(|n| *n.sink.arrived_by.lock().unwrap() == vec!["stream"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_group_is_aborted_in_time_and_its_replicas_are_streamed_to_instead() {
    let it = recorded(item(1 << 20));
    let (c, meet) = (collective::Local::default(), Arc::new(Rendezvous::default()));
    // The third "GPU" replica never joins: it advertises NCCL but has no collective (as one whose GPU vanished), so
    // the group waits for it, times out and is aborted. (The second would receive one bit flipped, had the broadcast
    // happened.)
    let corrupt = c.corrupting(2);
    let mut gpu = collective_nodes(1, 0, &c, &meet);
    gpu.extend(collective_nodes(1, 1, &corrupt, &meet));
    gpu.push(Node::start(2));
    let targets = with_transports(&gpu, &[STREAM, RELAY, collective::NCCL]);
    let b = collective::CollectiveBroadcast::new(Arc::new(c), meet, Arc::new(Pipelined::new(1, 64 << 10)));
    let start = Instant::now();
    let acks = b.stage(&targets, &it, Duration::from_secs(8)).await;
    assert!(start.elapsed() < Duration::from_secs(8), "bounded by the deadline: {:?}", start.elapsed());
    assert!(acks.iter().all(|a| a.is_ok()), "{acks:?}");
    for n in &gpu {
        // Whatever happened in the group, every replica staged the true bytes, by stream.
        assert_eq!(staged(n), vec![(it.version.clone(), checked_hash(&it.bytes))], "{}", n.target.id);
        assert_eq!(*n.sink.arrived_by.lock().unwrap(), vec!["stream"], "{}", n.target.id);
    }
    // For a while, they are streamed to without another group (and its wait).
    let again = Instant::now();
    let acks = b.stage(&targets, &it, Duration::from_secs(8)).await;
    assert!(acks.iter().all(|a| a.is_ok()), "{acks:?}");
    assert!(again.elapsed() < Duration::from_secs(3), "a second group was tried: {:?}", again.elapsed());
    for n in &gpu {
        assert_eq!(*n.sink.arrived_by.lock().unwrap(), vec!["stream", "stream"], "{}", n.target.id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_that_do_not_match_the_recorded_blake3_are_never_staged() {
    let it = recorded(item(256 << 10));
    let (c, meet) = (collective::Local::default(), Arc::new(Rendezvous::default()));
    let corrupt = c.corrupting(1);
    let gpu = collective_nodes(1, 0, &corrupt, &meet);
    let targets = with_transports(&gpu, &[STREAM, collective::NCCL]);
    // Only the collective is tried: the fallback reaches nobody.
    struct Nobody;
    #[async_trait::async_trait]
    impl Broadcaster for Nobody {
        fn name(&self) -> &'static str {
            "nobody"
        }
        async fn stage(
            &self,
            t: &[Target],
            _: &Staging,
            _: Duration,
        ) -> Vec<anyhow::Result<engram_proto::v1::StageAck>> {
            t.iter().map(|_| Err(anyhow::anyhow!("no fallback here"))).collect()
        }
    }
    let b = collective::CollectiveBroadcast::new(Arc::new(c), meet, Arc::new(Nobody));
    let acks = b.stage(&targets, &it, Duration::from_secs(5)).await;
    assert!(acks[0].is_err());
    assert_eq!(*gpu[0].sink.refused.lock().unwrap(), vec![tonic::Code::DataLoss], "refused for its BLAKE3");
    assert!(staged(&gpu[0]).is_empty(), "a corrupted copy was staged");
    assert_eq!(gpu[0].sink.attempts.load(Ordering::SeqCst), 1);
}
