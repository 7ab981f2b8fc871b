//! Spool's wire types, shared by the server and its clients (the `spool` CLI, the bench, and
//! the SDKs), so both sides agree on every field name by construction.
//!
//! [`http`] holds the JSON bodies of the HTTP API and SSE events; [`groups`] those of the
//! consumer-group calls; [`ws`] the frames of the
//! WebSocket protocol `spool.v1.json`; [`error`] the error body and its stable codes. Field
//! names here are public interface: see docs/http-api.md and docs/protocol.md.

pub mod error;
pub mod groups;
pub mod http;
pub mod ws;

pub use error::{ErrorBody, ErrorCode, ErrorDetail};
