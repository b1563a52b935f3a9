//! Engram's memory of every weight update: versioned, content-addressed adapters.
//!
//! A [`LineageStore`] records namespaces (one tenant's adapter line over one base model), immutable versions
//! (id = hash of parent, delta and base model), the head each namespace serves (moved only by compare-and-swap),
//! tags, and an append-only event history. Two backends share one implementation of every operation
//! ([`ops`]): [`embedded::EmbeddedStore`] (redb, one file, no server) and [`etcd::EtcdStore`]. Delta bytes live in a
//! [`blob::BlobStore`], content-addressed and verified on every read; their format is `engram-lora`'s.
//!
//! Crash safety follows from the order of writes: a delta's blob is stored before any version names it, and a
//! version is recorded (atomically, with its log and event entries) before any head can point at it.
#![forbid(unsafe_code)]

pub mod admin;
pub mod bench;
pub mod blob;
#[cfg(feature = "etcd")]
pub mod election;
pub mod embedded;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod jobs;
pub mod keys;
#[cfg(feature = "etcd")]
pub mod local_etcd;
pub mod ops;
pub mod types;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde::de::DeserializeOwned;

pub use blob::BlobStore;
pub use jobs::{Job, JobOptions, JobState, JobTimings};
pub use keys::Keys;
pub use ops::{Applied, Op};
pub use types::*;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// A compare-and-swap lost: someone else moved the head first.
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("corrupt data: {0}")]
    Corrupt(String),
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// This process lost the leadership its writes were conditioned on.
    #[error("fenced: {0}")]
    Fenced(String),
}

/// A leader's election key at its creation revision: writes made under it succeed only while it still holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub key: String,
    pub revision: i64,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Head moves of one namespace. The first item is the head at subscription time; then every move, in order.
pub struct HeadWatch {
    rx: tokio::sync::mpsc::Receiver<Result<HeadChange>>,
}

impl HeadWatch {
    pub(crate) fn new(rx: tokio::sync::mpsc::Receiver<Result<HeadChange>>) -> Self {
        Self { rx }
    }

    /// The next head, or `None` when the store is gone.
    pub async fn next(&mut self) -> Option<Result<HeadChange>> {
        self.rx.recv().await
    }
}

