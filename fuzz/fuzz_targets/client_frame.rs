//! What the server decodes: one WebSocket text message as a `ClientFrame`.
//!
//! Properties, for any input:
//! - decoding never panics;
//! - a decoded frame encodes to JSON that decodes to the same frame (round trip), and encoding
//!   that again gives the same text;
//! - every string the server goes on to interpret (stream names, `after`, the `positions` of
//!   a resume, group and member names, receipts) goes through `StreamName::new`, the `after`
//!   start parser (a keyword or `Position::from_str`), `GroupName::new` and `Receipt::decode`
//!   without panicking, and whatever they accept prints back as itself.
//!   The session id's own check lives in spool-server, so it gets the stream-name and position
//!   checks instead.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spool_fuzz::{check_group, check_position, check_receipt, check_stream, round_trip};
use spool_protocol::ws::ClientFrame;

fuzz_target!(|data: &[u8]| {
    let Some(frame) = round_trip::<ClientFrame>(data) else {
        return;
    };
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
        ClientFrame::Consume(c) => {
            check_stream(&c.stream);
            check_group(&c.group);
            check_group(&c.consumer);
        }
        ClientFrame::Credit(c) => {
            check_stream(&c.stream);
            check_group(&c.group);
        }
        ClientFrame::Ack(s)
        | ClientFrame::Nack(s)
        | ClientFrame::Extend(s)
        | ClientFrame::Terminate(s) => {
            check_stream(&s.stream);
            check_group(&s.group);
            s.receipts.iter().for_each(|r| check_receipt(r));
        }
        ClientFrame::StopConsuming(s) => {
            check_stream(&s.stream);
            check_group(&s.group);
        }
        ClientFrame::Refresh(_) | ClientFrame::Ping(_) | ClientFrame::Pong(_) => {}
    }
});

/// The `after` of a `subscribe`, as the server's `parse_start` reads it: a keyword or a position.
fn check_after(s: &str) {
    match s {
        "oldest" | "latest" | "now" => {}
        _ => check_position(s),
    }
}
