//! Lineage records as wire messages.

use engram_lineage as lin;
use engram_proto::v1 as pb;

pub fn job_state(s: lin::JobState) -> pb::JobState {
    match s {
        lin::JobState::Queued => pb::JobState::Queued,
        lin::JobState::Running => pb::JobState::Running,
        lin::JobState::Staging => pb::JobState::Staging,
        lin::JobState::Live => pb::JobState::Live,
        lin::JobState::Rejected => pb::JobState::Rejected,
        lin::JobState::Failed => pb::JobState::Failed,
    }
}

pub fn job(j: &lin::Job) -> pb::Job {
    pb::Job {
        id: j.id.clone(),
        namespace: j.namespace.clone(),
        idempotency_key: j.idempotency_key.clone(),
        state: job_state(j.state) as i32,
        version: j.version.as_ref().map(|v| v.to_string()).unwrap_or_default(),
        worker: j.worker.clone(),
        attempts: j.attempts,
        error: j.error.clone(),
        document_digests: j.document_digests.clone(),
        created_ms: j.created_ms as i64,
        updated_ms: j.updated_ms as i64,
        timings: Some(pb::Timings {
            queue_ms: j.timings.queue_ms,
            inject_ms: j.timings.inject_ms,
            stage_ms: j.timings.stage_ms,
            commit_ms: j.timings.commit_ms,
        }),
    }
}

pub fn version(v: &lin::Version) -> pb::Version {
    pb::Version {
        id: v.id.to_string(),
        namespace: v.namespace.clone(),
        parent: v.parent.as_ref().map(|p| p.to_string()).unwrap_or_default(),
        delta_hash: v.delta_hash.clone(),
        delta_bytes: v.delta_size,
        status: v.status.to_string(),
        injector: v.injector.clone(),
        job: v.job_id.clone(),
        document_digests: v.document_digests.clone(),
        metrics: v.gate_metrics.iter().map(|(k, x)| (k.clone(), *x)).collect(),
        created_by: v.creator.clone(),
        created_ms: v.created_at_ms as i64,
        compacts: v.compacts.iter().map(|c| c.to_string()).collect(),
        delta_blake3: v.delta_blake3.clone().unwrap_or_default(),
    }
}

pub fn namespace(n: &lin::Namespace) -> pb::Namespace {
    pb::Namespace {
        name: n.name.clone(),
        base_model: n.base_model.clone(),
        head: n.head.as_ref().map(|h| h.to_string()).unwrap_or_default(),
        seq: n.seq,
    }
}