/// A lineage backend. Implementors provide atomic operations, reads and a head watch; everything else is shared.
#[async_trait]
pub trait LineageStore: Send + Sync + 'static {
    fn keys(&self) -> &Keys;

    /// Where the store lives, for messages.
    fn describe(&self) -> String;

    /// Runs one write operation atomically and durably.
    async fn apply(&self, op: Op) -> Result<Applied>;

    async fn get_raw(&self, key: &str) -> Result<Option<Vec<u8>>>;

    /// Keys starting with `prefix` in key order (or reversed), at most `limit`.
    async fn scan(&self, prefix: &str, limit: Option<usize>, newest_first: bool) -> Result<Vec<(String, Vec<u8>)>>;

    async fn watch_head(&self, namespace: &str) -> Result<HeadWatch>;

    /// Makes every later write conditional on `fence` (see [`Fence`]); a write after the key is gone or re-created
    /// fails with [`Error::Fenced`]. A store without leadership (embedded: one process) ignores it.
    fn set_fence(&self, _fence: Option<Fence>) {}

    // ---- provided: the lineage API ----

    async fn create_namespace(&self, name: &str, base_model: &str, actor: &str) -> Result<Namespace> {
        let op = Op::CreateNamespace { name: name.into(), base_model: base_model.into(), actor: actor.into() };
        match self.apply(op).await? {
            Applied::Namespace(ns) => Ok(ns),
            other => unreachable!("create namespace returned {other:?}"),
        }
    }

    async fn namespace(&self, name: &str) -> Result<Namespace> {
        validate_name("namespace", name)?;
        get_json(self, &self.keys().namespace(name))
            .await?
            .ok_or_else(|| Error::NotFound(format!("namespace {name:?}")))
    }

    async fn namespaces(&self) -> Result<Vec<Namespace>> {
        let rows = self.scan(&self.keys().namespaces(), None, false).await?;
        rows.iter().map(|(k, v)| decode(k, v)).collect()
    }

    /// Records a candidate version. Its delta must already be in the blob store.
    async fn create_version(&self, new: NewVersion) -> Result<Version> {
        match self.apply(Op::CreateVersion(new)).await? {
            Applied::Version(v) => Ok(v),
            other => unreachable!("create version returned {other:?}"),
        }
    }

    async fn version(&self, id: &VersionId) -> Result<Version> {
        get_json(self, &self.keys().version(id)).await?.ok_or_else(|| Error::NotFound(format!("version {id}")))
    }

    /// Moves `namespace`'s head from `expected` to the candidate `to` (whose parent must be `expected`).
    async fn promote(
        &self,
        namespace: &str,
        expected: Option<&VersionId>,
        to: &VersionId,
        actor: &str,
    ) -> Result<HeadChange> {
        let op = Op::Promote {
            namespace: namespace.into(),
            expected: expected.cloned(),
            to: to.clone(),
            actor: actor.into(),
        };
        head_change(self.apply(op).await?)
    }

    /// Moves `namespace`'s head from `expected` back to its ancestor `to` (`None`: the bare base model).
    async fn rollback(
        &self,
        namespace: &str,
        expected: Option<&VersionId>,
        to: Option<&VersionId>,
        actor: &str,
        reason: &str,
    ) -> Result<HeadChange> {
        let op = Op::Rollback {
            namespace: namespace.into(),
            expected: expected.cloned(),
            to: to.cloned(),
            actor: actor.into(),
            reason: reason.into(),
        };
        head_change(self.apply(op).await?)
    }

    async fn reject(&self, id: &VersionId, actor: &str, reason: &str) -> Result<Version> {
        match self.apply(Op::Reject { version: id.clone(), actor: actor.into(), reason: reason.into() }).await? {
            Applied::Version(v) => Ok(v),
            other => unreachable!("reject returned {other:?}"),
        }
    }

    async fn tag(&self, namespace: &str, tag: &str, id: &VersionId, actor: &str) -> Result<()> {
        let op = Op::Tag { namespace: namespace.into(), tag: tag.into(), version: id.clone(), actor: actor.into() };
        self.apply(op).await.map(|_| ())
    }

    async fn tags(&self, namespace: &str) -> Result<BTreeMap<String, VersionId>> {
        self.namespace(namespace).await?;
        let prefix = self.keys().tags(namespace);
        let rows = self.scan(&prefix, None, false).await?;
        rows.iter().map(|(k, v)| Ok((k[prefix.len()..].to_string(), decode(k, v)?))).collect()
    }

    /// Records `job` durably, or returns the job already submitted under its idempotency key; `true` when new.
    async fn submit_job(&self, job: Job) -> Result<(Job, bool)> {
        match self.apply(Op::SubmitJob(job)).await? {
            Applied::Job(j, created) => Ok((j, created)),
            other => unreachable!("submit job returned {other:?}"),
        }
    }

    /// Replaces `job`'s record if it is still `expected_state` at `expected_attempts`.
    async fn update_job(&self, job: Job, expected_state: JobState, expected_attempts: u32) -> Result<Job> {
        match self.apply(Op::UpdateJob { job, expected_state, expected_attempts }).await? {
            Applied::Job(j, _) => Ok(j),
            other => unreachable!("update job returned {other:?}"),
        }
    }

    async fn job(&self, id: &str) -> Result<Job> {
        jobs::validate_job_id(id)?;
        get_json(self, &self.keys().job(id)).await?.ok_or_else(|| Error::NotFound(format!("job {id}")))
    }

    /// Every job, oldest first.
    async fn jobs(&self) -> Result<Vec<Job>> {
        let rows = self.scan(&self.keys().jobs(), None, false).await?;
        rows.iter().map(|(k, v)| decode(k, v)).collect()
    }

    /// The namespace's versions, newest first.
    async fn log(&self, namespace: &str, limit: Option<usize>) -> Result<Vec<Version>> {
        self.namespace(namespace).await?;
        let rows = self.scan(&self.keys().logs(namespace), limit, true).await?;
        let mut out = Vec::with_capacity(rows.len());
        for (k, v) in &rows {
            out.push(self.version(&decode(k, v)?).await?);
        }
        Ok(out)
    }

    /// `id` and its ancestors, child first.
    async fn ancestry(&self, id: &VersionId, limit: Option<usize>) -> Result<Vec<Version>> {
        let mut out = Vec::new();
        let mut cur = Some(id.clone());
        while let Some(id) = cur {
            if limit.is_some_and(|l| out.len() >= l) {
                break;
            }
            let v = self.version(&id).await?;
            cur = v.parent.clone();
            out.push(v);
        }
        Ok(out)
    }

    /// The namespace's events, newest first.
    async fn history(&self, namespace: &str, limit: Option<usize>) -> Result<Vec<Event>> {
        self.namespace(namespace).await?;
        let rows = self.scan(&self.keys().events(namespace), limit, true).await?;
        rows.iter().map(|(k, v)| decode(k, v)).collect()
    }

    /// Resolves what an operator typed: a full id, a unique prefix of at least 6 digits, or (with a namespace) a
    /// tag or `head`.
    async fn resolve(&self, namespace: Option<&str>, text: &str) -> Result<VersionId> {
        if let Some(ns) = namespace {
            if text == "head" {
                return self.namespace(ns).await?.head.ok_or_else(|| Error::NotFound(format!("{ns:?} has no head")));
            }
            if let Some(id) = self.tags(ns).await?.remove(text) {
                return Ok(id);
            }
        }
        if let Ok(id) = VersionId::parse(text) {
            return Ok(id);
        }
        if text.len() < 6 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::Invalid(format!("{text:?} is not a version id, id prefix (6+ hex digits) or tag")));
        }
        let prefix = format!("{}{text}", self.keys().versions());
        let rows = self.scan(&prefix, Some(2), false).await?;
        match rows.as_slice() {
            [] => Err(Error::NotFound(format!("no version starts with {text}"))),
            [(k, _)] => VersionId::parse(&k[self.keys().versions().len()..]),
            _ => Err(Error::Invalid(format!("{text} is ambiguous: more than one version starts with it"))),
        }
    }
}

