//! Settling leases: ack, nack, extend and terminate, each with a result per receipt (SPEC §7):
//! `ok` when the receipt names the message's live lease, `expired` when it names a lease that
//! is over, `unknown` when it is not a receipt of this group. Only `ok` changes anything, so a
//! stale or foreign receipt can never settle someone else's lease.

use std::time::Duration;

use crate::group::{
    change::{Change, Outcome},
    config::check_visibility,
    dead::{REASON_MAX_DELIVERIES, REASON_TERMINATED, Reason},
    entry::{Entry, EntryState},
    receipt::{Receipt, ReceiptResult},
    receive::{MAX_RECEIPTS, OpError, Tx, check_delay},
    state::GroupState,
};
use crate::position::Offset;

impl GroupState {
    /// What a receipt names at `now_ms`: the offset of a live lease, or why not.
    pub fn check_receipt(&self, text: &str, now_ms: u64) -> Result<Offset, ReceiptResult> {
        let receipt = Receipt::decode(text).map_err(|_| ReceiptResult::Unknown)?;
        if receipt.group != self.id {
            return Err(ReceiptResult::Unknown);
        }
        if receipt.epoch != self.cursor.epoch {
            // A lease of a history the group has since reset away from.
            return Err(ReceiptResult::Expired);
        }
        if receipt.offset == Offset::ZERO || receipt.offset > self.cursor.offset {
            return Err(ReceiptResult::Unknown);
        }
        match self.entries.get(&receipt.offset).and_then(Entry::lease) {
            Some((lease, _, until_ms)) if lease == receipt.lease && until_ms > now_ms => {
                Ok(receipt.offset)
            }
            _ => Err(ReceiptResult::Expired),
        }
    }

    fn settle<S: AsRef<str>>(
        &mut self,
        receipts: &[S],
        now_ms: u64,
        mut settle: impl FnMut(&mut Self, &mut Tx, Offset, Entry),
    ) -> Result<Outcome<Vec<ReceiptResult>>, OpError> {
        if receipts.len() > MAX_RECEIPTS {
            return Err(OpError::TooManyReceipts(receipts.len()));
        }
        let mut tx = self.begin();
        let mut results = Vec::with_capacity(receipts.len());
        for text in receipts {
            match self.check_receipt(text.as_ref(), now_ms) {
                Ok(offset) => {
                    let entry = self.entries[&offset].clone();
                    settle(self, &mut tx, offset, entry);
                    results.push(ReceiptResult::Ok);
                }
                Err(result) => results.push(result),
            }
        }
        Ok(self.finish(tx, results))
    }

    /// Ends each message for the group for good.
    pub fn ack<S: AsRef<str>>(
        &mut self,
        receipts: &[S],
        now_ms: u64,
    ) -> Result<Outcome<Vec<ReceiptResult>>, OpError> {
        self.settle(receipts, now_ms, |state, tx, offset, _| {
            state.counters.acked += 1;
            state.commit(tx, Change::EntryRemoved { offset });
        })
    }

    /// Hands each message back: visible again after `delay` (zero: at once), or dead-lettered
    /// if this was its last allowed delivery — with `reason` as the dead letter's reason when
    /// given, else `max_deliveries`. Counts a nack for the lease's member.
    pub fn nack<S: AsRef<str>>(
        &mut self,
        receipts: &[S],
        delay: Duration,
        reason: Option<&Reason>,
        now_ms: u64,
    ) -> Result<Outcome<Vec<ReceiptResult>>, OpError> {
        check_delay(delay)?;
        let at_ms = now_ms.saturating_add(delay.as_millis() as u64);
        self.settle(receipts, now_ms, |state, tx, offset, mut entry| {
            if let Some((_, member, _)) = entry.lease() {
                let member = member.clone();
                state.member(tx, &member, None).nacks += 1;
                tx.touch(member);
            }
            if entry.deliveries >= state.config.max_deliveries {
                let reason = reason.map_or(REASON_MAX_DELIVERIES, Reason::as_str);
                state.send_to_dead_letter(tx, offset, reason.to_owned(), None);
            } else {
                entry.state = EntryState::Visible { at_ms };
                state.commit(tx, Change::EntryPut { offset, entry });
            }
        })
    }

    /// Renews each lease for `visibility_timeout` from now (work in progress). The receipt
    /// stays the same.
    pub fn extend<S: AsRef<str>>(
        &mut self,
        receipts: &[S],
        visibility_timeout: Duration,
        now_ms: u64,
    ) -> Result<Outcome<Vec<ReceiptResult>>, OpError> {
        check_visibility(visibility_timeout)
            .map_err(|_| OpError::VisibilityTimeout(visibility_timeout))?;
        let until = now_ms.saturating_add(visibility_timeout.as_millis() as u64);
        self.settle(receipts, now_ms, |state, tx, offset, mut entry| {
            if let EntryState::Leased { until_ms, .. } = &mut entry.state {
                *until_ms = until;
            }
            state.commit(tx, Change::EntryPut { offset, entry });
        })
    }

    /// Sends each message to the dead-letter stream at once (reason `terminated`; `reason`,
    /// when given, goes in the `spool-dead-detail` header).
    pub fn terminate<S: AsRef<str>>(
        &mut self,
        receipts: &[S],
        reason: Option<&Reason>,
        now_ms: u64,
    ) -> Result<Outcome<Vec<ReceiptResult>>, OpError> {
        let detail = reason.map(|r| r.as_str().to_owned());
        self.settle(receipts, now_ms, |state, tx, offset, _| {
            state.send_to_dead_letter(tx, offset, REASON_TERMINATED.into(), detail.clone());
        })
    }
}
