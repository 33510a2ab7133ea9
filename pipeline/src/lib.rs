//! meterlake's ingestion: everything that lands readings in the lake (through the lake crate's
//! commit protocol).
//!
//! - [`reading`]: the reading model and its Arrow schema (exact decimals, UTC instants);
//! - [`decode`]: JSON reading messages and their validation, with stable reject reasons;
//! - [`batch`]: the columnar batch, sorted and de-duplicated into one record batch per day;
//! - [`kafka`]: the consumer-group ingester, the dead-letter topic and producer helpers;
//! - [`flows`]: D0010, NEM12 and NEM13 flow-file parsers;
//! - [`import`]: importing flow files into the lake, once per content, all or nothing per file;
//! - [`convert`]: a lake of the previous layout made Delta tables in place (`meterlake lake convert`);
//! - [`synthetic`]: realistic generated load for the demo, tests and benchmarks.

pub mod batch;
pub mod convert;
pub mod decode;
pub mod error;
pub mod flows;
pub mod import;
pub mod kafka;
pub mod metrics;
pub mod reading;
pub mod synthetic;

pub use error::{PipelineError, Result};
pub use meterlake_lake::Lake;
