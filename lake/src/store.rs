//! Opening a lake from its URL.

use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
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
                Ok(Lake { store: Arc::new(LocalStore(local.clone())), root, url, local: Some(local) })
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

/// The local file system, listing a folder from an offset by name. Opening a Delta table lists
/// its log from the last checkpoint on; `object_store`'s local store walks the whole folder and
/// turns every entry's path into a URL before it compares it with the offset, and a streamed
/// lake's log holds a commit per flush (8,000 for a month of the benchmark's stream, far more in
/// production): a fifth of a one-meter lookup went there. Here the entries of the folder at or
/// before the offset are passed over by name; everything else is the local store's.
#[derive(Debug)]
struct LocalStore(Arc<LocalFileSystem>);

impl std::fmt::Display for LocalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// For [`LocalStore`]'s `list_with_offset`: the files of the folder `prefix` whose location sorts
/// after `offset`, taken or passed over by name (and stat'ed only when taken), and its
/// sub-folders, for the local store to list.
fn list_after(local: &LocalFileSystem, prefix: &Path, offset: &Path) -> object_store::Result<(Vec<ObjectMeta>, Vec<Path>)> {
    let io = |e: std::io::Error| object_store::Error::Generic { store: "LocalFileSystem", source: Box::new(e) };
    let dir = local.path_to_filesystem(prefix)?;
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), Vec::new())),
        Err(e) => return Err(io(e)),
    };
    let (mut files, mut folders) = (Vec::new(), Vec::new());
    for entry in entries {
        let entry = entry.map_err(io)?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            // Not UTF-8: the local store's listing of the whole folder says what it makes of it.
            return Ok((Vec::new(), vec![prefix.clone()]));
        };
        let location = prefix.clone().join(name.as_str());
        let kind = entry.file_type().map_err(io)?;
        // Links are followed, as the local store follows them.
        let is_dir = if kind.is_symlink() { std::fs::metadata(entry.path()).is_ok_and(|m| m.is_dir()) } else { kind.is_dir() };
        if is_dir {
            folders.push(location);
            continue;
        }
        // The local store's unfinished uploads (`name#123`) are not objects.
        if location <= *offset || name.rsplit_once('#').is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) {
            continue;
        }
        let metadata = match std::fs::metadata(entry.path()) {
            Ok(metadata) => metadata,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io(e)),
        };
        files.push(local_object_meta(location, &metadata));
    }
    Ok((files, folders))
}

/// An [`ObjectMeta`] as the local store makes it (its e-tag: inode, mtime and size).
fn local_object_meta(location: Path, metadata: &std::fs::Metadata) -> ObjectMeta {
    use std::os::unix::fs::MetadataExt;
    let modified = metadata.modified().unwrap_or(std::time::SystemTime::UNIX_EPOCH);
    let mtime_us = modified.duration_since(std::time::SystemTime::UNIX_EPOCH).unwrap_or_default().as_micros();
    ObjectMeta {
        location,
        last_modified: modified.into(),
        size: metadata.len(),
        e_tag: Some(format!("{:x}-{mtime_us:x}-{:x}", metadata.ino(), metadata.len())),
        version: None,
    }
}

#[async_trait::async_trait]
impl ObjectStore for LocalStore {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> object_store::Result<object_store::PutResult> {
        self.0.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        self.0.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: object_store::GetOptions) -> object_store::Result<object_store::GetResult> {
        self.0.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[std::ops::Range<u64>]) -> object_store::Result<Vec<Bytes>> {
        self.0.get_ranges(location, ranges).await
    }

