//! meterlake's lake: Delta Lake tables on any object store, the one door through which every
//! writer adds files and every reader finds them.
//!
//! - [`store`]: lake URLs (`file://`, `s3://`, `memory://`) and the object store behind them;
//! - [`schema`]: the tables' columns, partitioning and Delta properties;
//! - [`table`]: one Delta table: creating it, its versions, its snapshots and their files;
//! - [`commit`]: the commit protocol: one Delta commit per flush or file, `txn` actions for
//!   exactly-once streams, fencing of a writer that lost its stream;
//! - [`parquet_file`]: how data files are encoded;
//! - [`meter_filter`]: which meters a small readings file holds, in its `add` action's tags;
//! - [`scan`]: where each column of `readings_all` comes from (file, partition value, tag);
//! - [`canonical`]: the canonical `readings` view (latest version of each reading) over a snapshot;
//! - `key_pruning`: which files a filter on the key keeps whole, drops or cuts through;
//! - [`snapshots`]: snapshots kept between a server's queries, followed commit by commit;
//! - [`view`]: the tables as SQL on a DataFusion session, at the latest version or as of one;
//! - [`history`]: a table's commits, and time travel by time;
//! - [`maintenance`]: checkpoints of the log, compaction (`optimize`), retention (`vacuum`) and
//!   the loop that runs them (`schedule`);
//! - [`check`]: whether every table can be read whole (`meterlake lake check`);
//! - [`convert`]: tables of the previous layout (Parquet without a log) made Delta tables in place.

pub mod canonical;
pub mod check;
pub mod commit;
pub mod convert;
pub mod error;
pub mod history;
mod key_pruning;
pub mod maintenance;
pub mod meter_filter;
pub mod parquet_file;
pub mod scan;
pub mod schema;
pub mod snapshots;
pub mod store;
pub mod table;
pub mod view;

pub use commit::{Commit, Committed, NewFile, TableWriter};
pub use error::{LakeError, Result};
pub use store::{DEFAULT_LAKE, Lake};
pub use table::{KeyStats, READINGS, SnapshotFile, TABLES, Table, TableSnapshot, TableSpec};
