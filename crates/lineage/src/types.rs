//! The lineage's domain: namespaces, immutable versions, head moves and the event history.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// A version's id: hex SHA-256 of (parent id, delta hash, base model hash). Equal inputs give equal ids, so an
/// id names exactly one history; the store refuses to create the same id twice.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VersionId(String);

impl VersionId {
    pub fn derive(parent: Option<&VersionId>, delta_hash: &str, base_model: &str) -> Self {
        let mut h = Sha256::new();
        // Length-prefixed fields, so no two different triples hash the same bytes.
        for field in [parent.map_or("", |p| p.as_str()), delta_hash, base_model] {
            h.update((field.len() as u64).to_le_bytes());
            h.update(field.as_bytes());
        }
        Self(hex::encode(h.finalize()))
    }

    /// Parses a full 64-hex-digit id.
    pub fn parse(s: &str) -> Result<Self> {
        if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
            Ok(Self(s.to_string()))
        } else {
            Err(Error::Invalid(format!("version id {s:?} is not 64 lowercase hex digits")))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 12 digits, for tables.
    pub fn short(&self) -> &str {
        &self.0[..12]
    }
}

impl fmt::Display for VersionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Namespace and tag names become etcd key segments: keep them short and free of separators.
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "{what} {name:?} must be 1-128 characters of letters, digits, '-', '_' or '.', not starting with '.'"
        )))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Recorded, not (yet) served.
    Candidate,
    /// The namespace's head: what replicas serve.
    Live,
    /// Refused by the capability gate; never served.
    Rejected,
    /// Was live; a newer version replaced it.
    Superseded,
    /// Was live or on the live line when a rollback moved the head below it.
    RolledBack,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Candidate => "candidate",
            Status::Live => "live",
            Status::Rejected => "rejected",
            Status::Superseded => "superseded",
            Status::RolledBack => "rolled-back",
        })
    }
}

/// One tenant's adapter line over one base model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Namespace {
    pub name: String,
    /// Hash of the base model every version in this namespace applies to.
    pub base_model: String,
    /// The served version; `None` serves the bare base model.
    pub head: Option<VersionId>,
    /// Number of events so far; the next event's sequence number.
    pub seq: u64,
    pub created_at_ms: u64,
    pub creator: String,
}

/// What a caller supplies to record a version.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NewVersion {
    pub namespace: String,
    pub parent: Option<VersionId>,
    /// SHA-256 (hex) of the delta's bytes in the blob store.
    pub delta_hash: String,
    pub delta_size: u64,
    /// BLAKE3 (hex) of the same bytes ([`crate::blob::transfer_hash`]), for staging; absent on versions recorded
    /// before it was kept (the sender then hashes as it sends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta_blake3: Option<String>,
    /// Which injector made it, e.g. `hypernetwork@<hash>` or `distill`.
    pub injector: String,
    pub job_id: String,
    pub document_digests: Vec<String>,
    pub gate_metrics: BTreeMap<String, f64>,
    pub creator: String,
    /// A compaction: the chain this version replaces, oldest first. The first's parent is this version's parent
    /// and each next one's parent is the one before, so the versions' deltas summed equal this one's; it is
    /// promoted while the last of them is the head, and serves what that one served.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compacts: Vec<VersionId>,
    /// Blob hash of the composition strategy's state after this version (what the next delta is composed from),
    /// so any worker can continue the chain from any version, rollbacks included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub composer_state: Option<String>,
}

/// An immutable version (only `status` changes, through head moves and rejection).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Version {
    pub id: VersionId,
    pub namespace: String,
    pub parent: Option<VersionId>,
    pub delta_hash: String,
    pub delta_size: u64,
    /// See [`NewVersion::delta_blake3`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta_blake3: Option<String>,
    pub base_model: String,
    pub injector: String,
    pub job_id: String,
    pub document_digests: Vec<String>,
    pub gate_metrics: BTreeMap<String, f64>,
    /// See [`NewVersion::compacts`]. Rollback walks through a compaction into the chain it replaced, so any of
    /// those versions can still be restored exactly.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compacts: Vec<VersionId>,
    /// See [`NewVersion::composer_state`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub composer_state: Option<String>,
    pub created_at_ms: u64,
    pub creator: String,
    pub status: Status,
    /// The namespace event that created it (orders the log).
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum EventKind {
    NamespaceCreated {
        base_model: String,
    },
    VersionCreated {
        version: VersionId,
        parent: Option<VersionId>,
    },
    /// The head moved forward to a candidate.
    Promoted {
        from: Option<VersionId>,
        to: VersionId,
    },
    /// The head moved back to an ancestor (`None`: the bare base model).
    RolledBack {
        from: Option<VersionId>,
        to: Option<VersionId>,
    },
    Rejected {
        version: VersionId,
    },
    Tagged {
        tag: String,
        version: VersionId,
    },
}

/// One entry of a namespace's append-only history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub at_ms: u64,
    /// `at_ms` as RFC 3339, for operators reading the store directly.
    #[serde(default)]
    pub at: String,
    pub actor: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// A head move as a watcher sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadChange {
    pub namespace: String,
    pub head: Option<VersionId>,
    /// The namespace's event count after the move; increases with every move.
    pub seq: u64,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

pub fn format_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_depend_on_every_field_and_parse_back() {
        let a = VersionId::derive(None, "d1", "b");
        assert_eq!(a, VersionId::derive(None, "d1", "b"));
        assert_ne!(a, VersionId::derive(Some(&a), "d1", "b"));
        assert_ne!(a, VersionId::derive(None, "d2", "b"));
        assert_ne!(a, VersionId::derive(None, "d1", "c"));
        // Length prefixes: moving a character between fields changes the id.
        assert_ne!(VersionId::derive(None, "ab", "c"), VersionId::derive(None, "a", "bc"));
        assert_eq!(VersionId::parse(a.as_str()).unwrap(), a);
        assert!(VersionId::parse("abc").is_err());
        assert!(VersionId::parse(&a.as_str().to_uppercase()).is_err());
    }

    #[test]
    fn names_are_key_safe() {
        for ok in ["tenant-a", "t_1.x", "A"] {
            validate_name("namespace", ok).unwrap();
        }
        for bad in ["", "a/b", ".hidden", "a b", &"x".repeat(129)] {
            let e = validate_name("namespace", bad).unwrap_err().to_string();
            assert!(e.contains("namespace"), "{e}");
        }
    }
}
