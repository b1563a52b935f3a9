//! The write operations, written once for every backend.
//!
//! An operation reads what it needs through a [`Tx`] and buffers its writes there; the backend makes the whole
//! buffer durable atomically or not at all (redb: one write transaction; etcd: one transaction guarded by the
//! revisions of every key read, retried when another writer got there first). Validation happens before any write,
//! so a refused operation leaves no trace.

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::jobs::{idempotency_digest, Job, JobState};
use crate::keys::Keys;
use crate::types::*;
use crate::{Error, Result};

/// A write operation as data: backends queue, batch and retry it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    CreateNamespace {
        name: String,
        base_model: String,
        actor: String,
    },
    CreateVersion(NewVersion),
    /// Compare-and-swap the head forward to a candidate whose parent is the current head.
    Promote {
        namespace: String,
        expected: Option<VersionId>,
        to: VersionId,
        actor: String,
    },
    /// Compare-and-swap the head back to an ancestor (`None`: the bare base model).
    Rollback {
        namespace: String,
        expected: Option<VersionId>,
        to: Option<VersionId>,
        actor: String,
        reason: String,
    },
    Reject {
        version: VersionId,
        actor: String,
        reason: String,
    },
    Tag {
        namespace: String,
        tag: String,
        version: VersionId,
        actor: String,
    },
    /// Records a queued job, unless its namespace already has a job under the same idempotency key (then that job
    /// is returned unchanged).
    SubmitJob(Job),
    /// Replaces a job record, if it is still in `expected_state` at `expected_attempts` (fencing stale writers).
    UpdateJob {
        job: Job,
        expected_state: JobState,
        expected_attempts: u32,
    },
}

/// What an operation produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    Namespace(Namespace),
    Version(Version),
    Head(HeadChange),
    /// A job, and whether this operation created it.
    Job(Job, bool),
}

/// Point reads an operation can make.
#[async_trait]
pub trait Reader: Send {
    async fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>>;
}

/// One operation's view of the store: reads see its own buffered writes first.
pub struct Tx<'r> {
    reader: &'r mut dyn Reader,
    pub writes: BTreeMap<String, Vec<u8>>,
    pub head_changes: Vec<HeadChange>,
}

impl<'r> Tx<'r> {
    pub fn new(reader: &'r mut dyn Reader) -> Self {
        Self { reader, writes: BTreeMap::new(), head_changes: Vec::new() }
    }

    async fn get<T: DeserializeOwned>(&mut self, key: &str) -> Result<Option<T>> {
        let bytes = match self.writes.get(key) {
            Some(v) => Some(v.clone()),
            None => self.reader.get(key).await?,
        };
        bytes.map(|b| serde_json::from_slice(&b).map_err(|e| Error::Corrupt(format!("{key}: {e}")))).transpose()
    }

    fn put<T: Serialize>(&mut self, key: String, value: &T) {
        // Pretty JSON: `etcdctl get --prefix` is an operator's view of the lineage.
        let bytes = serde_json::to_vec_pretty(value).expect("lineage records serialize");
        self.writes.insert(key, bytes);
    }

    async fn namespace(&mut self, keys: &Keys, name: &str) -> Result<Namespace> {
        validate_name("namespace", name)?;
        self.get(&keys.namespace(name)).await?.ok_or_else(|| Error::NotFound(format!("namespace {name:?}")))
    }

    async fn version(&mut self, keys: &Keys, id: &VersionId) -> Result<Version> {
        self.get(&keys.version(id)).await?.ok_or_else(|| Error::NotFound(format!("version {id}")))
    }

    fn event(&mut self, keys: &Keys, ns: &mut Namespace, actor: &str, reason: Option<String>, kind: EventKind) -> u64 {
        let seq = ns.seq;
        ns.seq += 1;
        let at_ms = now_ms();
        let e = Event { seq, at_ms, at: format_ms(at_ms), actor: actor.to_string(), reason, kind };
        self.put(keys.event(&ns.name, seq), &e);
        seq
    }

    fn set_head(&mut self, keys: &Keys, ns: &Namespace) {
        self.put(keys.namespace(&ns.name), ns);
        self.head_changes.push(HeadChange { namespace: ns.name.clone(), head: ns.head.clone(), seq: ns.seq });
    }
}

