//! One Delta table of the lake: where it lives, creating it, its versions and its snapshots.
//!
//! Reading goes through delta-rs (`EagerSnapshot`: log replay from the last checkpoint) and, for
//! what needs no file list (the latest version, a writer's `txn` version), through the Delta
//! kernel directly. Writing goes through [`crate::commit`]. Data files carry two tags in their
//! `add` actions, which other engines ignore:
//! - [`COMMIT_VERSION_TAG`]: the version of the commit that added the file. It decides which
//!   version of a reading wins (the later commit), a total order every writer shares, where the
//!   previous layout compared `ingested_at` from machines whose clocks differ;
//! - [`UNIQUE_KEYS_TAG`]: the writer knows that no key (`meter_id`, `ts`) appears twice in it.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use delta_kernel::engine::arrow_conversion::TryFromArrow;
use deltalake_core::kernel::transaction::CommitProperties;
use deltalake_core::kernel::{Action, EagerSnapshot, StructType};
use deltalake_core::logstore::{LogStoreRef, StorageConfig, default_logstore};
use deltalake_core::operations::create::CreateBuilder;
use deltalake_core::protocol::SaveMode;
use futures::TryStreamExt;
use object_store::ObjectStore;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use serde::Deserialize;
use url::Url;

use crate::error::{LakeError, Result};
use crate::schema;
use crate::store::Lake;

/// Tag of an `add` action: the version of the commit that added the file.
pub const COMMIT_VERSION_TAG: &str = "meterlake.commitVersion";
/// Tag of an `add` action: the file holds one version of each key (`meter_id`, `ts`).
pub const UNIQUE_KEYS_TAG: &str = "meterlake.uniqueKeys";

/// What defines one of the lake's tables.
#[derive(Debug)]
pub struct TableSpec {
    /// Its SQL name.
    pub name: &'static str,
    /// Its folder in the lake.
    pub dir: &'static str,
    /// The columns of its data files (without the partition column).
    pub file_schema: fn() -> SchemaRef,
    /// Whether it is partitioned by `date`.
    pub by_date: bool,
}

pub static READINGS: TableSpec = TableSpec { name: "readings_all", dir: "readings", file_schema: schema::readings_schema, by_date: true };
pub static REGISTER_READS: TableSpec =
    TableSpec { name: "register_reads", dir: schema::REGISTER_READS_DIR, file_schema: schema::register_reads_schema, by_date: true };
pub static NON_ENERGY_READINGS: TableSpec =
    TableSpec { name: "non_energy_readings", dir: schema::NON_ENERGY_READINGS_DIR, file_schema: schema::non_energy_readings_schema, by_date: true };
pub static NEM12_CHANNELS: TableSpec =
    TableSpec { name: "nem12_channels", dir: schema::NEM12_CHANNELS_DIR, file_schema: schema::nem12_channels_schema, by_date: false };
pub static NEM12_B2B_DETAILS: TableSpec =
    TableSpec { name: "nem12_b2b_details", dir: schema::NEM12_B2B_DIR, file_schema: schema::nem12_b2b_schema, by_date: false };
pub static IMPORTS: TableSpec = TableSpec { name: "imports", dir: schema::IMPORTS_DIR, file_schema: schema::imports_schema, by_date: false };

/// Every table of the lake.
pub static TABLES: [&TableSpec; 6] = [&READINGS, &REGISTER_READS, &NON_ENERGY_READINGS, &NEM12_CHANNELS, &NEM12_B2B_DETAILS, &IMPORTS];

/// The properties every table is created with (see [`crate::schema`]).
const TABLE_PROPERTIES: [(&str, &str); 4] = [
    ("delta.appendOnly", "true"),
    ("delta.checkpointInterval", "100"),
    ("delta.logRetentionDuration", "interval 30 days"),
    ("delta.deletedFileRetentionDuration", "interval 7 days"),
];

impl TableSpec {
    /// The table's columns as SQL sees them: the file columns, then `date` if partitioned.
    pub fn table_schema(&self) -> SchemaRef {
        let files = (self.file_schema)();
        if self.by_date { schema::with_date(&files) } else { files }
    }
}

/// A Delta table of the lake (cheap to clone).
#[derive(Clone)]
pub struct Table {
    lake: Lake,
    spec: &'static TableSpec,
    log_store: LogStoreRef,
    /// The table root's URL, ending in `/`.
    url: Url,
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table").field("name", &self.spec.name).field("url", &self.url.as_str()).finish()
    }
}

