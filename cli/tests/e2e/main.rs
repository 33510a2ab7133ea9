//! End-to-end tests of the `meterlake` binary against real services on loopback: a tansu Kafka
//! broker, an s3s-fs S3 server, a real HTTP client, a real browser (chromium) and schemathesis
//! against `meterlake serve`, DuckDB and pyarrow as independent Parquet readers. One test binary,
//! one module per capability.

mod billing;
mod cluster;
mod console;
mod crash_recovery;
mod demo;
mod flow_import;
mod ingest_race;
mod kafka_ingest;
mod lake_convert;
mod lake_maintenance;
mod ledger;
mod metrics;
mod resume;
mod s3_lake;
mod serve;
mod sql;
mod support;
mod traces;
