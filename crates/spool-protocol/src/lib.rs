//! Spool's wire types, shared by the server and its clients (the `spool` CLI, the bench, and
//! the SDKs), so both sides agree on every field name by construction.
//!
//! [`http`] holds the JSON bodies of the HTTP API and SSE events; [`groups`] those of the
//! consumer-group calls; [`ws`] the frames of the
//! WebSocket protocol `spool.v1.json`; [`error`] the error body and its stable codes. Field
//! names here are public interface: see docs/http-api.md and docs/protocol.md.

/// Declares a wire struct that carries a message's payload: the fields given, then `data`
/// (the payload as UTF-8 text) or `data_base64` (any other bytes), `content_type`, `key` and
/// `headers`, then the fields after `then`; and its `payload()`. Every body and frame that
/// carries a payload (publishes and deliveries, over HTTP, SSE and WebSocket) names, orders
/// (serde writes fields in declaration order) and leaves out these fields alike because they
/// are written here once. Not `serde(flatten)`: that buffers every field when reading, and
/// refuses no unknown field.
///
/// With `frame "TYPE"` at the end, also `from_frame`: a WebSocket frame `{"type":"TYPE",…}`
/// read straight into the struct's fields (see [`ws::Publish::from_frame`]).
macro_rules! with_payload {
    (
        $(#[$attr:meta])*
        pub struct $name:ident {
            $($(#[$field_attr:meta])* pub $field:ident: $ty:ty,)*
        }
        $(then { $($(#[$after_attr:meta])* pub $after:ident: $after_ty:ty,)* })?
        frame $tag:literal
    ) => {
        with_payload! {
            $(#[$attr])*
            pub struct $name {
                $($(#[$field_attr])* pub $field: $ty,)*
            }
            $(then { $($(#[$after_attr])* pub $after: $after_ty,)* })?
        }

        impl $name {
            #[doc = concat!(
                "`text` read as a `", $tag, "` frame straight into its fields, not through ",
                "serde's buffering of the internally tagged frame enum (every field copied ",
                "into a `Content` tree first, then read from it). `None`: not a `", $tag,
                "` frame this reads; the frame enum reads it (or says what is wrong with it)."
            )]
            #[inline]
            pub fn from_frame(text: &str) -> Option<Self> {
                with_payload! {
                    @struct
                    #[derive(serde::Deserialize)]
                    #[serde(deny_unknown_fields)]
                    struct Tagged<'a> {
                        #[serde(rename = "type", borrow)]
                        kind: ::std::borrow::Cow<'a, str>,
                        $($(#[$field_attr])* pub $field: $ty,)*
                    } {
                        $($($(#[$after_attr])* pub $after: $after_ty,)*)?
                    }
                }
                let t = serde_json::from_str::<Tagged<'_>>(text).ok()?;
                (t.kind == $tag).then(|| $name {
                    $($field: t.$field,)*
                    data: t.data, data_base64: t.data_base64,
                    content_type: t.content_type, key: t.key, headers: t.headers,
                    $($($after: t.$after,)*)?
                })
            }
        }
    };
    (
        $(#[$attr:meta])*
        pub struct $name:ident {
            $($(#[$field_attr:meta])* pub $field:ident: $ty:ty,)*
        }
        $(then { $($(#[$after_attr:meta])* pub $after:ident: $after_ty:ty,)* })?
    ) => {
        with_payload! {
            @struct
            $(#[$attr])*
            pub struct $name {
                $($(#[$field_attr])* pub $field: $ty,)*
            } {
                $($($(#[$after_attr])* pub $after: $after_ty,)*)?
            }
        }

        impl $name {
            /// The payload bytes, decoded from `data` or `data_base64`.
            pub fn payload(&self) -> Result<Vec<u8>, base64::DecodeError> {
                $crate::http::decode_payload(self.data.as_deref(), self.data_base64.as_deref())
            }
        }
    };
    // The struct itself: the fields before, the payload's, the fields after.
    (
        @struct
        $(#[$attr:meta])*
        $vis:vis struct $name:ident $(<$lt:lifetime>)? { $($before:tt)* } { $($after:tt)* }
    ) => {
        $(#[$attr])*
        $vis struct $name $(<$lt>)? {
            $($before)*
            /// The payload, when it is UTF-8 text.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub data: Option<String>,
            /// The payload, base64-encoded, when it is not UTF-8.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub data_base64: Option<String>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub content_type: Option<String>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub key: Option<String>,
            #[serde(default, skip_serializing_if = "::std::collections::BTreeMap::is_empty")]
            pub headers: ::std::collections::BTreeMap<String, String>,
            $($after)*
        }
    };
}

/// [`with_payload!`] for a stored message handed out: the fields given, then the message's
/// `epoch`, `offset` and `time`, then its payload fields.
macro_rules! delivered {
    ($(#[$attr:meta])* pub struct $name:ident { $($fields:tt)* }) => {
        with_payload! {
            $(#[$attr])*
            pub struct $name {
                $($fields)*
                pub epoch: String,
                pub offset: u64,
                /// Publish time, ms since the Unix epoch.
                pub time: u64,
            }
        }
    };
}

pub mod error;
pub mod groups;
pub mod http;
pub mod ws;

pub use error::{ErrorBody, ErrorCode, ErrorDetail};
