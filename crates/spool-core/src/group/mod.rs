//! Durable consumer groups (SPEC §7), as a pure state machine: no I/O and no clock.
//!
//! (The state machine itself follows; this module holds the group's names and settings.)

pub mod config;
pub mod name;

pub use config::{GroupConfig, GroupConfigError, GroupConfigSpec, Ordering};
pub use name::{GroupName, InvalidName, MemberName};
