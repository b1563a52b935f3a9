//! Checkpoint directories replaced as a whole, so a crash at any instant leaves one complete checkpoint.

use std::path::Path;

use anyhow::{Context, Result};

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
