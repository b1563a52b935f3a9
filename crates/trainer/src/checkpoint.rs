//! Checkpoint directories replaced as a whole, so a crash at any instant leaves one complete checkpoint.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Writes a new version of directory `dir`: `fill` writes into a temporary sibling, which then replaces `dir`.
/// The previous version is kept as `dir.old` until the new one is in place.
pub fn replace_dir(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    fill(&tmp)?;
    let old = dir.with_extension("old");
    let _ = std::fs::remove_dir_all(&old);
    if dir.exists() {
        std::fs::rename(dir, &old)?;
    }
    std::fs::rename(&tmp, dir)?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// Undoes a replacement cut short between its two renames: puts `dir.old` back when `dir` is missing.
pub fn recover_dir(dir: &Path) -> Result<()> {
    let old = dir.with_extension("old");
    if !dir.exists() && old.is_dir() {
        std::fs::rename(&old, dir).with_context(|| format!("restoring {}", dir.display()))?;
    }
    Ok(())
}

/// The state saved in checkpoint `dir` (its `state.json`), or `None` when there is no checkpoint. A checkpoint is
/// continued only when asked (`resume`) and only with the configuration it was made with (the state's `config`
/// field): a run is never silently restarted over one, nor continued under another recipe.
pub fn resume_state<S: DeserializeOwned>(dir: &Path, resume: bool, config: &impl Serialize) -> Result<Option<S>> {
    recover_dir(dir)?;
    let path = dir.join("state.json");
    if !path.is_file() {
        return Ok(None);
    }
    if !resume {
        bail!("{} holds a checkpoint: pass --resume to continue it, or remove it to start over", dir.display());
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let state: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    if state["config"] != serde_json::to_value(config)? {
        bail!("the checkpoint in {} was made with a different training config", dir.display());
    }
    Ok(Some(serde_json::from_value(state)?))
}
