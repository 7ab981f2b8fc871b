//! What both fuzz targets check, written once: a frame's round trip through JSON, and the
//! parsers a peer runs on the strings a frame carries (they may refuse, never panic, and what
//! they accept prints back as itself).

use std::fmt::Debug;

use serde::{Serialize, de::DeserializeOwned};
use spool_core::{
    Epoch, Position, StreamName,
    group::{GroupName, Receipt},
};

/// `data` decoded as one frame, when it is one; a decoded frame encodes to JSON that decodes
/// to the same frame, and encoding that again gives the same text.
pub fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(data: &[u8]) -> Option<T> {
    let text = std::str::from_utf8(data).ok()?;
    let frame = serde_json::from_str::<T>(text).ok()?;
    let json = serde_json::to_string(&frame).expect("a decoded frame encodes");
    let again = serde_json::from_str::<T>(&json)
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
    Some(frame)
}

/// `StreamName::new` as the server calls it: a name it accepts is the string it was given.
pub fn check_stream(s: &str) {
    if let Ok(name) = StreamName::new(s) {
        assert_eq!(name.as_str(), s);
        assert_eq!(name.to_string(), s);
        assert!(!s.is_empty() && s.len() <= spool_core::name::MAX_STREAM_NAME_LEN);
    }
}

/// A group or member name (the stream-name rules).
pub fn check_group(s: &str) {
    if let Ok(name) = GroupName::new(s) {
        assert_eq!(name.as_str(), s);
    }
}

/// `Receipt::decode`, bounded before it decodes anything.
pub fn check_receipt(s: &str) {
    let _ = Receipt::decode(s);
}

pub fn check_epoch(s: &str) {
    if let Ok(e) = Epoch::parse(s) {
        assert_eq!(e.as_str(), s);
    }
}

/// `Position::from_str`: an accepted position prints back as a position that parses to itself.
pub fn check_position(s: &str) {
    if let Ok(p) = s.parse::<Position>() {
        let printed = p.to_string();
        let back = printed
            .parse::<Position>()
            .unwrap_or_else(|e| panic!("{s:?} parsed, but its display {printed:?} does not: {e}"));
        assert_eq!(back, p);
    }
}