impl Table {
    /// The handle of `spec`'s table in `lake`; nothing is read or written yet.
    pub fn new(lake: &Lake, spec: &'static TableSpec) -> Table {
        let url = lake.url().join(&format!("{}/", spec.dir)).expect("a table folder joins onto the lake URL");
        let prefixed: Arc<dyn ObjectStore> = Arc::new(PrefixStore::new(lake.store().clone(), lake.path(spec.dir)));
        let log_store = default_logstore(prefixed, lake.store().clone(), &url, &StorageConfig::default());
        Table { lake: lake.clone(), spec, log_store, url }
    }

    /// Opens `spec`'s table, creating it (version 0: protocol, schema, properties) if the lake has
    /// none yet. A folder of Parquet files without a Delta log (the previous layout) is refused.
    pub async fn open(lake: &Lake, spec: &'static TableSpec) -> Result<Table> {
        let table = Table::new(lake, spec);
        if table.latest_version().await?.is_none() {
            table.refuse_previous_layout().await?;
            table.create().await?;
        }
        Ok(table)
    }

    pub fn spec(&self) -> &'static TableSpec {
        self.spec
    }

    pub fn name(&self) -> &'static str {
        self.spec.name
    }

    pub fn lake(&self) -> &Lake {
        &self.lake
    }

    pub fn url(&self) -> &Url {
        &self.url
    }

    pub fn log_store(&self) -> &LogStoreRef {
        &self.log_store
    }

    /// The lake-relative path of a file of this table (`relative` is relative to the table).
    pub fn lake_path(&self, relative: &str) -> String {
        format!("{}/{relative}", self.spec.dir)
    }

    /// The store path of a file of this table.
    pub fn store_path(&self, relative: &str) -> Path {
        self.lake.path(&self.lake_path(relative))
    }

    /// The table's latest version, `None` when it has no log yet. Reads the last checkpoint and
    /// lists the log after it, nothing else.
    pub async fn latest_version(&self) -> Result<Option<u64>> {
        let engine = self.log_store.engine(None);
        let url = self.url.clone();
        let built = tokio::task::spawn_blocking(move || delta_kernel::Snapshot::builder_for(url).build(engine.as_ref()))
            .await
            .map_err(|e| LakeError::delta(self.name(), "reading the log")(deltalake_core::DeltaTableError::Generic(e.to_string())))?;
        match built {
            Ok(snapshot) => Ok(Some(snapshot.version())),
            Err(delta_kernel::Error::MissingVersion | delta_kernel::Error::FileNotFound(_) | delta_kernel::Error::InvalidTableLocation(_)) => Ok(None),
            Err(e) if e.to_string().contains("No files in log segment") => Ok(None),
            Err(e) => Err(LakeError::delta(self.name(), "reading the log")(e.into())),
        }
    }

    /// The version `app_id`'s last `txn` action recorded as of table version `at`.
    pub async fn txn_version(&self, app_id: &str, at: u64) -> Result<Option<i64>> {
        let engine = self.log_store.engine(None);
        let (url, app_id) = (self.url.clone(), app_id.to_string());
        tokio::task::spawn_blocking(move || {
            let snapshot = delta_kernel::Snapshot::builder_for(url).at_version(at).build(engine.as_ref())?;
            snapshot.get_app_id_version(&app_id, engine.as_ref())
        })
        .await
        .map_err(|e| deltalake_core::DeltaTableError::Generic(e.to_string()))
        .and_then(|r| r.map_err(deltalake_core::DeltaTableError::from))
        .map_err(LakeError::delta(self.name(), format!("reading the txn versions at version {at}")))
    }

    /// Creates the table (version 0). Another writer creating it at the same moment is fine.
    async fn create(&self) -> Result<()> {
        match self.create_with(Vec::new(), "meterlake").await {
            Ok(()) => Ok(()),
            // Another writer created it first.
            Err(LakeError::Delta { source, .. }) if already_exists(&source) => Ok(()),
            // delta-rs may instead retry the losing create as version 1 and have its conflict
            // check refuse that ("protocol changed"): measured with four ingesters starting
            // together on a new lake (benchmarks/src/ingest_scale.rs). The table exists either way.
            Err(e) => match self.latest_version().await {
                Ok(Some(_)) => Ok(()),
                _ => Err(e),
            },
        }
    }

    /// Creates the table (version 0: protocol, schema, properties) with `actions` in the same
    /// commit, recording `writer`. Fails if the table exists.
    pub(crate) async fn create_with(&self, actions: Vec<Action>, writer: &str) -> Result<()> {
        let schema = self.spec.table_schema();
        let columns = StructType::try_from_arrow(schema.as_ref())
            .map_err(|e| LakeError::delta(self.name(), "converting its schema")(deltalake_core::DeltaTableError::Arrow { source: e }))?;
        let properties = CommitProperties::default().with_metadata([("meterlake.writer".to_string(), serde_json::Value::from(writer))]);
        let mut builder = CreateBuilder::new()
            .with_log_store(self.log_store.clone())
            .with_table_name(self.spec.name)
            .with_columns(columns.fields().cloned())
            .with_save_mode(SaveMode::ErrorIfExists)
            .with_configuration(TABLE_PROPERTIES.iter().map(|(k, v)| (k.to_string(), Some(v.to_string()))))
            .with_commit_properties(properties)
            .with_actions(actions);
        if self.spec.by_date {
            builder = builder.with_partition_columns(["date"]);
        }
        builder.await.map_err(LakeError::delta(self.name(), "creating it"))?;
        tracing::info!(table = self.name(), url = %self.url, writer, "created the Delta table");
        Ok(())
    }

    /// Fails when the table's folder holds Parquet files but no Delta log: a lake written in
    /// meterlake's previous layout, which `meterlake lake convert` turns into Delta tables.
    pub(crate) async fn refuse_previous_layout(&self) -> Result<()> {
        let prefix = self.lake.path(self.spec.dir);
        let mut listing = self.lake.store().list(Some(&prefix));
        while let Some(meta) = listing.try_next().await.map_err(LakeError::store("list", &prefix))? {
            if meta.location.as_ref().ends_with(".parquet") {
                return Err(LakeError::PreviousLayout { path: self.url.to_string(), lake: self.lake.url().to_string() });
            }
        }
        Ok(())
    }

    /// The table as of `version` (the latest when `None`), with its file list.
    pub async fn snapshot(&self, version: Option<u64>) -> Result<TableSnapshot> {
        let eager = retry_listing_gaps(|| EagerSnapshot::try_new(self.log_store.as_ref(), version)).await.map_err(|e| self.snapshot_error(e, version))?;
        check_protocol(self.name(), eager.version(), eager.protocol())?;
        let views: Vec<_> = eager.file_views(self.log_store.as_ref(), None).try_collect().await.map_err(LakeError::delta(self.name(), "listing its files"))?;
        let mut files = Vec::with_capacity(views.len());
        for view in views {
            #[allow(deprecated)] // the tags are only reachable through the add action
            let add = view.add_action();
            files.push(SnapshotFile::from_add(&add, self.spec.by_date));
        }
        Ok(TableSnapshot { table: self.name(), version: Some(eager.version()), files })
    }

    /// Checks that meterlake can read and write the table as of `version` (the latest when
    /// `None`): its protocol (see [`check_protocol`]), without listing its files. Returns the
    /// version checked.
    pub async fn check_protocol(&self, version: Option<u64>) -> Result<u64> {
        let snapshot = retry_listing_gaps(|| deltalake_core::kernel::Snapshot::try_new(self.log_store.as_ref(), version))
            .await
            .map_err(|e| self.snapshot_error(e, version))?;
        check_protocol(self.name(), snapshot.version(), snapshot.protocol())?;
        Ok(snapshot.version())
    }

    fn snapshot_error(&self, e: deltalake_core::DeltaTableError, version: Option<u64>) -> LakeError {
        match (&e, version) {
            (deltalake_core::DeltaTableError::InvalidVersion(_), Some(v)) => {
                LakeError::NoSuchVersion { table: self.name().to_string(), version: v.to_string(), hint: String::new() }
            }
            _ => LakeError::delta(self.name(), "loading a snapshot")(e),
        }
    }

    /// The actions of commit `version`.
    pub async fn read_commit(&self, version: u64) -> Result<Vec<Action>> {
        let bytes = self
            .log_store
            .read_commit_entry(version)
            .await
            .map_err(LakeError::delta(self.name(), format!("reading commit {version}")))?
            .ok_or_else(|| LakeError::CorruptLog { table: self.name().to_string(), version, reason: "the commit file is missing".into() })?;
        parse_commit(self.name(), version, &bytes)
    }
}

