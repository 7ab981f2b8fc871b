//! What a client decodes: one WebSocket text message from the server as a `ServerFrame`.
//!
//! Properties, for any input:
//! - decoding never panics;
//! - a decoded frame encodes to JSON that decodes to the same frame (round trip), and encoding
//!   that again gives the same text;
//! - what the client crate does with the frame's strings (`Position` and `Epoch` parsing,
//!   stream names, decoding a delivery's payload) never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spool_core::{Epoch, Position, StreamName};
use spool_protocol::ws::ServerFrame;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(frame) = serde_json::from_str::<ServerFrame>(text) else {
        return;
    };

    let json = serde_json::to_string(&frame).expect("a decoded frame encodes");
    let again = serde_json::from_str::<ServerFrame>(&json)
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
        ServerFrame::Connected(c) => {
            for s in &c.subscriptions {
                check_stream(&s.stream);
                check_position(&s.position);
                check_position(&s.head);
            }
        }
        ServerFrame::Subscribed(s) => {
            check_stream(&s.stream);
            check_position(&s.position);
            check_position(&s.head);
        }
        ServerFrame::Unsubscribed(u) => check_stream(&u.stream),
        ServerFrame::Message(d) => {
            check_stream(&d.stream);
            check_epoch(&d.epoch);
            let _ = d.payload();
        }
        ServerFrame::Reset(r) => {
            check_stream(&r.stream);
            check_position(&r.position);
        }
        ServerFrame::Skipped(s) => {
            check_stream(&s.stream);
            check_epoch(&s.epoch);
        }
        ServerFrame::Ack(a) => {
            check_stream(&a.stream);
            check_epoch(&a.epoch);
        }
        ServerFrame::Error(e) => {
            let _ = e.code.as_str();
        }
        ServerFrame::Refreshed(_)
        | ServerFrame::Ping(_)
        | ServerFrame::Pong(_)
        | ServerFrame::Reconnect(_) => {}
    }
});

fn check_stream(s: &str) {
    if let Ok(name) = StreamName::new(s) {
        assert_eq!(name.as_str(), s);
    }
}

fn check_epoch(s: &str) {
    if let Ok(e) = Epoch::parse(s) {
        assert_eq!(e.as_str(), s);
    }
}

/// An accepted position prints back as a position that parses to itself.
fn check_position(s: &str) {
    if let Ok(p) = s.parse::<Position>() {
        let printed = p.to_string();
        let back = printed
            .parse::<Position>()
            .unwrap_or_else(|e| panic!("{s:?} parsed, but its display {printed:?} does not: {e}"));
        assert_eq!(back, p);
    }
}
