//! Pull: what a replica or worker lacks of a version's chain, fetched from the lineage and the blob store.

use anyhow::{bail, Context, Result};
use engram_lineage::{BlobStore, LineageStore, Version, VersionId};
use engram_lora::Delta;

/// The versions from `version` down to the first one `have` accepts (or the base model), oldest first, each with
/// its delta read from the blob store (verified by hash). The first element's parent is the version `have`
/// accepted, returned alongside (`None`: the bare base model).
pub async fn missing(
    store: &dyn LineageStore,
    blobs: &BlobStore,
    version: &VersionId,
    have: impl Fn(&VersionId) -> bool,
) -> Result<(Option<VersionId>, Vec<(Version, Delta)>)> {
    let mut todo = Vec::new();
    let mut cur = Some(version.clone());
    while let Some(id) = cur {
        if have(&id) {
            cur = Some(id);
            break;
        }
        let v = store.version(&id).await.with_context(|| format!("reading version {}", id.short()))?;
        cur = v.parent.clone();
        todo.push(v);
        if todo.len() > 100_000 {
            bail!("version {} has an ancestry over 100000 long; is the lineage cyclic?", version.short());
        }
    }
    todo.reverse();
    let mut out = Vec::with_capacity(todo.len());
    for v in todo {
        let bytes = blobs.get(&v.delta_hash).await.with_context(|| format!("delta of version {}", v.id.short()))?;
        let delta = Delta::decode(&bytes).with_context(|| format!("decoding the delta of {}", v.id.short()))?;
        out.push((v, delta));
    }
    Ok((cur, out))
}