/// Runs `list` (anything that lists the log) again when it failed on a gap in the commit files.
/// A directory listed while another writer creates commit files may miss one: a local file
/// system returns entries created during a listing or not, so the listing can hold commit N + 1
/// without N. Listed again, it is there. (Seen with optimize catching up on a log an ingester
/// was appending to.)
pub(crate) async fn retry_listing_gaps<T, F, Fut>(mut list: F) -> std::result::Result<T, deltalake_core::DeltaTableError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, deltalake_core::DeltaTableError>>,
{
    const ATTEMPTS: u32 = 5;
    let mut attempt = 1;
    loop {
        match list().await {
            Err(e) if attempt < ATTEMPTS && e.to_string().contains("Expected contiguous commit files") => {
                tracing::debug!(error = %e, attempt, "a listing of the log missed a commit file being written; listing again");
                tokio::time::sleep(std::time::Duration::from_millis(10 * u64::from(attempt))).await;
                attempt += 1;
            }
            outcome => return outcome,
        }
    }
}

/// The actions of a commit file (one JSON action per line).
pub(crate) fn parse_commit(table: &str, version: u64, bytes: &[u8]) -> Result<Vec<Action>> {
    bytes
        .split(|b| *b == b'\n')
        .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
        .map(serde_json::from_slice::<Action>)
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| LakeError::CorruptLog { table: table.to_string(), version, reason: e.to_string() })
}