fn head_change(a: Applied) -> Result<HeadChange> {
    match a {
        Applied::Head(h) => Ok(h),
        other => unreachable!("head move returned {other:?}"),
    }
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::Corrupt(format!("{key}: {e}")))
}

async fn get_json<S: LineageStore + ?Sized, T: DeserializeOwned>(store: &S, key: &str) -> Result<Option<T>> {
    store.get_raw(key).await?.map(|b| decode(key, &b)).transpose()
}

/// The endpoints (`http://HOST:PORT`) and key prefix of an `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]` URL.
pub fn etcd_url(url: &str) -> Option<(Vec<String>, String)> {
    let rest = url.strip_prefix("etcd://")?;
    let (hosts, prefix) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/engram"),
    };
    Some((hosts.split(',').map(|h| format!("http://{h}")).collect(), prefix.to_string()))
}

/// Opens a lineage store from a URL: `file://DIR` (embedded, `DIR/lineage.redb`) or
/// `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]` (prefix defaults to `/engram`).
pub async fn open(url: &str) -> Result<Arc<dyn LineageStore>> {
    if let Some(dir) = url.strip_prefix("file://") {
        return Ok(Arc::new(embedded::EmbeddedStore::open(std::path::Path::new(dir))?));
    }
    if let Some((_endpoints, _prefix)) = etcd_url(url) {
        #[cfg(feature = "etcd")]
        return Ok(Arc::new(etcd::EtcdStore::connect(&_endpoints, &_prefix).await?));
        #[cfg(not(feature = "etcd"))]
        return Err(Error::Invalid("this build has no etcd support (cargo feature `etcd`)".into()));
    }
    Err(Error::Invalid(format!("store {url:?}: expected file://DIR or etcd://HOST:PORT[/PREFIX]")))
}
