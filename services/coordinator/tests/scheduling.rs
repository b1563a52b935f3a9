//! The coordinator's job life cycle against fake workers speaking the real Membership protocol over gRPC: leases,
//! re-queue on a lapsed lease, the attempt fence, one job per namespace in flight, rejection with gate metrics,
//! failures, and recovery of unfinished jobs by a new coordinator on the same store.

use std::sync::Arc;
use std::time::Duration;

use engram_coordinator::{Coordinator, CoordinatorConfig};
use engram_lineage::{BlobStore, LineageStore};
use engram_proto::v1 as pb;
use pb::membership_client::MembershipClient;

const BASE: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

struct Cluster {
    coordinator: Arc<Coordinator>,
    address: String,
    store: Arc<dyn LineageStore>,
    blobs: BlobStore,
    _dir: tempfile::TempDir,
}

async fn start(store: Option<(Arc<dyn LineageStore>, BlobStore, tempfile::TempDir)>) -> Cluster {
    start_with(store, CoordinatorConfig::default()).await
}

async fn start_with(
    store: Option<(Arc<dyn LineageStore>, BlobStore, tempfile::TempDir)>,
    cfg: CoordinatorConfig,
) -> Cluster {
    start_full(store, cfg, Arc::new(engram_transport::GrpcStream::default())).await
}

async fn start_full(
    store: Option<(Arc<dyn LineageStore>, BlobStore, tempfile::TempDir)>,
    cfg: CoordinatorConfig,
    broadcaster: Arc<dyn engram_transport::Broadcaster>,
) -> Cluster {
    let (store, blobs, dir) = match store {
        Some(s) => s,
        None => {
            let dir = tempfile::tempdir().unwrap();
            let store = engram_lineage::open(&format!("file://{}", dir.path().display())).await.unwrap();
            store.create_namespace("ns", BASE, "t").await.unwrap();
            store.create_namespace("other", BASE, "t").await.unwrap();
            (store, BlobStore::open("memory://").unwrap(), dir)
        }
    };
    let cfg = CoordinatorConfig { lease_ttl: Duration::from_millis(400), ..cfg };
    let c = Coordinator::new(cfg, store.clone(), blobs.clone(), broadcaster);
    c.recover().await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(engram_coordinator::serve(c.clone(), listener, std::future::pending()));
    Cluster { coordinator: c, address, store, blobs, _dir: dir }
}

fn request(ns: &str, key: &str) -> pb::ConsolidateRequest {
    pb::ConsolidateRequest {
        namespace: ns.into(),
        documents: vec![format!("<doc> {key} </doc>").into_bytes()],
        idempotency_key: key.into(),
        ..Default::default()
    }
}

