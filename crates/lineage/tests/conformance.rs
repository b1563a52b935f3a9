//! One suite, every backend: the embedded store and a real etcd on loopback.
//!
//! The etcd half needs the `etcd` binary. Without it those tests print why and pass, unless the test script
//! promised etcd (`ENGRAM_REQUIRE_ETCD=1`), in which case they fail.

use std::sync::Arc;
use std::time::Duration;

use engram_lineage::local_etcd::LocalEtcd;
use engram_lineage::{
    blob::digest, Error, EventKind, Job, JobOptions, JobState, LineageStore, NewVersion, Status, VersionId,
};

enum Backend {
    Embedded(tempfile::TempDir),
    Etcd(LocalEtcd),
}

struct Harness {
    backend: Backend,
    store: Option<Arc<dyn LineageStore>>,
}

impl Harness {
    async fn embedded() -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let store = engram_lineage::open(&format!("file://{}", dir.path().display())).await.unwrap();
        Some(Self { backend: Backend::Embedded(dir), store: Some(store) })
    }

    async fn etcd() -> Option<Self> {
        if !engram_lineage::local_etcd::etcd_available_for_tests() {
            return None;
        }
        let etcd = LocalEtcd::start().unwrap();
        let store = engram_lineage::open(&etcd.url("/engram-test")).await.unwrap();
        Some(Self { backend: Backend::Etcd(etcd), store: Some(store) })
    }

    fn store(&self) -> Arc<dyn LineageStore> {
        self.store.clone().expect("store open")
    }

    /// Closes and reopens the store (embedded) or kills and restarts the server (etcd).
    async fn restart(&mut self) {
        let url = match &mut self.backend {
            Backend::Embedded(dir) => {
                let store = self.store.take().unwrap();
                assert_eq!(Arc::strong_count(&store), 1, "a test still holds the store");
                drop(store);
                format!("file://{}", dir.path().display())
            }
            Backend::Etcd(etcd) => {
                etcd.restart().unwrap();
                etcd.url("/engram-test")
            }
        };
        self.store = Some(engram_lineage::open(&url).await.unwrap());
    }
}

fn new_version(ns: &str, parent: Option<&VersionId>, delta: &str) -> NewVersion {
    NewVersion {
        namespace: ns.into(),
        parent: parent.cloned(),
        delta_hash: digest(delta.as_bytes()),
        delta_size: delta.len() as u64,
        injector: "test".into(),
        job_id: format!("job-{delta}"),
        document_digests: vec![digest(b"doc")],
        gate_metrics: [("known_recall".to_string(), 0.97)].into(),
        creator: "tester".into(),
        ..Default::default()
    }
}

/// A namespace with a promoted chain of `n` versions; returns their ids, oldest first.
async fn chain(store: &Arc<dyn LineageStore>, ns: &str, n: usize) -> Vec<VersionId> {
    store.create_namespace(ns, "base-hash", "tester").await.unwrap();
    let mut ids: Vec<VersionId> = Vec::new();
    for i in 0..n {
        let v = store.create_version(new_version(ns, ids.last(), &format!("{ns}-{i}"))).await.unwrap();
        store.promote(ns, ids.last(), &v.id, "tester").await.unwrap();
        ids.push(v.id);
    }
    ids
}

mod suite {
    use super::*;

    pub async fn namespaces(h: Harness) {
        let s = h.store();
        let ns = s.create_namespace("tenant-a", "base-hash", "alice").await.unwrap();
        assert_eq!((ns.head, ns.base_model.as_str(), ns.creator.as_str()), (None, "base-hash", "alice"));
        assert!(matches!(s.create_namespace("tenant-a", "base-hash", "bob").await, Err(Error::AlreadyExists(_))));
        assert!(matches!(s.create_namespace("a/b", "base-hash", "bob").await, Err(Error::Invalid(_))));
        assert!(matches!(s.create_namespace("x", "", "bob").await, Err(Error::Invalid(_))));
        assert!(matches!(s.namespace("missing").await, Err(Error::NotFound(_))));
        s.create_namespace("tenant-b", "other-base", "bob").await.unwrap();
        let names: Vec<String> = s.namespaces().await.unwrap().into_iter().map(|n| n.name).collect();
        assert_eq!(names, ["tenant-a", "tenant-b"]);
    }

