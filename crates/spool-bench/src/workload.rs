//! What a benchmark publishes: the stream names, and payloads of the requested size.
//!
//! Payloads are random-looking printable ASCII (so no engine or codec can win by compressing
//! or special-casing them) and are generated once, before timing starts; message `seq` picks
//! its stream round-robin and one payload of a small pool.

use bytes::Bytes;

/// Distinct payloads cycled through.
const PAYLOAD_POOL: usize = 64;

/// The streams and payloads of one benchmark, shared by every target and client.
#[derive(Debug)]
pub struct Workload {
    streams: Vec<String>,
    payloads: Vec<Bytes>,
}

impl Workload {
    /// `streams` streams named `bench-0`… and payloads of `size` bytes.
    pub fn new(streams: u16, size: usize) -> Self {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let payloads = (0..PAYLOAD_POOL)
            .map(|_| {
                (0..size)
                    .map(|_| {
                        // 64 printable characters: letters, digits, '-' and '_'.
                        const ALPHABET: &[u8; 64] =
                            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
                        ALPHABET[(rng.next() % 64) as usize]
                    })
                    .collect::<Vec<u8>>()
                    .into()
            })
            .collect();
        Self {
            streams: (0..streams).map(|i| format!("bench-{i}")).collect(),
            payloads,
        }
    }

    pub fn streams(&self) -> &[String] {
        &self.streams
    }

    /// Index into [`Self::streams`] of message `seq`.
    pub fn stream_index(&self, seq: u64) -> usize {
        // The modulus is at most u16::MAX, so the result fits any usize.
        (seq % self.streams.len().max(1) as u64) as usize
    }

    /// Payload of message `seq` (a cheap reference-counted clone).
    pub fn payload(&self, seq: u64) -> Bytes {
        self.payloads
            .get((seq % PAYLOAD_POOL as u64) as usize)
            .cloned()
            .unwrap_or_default()
    }

    /// Bytes of every payload.
    pub fn payload_size(&self) -> usize {
        self.payloads.first().map_or(0, Bytes::len)
    }
}

/// Marsaglia's xorshift64: fast and good enough for filler text; deterministic on purpose.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_printable_and_sized() {
        let w = Workload::new(3, 256);
        assert_eq!(w.payload_size(), 256);
        assert!(w.payload(7).iter().all(u8::is_ascii_graphic));
        assert_ne!(w.payload(0), w.payload(1));
        assert_eq!(w.streams(), ["bench-0", "bench-1", "bench-2"]);
        assert_eq!(w.stream_index(4), 1);
    }
}