async fn worker(address: &str, id: &str) -> (MembershipClient<tonic::transport::Channel>, u64) {
    let mut m = MembershipClient::connect(address.to_string()).await.unwrap();
    let lease = m
        .register_worker(pb::RegisterWorkerRequest {
            id: id.into(),
            base_models: vec![BASE.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    (m, lease.lease_id)
}

async fn next(
    m: &mut MembershipClient<tonic::transport::Channel>,
    id: &str,
    lease: u64,
    wait_ms: u32,
) -> pb::JobAssignment {
    m.next_job(pb::NextJobRequest { worker: id.into(), lease_id: lease, wait_ms }).await.unwrap().into_inner()
}

async fn delta(blobs: &BlobStore, tag: &str) -> pb::DeltaRef {
    let bytes = format!("delta {tag}").into_bytes();
    let hash = blobs.put(bytes.clone().into()).await.unwrap();
    pb::DeltaRef { hash, bytes: bytes.len() as u64, injector: "fake".into(), ..Default::default() }
}

fn complete(
    id: &str,
    lease: u64,
    a: &pb::JobAssignment,
    outcome: pb::complete_job_request::Outcome,
) -> pb::CompleteJobRequest {
    pb::CompleteJobRequest {
        worker: id.into(),
        lease_id: lease,
        job: a.job.as_ref().unwrap().id.clone(),
        attempt: a.attempt,
        outcome: Some(outcome),
        ..Default::default()
    }
}

async fn wait_state(store: &Arc<dyn LineageStore>, job: &str, state: engram_lineage::JobState) -> engram_lineage::Job {
    for _ in 0..100 {
        let j = store.job(job).await.unwrap();
        if j.state == state {
            return j;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("job {job} never reached {state:?}: {:?}", store.job(job).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_fence_and_one_job_per_namespace() {
    use engram_lineage::JobState::*;
    use pb::complete_job_request::Outcome;
    let c = start(None).await;
    let first = c.coordinator.consolidate(request("ns", "k1")).await.unwrap();
    let second = c.coordinator.consolidate(request("ns", "k2")).await.unwrap();
    assert_eq!(c.coordinator.consolidate(request("ns", "k1")).await.unwrap().id, first.id, "same key, same job");

    // Worker A takes the first job, then goes silent: its lease lapses and the job is queued again.
    let (mut a, lease_a) = worker(&c.address, "a").await;
    let got = next(&mut a, "a", lease_a, 1000).await;
    assert_eq!((got.job.as_ref().unwrap().id.as_str(), got.attempt), (first.id.as_str(), 1));
    assert!(got.head.is_empty(), "the first job composes onto the bare base model");
    // One job per namespace: nothing else of "ns" is handed out while it runs.
    let (mut b, lease_b) = worker(&c.address, "b").await;
    let none = next(&mut b, "b", lease_b, 200).await;
    assert!(none.job.is_none(), "a second job of a busy namespace was handed out");
    // Keep b alive, let a lapse.
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        b.heartbeat(pb::HeartbeatRequest { member: "b".into(), lease_id: lease_b }).await.unwrap();
    }
    wait_state(&c.store, &first.id, Queued).await;
    let again = next(&mut b, "b", lease_b, 1000).await;
    assert_eq!((again.job.as_ref().unwrap().id.as_str(), again.attempt), (first.id.as_str(), 2));
    // A's late result: its lease is gone, and its attempt is stale.
    let late = a.complete_job(complete("a", lease_a, &got, Outcome::Delta(delta(&c.blobs, "a").await))).await;
    assert!(late.is_err(), "a result from a lapsed lease was accepted");
    // B's result goes live (no replicas: staging is trivially complete).
    b.complete_job(complete("b", lease_b, &again, Outcome::Delta(delta(&c.blobs, "b").await))).await.unwrap();
    let live = wait_state(&c.store, &first.id, Live).await;
    let v = live.version.clone().unwrap();
    assert_eq!(c.store.namespace("ns").await.unwrap().head, Some(v.clone()));
    assert_eq!(c.store.version(&v).await.unwrap().job_id, first.id);

    // The second job builds on it; the gate rejects it: recorded with its metrics, never served.
    let got = next(&mut b, "b", lease_b, 1000).await;
    assert_eq!(got.job.as_ref().unwrap().id, second.id);
    assert_eq!(got.head, v.to_string());
    let mut req = complete("b", lease_b, &got, Outcome::Delta(delta(&c.blobs, "rejected").await));
    req.rejected = true;
    req.metrics = [("known_facts.drop_points".to_string(), 12.0)].into();
    b.complete_job(req).await.unwrap();
    let rejected = wait_state(&c.store, &second.id, Rejected).await;
    let rv = c.store.version(rejected.version.as_ref().unwrap()).await.unwrap();
    assert_eq!(rv.status, engram_lineage::Status::Rejected);
    assert_eq!(rv.gate_metrics["known_facts.drop_points"], 12.0);
    assert_eq!(c.store.namespace("ns").await.unwrap().head, Some(v.clone()), "a rejected version moved the head");

    // A worker error fails the job with the error.
    let third = c.coordinator.consolidate(request("other", "k3")).await.unwrap();
    let got = next(&mut b, "b", lease_b, 1000).await;
    assert_eq!(got.job.as_ref().unwrap().id, third.id);
    b.complete_job(complete("b", lease_b, &got, Outcome::Error("the document names nobody".into()))).await.unwrap();
    let failed = wait_state(&c.store, &third.id, Failed).await;
    assert!(failed.error.contains("names nobody"), "{failed:?}");
    // Unknown lease: told to register again.
    let e = b.next_job(pb::NextJobRequest { worker: "b".into(), lease_id: 999, wait_ms: 0 }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_coordinator_resumes_unfinished_jobs() {
    use engram_lineage::JobState::*;
    let c = start(None).await;
    let running = c.coordinator.consolidate(request("ns", "r")).await.unwrap();
    let queued = c.coordinator.consolidate(request("other", "q")).await.unwrap();
    let (mut a, lease) = worker(&c.address, "a").await;
    // Namespaces are served in name order from the start: "ns" first.
    let held = next(&mut a, "a", lease, 1000).await;
    assert_eq!(held.job.as_ref().unwrap().id, running.id);
    // The coordinator "restarts": a new one on the same store (the old one's leases mean nothing to it).
    let store = c.store.clone();
    let blobs = c.blobs.clone();
    let c2 = start(Some((store.clone(), blobs, c._dir))).await;
    assert_eq!(store.job(&running.id).await.unwrap().state, Queued, "a running job was not queued again");
    let (mut b, lease_b) = worker(&c2.address, "b").await;
    let mut seen = Vec::new();
    for _ in 0..2 {
        let a = next(&mut b, "b", lease_b, 1000).await;
        let j = a.job.unwrap();
        seen.push((j.id.clone(), a.attempt));
        let d = delta(&c2.blobs, &j.id).await;
        let req = pb::CompleteJobRequest {
            worker: "b".into(),
            lease_id: lease_b,
            job: j.id.clone(),
            attempt: a.attempt,
            outcome: Some(pb::complete_job_request::Outcome::Delta(d)),
            ..Default::default()
        };
        b.complete_job(req).await.unwrap();
    }
    seen.sort();
    let mut want = vec![(queued.id.clone(), 1), (running.id.clone(), 2)];
    want.sort();
    assert_eq!(seen, want);
    wait_state(&store, &queued.id, Live).await;
    wait_state(&store, &running.id, Live).await;
}

/// A real (tiny) delta: layer 0's down projection, rank 1, entries from `x`.
async fn lora_delta(blobs: &BlobStore, x: f32) -> (pb::DeltaRef, engram_lora::Delta) {
    let meta = engram_lora::Meta { base_model: BASE.into(), scale: 1.0, injector: "fake".into(), ..Default::default() };
    let factors = engram_lora::Factors::new(1, 3, 2, vec![x, 1.0, -x], vec![0.5, x]).unwrap();
    let d = engram_lora::Delta { meta, adapters: [((0, "down".to_string()), factors)].into(), memory: None };
    let bytes = d.encode().unwrap();
    let hash = blobs.put(bytes.clone().into()).await.unwrap();
    (pb::DeltaRef { hash, bytes: bytes.len() as u64, injector: "fake".into(), ..Default::default() }, d)
}

/// Every third version the chain is replaced by one compaction version that sums it exactly, becomes the head,
/// and can be rolled back through; a document the gate rejected on that chain is submitted again as a new job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_is_compacted_and_rejected_documents_are_offered_again() {
    use engram_lineage::JobState::*;
    use pb::complete_job_request::Outcome;
    let c = start_with(None, CoordinatorConfig { compact_every: 3, ..Default::default() }).await;
    let (mut w, lease) = worker(&c.address, "w").await;
    let mut live = Vec::new();
    let mut deltas = Vec::new();
    let mut rejected_job = None;
    // Four jobs: the second is rejected, the other three go live.
    for (i, x) in [1.0f32, 2.0, 3.0, 4.0].into_iter().enumerate() {
        let job = c.coordinator.consolidate(request("ns", &format!("c{i}"))).await.unwrap();
        let got = next(&mut w, "w", lease, 1000).await;
        assert_eq!(got.job.as_ref().unwrap().id, job.id);
        let (r, d) = lora_delta(&c.blobs, x).await;
        let mut req = complete("w", lease, &got, Outcome::Delta(r));
        if i == 1 {
            req.rejected = true;
            w.complete_job(req).await.unwrap();
            rejected_job = Some(wait_state(&c.store, &job.id, Rejected).await);
            continue;
        }
        w.complete_job(req).await.unwrap();
        live.push(wait_state(&c.store, &job.id, Live).await.version.unwrap());
        deltas.push(d);
    }
    // The third live version made the chain three long: the compaction follows before the namespace is free.
    let mut head = None;
    for _ in 0..100 {
        head = c.store.namespace("ns").await.unwrap().head;
        if head.as_ref() != live.last() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let k = c.store.version(head.as_ref().unwrap()).await.unwrap();
    assert_eq!(k.compacts, live, "the compaction names the chain it replaces, oldest first");
    assert_eq!(k.parent, None, "built on the base, like the chain's first version");
    assert_eq!(k.status, engram_lineage::Status::Live);
    // Its delta is the chain's sum, recorded with the hash staging checks.
    let blob = c.blobs.get(&k.delta_hash).await.unwrap();
    assert_eq!(k.delta_blake3.as_deref(), Some(engram_lineage::blob::transfer_hash(&blob).as_str()));
    let compacted = engram_lora::Delta::decode(&blob).unwrap();
    let want: Vec<f32> = (0..6).map(|i| deltas.iter().map(|d| d.dense(0, "down").unwrap()[i]).sum()).collect();
    let got = compacted.dense(0, "down").unwrap();
    assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5), "{got:?} != {want:?}");
    // The rejected document is queued again as a new job (once), composed onto the compaction.
    let rejected = rejected_job.unwrap();
    let again = c
        .store
        .jobs()
        .await
        .unwrap()
        .into_iter()
        .filter(|j| j.idempotency_key == format!("reoffer:{}", rejected.id))
        .collect::<Vec<_>>();
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0].documents, rejected.documents);
    let got = next(&mut w, "w", lease, 1000).await;
    assert_eq!(got.job.as_ref().unwrap().id, again[0].id);
    assert_eq!(got.head, k.id.to_string(), "the re-offered document composes onto the compaction");
    let (r, _) = lora_delta(&c.blobs, 5.0).await;
    w.complete_job(complete("w", lease, &got, Outcome::Delta(r))).await.unwrap();
    let v = wait_state(&c.store, &again[0].id, Live).await.version.unwrap();
    assert_eq!(c.store.version(&v).await.unwrap().parent, Some(k.id.clone()));
    // Rollback reaches a version inside the compacted chain.
    c.coordinator
        .rollback(pb::RollbackRequest { namespace: "ns".into(), to: live[0].to_string(), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(c.store.namespace("ns").await.unwrap().head, Some(live[0].clone()));
}

/// A broadcaster that stages nowhere and records the BLAKE3 each staging carried.
#[derive(Default)]
struct Recording(std::sync::Mutex<Vec<Option<String>>>);

#[async_trait::async_trait]
impl engram_transport::Broadcaster for Recording {
    fn name(&self) -> &'static str {
        "recording"
    }

    async fn stage(
        &self,
        targets: &[engram_transport::Target],
        item: &engram_transport::Staging,
        _: Duration,
    ) -> Vec<anyhow::Result<pb::StageAck>> {
        self.0.lock().unwrap().push(item.blake3.clone());
        targets.iter().map(|_| Ok(pb::StageAck { ready: true, ..Default::default() })).collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_recorded_blake3_is_caught_and_the_delta_staged_again_with_the_right_one() {
    use pb::complete_job_request::Outcome;
    let recording = Arc::new(Recording::default());
    let c = start_full(None, CoordinatorConfig::default(), recording.clone()).await;
    let (mut w, lease) = worker(&c.address, "w").await;
    for (key, recorded) in [("right", None), ("wrong", Some("0".repeat(64)))] {
        let job = c.coordinator.consolidate(request("ns", key)).await.unwrap();
        let got = next(&mut w, "w", lease, 1000).await;
        let mut d = delta(&c.blobs, key).await;
        let bytes = c.blobs.get(&d.hash).await.unwrap();
        let right = engram_lineage::blob::transfer_hash(&bytes);
        d.blake3 = recorded.clone().unwrap_or_else(|| right.clone());
        w.complete_job(complete("w", lease, &got, Outcome::Delta(d))).await.unwrap();
        wait_state(&c.store, &job.id, engram_lineage::JobState::Live).await;
        let staged = std::mem::take(&mut *recording.0.lock().unwrap());
        match recorded {
            // The worker's hash was right: one staging, with it.
            None => assert_eq!(staged, vec![Some(right)]),
            // A wrong one: staged with it, caught beside the staging, staged again with the right one.
            Some(wrong) => assert_eq!(staged, vec![Some(wrong), Some(right)]),
        }
    }
}
