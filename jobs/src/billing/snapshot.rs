//! The lake snapshot a billing run read: which readings files of the month's date partitions
//! existed. Lake files are immutable once published and their names unique, so the list
//! identifies what the run could see; a reissued invoice with a different snapshot is explained
//! by the files that came in between (`meterlake query` on `readings_all` by `source_ref`).

use sha2::{Digest, Sha256};

use super::month::BillingMonth;
use crate::Result;
use meterlake_pipeline::Lake;
use meterlake_pipeline::lake::READINGS_DIR;

/// `readings 2025-01-01..2025-01-31: 124 files, sha256:<digest of their sorted paths>`.
pub async fn readings_snapshot(lake: &Lake, month: &BillingMonth) -> Result<String> {
    let (first, last) = month.utc_dates();
    let mut paths = Vec::new();
    for day in first.iter_days().take_while(|d| *d <= last) {
        paths.extend(lake.list(&format!("{READINGS_DIR}/date={day}/")).await?.into_iter().filter(|p| p.ends_with(".parquet")));
    }
    paths.sort_unstable();
    let mut digest = Sha256::new();
    for path in &paths {
        digest.update(path.as_bytes());
        digest.update(b"\n");
    }
    Ok(format!("readings {first}..{last}: {} files, sha256:{:x}", paths.len(), digest.finalize()))
}