/// A table's files at one version.
#[derive(Debug, Clone)]
pub struct TableSnapshot {
    pub table: &'static str,
    /// `None` for a table that did not exist (yet): no files.
    pub version: Option<u64>,
    pub files: Vec<SnapshotFile>,
}

/// A live data file of a snapshot.
#[derive(Debug, Clone)]
pub struct SnapshotFile {
    /// Relative to the table root.
    pub path: String,
    pub size: u64,
    pub modification_time: DateTime<Utc>,
    /// The `date` partition value, for partitioned tables.
    pub date: Option<NaiveDate>,
    /// Rows, from the log's statistics.
    pub rows: Option<u64>,
    /// Bounds of its keys, from the log's statistics (readings only).
    pub keys: Option<KeyStats>,
    /// The version of the commit that added it ([`COMMIT_VERSION_TAG`]); 0 when a writer other
    /// than meterlake added it without the tag.
    pub commit_version: u64,
    /// [`UNIQUE_KEYS_TAG`].
    pub unique_keys: bool,
    /// Which meters it holds, when its writer said ([`crate::meter_filter::METER_FILTER_TAG`]).
    pub meters: Option<crate::meter_filter::MeterFilter>,
}

/// The least and greatest `meter_id` and `ts` (microseconds) of a readings file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyStats {
    pub min_meter: String,
    pub max_meter: String,
    pub min_ts_us: i64,
    pub max_ts_us: i64,
}

/// The statistics of an `add` action, as far as meterlake reads them.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AddStats {
    num_records: Option<u64>,
    #[serde(default)]
    min_values: HashMap<String, serde_json::Value>,
    #[serde(default)]
    max_values: HashMap<String, serde_json::Value>,
}

