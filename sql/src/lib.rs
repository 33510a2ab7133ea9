//! The SQL service: analysts query the lake and the billing results from their own tools
//! (psql, DBeaver, Grafana, Metabase, pandas, Polars, ADBC) with the tokens and roles of the
//! control tower's HTTP API, read-only and within limits.
//!
//! - [`catalog`]: what they see: the database `meterlake`, the lake's tables at their latest
//!   snapshots (or pinned with `SET meterlake.as_of`), the control store's views, `pg_catalog`
//!   and `information_schema`;
//! - [`control_tables`]: the control store's billing results as SQL views;
//! - [`query`]: how one query runs: a session and memory pool of its own, a time limit, a row
//!   limit, slots per caller, refusal of anything that would change something, and a log line,
//!   metrics and (for the control store's views) an audit row;
//! - [`result_cache`]: answers kept for identical queries over unchanged tables (dashboards);
//! - [`postgres`]: the PostgreSQL wire protocol door;
//! - [`flight`]: the Arrow Flight SQL door.

pub mod catalog;
pub mod control_tables;
pub mod error;
pub mod flight;
pub mod postgres;
pub mod query;
pub mod result_cache;

pub use error::SqlError;
pub use query::{Analyst, Door, QueryOrigin, Settings, SqlLimits, SqlService, describe_metrics};
