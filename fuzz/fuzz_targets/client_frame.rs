//! What the server decodes: one WebSocket text message as a `ClientFrame`.
//!
//! Properties, for any input:
//! - decoding never panics;
//! - a decoded frame encodes to JSON that decodes to the same frame (round trip), and encoding
//!   that again gives the same text;
//! - every string the server goes on to interpret (stream names, `after`, the `positions` of
//!   a resume) goes through `StreamName::new` and the `after` start parser (a keyword or
//!   `Position::from_str`) without panicking, and whatever they accept prints back as itself.
//!   The session id's own check lives in spool-server, so it gets the stream-name and position
//!   checks instead.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spool_core::{Position, StreamName};
use spool_protocol::ws::ClientFrame;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(frame) = serde_json::from_str::<ClientFrame>(text) else {
        return;
    };

    let json = serde_json::to_string(&frame).expect("a decoded frame encodes");
    let again = serde_json::from_str::<ClientFrame>(&json)
        .unwrap_or_else(|e| panic!("re-decoding {json} failed: {e}"));
    assert_eq!(
        frame, again,
        "round trip changed the frame; encoded as {json}"
    );
    assert_eq!(
        json,
        serde_json::to_string(&again).unwrap(),
        "encoding is not stable"
    );

    match &frame {
        ClientFrame::Connect(c) => {
            if let Some(session) = &c.session {
                check_stream(session);
                check_position(session);
            }
            for (stream, position) in &c.positions {
                check_stream(stream);
                check_position(position);
            }
        }
        ClientFrame::Subscribe(s) => {
            check_stream(&s.stream);
            check_after(s.after.as_deref().unwrap_or("now"));
        }
        ClientFrame::Unsubscribe(u) => check_stream(&u.stream),
        ClientFrame::Publish(p) => check_stream(&p.stream),
        ClientFrame::Refresh(_) | ClientFrame::Ping(_) | ClientFrame::Pong(_) => {}
    }
});

/// `StreamName::new` as the server calls it: it may refuse, never panic, and a name it accepts
/// is the string it was given.
fn check_stream(s: &str) {
    if let Ok(name) = StreamName::new(s) {
        assert_eq!(name.as_str(), s);
        assert_eq!(name.to_string(), s);
        assert!(!s.is_empty() && s.len() <= spool_core::name::MAX_STREAM_NAME_LEN);
    }
}

/// `Position::from_str`: an accepted position prints back as a position that parses to itself.
fn check_position(s: &str) {
    if let Ok(p) = s.parse::<Position>() {
        let printed = p.to_string();
        let back = printed
            .parse::<Position>()
            .unwrap_or_else(|e| panic!("{s:?} parsed, but its display {printed:?} does not: {e}"));
        assert_eq!(back, p);
    }
}

/// The `after` of a `subscribe`, as the server's `parse_start` reads it: a keyword or a position.
fn check_after(s: &str) {
    match s {
        "oldest" | "latest" | "now" => {}
        _ => check_position(s),
    }
}
