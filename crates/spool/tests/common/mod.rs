//! The test harness lives in the `spool-testkit` crate; `mod common;` keeps the tests' paths.

pub use spool_testkit::*;
