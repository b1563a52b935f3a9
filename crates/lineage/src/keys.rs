//! The key layout, shared by both backends so an operator reads the same names everywhere:
//!
//! ```text
//! {prefix}/namespaces/{namespace}        namespace record (head, base model, event count)
//! {prefix}/versions/{id}                 version record (metadata and status)
//! {prefix}/log/{namespace}/{seq}         version id, in creation order
//! {prefix}/events/{namespace}/{seq}      append-only history
//! {prefix}/tags/{namespace}/{tag}        version id
//! {prefix}/jobs/{job}                    consolidation job (documents, state, attempts)
//! {prefix}/idempotency/{namespace}/{h}   job id, under the SHA-256 of the client's idempotency key
//! ```
//! Sequence numbers are zero-padded so key order is numeric order.

use crate::types::VersionId;

#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// `prefix` is used as given minus trailing slashes, e.g. `/engram`; empty for the embedded store.
    pub fn new(prefix: &str) -> Self {
        Self { prefix: prefix.trim_end_matches('/').to_string() }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn namespaces(&self) -> String {
        format!("{}/namespaces/", self.prefix)
    }

    pub fn namespace(&self, ns: &str) -> String {
        format!("{}/namespaces/{ns}", self.prefix)
    }

    pub fn versions(&self) -> String {
        format!("{}/versions/", self.prefix)
    }

    pub fn version(&self, id: &VersionId) -> String {
        format!("{}/versions/{id}", self.prefix)
    }

    pub fn logs(&self, ns: &str) -> String {
        format!("{}/log/{ns}/", self.prefix)
    }

    pub fn log(&self, ns: &str, seq: u64) -> String {
        format!("{}/log/{ns}/{seq:012}", self.prefix)
    }

    pub fn events(&self, ns: &str) -> String {
        format!("{}/events/{ns}/", self.prefix)
    }

    pub fn event(&self, ns: &str, seq: u64) -> String {
        format!("{}/events/{ns}/{seq:012}", self.prefix)
    }

    pub fn tags(&self, ns: &str) -> String {
        format!("{}/tags/{ns}/", self.prefix)
    }

    pub fn tag(&self, ns: &str, tag: &str) -> String {
        format!("{}/tags/{ns}/{tag}", self.prefix)
    }

    pub fn jobs(&self) -> String {
        format!("{}/jobs/", self.prefix)
    }

    pub fn job(&self, id: &str) -> String {
        format!("{}/jobs/{id}", self.prefix)
    }

    pub fn idempotency(&self, ns: &str, key_digest: &str) -> String {
        format!("{}/idempotency/{ns}/{key_digest}", self.prefix)
    }
}
