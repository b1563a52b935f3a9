//! Operator tasks that combine the lineage with the blob store: recording a delta, comparing versions, collecting
//! garbage.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use serde::Serialize;

use crate::{BlobStore, Error, LineageStore, NewVersion, Result, Status, Version, VersionId};
use engram_lora::{layer_norms, Delta};

/// Stores `delta` and records a candidate version for it: blob first, so no version ever names missing bytes.
pub async fn record(store: &dyn LineageStore, blobs: &BlobStore, mut new: NewVersion, delta: Bytes) -> Result<Version> {
    new.delta_size = delta.len() as u64;
    new.delta_blake3 = Some(crate::blob::transfer_hash(&delta));
    new.delta_hash = blobs.put(delta).await?;
    store.create_version(new).await
}

#[derive(Debug, Clone, Serialize)]
pub struct Diff {
    pub from: VersionId,
    pub to: VersionId,
    /// Their nearest common ancestor (`None`: they share only the base model).
    pub common_ancestor: Option<VersionId>,
    /// Versions whose deltas are removed going from `from` to `to` (newest first) ...
    pub removed: Vec<VersionId>,
    /// ... and added (newest first).
    pub added: Vec<VersionId>,
    /// Frobenius norm, per layer, of the weight change from `from` to `to`.
    pub layer_norms: BTreeMap<usize, f64>,
}

/// The weight change between two versions of one namespace: the deltas on the path from `from` up to the common
/// ancestor are subtracted, those down to `to` are added.
pub async fn diff(store: &dyn LineageStore, blobs: &BlobStore, from: &VersionId, to: &VersionId) -> Result<Diff> {
    let a = store.ancestry(from, None).await?;
    let b = store.ancestry(to, None).await?;
    if a[0].namespace != b[0].namespace {
        return Err(Error::Invalid(format!(
            "{} is in {:?} and {} in {:?}: versions of different namespaces share no weights",
            from.short(),
            a[0].namespace,
            to.short(),
            b[0].namespace
        )));
    }
    let in_a: BTreeSet<&VersionId> = a.iter().map(|v| &v.id).collect();
    let common = b.iter().map(|v| &v.id).find(|id| in_a.contains(id)).cloned();
    let above = |chain: &[Version]| -> Vec<VersionId> {
        chain.iter().map(|v| v.id.clone()).take_while(|id| Some(id) != common.as_ref()).collect()
    };
    let (removed, added) = (above(&a), above(&b));
    let mut deltas = Vec::new();
    for (sign, ids) in [(-1.0, &removed), (1.0, &added)] {
        for id in ids {
            let v = store.version(id).await?;
            let bytes = blobs.get(&v.delta_hash).await?;
            deltas.push((sign, Delta::decode(&bytes).map_err(|e| Error::Corrupt(format!("delta of {id}: {e}")))?));
        }
    }
    let terms: Vec<(f64, &Delta)> = deltas.iter().map(|(s, d)| (*s, d)).collect();
    Ok(Diff {
        from: from.clone(),
        to: to.clone(),
        common_ancestor: common,
        removed,
        added,
        layer_norms: layer_norms(&terms).map_err(|e| Error::Invalid(e.to_string()))?,
    })
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    pub blobs: usize,
    pub kept: usize,
    /// Unreachable blobs (deleted unless this was a dry run).
    pub unreachable: Vec<String>,
    pub unreachable_bytes: u64,
    /// Unreachable but younger than the grace period: maybe a version is being recorded for them right now.
    pub too_young: usize,
    pub deleted: bool,
}

/// Finds (and with `apply`, deletes) blobs no head or tag can reach. Candidates keep their blobs (they may still
/// be promoted), as do blobs younger than `min_age_ms`, which a writer may be about to name.
pub async fn gc(store: &dyn LineageStore, blobs: &BlobStore, apply: bool, min_age_ms: u64) -> Result<GcReport> {
    let mut roots: Vec<VersionId> = Vec::new();
    for ns in store.namespaces().await? {
        roots.extend(ns.head.clone());
        roots.extend(store.tags(&ns.name).await?.into_values());
    }
    let mut keep: BTreeSet<String> = BTreeSet::new();
    let mut seen: BTreeSet<VersionId> = BTreeSet::new();
    for root in roots {
        for v in store.ancestry(&root, None).await? {
            if !seen.insert(v.id.clone()) {
                break;
            }
            keep.insert(v.delta_hash);
        }
    }
    for (key, bytes) in store.scan(&store.keys().versions(), None, false).await? {
        let v: Version = serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt(format!("{key}: {e}")))?;
        if v.status == Status::Candidate {
            keep.insert(v.delta_hash);
        }
    }
    let now = crate::now_ms();
    let mut report = GcReport { deleted: apply, ..Default::default() };
    for b in blobs.list().await? {
        report.blobs += 1;
        if keep.contains(&b.hash) {
            report.kept += 1;
        } else if now.saturating_sub(b.modified_ms) < min_age_ms {
            report.too_young += 1;
        } else {
            if apply {
                blobs.delete(&b.hash).await?;
            }
            report.unreachable_bytes += b.size;
            report.unreachable.push(b.hash);
        }
    }
    Ok(report)
}
