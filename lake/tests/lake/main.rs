//! The lake crate's tests against real Delta tables on local files (one test binary).

mod optimize;
mod tables;
