//! Content-addressed delta bytes: `sha256/{hex}` in an object store (a local directory by default, S3 with the
//! `s3` feature). Writes are create-if-absent (an existing blob with that name already holds these bytes); every
//! read re-hashes what it got.

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::{path::Path, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobMeta {
    pub hash: String,
    pub size: u64,
    pub modified_ms: u64,
}

#[derive(Clone)]
pub struct BlobStore {
    inner: Arc<dyn ObjectStore>,
    url: String,
}

/// SHA-256 of `bytes`, lowercase hex.
pub fn digest(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// BLAKE3 of `bytes`, lowercase hex: what a replica checks its staged copy of a delta against. Recorded with the
/// version where the delta is made, so that the sender need not hash it again for every broadcast.
pub fn transfer_hash(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

fn blob_error(hash: &str, e: object_store::Error) -> Error {
    match e {
        object_store::Error::NotFound { .. } => Error::NotFound(format!("blob {hash}")),
        e => Error::Unavailable(format!("blob store: {e}")),
    }
}

impl BlobStore {
    /// `file://DIR` (created if needed), `memory://`, or `s3://BUCKET[/PREFIX]` (feature `s3`; credentials from
    /// the environment).
    pub fn open(url: &str) -> Result<Self> {
        let inner: Arc<dyn ObjectStore> = if let Some(dir) = url.strip_prefix("file://") {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::Unavailable(format!("creating blob directory {dir}: {e}")))?;
            Arc::new(
                object_store::local::LocalFileSystem::new_with_prefix(dir)
                    .map_err(|e| Error::Unavailable(format!("blob directory {dir}: {e}")))?,
            )
        } else if url == "memory://" {
            Arc::new(object_store::memory::InMemory::new())
        } else if let Some(_rest) = url.strip_prefix("s3://") {
            #[cfg(feature = "s3")]
            {
                let (bucket, prefix) = _rest.split_once('/').unwrap_or((_rest, ""));
                let s3 = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .build()
                    .map_err(|e| Error::Unavailable(format!("s3 bucket {bucket}: {e}")))?;
                let s3: Arc<dyn ObjectStore> = Arc::new(s3);
                if prefix.is_empty() {
                    s3
                } else {
                    Arc::new(object_store::prefix::PrefixStore::new(s3, prefix))
                }
            }
            #[cfg(not(feature = "s3"))]
            return Err(Error::Invalid("this build has no S3 support (cargo feature `s3`)".into()));
        } else {
            return Err(Error::Invalid(format!("blob store {url:?}: expected file://DIR, memory:// or s3://BUCKET")));
        };
        Ok(Self { inner, url: url.to_string() })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(hash: &str) -> Result<Path> {
        if hash.len() != 64 || !hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(Error::Invalid(format!("blob hash {hash:?} is not a lowercase hex SHA-256")));
        }
        Ok(Path::from(format!("sha256/{hash}")))
    }

    /// Stores `bytes` under their hash and returns it. Storing the same bytes twice is a no-op.
    pub async fn put(&self, bytes: Bytes) -> Result<String> {
        let hash = digest(&bytes);
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        match self.inner.put_opts(&Self::path(&hash)?, PutPayload::from(bytes), opts).await {
            Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => Ok(hash),
            Err(e) => Err(Error::Unavailable(format!("storing blob {hash}: {e}"))),
        }
    }

    /// The bytes stored under `hash`, verified.
    pub async fn get(&self, hash: &str) -> Result<Bytes> {
        let got = self.inner.get(&Self::path(hash)?).await.map_err(|e| blob_error(hash, e))?;
        let bytes = got.bytes().await.map_err(|e| blob_error(hash, e))?;
        let actual = digest(&bytes);
        if actual != hash {
            return Err(Error::Corrupt(format!("blob {hash} holds bytes hashing to {actual}")));
        }
        Ok(bytes)
    }

    pub async fn exists(&self, hash: &str) -> Result<bool> {
        match self.inner.head(&Self::path(hash)?).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(blob_error(hash, e)),
        }
    }

    pub async fn delete(&self, hash: &str) -> Result<()> {
        match self.inner.delete(&Self::path(hash)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(blob_error(hash, e)),
        }
    }

    /// Every stored blob.
    pub async fn list(&self) -> Result<Vec<BlobMeta>> {
        let metas: Vec<_> = self
            .inner
            .list(Some(&Path::from("sha256")))
            .try_collect()
            .await
            .map_err(|e| Error::Unavailable(format!("listing blobs: {e}")))?;
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                let hash = m.location.filename()?.to_string();
                Self::path(&hash).ok()?;
                Some(BlobMeta { hash, size: m.size, modified_ms: m.last_modified.timestamp_millis().max(0) as u64 })
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn blobs_round_trip_dedupe_and_detect_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(&format!("file://{}", dir.path().display())).unwrap();
        let h = store.put(Bytes::from_static(b"delta")).await.unwrap();
        assert_eq!(h, digest(b"delta"));
        assert_eq!(store.put(Bytes::from_static(b"delta")).await.unwrap(), h);
        assert_eq!(&store.get(&h).await.unwrap()[..], b"delta");
        let listed = store.list().await.unwrap();
        assert_eq!((listed.len(), listed[0].hash.as_str(), listed[0].size), (1, h.as_str(), 5));
        // Flip the stored bytes behind the store's back: the read must refuse them.
        std::fs::write(dir.path().join("sha256").join(&h), b"delta!").unwrap();
        assert!(matches!(store.get(&h).await, Err(Error::Corrupt(_))));
        store.delete(&h).await.unwrap();
        assert!(!store.exists(&h).await.unwrap());
        assert!(matches!(store.get(&h).await, Err(Error::NotFound(_))));
        assert!(matches!(store.get("nothex").await, Err(Error::Invalid(_))));
    }
}
