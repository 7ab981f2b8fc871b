//! Receipts: the opaque handle a member gets with each delivered message and gives back to
//! ack, nack, extend or terminate it (SPEC §7).
//!
//! A receipt names exactly one lease: the group's incarnation ([`GroupId`], new each time a
//! group is created, so a receipt never outlives a deleted group), the message's epoch and
//! offset, and the lease's [`LeaseId`] (64 random bits drawn for every delivery, so the receipt
//! of an earlier delivery of the same message is stale, and a member cannot guess the receipt
//! of a lease it was not given).
//!
//! Text form: base64url without padding of
//! `version=1 (u8) | group u64 BE | lease u64 BE | offset u64 BE | epoch length u8 | epoch`,
//! 36 characters for a 10-character epoch, at most [`MAX_RECEIPT_LEN`]. Anything else is an
//! [`InvalidReceipt`]; the operations answer it `unknown`, never with an error or a panic.

use std::fmt;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::position::{Epoch, MAX_EPOCH_LEN, Offset};

const VERSION: u8 = 1;
const FIXED_LEN: usize = 1 + 8 + 8 + 8 + 1;
/// The longest receipt text: the fixed fields and the longest epoch, in base64.
pub const MAX_RECEIPT_LEN: usize = (FIXED_LEN + MAX_EPOCH_LEN).div_ceil(3) * 4;

macro_rules! hex_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub u64);

        impl $name {
            /// A fresh random id (never 0, so a zeroed field is never a valid one).
            pub fn generate() -> Self {
                loop {
                    let id: u64 = rand::random();
                    if id != 0 {
                        return Self(id);
                    }
                }
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:016x})", stringify!($name), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:016x}", self.0)
            }
        }

        /// Stored as 16 hex digits, so every JSON reader keeps all 64 bits.
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                if s.len() != 16 {
                    return Err(serde::de::Error::custom("an id is 16 hex digits"));
                }
                u64::from_str_radix(&s, 16)
                    .map($name)
                    .map_err(|_| serde::de::Error::custom("an id is 16 hex digits"))
            }
        }
    };
}

hex_id!(
    /// One incarnation of a group: drawn when the group is created, kept for its life. A group
    /// deleted and created again under the same name has a new one, so old receipts are
    /// `unknown` to it.
    GroupId
);

hex_id!(
    /// One lease of one message: drawn at every delivery.
    LeaseId
);

/// A decoded receipt: which lease of which message of which group.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Receipt {
    pub group: GroupId,
    pub epoch: Epoch,
    pub offset: Offset,
    pub lease: LeaseId,
}

/// Why a text is not a receipt. Operations answer every one of these `unknown`; the detail is
/// for logs and tests.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidReceipt {
    #[error("a receipt is at most {MAX_RECEIPT_LEN} characters; got {0}")]
    TooLong(usize),
    #[error("a receipt is base64url text")]
    NotBase64,
    #[error("the receipt is truncated")]
    Truncated,
    #[error("unknown receipt version {0}")]
    Version(u8),
    #[error("the receipt's epoch is malformed")]
    BadEpoch,
    #[error("the receipt has bytes after its end")]
    TrailingBytes,
}

impl Receipt {
    /// The text a client holds.
    pub fn encode(&self) -> String {
        let epoch = self.epoch.as_str().as_bytes();
        let mut bytes = Vec::with_capacity(FIXED_LEN + epoch.len());
        bytes.push(VERSION);
        bytes.extend_from_slice(&self.group.0.to_be_bytes());
        bytes.extend_from_slice(&self.lease.0.to_be_bytes());
        bytes.extend_from_slice(&self.offset.0.to_be_bytes());
        // Epochs are at most 64 bytes (Epoch::parse), so the length fits a byte.
        bytes.push(epoch.len() as u8);
        bytes.extend_from_slice(epoch);
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Reads a receipt a client sent. Bounded before any decoding: a huge text costs nothing.
    pub fn decode(text: &str) -> Result<Self, InvalidReceipt> {
        if text.len() > MAX_RECEIPT_LEN {
            return Err(InvalidReceipt::TooLong(text.len()));
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| InvalidReceipt::NotBase64)?;
        let (&version, rest) = bytes.split_first().ok_or(InvalidReceipt::Truncated)?;
        if version != VERSION {
            return Err(InvalidReceipt::Version(version));
        }
        if rest.len() < FIXED_LEN - 1 {
            return Err(InvalidReceipt::Truncated);
        }
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&rest[i..i + 8]);
            u64::from_be_bytes(b)
        };
        let (group, lease, offset) = (u64_at(0), u64_at(8), u64_at(16));
        let epoch_len = rest[24] as usize;
        let epoch = &rest[25..];
        if epoch.len() < epoch_len {
            return Err(InvalidReceipt::Truncated);
        }
        if epoch.len() > epoch_len {
            return Err(InvalidReceipt::TrailingBytes);
        }
        let epoch = std::str::from_utf8(epoch)
            .ok()
            .and_then(|e| Epoch::parse(e).ok())
            .ok_or(InvalidReceipt::BadEpoch)?;
        Ok(Receipt {
            group: GroupId(group),
            epoch,
            offset: Offset(offset),
            lease: LeaseId(lease),
        })
    }
}