    pub async fn versions_log_and_ancestry(h: Harness) {
        let s = h.store();
        s.create_namespace("ns", "base-hash", "t").await.unwrap();
        s.create_namespace("other", "base-hash", "t").await.unwrap();
        let v1 = s.create_version(new_version("ns", None, "d1")).await.unwrap();
        assert_eq!(v1.status, Status::Candidate);
        assert_eq!(v1.id, VersionId::derive(None, &digest(b"d1"), "base-hash"));
        let v2 = s.create_version(new_version("ns", Some(&v1.id), "d2")).await.unwrap();
        let v3 = s.create_version(new_version("ns", Some(&v2.id), "d3")).await.unwrap();
        // Ids are never reused: the same parent, delta and base model is refused.
        assert!(matches!(s.create_version(new_version("ns", Some(&v1.id), "d2")).await, Err(Error::AlreadyExists(_))));
        // Bad parents and hashes are refused with nothing recorded.
        assert!(matches!(s.create_version(new_version("other", Some(&v1.id), "x")).await, Err(Error::Invalid(_))));
        let ghost = VersionId::derive(None, &digest(b"ghost"), "base-hash");
        assert!(matches!(s.create_version(new_version("ns", Some(&ghost), "x")).await, Err(Error::NotFound(_))));
        let mut bad = new_version("ns", None, "x");
        bad.delta_hash = "zz".into();
        assert!(matches!(s.create_version(bad).await, Err(Error::Invalid(_))));
        assert!(matches!(s.create_version(new_version("nope", None, "x")).await, Err(Error::NotFound(_))));

        let log: Vec<VersionId> = s.log("ns", None).await.unwrap().into_iter().map(|v| v.id).collect();
        assert_eq!(log, [v3.id.clone(), v2.id.clone(), v1.id.clone()]);
        assert_eq!(s.log("ns", Some(1)).await.unwrap()[0].id, v3.id);
        let anc: Vec<VersionId> = s.ancestry(&v3.id, None).await.unwrap().into_iter().map(|v| v.id).collect();
        assert_eq!(anc, [v3.id.clone(), v2.id.clone(), v1.id.clone()]);
        let got = s.version(&v2.id).await.unwrap();
        assert_eq!(got, v2);
        assert_eq!(got.gate_metrics["known_recall"], 0.97);
        assert!(s.log("other", None).await.unwrap().is_empty());
    }

    pub async fn promote_is_compare_and_swap(h: Harness) {
        let s = h.store();
        s.create_namespace("ns", "base-hash", "t").await.unwrap();
        let v1 = s.create_version(new_version("ns", None, "d1")).await.unwrap();
        let v2 = s.create_version(new_version("ns", Some(&v1.id), "d2")).await.unwrap();
        // v2 was built on v1, but the head is still the base model.
        assert!(matches!(s.promote("ns", None, &v2.id, "t").await, Err(Error::Conflict(_))));
        // A wrong expectation of the head is a conflict.
        assert!(matches!(s.promote("ns", Some(&v2.id), &v1.id, "t").await, Err(Error::Conflict(_))));
        let c = s.promote("ns", None, &v1.id, "t").await.unwrap();
        assert_eq!(c.head.as_ref(), Some(&v1.id));
        assert_eq!(s.version(&v1.id).await.unwrap().status, Status::Live);
        s.promote("ns", Some(&v1.id), &v2.id, "t").await.unwrap();
        assert_eq!(s.version(&v1.id).await.unwrap().status, Status::Superseded);
        assert_eq!(s.version(&v2.id).await.unwrap().status, Status::Live);
        assert_eq!(s.namespace("ns").await.unwrap().head, Some(v2.id.clone()));
        // Only candidates are promoted; a rejected version never serves.
        let v3 = s.create_version(new_version("ns", Some(&v2.id), "d3")).await.unwrap();
        s.reject(&v3.id, "gate", "known recall fell 9 points").await.unwrap();
        assert_eq!(s.version(&v3.id).await.unwrap().status, Status::Rejected);
        assert!(matches!(s.promote("ns", Some(&v2.id), &v3.id, "t").await, Err(Error::Invalid(_))));
        assert!(matches!(s.reject(&v2.id, "gate", "x").await, Err(Error::Invalid(_))));
    }

