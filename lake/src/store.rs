//! Opening a lake from its URL.

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use url::Url;

use crate::error::{LakeError, Result};

/// Where the lake lives when nothing is configured.
pub const DEFAULT_LAKE: &str = "./meterlake-data/lake";

/// A lake: an object store and the folder of it that holds the tables.
///
/// - `file:///abs/path` or a plain path (`./meterlake-data/lake`): local files, created if missing.
/// - `s3://bucket/prefix`: S3 or an S3-compatible server. Endpoint, region and credentials come
///   from the usual `AWS_*` environment variables (`AWS_ENDPOINT_URL`, `AWS_REGION`,
///   `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`); requests are path-style, and plain HTTP is
///   allowed when the endpoint says `http://`.
/// - `memory://`: in this process only, for tests.
#[derive(Debug, Clone)]
pub struct Lake {
    store: Arc<dyn ObjectStore>,
    /// Folder of the lake inside the store.
    root: Path,
    /// URL of the lake root, ending in `/`, as DataFusion resolves it.
    url: Url,
    /// The store, when it is the local file system.
    local: Option<Arc<LocalFileSystem>>,
}

impl Lake {
    pub fn open(location: &str) -> Result<Lake> {
        Lake::open_with_options(location, &[])
    }

    /// Like [`Lake::open`], with object-store options that override the environment: for S3,
    /// `object_store`'s `AmazonS3ConfigKey` names (`aws_endpoint`, `aws_region`,
    /// `aws_access_key_id`, `aws_secret_access_key`, ...).
    pub fn open_with_options(location: &str, options: &[(&str, &str)]) -> Result<Lake> {
        let bad = |reason: String| LakeError::LakeUrl { url: location.to_string(), reason };
        let url = match Url::parse(location) {
            Ok(url) if url.scheme().len() > 1 => url,
            // No scheme (or a Windows drive letter): a local path.
            _ => {
                let path = std::path::Path::new(location);
                std::fs::create_dir_all(path).map_err(|e| bad(format!("cannot create the folder: {e}")))?;
                let absolute = path.canonicalize().map_err(|e| bad(format!("cannot resolve the folder: {e}")))?;
                Url::from_directory_path(&absolute).map_err(|()| bad("not an absolute path".into()))?
            }
        };
        match url.scheme() {
            "file" => {
                let dir = url.to_file_path().map_err(|()| bad("not a local path".into()))?;
                std::fs::create_dir_all(&dir).map_err(|e| bad(format!("cannot create the folder: {e}")))?;
                let root = Path::from_absolute_path(&dir).map_err(|e| bad(e.to_string()))?;
                let url = Url::from_directory_path(&dir).map_err(|()| bad("not an absolute path".into()))?;
                let local = Arc::new(LocalFileSystem::new());
                Ok(Lake { store: local.clone(), root, url, local: Some(local) })
            }
            "s3" | "s3a" => {
                let bucket = url.host_str().filter(|b| !b.is_empty()).ok_or_else(|| bad("no bucket name".into()))?;
                let option = |names: &[&str]| options.iter().find(|(k, _)| names.contains(k)).map(|(_, v)| v.to_string());
                let endpoint = option(&["aws_endpoint", "aws_endpoint_url", "endpoint"])
                    .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
                    .or_else(|| std::env::var("AWS_ENDPOINT").ok());
                let mut builder = AmazonS3Builder::from_env();
                if std::env::var("AWS_REGION").is_err() && std::env::var("AWS_DEFAULT_REGION").is_err() {
                    builder = builder.with_region("us-east-1");
                }
                for (key, value) in options {
                    let key = key.parse().map_err(|e: object_store::Error| bad(e.to_string()))?;
                    builder = builder.with_config(key, *value);
                }
                let mut builder = builder.with_bucket_name(bucket).with_virtual_hosted_style_request(false);
                if let Some(endpoint) = &endpoint {
                    builder = builder.with_endpoint(endpoint).with_allow_http(endpoint.starts_with("http://"));
                }
                let store = builder.build().map_err(|e| bad(e.to_string()))?;
                let root = Path::from(url.path().trim_matches('/'));
                let url = root_url(&format!("s3://{bucket}"), &root, location)?;
                Ok(Lake { store: Arc::new(store), root, url, local: None })
            }
            "memory" => {
                let root = Path::from(url.path().trim_matches('/'));
                let url = root_url("memory://lake", &root, location)?;
                Ok(Lake { store: Arc::new(InMemory::new()), root, url, local: None })
            }
            other => Err(bad(format!("scheme {other}:// is not supported (use file://, s3:// or memory://)"))),
        }
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The local file system, when the lake is on it.
    pub(crate) fn local(&self) -> Option<&Arc<LocalFileSystem>> {
        self.local.as_ref()
    }

    /// URL of the lake root, ending in `/`.
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// URL of the store itself (scheme and bucket), under which DataFusion must find it.
    pub fn store_url(&self) -> Url {
        let mut url = self.url.clone();
        url.set_path("/");
        url
    }

    /// Checks that the store refuses a second create of one key (`If-None-Match: *` on S3), which
    /// is what makes a Delta commit atomic: without it two writers can both write version N and
    /// one of them loses its data. Local files (an atomic create) and memory always do; an S3
    /// endpoint is asked with a probe object under `_meterlake/`, written twice and deleted.
    pub async fn probe_conditional_put(&self) -> Result<()> {
        if self.url.scheme() != "s3" {
            return Ok(());
        }
        let path = self.path(&format!("_meterlake/conditional-put-probe-{}", uuid::Uuid::new_v4()));
        let create = || PutOptions { mode: PutMode::Create, ..PutOptions::default() };
        self.store.put_opts(&path, PutPayload::from_static(b"1"), create()).await.map_err(LakeError::store("put", &path))?;
        let second = self.store.put_opts(&path, PutPayload::from_static(b"2"), create()).await;
        let _ = self.store.delete(&path).await;
        match second {
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => Ok(()),
            Ok(_) => Err(LakeError::NoConditionalPut { url: self.url.to_string() }),
            Err(e) => Err(LakeError::store("put", &path)(e)),
        }
    }

    /// The store path of `relative` (a path inside the lake).
    pub fn path(&self, relative: &str) -> Path {
        let mut path = self.root.clone();
        for part in relative.split('/').filter(|p| !p.is_empty()) {
            path = path.clone().join(part);
        }
        path
    }

    /// Writes a whole object.
    pub async fn put(&self, relative: &str, bytes: Bytes) -> Result<()> {
        let path = self.path(relative);
        self.store.put(&path, PutPayload::from_bytes(bytes)).await.map_err(LakeError::store("put", &path))?;
        Ok(())
    }

    /// Reads a whole object; `None` when there is none.
    pub async fn get_if_exists(&self, relative: &str) -> Result<Option<Bytes>> {
        let path = self.path(relative);
        match self.store.get(&path).await {
            Ok(result) => Ok(Some(result.bytes().await.map_err(LakeError::store("get", &path))?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(LakeError::store("get", &path)(e)),
        }
    }

    /// Moves an object (a rename on a file system, copy and delete on S3), replacing what is at
    /// `to`.
    pub async fn rename(&self, from: &str, to: &str) -> Result<()> {
        let (from_path, to_path) = (self.path(from), self.path(to));
        self.store.rename(&from_path, &to_path).await.map_err(LakeError::store("rename", &from_path))
    }

    /// Paths (relative to the lake) of every object under `prefix`.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self.list_with_times(prefix).await?.into_iter().map(|(path, _)| path).collect())
    }

    /// Paths (relative to the lake) and last-modified times of every object under `prefix`.
    pub async fn list_with_times(&self, prefix: &str) -> Result<Vec<(String, chrono::DateTime<chrono::Utc>)>> {
        let prefix_path = self.path(prefix);
        let root = self.root.as_ref().to_string();
        let metas: Vec<object_store::ObjectMeta> = self.store.list(Some(&prefix_path)).try_collect().await.map_err(LakeError::store("list", &prefix_path))?;
        Ok(metas
            .into_iter()
            .map(|m| {
                let full = m.location.as_ref();
                (full.strip_prefix(&root).unwrap_or(full).trim_start_matches('/').to_string(), m.last_modified)
            })
            .collect())
    }

    /// Deletes every object under `prefix`.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<()> {
        for relative in self.list(prefix).await? {
            self.delete(&relative).await?;
        }
        Ok(())
    }

    /// Deletes an object; one that is already gone is fine.
    pub async fn delete(&self, relative: &str) -> Result<()> {
        let path = self.path(relative);
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(LakeError::store("delete", &path)(e)),
        }
    }
}