/// Runs `op` against `tx`. On error nothing in `tx.writes` may be applied.
pub async fn run(keys: &Keys, op: &Op, tx: &mut Tx<'_>) -> Result<Applied> {
    match op {
        Op::CreateNamespace { name, base_model, actor } => {
            validate_name("namespace", name)?;
            if base_model.is_empty() {
                return Err(Error::Invalid("a namespace needs the hash of its base model".into()));
            }
            if tx.get::<Namespace>(&keys.namespace(name)).await?.is_some() {
                return Err(Error::AlreadyExists(format!("namespace {name:?}")));
            }
            let mut ns = Namespace {
                name: name.clone(),
                base_model: base_model.clone(),
                head: None,
                seq: 0,
                created_at_ms: now_ms(),
                creator: actor.clone(),
            };
            tx.event(keys, &mut ns, actor, None, EventKind::NamespaceCreated { base_model: base_model.clone() });
            tx.put(keys.namespace(name), &ns);
            Ok(Applied::Namespace(ns))
        }
        Op::CreateVersion(new) => {
            let mut ns = tx.namespace(keys, &new.namespace).await?;
            if new.delta_hash.len() != 64 || !new.delta_hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(Error::Invalid(format!("delta hash {:?} is not a hex SHA-256", new.delta_hash)));
            }
            if let Some(p) = &new.parent {
                let parent = tx.version(keys, p).await?;
                if parent.namespace != ns.name {
                    return Err(Error::Invalid(format!("parent {p} belongs to namespace {:?}", parent.namespace)));
                }
            }
            // A compaction names an unbroken chain that starts right above its parent.
            let mut below = new.parent.clone();
            for c in &new.compacts {
                let v = tx.version(keys, c).await?;
                if v.namespace != ns.name || v.parent != below {
                    return Err(Error::Invalid(format!(
                        "compaction: {} is not the child of {} in namespace {:?}; a compaction replaces an unbroken \
                         chain starting right above its parent",
                        c.short(),
                        show(&below),
                        ns.name
                    )));
                }
                below = Some(c.clone());
            }
            let id = VersionId::derive(new.parent.as_ref(), &new.delta_hash, &ns.base_model);
            if tx.get::<Version>(&keys.version(&id)).await?.is_some() {
                return Err(Error::AlreadyExists(format!("version {id} (same parent, delta and base model)")));
            }
            let seq = tx.event(
                keys,
                &mut ns,
                &new.creator,
                None,
                EventKind::VersionCreated { version: id.clone(), parent: new.parent.clone() },
            );
            let v = Version {
                id: id.clone(),
                namespace: ns.name.clone(),
                parent: new.parent.clone(),
                delta_hash: new.delta_hash.clone(),
                delta_size: new.delta_size,
                delta_blake3: new.delta_blake3.clone(),
                base_model: ns.base_model.clone(),
                injector: new.injector.clone(),
                job_id: new.job_id.clone(),
                document_digests: new.document_digests.clone(),
                gate_metrics: new.gate_metrics.clone(),
                compacts: new.compacts.clone(),
                composer_state: new.composer_state.clone(),
                created_at_ms: now_ms(),
                creator: new.creator.clone(),
                status: Status::Candidate,
                seq,
            };
            tx.put(keys.version(&id), &v);
            tx.put(keys.log(&ns.name, seq), &id);
            tx.put(keys.namespace(&ns.name), &ns);
            Ok(Applied::Version(v))
        }
        Op::Promote { namespace, expected, to, actor } => {
            let mut ns = tx.namespace(keys, namespace).await?;
            check_head(&ns, expected)?;
            let mut v = tx.version(keys, to).await?;
            if v.namespace != ns.name {
                return Err(Error::Invalid(format!("version {to} belongs to namespace {:?}", v.namespace)));
            }
            if v.status != Status::Candidate {
                return Err(Error::Invalid(format!("version {to} is {}, only a candidate can be promoted", v.status)));
            }
            // A compaction takes over from the last version it replaces; anything else from its parent.
            let built_on = if v.compacts.is_empty() { v.parent.clone() } else { v.compacts.last().cloned() };
            if built_on != ns.head {
                return Err(Error::Conflict(format!(
                    "candidate {to} was built on {}, but the head is {}",
                    show(&built_on),
                    show(&ns.head)
                )));
            }
            if let Some(old) = ns.head.clone() {
                let mut o = tx.version(keys, &old).await?;
                o.status = Status::Superseded;
                tx.put(keys.version(&old), &o);
            }
            v.status = Status::Live;
            tx.put(keys.version(to), &v);
            let from = ns.head.replace(to.clone());
            tx.event(keys, &mut ns, actor, None, EventKind::Promoted { from, to: to.clone() });
            tx.set_head(keys, &ns);
            Ok(Applied::Head(tx.head_changes.last().cloned().expect("just pushed")))
        }
        Op::Rollback { namespace, expected, to, actor, reason } => {
            let mut ns = tx.namespace(keys, namespace).await?;
            check_head(&ns, expected)?;
            if reason.trim().is_empty() {
                return Err(Error::Invalid("a rollback needs a reason".into()));
            }
            let Some(head) = ns.head.clone() else {
                return Err(Error::Invalid(format!(
                    "namespace {namespace:?} serves the base model; nothing to roll back"
                )));
            };
            // Walk down from the head; every version above the target leaves the live line.
            let mut undone = Vec::new();
            let mut cur = Some(head.clone());
            while cur != *to {
                let Some(id) = cur else {
                    return Err(Error::Invalid(format!("{} is not an ancestor of the head {head}", show(to))));
                };
                let v = tx.version(keys, &id).await?;
                // Through a compaction, the way down runs through the chain it replaced.
                cur = v.compacts.last().cloned().or_else(|| v.parent.clone());
                undone.push(v);
            }
            for mut v in undone {
                if v.status != Status::RolledBack {
                    v.status = Status::RolledBack;
                    tx.put(keys.version(&v.id), &v);
                }
            }
            if let Some(t) = to {
                let mut v = tx.version(keys, t).await?;
                v.status = Status::Live;
                tx.put(keys.version(t), &v);
            }
            let from = std::mem::replace(&mut ns.head, to.clone());
            tx.event(keys, &mut ns, actor, Some(reason.clone()), EventKind::RolledBack { from, to: to.clone() });
            tx.set_head(keys, &ns);
            Ok(Applied::Head(tx.head_changes.last().cloned().expect("just pushed")))
        }
        Op::Reject { version, actor, reason } => {
            let mut v = tx.version(keys, version).await?;
            if v.status != Status::Candidate {
                return Err(Error::Invalid(format!(
                    "version {version} is {}, only a candidate can be rejected",
                    v.status
                )));
            }
            let mut ns = tx.namespace(keys, &v.namespace.clone()).await?;
            v.status = Status::Rejected;
            tx.put(keys.version(version), &v);
            tx.event(keys, &mut ns, actor, Some(reason.clone()), EventKind::Rejected { version: version.clone() });
            tx.put(keys.namespace(&ns.name), &ns);
            Ok(Applied::Version(v))
        }
        Op::Tag { namespace, tag, version, actor } => {
            validate_name("tag", tag)?;
            let mut ns = tx.namespace(keys, namespace).await?;
            let v = tx.version(keys, version).await?;
            if v.namespace != ns.name {
                return Err(Error::Invalid(format!("version {version} belongs to namespace {:?}", v.namespace)));
            }
            tx.put(keys.tag(namespace, tag), version);
            tx.event(keys, &mut ns, actor, None, EventKind::Tagged { tag: tag.clone(), version: version.clone() });
            tx.put(keys.namespace(&ns.name), &ns);
            Ok(Applied::Version(v))
        }
        Op::SubmitJob(job) => {
            // Jobs never touch the namespace record: submissions do not contend with head moves or each other.
            tx.namespace(keys, &job.namespace).await?;
            let index = keys.idempotency(&job.namespace, &idempotency_digest(&job.idempotency_key));
            if let Some(id) = tx.get::<String>(&index).await? {
                let existing: Job =
                    tx.get(&keys.job(&id)).await?.ok_or_else(|| Error::Corrupt(format!("{index} names job {id}")))?;
                return Ok(Applied::Job(existing, false));
            }
            if tx.get::<Job>(&keys.job(&job.id)).await?.is_some() {
                return Err(Error::AlreadyExists(format!("job {}", job.id)));
            }
            tx.put(index, &job.id);
            tx.put(keys.job(&job.id), job);
            Ok(Applied::Job(job.clone(), true))
        }
        Op::UpdateJob { job, expected_state, expected_attempts } => {
            let cur: Job =
                tx.get(&keys.job(&job.id)).await?.ok_or_else(|| Error::NotFound(format!("job {}", job.id)))?;
            if cur.state != *expected_state || cur.attempts != *expected_attempts {
                return Err(Error::Conflict(format!(
                    "job {} is {:?} at attempt {}, not {:?} at attempt {}",
                    job.id, cur.state, cur.attempts, expected_state, expected_attempts
                )));
            }
            if cur.state.is_final() {
                return Err(Error::Conflict(format!("job {} is already final ({:?})", job.id, cur.state)));
            }
            tx.put(keys.job(&job.id), job);
            Ok(Applied::Job(job.clone(), false))
        }
    }
}

fn check_head(ns: &Namespace, expected: &Option<VersionId>) -> Result<()> {
    if ns.head != *expected {
        return Err(Error::Conflict(format!(
            "head of {:?} moved meanwhile: expected {}, found {}",
            ns.name,
            show(expected),
            show(&ns.head)
        )));
    }
    Ok(())
}

pub fn show(v: &Option<VersionId>) -> String {
    v.as_ref().map_or_else(|| "base".to_string(), |v| v.short().to_string())
}
