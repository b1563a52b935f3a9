//! Consolidation jobs: durable before they are acknowledged, deduplicated by idempotency key, and moved between
//! states only by a writer that holds the job's current attempt (a stale worker's or coordinator's write is refused).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::types::VersionId;
use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    /// Durable, waiting for a worker.
    Queued,
    /// A worker holds it (attempt `attempts`).
    Running,
    /// Its version is a candidate being staged on the replicas.
    Staging,
    /// Final: its version became the head.
    Live,
    /// Final: the capability gate refused its candidate.
    Rejected,
    /// Final: it could not be done; `error` says why.
    Failed,
}

impl JobState {
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Live | JobState::Rejected | JobState::Failed)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobOptions {
    /// Adapter rank per chunk; 0: the injector's default.
    pub rank: u32,
    /// Skip the capability gate.
    pub force: bool,
    /// Empty: the worker's default injector.
    pub injector: String,
}

/// Milliseconds spent in each phase, filled in as the job moves.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobTimings {
    pub queue_ms: f64,
    pub inject_ms: f64,
    pub stage_ms: f64,
    pub commit_ms: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Time-ordered (`j{created_ms}-{hash}`), so a key scan lists jobs in submission order.
    pub id: String,
    pub namespace: String,
    pub idempotency_key: String,
    pub documents: Vec<String>,
    pub document_digests: Vec<String>,
    pub options: JobOptions,
    pub actor: String,
    pub state: JobState,
    /// Incremented on every hand-out to a worker; fences results of earlier hand-outs.
    pub attempts: u32,
    pub worker: String,
    /// The head the running attempt composes onto.
    #[serde(default)]
    pub base_head: Option<VersionId>,
    pub version: Option<VersionId>,
    pub error: String,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub timings: JobTimings,
}

impl Job {
    /// A queued job. The id is derived from the submission time and the idempotency key.
    pub fn new(
        namespace: &str,
        idempotency_key: &str,
        documents: Vec<String>,
        options: JobOptions,
        actor: &str,
    ) -> Self {
        let now = crate::now_ms();
        let document_digests = documents.iter().map(|d| crate::blob::digest(d.as_bytes())).collect();
        let mut h = Sha256::new();
        h.update(namespace.as_bytes());
        h.update([0]);
        h.update(idempotency_key.as_bytes());
        h.update(now.to_le_bytes());
        let id = format!("j{now:013}-{}", &hex::encode(h.finalize())[..12]);
        Self {
            id,
            namespace: namespace.to_string(),
            idempotency_key: idempotency_key.to_string(),
            documents,
            document_digests,
            options,
            actor: actor.to_string(),
            state: JobState::Queued,
            attempts: 0,
            worker: String::new(),
            base_head: None,
            version: None,
            error: String::new(),
            created_ms: now,
            updated_ms: now,
            timings: JobTimings::default(),
        }
    }
}

/// Checks a job id as typed by a caller (it becomes a key segment).
pub fn validate_job_id(id: &str) -> Result<()> {
    let ok = id.len() <= 40 && id.starts_with('j') && id[1..].bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if ok && id.len() > 1 {
        Ok(())
    } else {
        Err(Error::Invalid(format!("job id {id:?} is not of the form j<ms>-<hex>")))
    }
}

/// Idempotency keys are arbitrary client strings: the index key holds their hash.
pub fn idempotency_digest(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}
