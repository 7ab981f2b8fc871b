//! Property test of the continuity rule as a reader uses it: a stream is published to, trimmed
//! by retention and restarted (new epoch) at random, while a reader keeps reading in small
//! batches from its stored position and reconnecting. Whatever happens, "if it saw offset n
//! since its last reset, it saw every offset before n since that reset" — and it never sees a
//! message twice or out of order within one history.

use proptest::prelude::*;
use spool_core::continuity::{Decision, Start, StreamState, decide};
use spool_core::{Epoch, Offset, Position};

#[derive(Clone, Debug)]
enum Op {
    Publish(u8),
    Trim(u8),
    Restart,
    Read(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u8..20).prop_map(Op::Publish),
        2 => (1u8..15).prop_map(Op::Trim),
        1 => Just(Op::Restart),
        6 => (1u8..10).prop_map(Op::Read),
    ]
}

/// The stream as an engine would hold it.
struct Log {
    epoch: Epoch,
    head: u64,
    oldest: u64,
}

impl Log {
    fn state(&self) -> StreamState {
        StreamState {
            epoch: self.epoch.clone(),
            head: Offset(self.head),
            oldest: Offset(self.oldest),
        }
    }
}

/// The reader: its stored position and what it saw since its last reset.
struct Reader {
    position: Option<Position>,
    seen_since_reset: Vec<u64>,
    resets: usize,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn no_silent_gap(ops in prop::collection::vec(op(), 1..200), start_oldest in any::<bool>()) {
        let mut log = Log { epoch: Epoch::generate(), head: 0, oldest: 1 };
        let mut reader = Reader { position: None, seen_since_reset: Vec::new(), resets: 0 };
        for op in ops {
            match op {
                Op::Publish(n) => log.head += u64::from(n),
                Op::Trim(n) => log.oldest = (log.oldest + u64::from(n)).min(log.head + 1),
                Op::Restart => log = Log { epoch: Epoch::generate(), head: 0, oldest: 1 },
                Op::Read(limit) => {
                    let start = match &reader.position {
                        Some(p) => Start::After(p.clone()),
                        None if start_oldest => Start::Oldest,
                        None => Start::Now,
                    };
                    let state = log.state();
                    let after = match decide(&start, &state) {
                        Decision::Deliver { after } => {
                            if let Start::After(p) = &start {
                                prop_assert_eq!(p.offset, after, "resume must start at the reader's position");
                                prop_assert_eq!(&p.epoch, &state.epoch);
                            }
                            after.0
                        }
                        Decision::Reset { head, .. } => {
                            prop_assert!(matches!(start, Start::After(_)), "only a position can be reset");
                            reader.resets += 1;
                            reader.seen_since_reset.clear();
                            prop_assert_eq!(&head, &state.head_position());
                            head.offset.0
                        }
                    };
                    // Every delivered offset must still be retained.
                    prop_assert!(after + 1 >= state.oldest.0 || after == state.head.0);
                    let last = (after + u64::from(limit)).min(state.head.0);
                    for offset in after + 1..=last {
                        if let Some(&prev) = reader.seen_since_reset.last() {
                            prop_assert_eq!(offset, prev + 1, "gap or reorder since last reset");
                        }
                        reader.seen_since_reset.push(offset);
                    }
                    reader.position = Some(Position::new(state.epoch.clone(), Offset(last)));
                }
            }
        }
    }
}