    pub async fn concurrent_writers_race_for_one_head(h: Harness) {
        let s = h.store();
        let base = chain(&s, "ns", 1).await;
        let racers = 16;
        let mut tasks = Vec::new();
        for i in 0..racers {
            let s = s.clone();
            let parent = base[0].clone();
            tasks.push(tokio::spawn(async move {
                let v = s.create_version(new_version("ns", Some(&parent), &format!("racer-{i}"))).await.unwrap();
                (v.id.clone(), s.promote("ns", Some(&parent), &v.id, &format!("racer-{i}")).await)
            }));
        }
        let mut winners = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                (id, Ok(_)) => winners.push(id),
                (_, Err(Error::Conflict(_))) => {}
                (_, Err(e)) => panic!("a racer failed with something other than a conflict: {e}"),
            }
        }
        assert_eq!(winners.len(), 1, "exactly one writer may move the head");
        assert_eq!(s.namespace("ns").await.unwrap().head.as_ref(), Some(&winners[0]));
        let promotions = s
            .history("ns", None)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| matches!(e.kind, EventKind::Promoted { .. }))
            .count();
        assert_eq!(promotions, 2, "the base promotion and the one winner");
        assert_eq!(s.log("ns", None).await.unwrap().len(), racers + 1);
    }

    pub async fn rollback_keeps_history(h: Harness) {
        let s = h.store();
        let ids = chain(&s, "ns", 3).await;
        // Not an ancestor: a candidate off to the side.
        let side = s.create_version(new_version("ns", Some(&ids[0]), "side")).await.unwrap();
        let err = s.rollback("ns", Some(&ids[2]), Some(&side.id), "op", "bad").await.unwrap_err();
        assert!(matches!(err, Error::Invalid(ref m) if m.contains("not an ancestor")), "{err}");
        assert!(matches!(s.rollback("ns", Some(&ids[2]), Some(&ids[0]), "op", " ").await, Err(Error::Invalid(_))));
        assert!(matches!(s.rollback("ns", Some(&ids[1]), Some(&ids[0]), "op", "x").await, Err(Error::Conflict(_))));

        let c = s.rollback("ns", Some(&ids[2]), Some(&ids[0]), "oncall", "bad answers").await.unwrap();
        assert_eq!(c.head.as_ref(), Some(&ids[0]));
        let st = |i: usize| {
            let s = s.clone();
            let id = ids[i].clone();
            async move { s.version(&id).await.unwrap().status }
        };
        assert_eq!((st(0).await, st(1).await, st(2).await), (Status::Live, Status::RolledBack, Status::RolledBack));
        let last = &s.history("ns", Some(1)).await.unwrap()[0];
        assert_eq!(last.actor, "oncall");
        assert_eq!(last.reason.as_deref(), Some("bad answers"));
        assert_eq!(last.kind, EventKind::RolledBack { from: Some(ids[2].clone()), to: Some(ids[0].clone()) });
        // All the way back to the bare base model.
        s.rollback("ns", Some(&ids[0]), None, "oncall", "start over").await.unwrap();
        assert_eq!(s.namespace("ns").await.unwrap().head, None);
        assert!(matches!(s.rollback("ns", None, None, "oncall", "again").await, Err(Error::Invalid(_))));
        // The history is append-only and newest first: created, 3 x (version, promote), side, 2 rollbacks.
        let events = s.history("ns", None).await.unwrap();
        assert_eq!(events.len(), 1 + 6 + 1 + 2);
        assert!(events.windows(2).all(|w| w[0].seq == w[1].seq + 1));
    }

    pub async fn jobs_are_idempotent_and_fenced(h: Harness) {
        let s = h.store();
        let job = |key: &str| Job::new("ns", key, vec!["<doc> a </doc>".into()], JobOptions::default(), "t");
        // Unknown namespace: refused, nothing recorded.
        assert!(matches!(s.submit_job(job("k1")).await, Err(Error::NotFound(_))));
        s.create_namespace("ns", "base", "t").await.unwrap();
        let (a, created) = s.submit_job(job("k1")).await.unwrap();
        assert!(created);
        assert_eq!(a.document_digests, vec![digest(b"<doc> a </doc>")]);
        // The same key again, even with other documents: the first job, unchanged.
        let mut again = job("k1");
        again.documents = vec!["other".into()];
        let (b, created) = s.submit_job(again).await.unwrap();
        assert!(!created);
        assert_eq!(b, a);
        let (c, _) = s.submit_job(job("k2")).await.unwrap();
        assert_ne!(c.id, a.id);
        assert_eq!(s.jobs().await.unwrap().len(), 2);
        assert_eq!(s.job(&a.id).await.unwrap(), a);
        // A hand-out moves it to running at attempt 1; a writer still expecting attempt 0 is refused.
        let mut run = a.clone();
        run.state = JobState::Running;
        run.attempts = 1;
        s.update_job(run.clone(), JobState::Queued, 0).await.unwrap();
        let mut stale = a.clone();
        stale.state = JobState::Failed;
        assert!(matches!(s.update_job(stale, JobState::Queued, 0).await, Err(Error::Conflict(_))));
        let mut done = run.clone();
        done.state = JobState::Live;
        s.update_job(done.clone(), JobState::Running, 1).await.unwrap();
        // Final is final.
        assert!(matches!(s.update_job(run, JobState::Live, 1).await, Err(Error::Conflict(_))));
        assert_eq!(s.job(&a.id).await.unwrap().state, JobState::Live);
        assert!(matches!(s.job("../x").await, Err(Error::Invalid(_))));
    }

    pub async fn compaction_replaces_a_chain_and_rollback_walks_through_it(h: Harness) {
        let s = h.store();
        let ids = chain(&s, "ns", 4).await;
        let compaction = |parent: Option<&VersionId>, chain: &[VersionId], name: &str| NewVersion {
            compacts: chain.to_vec(),
            ..new_version("ns", parent, name)
        };
        // Not a chain starting right above the parent: refused, nothing recorded.
        for (parent, chain) in [(None, vec![ids[1].clone(), ids[2].clone()]), (Some(&ids[0]), vec![ids[2].clone()])] {
            let err = s.create_version(compaction(parent, &chain, "bad")).await.unwrap_err();
            assert!(matches!(err, Error::Invalid(ref m) if m.contains("unbroken chain")), "{err}");
        }
        assert_eq!(s.log("ns", None).await.unwrap().len(), 4);
        // ids[1..4] compacted onto ids[0]. It may only replace the head it ends with.
        let c = s.create_version(compaction(Some(&ids[0]), &ids[1..4], "c")).await.unwrap();
        assert_eq!(c.compacts, ids[1..4].to_vec());
        let early = s.create_version(compaction(Some(&ids[0]), &ids[1..3], "early")).await.unwrap();
        assert!(matches!(s.promote("ns", Some(&ids[3]), &early.id, "t").await, Err(Error::Conflict(_))));
        s.promote("ns", Some(&ids[3]), &c.id, "t").await.unwrap();
        assert_eq!(s.version(&c.id).await.unwrap().status, Status::Live);
        assert_eq!(s.version(&ids[3]).await.unwrap().status, Status::Superseded);
        // What replicas apply is the short chain: the compaction on top of its parent.
        let applied: Vec<VersionId> = s.ancestry(&c.id, None).await.unwrap().into_iter().map(|v| v.id).collect();
        assert_eq!(applied, [c.id.clone(), ids[0].clone()]);
        // A new version on top of the compaction, then a rollback into the replaced chain: the target is restored
        // with its own ancestry, exactly what it served before the compaction.
        let next = s.create_version(new_version("ns", Some(&c.id), "next")).await.unwrap();
        s.promote("ns", Some(&c.id), &next.id, "t").await.unwrap();
        s.rollback("ns", Some(&next.id), Some(&ids[2]), "oncall", "before the compaction").await.unwrap();
        assert_eq!(s.namespace("ns").await.unwrap().head.as_ref(), Some(&ids[2]));
        let restored: Vec<VersionId> = s.ancestry(&ids[2], None).await.unwrap().into_iter().map(|v| v.id).collect();
        assert_eq!(restored, [ids[2].clone(), ids[1].clone(), ids[0].clone()]);
        for (id, want) in [
            (&next.id, Status::RolledBack),
            (&c.id, Status::RolledBack),
            (&ids[3], Status::RolledBack),
            (&ids[2], Status::Live),
        ] {
            assert_eq!(s.version(id).await.unwrap().status, want, "{}", id.short());
        }
    }

    pub async fn tags_and_resolution(h: Harness) {
        let s = h.store();
        let ids = chain(&s, "ns", 2).await;
        s.tag("ns", "prod", &ids[0], "op").await.unwrap();
        assert!(matches!(s.tag("ns", "bad/tag", &ids[0], "op").await, Err(Error::Invalid(_))));
        assert_eq!(s.tags("ns").await.unwrap().get("prod"), Some(&ids[0]));
        assert_eq!(s.resolve(Some("ns"), "prod").await.unwrap(), ids[0]);
        assert_eq!(s.resolve(Some("ns"), "head").await.unwrap(), ids[1]);
        assert_eq!(s.resolve(None, &ids[1].as_str()[..10]).await.unwrap(), ids[1]);
        assert_eq!(s.resolve(None, ids[0].as_str()).await.unwrap(), ids[0]);
        assert!(matches!(s.resolve(None, "abc").await, Err(Error::Invalid(_))));
        assert!(matches!(s.resolve(None, "ffffffffff").await, Err(Error::NotFound(_))));
        // Retagging moves the tag and is recorded.
        s.tag("ns", "prod", &ids[1], "op").await.unwrap();
        assert_eq!(s.resolve(Some("ns"), "prod").await.unwrap(), ids[1]);
        let tagged = s
            .history("ns", None)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| matches!(e.kind, EventKind::Tagged { .. }))
            .count();
        assert_eq!(tagged, 2);
    }

    async fn next(w: &mut engram_lineage::HeadWatch) -> engram_lineage::HeadChange {
        tokio::time::timeout(Duration::from_secs(10), w.next())
            .await
            .expect("watch delivered in time")
            .unwrap()
            .unwrap()
    }

    pub async fn watchers_see_every_move_in_order(h: Harness) {
        let s = h.store();
        let ids = chain(&s, "ns", 1).await;
        let mut w = s.watch_head("ns").await.unwrap();
        assert_eq!(next(&mut w).await.head.as_ref(), Some(&ids[0]), "first item is the current head");
        let mut expect = vec![];
        let mut head = ids[0].clone();
        for i in 0..5 {
            let v = s.create_version(new_version("ns", Some(&head), &format!("w{i}"))).await.unwrap();
            s.promote("ns", Some(&head), &v.id, "t").await.unwrap();
            head = v.id.clone();
            expect.push(Some(v.id));
        }
        s.rollback("ns", Some(&head), Some(&ids[0]), "t", "watch test").await.unwrap();
        expect.push(Some(ids[0].clone()));
        for e in expect {
            assert_eq!(next(&mut w).await.head, e);
        }
        // Writes that do not move the head are not head changes.
        s.create_version(new_version("ns", Some(&ids[0]), "quiet")).await.unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(300), w.next()).await.is_err());
    }

    pub async fn survives_restart(mut h: Harness) {
        let ids = chain(&h.store(), "ns", 2).await;
        h.store().tag("ns", "keep", &ids[0], "op").await.unwrap();
        let before = h.store().history("ns", None).await.unwrap();
        h.restart().await;
        let s = h.store();
        assert_eq!(s.namespace("ns").await.unwrap().head.as_ref(), Some(&ids[1]));
        assert_eq!(s.history("ns", None).await.unwrap(), before);
        assert_eq!(s.resolve(Some("ns"), "keep").await.unwrap(), ids[0]);
        // Still writable, and the event sequence continues.
        let v = s.create_version(new_version("ns", Some(&ids[1]), "after")).await.unwrap();
        s.promote("ns", Some(&ids[1]), &v.id, "t").await.unwrap();
        assert_eq!(s.history("ns", Some(1)).await.unwrap()[0].seq, before[0].seq + 2);
    }

    /// A watcher keeps delivering across a server restart (etcd) or carries on (embedded: nothing to lose).
    pub async fn watch_resumes_after_reconnect(mut h: Harness) {
        let ids = chain(&h.store(), "ns", 1).await;
        let store = h.store();
        let mut w = store.watch_head("ns").await.unwrap();
        let first = tokio::time::timeout(Duration::from_secs(10), w.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(first.head.as_ref(), Some(&ids[0]));
        if let Backend::Etcd(etcd) = &mut h.backend {
            etcd.restart().unwrap();
        }
        // Write through the same client; it reconnects too.
        let mut attempt = 0;
        let v = loop {
            match store.create_version(new_version("ns", Some(&ids[0]), "after-restart")).await {
                Ok(v) => break v,
                Err(e) if attempt < 50 => {
                    attempt += 1;
                    eprintln!("waiting for the store: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("store did not come back: {e}"),
            }
        };
        store.promote("ns", Some(&ids[0]), &v.id, "t").await.unwrap();
        let got =
            tokio::time::timeout(Duration::from_secs(15), w.next()).await.expect("watch resumed").unwrap().unwrap();
        assert_eq!(got.head.as_ref(), Some(&v.id));
    }
}

macro_rules! conformance {
    ($backend:ident, $open:expr) => {
        mod $backend {
            use super::*;
            conformance!(@tests $open; namespaces, versions_log_and_ancestry, promote_is_compare_and_swap,
                concurrent_writers_race_for_one_head, rollback_keeps_history,
                compaction_replaces_a_chain_and_rollback_walks_through_it, tags_and_resolution, jobs_are_idempotent_and_fenced,
                watchers_see_every_move_in_order, survives_restart, watch_resumes_after_reconnect);
        }
    };
    (@tests $open:expr; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                if let Some(h) = $open.await {
                    suite::$name(h).await;
                }
            }
        )*
    };
}

conformance!(embedded, Harness::embedded());
conformance!(etcd, Harness::etcd());