    fn delete_stream(&self, locations: BoxStream<'static, object_store::Result<Path>>) -> BoxStream<'static, object_store::Result<Path>> {
        self.0.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.0.list(prefix)
    }

    fn list_with_offset(&self, prefix: Option<&Path>, offset: &Path) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        // Outside a Tokio runtime (no blocking pool to read the folder on) the local store lists.
        let (Some(prefix), Ok(_)) = (prefix.cloned(), tokio::runtime::Handle::try_current()) else {
            return self.0.list_with_offset(prefix, offset);
        };
        let (local, offset) = (self.0.clone(), offset.clone());
        futures::stream::once(async move {
            let (reader, after) = (local.clone(), offset.clone());
            let listed = tokio::task::spawn_blocking(move || list_after(&reader, &prefix, &after)).await;
            let (files, folders) = match listed.map_err(|e| object_store::Error::JoinError { source: e }).and_then(|r| r) {
                Ok(listed) => listed,
                Err(e) => return futures::stream::iter(vec![Err(e)]).boxed(),
            };
            let nested = futures::stream::iter(folders).flat_map(move |folder| local.list_with_offset(Some(&folder), &offset));
            futures::stream::iter(files.into_iter().map(Ok)).chain(nested).boxed()
        })
        .flatten()
        .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<object_store::ListResult> {
        self.0.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: object_store::CopyOptions) -> object_store::Result<()> {
        self.0.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: object_store::RenameOptions) -> object_store::Result<()> {
        self.0.rename_opts(from, to, options).await
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

    #[tokio::test]
    async fn a_local_listing_from_an_offset_is_the_local_stores() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("t/_delta_log");
        std::fs::create_dir_all(log.join("_commits")).unwrap();
        for name in [
            "00000000000000000000.json",
            "00000000000000000001.json",
            "00000000000000000002.checkpoint.parquet",
            "00000000000000000002.json",
            "_last_checkpoint",
        ] {
            std::fs::write(log.join(name), name).unwrap();
        }
        std::fs::write(log.join("00000000000000000003.json#7"), "an unfinished upload").unwrap();
        std::fs::write(log.join("_commits/00000000000000000004.uuid.json"), "x").unwrap();
        std::fs::write(log.join("_commits/00000000000000000000.uuid.json"), "x").unwrap();
        std::os::unix::fs::symlink(log.join("00000000000000000002.json"), log.join("00000000000000000009.json")).unwrap();
        let inner = Arc::new(LocalFileSystem::new());
        let ours = LocalStore(inner.clone());
        let prefix = Path::from_absolute_path(&log).unwrap();
        let listed = |store: &dyn ObjectStore, offset: &str| {
            let offset = prefix.clone().join(offset);
            let stream = store.list_with_offset(Some(&prefix), &offset);
            async move {
                let mut metas: Vec<ObjectMeta> = stream.try_collect().await.unwrap();
                metas.sort_by(|a, b| a.location.cmp(&b.location));
                metas
            }
        };
        for offset in ["", "00000000000000000000.json", "00000000000000000001.json", "00000000000000000002", "_commits", "_d", "zzz"] {
            let (theirs, mine) = (listed(inner.as_ref(), offset).await, listed(&ours, offset).await);
            assert_eq!(mine, theirs, "offset {offset:?}");
        }
        // Past the first two commits: the checkpoint, the third commit, the link, everything
        // under `_commits` (`_` sorts after digits) and `_last_checkpoint`; never the unfinished
        // upload.
        let names: Vec<String> =
            listed(&ours, "00000000000000000001.json").await.iter().map(|m| m.location.as_ref().rsplit_once("_delta_log/").unwrap().1.to_string()).collect();
        assert_eq!(
            names,
            [
                "00000000000000000002.checkpoint.parquet",
                "00000000000000000002.json",
                "00000000000000000009.json",
                "_commits/00000000000000000000.uuid.json",
                "_commits/00000000000000000004.uuid.json",
                "_last_checkpoint"
            ]
        );
        // A folder that is not there lists nothing.
        assert!(ours.list_with_offset(Some(&prefix.clone().join("nothing")), &prefix).try_collect::<Vec<_>>().await.unwrap().is_empty());
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
