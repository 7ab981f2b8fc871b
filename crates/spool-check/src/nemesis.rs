//! The nemesis: a fault schedule drawn from the seed before the run starts (so one seed always
//! gives one schedule), then applied at its moments.

use std::time::Duration;

use serde::Serialize;

use crate::{history::FaultKind, rng::Rng};

/// One scheduled fault.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Planned {
    /// When, in ms after the workload started.
    pub at_ms: u64,
    pub kind: FaultKind,
    /// The node it hits (cut, stall, sigterm, kill9), or the subscriber (pause).
    pub target: usize,
    /// How long it lasts (stall, pause, a node or the engine down); for a cut, the percent of
    /// connections cut.
    pub amount: u64,
}

/// What the schedule may use.
#[derive(Clone, Debug)]
pub struct Abilities {
    pub nodes: usize,
    pub subscribers: usize,
    /// Subscribers whose pause surely leaves them behind the retained history (long-poll: a
    /// paused one sends no request, so nothing is buffered for it); pauses pick them more often.
    pub laggards: Vec<usize>,
    /// Node processes can be stopped and started (the scenario started them).
    pub processes: bool,
    /// The engine server can be restarted (the scenario started its own).
    pub engine_restart: bool,
}

/// Draws the schedule for a run of `duration`: faults from 1 s in, every 0.6–2.5 s, none in
/// the last `quiet` (so every fault has healed and subscribers can catch up before the end).
pub fn schedule(seed: u64, duration: Duration, quiet: Duration, can: &Abilities) -> Vec<Planned> {
    let mut rng = Rng::new(seed).fork(1);
    let end = duration.saturating_sub(quiet).as_millis() as u64;
    let mut kinds: Vec<(FaultKind, u64)> = vec![
        (FaultKind::Cut, 30),
        (FaultKind::Stall, 15),
        (FaultKind::Pause, 20),
    ];
    if can.processes {
        kinds.push((FaultKind::Term, 10));
        kinds.push((FaultKind::Kill, 15));
    }
    if can.engine_restart {
        kinds.push((FaultKind::EngineRestart, 10));
    }
    let total: u64 = kinds.iter().map(|(_, w)| w).sum();
    let mut out = Vec::new();
    let mut at = 1000;
    while at < end {
        let mut pick = rng.range(0, total);
        let kind = kinds
            .iter()
            .find(|(_, w)| {
                if pick < *w {
                    true
                } else {
                    pick -= w;
                    false
                }
            })
            .map(|(k, _)| *k)
            .unwrap_or(FaultKind::Cut);
        let (target, amount) = match kind {
            FaultKind::Cut => (rng.below(can.nodes), rng.range(30, 101)),
            FaultKind::Stall => (rng.below(can.nodes), rng.range(300, 3000)),
            FaultKind::Pause => {
                let target = if !can.laggards.is_empty() && rng.chance(60) {
                    can.laggards[rng.below(can.laggards.len())]
                } else {
                    rng.below(can.subscribers)
                };
                (target, rng.range(1000, 4000))
            }
            FaultKind::Term | FaultKind::Kill => (rng.below(can.nodes), rng.range(200, 2000)),
            FaultKind::EngineRestart => (0, rng.range(200, 2000)),
        };
        out.push(Planned {
            at_ms: at,
            kind,
            target,
            amount,
        });
        at += rng.range(600, 2500);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_seed_gives_one_schedule() {
        let can = Abilities {
            nodes: 3,
            subscribers: 6,
            laggards: vec![2, 5],
            processes: true,
            engine_restart: true,
        };
        let d = Duration::from_secs(60);
        let q = Duration::from_secs(5);
        let a = schedule(42, d, q, &can);
        assert_eq!(a, schedule(42, d, q, &can));
        assert_ne!(a, schedule(43, d, q, &can));
        assert!(a.len() > 20, "{} faults in 60 s", a.len());
        assert!(a.iter().all(|p| p.at_ms >= 1000 && p.at_ms < 55_000));
        for kind in [
            FaultKind::Cut,
            FaultKind::Stall,
            FaultKind::Pause,
            FaultKind::Term,
            FaultKind::Kill,
            FaultKind::EngineRestart,
        ] {
            assert!(a.iter().any(|p| p.kind == kind), "no {kind:?} in {a:?}");
        }
        let remote = Abilities {
            processes: false,
            engine_restart: false,
            ..can
        };
        assert!(
            schedule(42, d, q, &remote)
                .iter()
                .all(|p| matches!(p.kind, FaultKind::Cut | FaultKind::Stall | FaultKind::Pause))
        );
    }
}