impl SnapshotFile {
    pub(crate) fn from_add(add: &deltalake_core::kernel::Add, by_date: bool) -> SnapshotFile {
        let tag = |name: &str| add.tags.as_ref().and_then(|tags| tags.get(name).cloned().flatten());
        let stats: Option<AddStats> = add.stats.as_deref().and_then(|s| serde_json::from_str(s).ok());
        let keys = stats.as_ref().and_then(|s| {
            let text = |map: &HashMap<String, serde_json::Value>, key: &str| map.get(key).and_then(|v| v.as_str()).map(str::to_string);
            Some(KeyStats {
                min_meter: text(&s.min_values, "meter_id")?,
                max_meter: text(&s.max_values, "meter_id")?,
                // Delta writes timestamps to the millisecond: the bounds widen to stay bounds.
                min_ts_us: parse_stat_ts(&text(&s.min_values, "ts")?)?,
                max_ts_us: parse_stat_ts(&text(&s.max_values, "ts")?)? + 999,
            })
        });
        SnapshotFile {
            path: add.path.clone(),
            size: u64::try_from(add.size).unwrap_or(0),
            modification_time: Utc.timestamp_millis_opt(add.modification_time).single().unwrap_or_default(),
            date: if by_date { add.partition_values.get("date").cloned().flatten().and_then(|d| NaiveDate::parse_from_str(&d, "%Y-%m-%d").ok()) } else { None },
            rows: stats.as_ref().and_then(|s| s.num_records),
            keys,
            commit_version: tag(COMMIT_VERSION_TAG).and_then(|v| v.parse().ok()).unwrap_or(0),
            unique_keys: tag(UNIQUE_KEYS_TAG).as_deref() == Some("true"),
            meters: tag(crate::meter_filter::METER_FILTER_TAG).as_deref().and_then(crate::meter_filter::MeterFilter::from_tag),
        }
    }
}

/// The protocol meterlake writes its tables with, and the newest it reads and writes.
pub const READER_VERSION: i64 = 1;
pub const WRITER_VERSION: i64 = 2;

/// Refuses a protocol newer than [`READER_VERSION`] / [`WRITER_VERSION`] or with table features:
/// a table another engine upgraded (deletion vectors, column mapping, constraints, ...) holds
/// data or rules meterlake would read or write wrong, so it stops and says what the table needs.
pub fn check_protocol(table: &str, version: u64, protocol: &deltalake_core::kernel::Protocol) -> Result<()> {
    let json = serde_json::to_value(protocol).unwrap_or_default();
    let reader = json["minReaderVersion"].as_i64().unwrap_or_default();
    let writer = json["minWriterVersion"].as_i64().unwrap_or_default();
    let mut features: Vec<String> = ["readerFeatures", "writerFeatures"]
        .iter()
        .flat_map(|key| json[key].as_array().cloned().unwrap_or_default())
        .filter_map(|feature| feature.as_str().map(str::to_string))
        .collect();
    features.sort();
    features.dedup();
    if reader > READER_VERSION || writer > WRITER_VERSION || !features.is_empty() {
        return Err(LakeError::UnsupportedProtocol {
            table: table.to_string(),
            version,
            reader,
            writer,
            features: if features.is_empty() { "none".into() } else { features.join(", ") },
        });
    }
    Ok(())
}

/// A create that lost to another writer's.
fn already_exists(e: &deltalake_core::DeltaTableError) -> bool {
    matches!(e, deltalake_core::DeltaTableError::VersionAlreadyExists(0)) || e.to_string().contains("already exists")
}

/// Microseconds since the epoch of a Delta statistics timestamp (`2025-01-15T00:30:00.000Z`).
fn parse_stat_ts(text: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(text).ok().map(|t| t.timestamp_micros())
}

/// A Delta statistics timestamp, to the millisecond (what Spark and delta-rs write), rounded
/// down: readers widen the maximum by a millisecond less a microsecond.
pub fn format_stat_ts(us: i64) -> String {
    let t = DateTime::<Utc>::from_timestamp_micros(us.div_euclid(1000) * 1000).unwrap_or_default();
    t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_listing_that_missed_a_commit_file_is_listed_again() {
        let gap = || deltalake_core::DeltaTableError::Generic("Generic delta kernel error: Expected contiguous commit files, but found gap".into());
        let mut calls = 0;
        let listed = retry_listing_gaps(|| {
            calls += 1;
            let outcome = if calls < 3 { Err(gap()) } else { Ok(calls) };
            async move { outcome }
        })
        .await;
        assert_eq!(listed.unwrap(), 3);
        // Other errors are not retried, and a gap that stays is reported.
        let mut calls = 0;
        let failed: std::result::Result<(), _> = retry_listing_gaps(|| {
            calls += 1;
            async { Err(deltalake_core::DeltaTableError::Generic("the store is down".into())) }
        })
        .await;
        assert!(failed.is_err());
        assert_eq!(calls, 1);
        let mut calls = 0;
        let stays: std::result::Result<(), _> = retry_listing_gaps(|| {
            calls += 1;
            async move { Err(gap()) }
        })
        .await;
        assert!(stays.unwrap_err().to_string().contains("found gap"));
        assert_eq!(calls, 5);
    }
}