impl fmt::Display for Receipt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.encode())
    }
}

impl std::str::FromStr for Receipt {
    type Err = InvalidReceipt;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Receipt::decode(s)
    }
}

/// The answer for one receipt of an ack, nack, extend or terminate (SPEC §7).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReceiptResult {
    /// Done: the receipt named the message's live lease.
    Ok,
    /// The receipt named a real lease that is over (ran out, or the message was delivered
    /// again, finished, or lost to a reset since): nothing was done.
    Expired,
    /// Not a receipt of this group: malformed, of another group or incarnation, or of a
    /// message the group never handed out. Nothing was done.
    Unknown,
}

impl ReceiptResult {
    /// The stable wire name: `ok`, `expired`, `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            ReceiptResult::Ok => "ok",
            ReceiptResult::Expired => "expired",
            ReceiptResult::Unknown => "unknown",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt(epoch: &str) -> Receipt {
        Receipt {
            group: GroupId(0x0123_4567_89ab_cdef),
            epoch: Epoch::parse(epoch).unwrap(),
            offset: Offset(42),
            lease: LeaseId(u64::MAX),
        }
    }

    #[test]
    fn round_trips_compactly() {
        let r = receipt("aB3dE5gH9k");
        let text = r.encode();
        assert_eq!(text.len(), 48);
        assert!(
            text.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_eq!(Receipt::decode(&text), Ok(r));
        let longest = receipt(&"e".repeat(MAX_EPOCH_LEN));
        let text = longest.encode();
        assert_eq!(text.len(), MAX_RECEIPT_LEN);
        assert_eq!(text.parse::<Receipt>(), Ok(longest));
    }

    #[test]
    fn every_malformed_text_is_refused_without_panicking() {
        let good = URL_SAFE_NO_PAD.decode(receipt("e1").encode()).unwrap();
        let enc = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
        assert_eq!(Receipt::decode(""), Err(InvalidReceipt::Truncated));
        assert_eq!(Receipt::decode("!!!!"), Err(InvalidReceipt::NotBase64));
        assert_eq!(Receipt::decode("abc=="), Err(InvalidReceipt::NotBase64));
        assert_eq!(
            Receipt::decode(&"A".repeat(10_000_000)),
            Err(InvalidReceipt::TooLong(10_000_000))
        );
        for cut in 1..good.len() {
            assert_eq!(
                Receipt::decode(&enc(&good[..cut])),
                Err(InvalidReceipt::Truncated),
                "cut at {cut}"
            );
        }
        let mut longer = good.clone();
        longer.push(b'x');
        assert_eq!(
            Receipt::decode(&enc(&longer)),
            Err(InvalidReceipt::TrailingBytes)
        );
        let mut version = good.clone();
        version[0] = 2;
        assert_eq!(
            Receipt::decode(&enc(&version)),
            Err(InvalidReceipt::Version(2))
        );
        let mut epoch = good.clone();
        *epoch.last_mut().unwrap() = b' ';
        assert_eq!(Receipt::decode(&enc(&epoch)), Err(InvalidReceipt::BadEpoch));
        let mut empty_epoch = good[..FIXED_LEN].to_vec();
        empty_epoch[FIXED_LEN - 1] = 0;
        assert_eq!(
            Receipt::decode(&enc(&empty_epoch)),
            Err(InvalidReceipt::BadEpoch)
        );
        let mut not_utf8 = good.clone();
        *not_utf8.last_mut().unwrap() = 0xff;
        assert_eq!(
            Receipt::decode(&enc(&not_utf8)),
            Err(InvalidReceipt::BadEpoch)
        );
    }

    #[test]
    fn ids_are_hex_on_the_wire_and_random() {
        let id = GroupId(0xff);
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"00000000000000ff\"");
        assert_eq!(
            serde_json::from_str::<GroupId>("\"00000000000000ff\"").unwrap(),
            id
        );
        assert!(serde_json::from_str::<GroupId>("\"ff\"").is_err());
        assert!(serde_json::from_str::<GroupId>("\"zzzzzzzzzzzzzzzz\"").is_err());
        assert_ne!(LeaseId::generate(), LeaseId::generate());
        assert_eq!(ReceiptResult::Expired.as_str(), "expired");
        assert_eq!(
            serde_json::to_string(&ReceiptResult::Unknown).unwrap(),
            "\"unknown\""
        );
    }
}
