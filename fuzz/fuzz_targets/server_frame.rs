//! What a client decodes: one WebSocket text message from the server as a `ServerFrame`.
//!
//! Properties, for any input:
//! - decoding never panics;
//! - a decoded frame encodes to JSON that decodes to the same frame (round trip), and encoding
//!   that again gives the same text;
//! - what the client crate does with the frame's strings (`Position` and `Epoch` parsing,
//!   stream, group and member names, receipts, decoding a delivery's payload) never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spool_fuzz::{
    check_epoch, check_group, check_position, check_receipt, check_stream, round_trip,
};
use spool_protocol::ws::ServerFrame;

fuzz_target!(|data: &[u8]| {
    let Some(frame) = round_trip::<ServerFrame>(data) else {
        return;
    };
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
        ServerFrame::Consuming(c) => {
            check_stream(&c.stream);
            check_group(&c.group);
        }
        ServerFrame::Leased(l) => {
            check_stream(&l.stream);
            check_group(&l.group);
            check_receipt(&l.receipt);
            check_epoch(&l.epoch);
            let _ = l.payload();
        }
        ServerFrame::Settled(s) => {
            check_stream(&s.stream);
            check_group(&s.group);
        }
        ServerFrame::GroupReset(r) => {
            check_stream(&r.stream);
            check_group(&r.group);
            check_position(&r.reset.from);
            check_position(&r.reset.to);
        }
        ServerFrame::Stopped(s) => {
            check_stream(&s.stream);
            check_group(&s.group);
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