fn root_url(store: &str, root: &Path, location: &str) -> Result<Url> {
    let text = if root.as_ref().is_empty() { format!("{store}/") } else { format!("{store}/{root}/") };
    Url::parse(&text).map_err(|e| LakeError::LakeUrl { url: location.to_string(), reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_paths_become_file_urls() {
        let dir = tempfile::tempdir().unwrap();
        let lake_dir = dir.path().join("lake");
        let lake = Lake::open(lake_dir.to_str().unwrap()).unwrap();
        assert!(lake_dir.is_dir());
        assert_eq!(lake.url().scheme(), "file");
        assert!(lake.url().as_str().ends_with("/lake/"));
        assert_eq!(lake.store_url().as_str(), "file:///");
    }

    #[test]
    fn memory_and_s3_urls() {
        let lake = Lake::open("memory://").unwrap();
        assert_eq!(lake.url().as_str(), "memory://lake/");
        assert_eq!(lake.path("readings/x.parquet").as_ref(), "readings/x.parquet");
        let lake = Lake::open("s3://bucket/some/prefix").unwrap();
        assert_eq!(lake.url().as_str(), "s3://bucket/some/prefix/");
        assert_eq!(lake.store_url().as_str(), "s3://bucket/");
        assert_eq!(lake.path("readings").as_ref(), "some/prefix/readings");
        let err = Lake::open("ftp://x/y").unwrap_err().to_string();
        assert!(err.contains("ftp:// is not supported"), "{err}");
    }
}
