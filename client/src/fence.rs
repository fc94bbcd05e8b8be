//! Fencing for stores outside latchkey.
//!
//! latchkey's own store checks tokens itself. Any other store an application
//! writes to under a lock (a file, a database, another service) must do the
//! same check, or a holder that was paused past its lease can overwrite the
//! work of the holder after it. [`FenceGate`] is that check, to embed next
//! to the store: it remembers, per resource, the highest fencing token it
//! has admitted, and refuses any write that presents a lower one.
//!
//! # Rules
//! - A token equal to the highest is admitted: one holder writes many times.
//! - A higher token is admitted and becomes the highest: a new holder
//!   supersedes every older one, which is refused from then on.
//! - The check and the write must be one atomic step. Two writers that both
//!   pass the check and then write in the opposite order defeat it. Use
//!   [`FenceGate::write_fenced`], which runs the write under the gate, or,
//!   for a store with its own transactions, store the highest token in the
//!   store and compare it in the same transaction as the write (the gate
//!   then only saves a round trip).
//! - The highest token must survive a restart of the gate's process: keep it
//!   with the data, and load it back with [`FenceGate::restore`] before
//!   admitting writes. A gate that forgot would admit a stale holder.
//!
//! ```
//! use latchkey_client::fence::FenceGate;
//! use latchkey_client::FencingToken;
//!
//! let gate = FenceGate::new();
//! let mut balance = 0;
//! let written = gate.write_fenced("balance", FencingToken(7), || -> Result<(), ()> {
//!     balance = 10;
//!     Ok(())
//! });
//! assert!(written.is_ok());
//! // A holder from before token 7 is refused, and the balance is untouched.
//! let stale = gate.write_fenced("balance", FencingToken(6), || -> Result<(), ()> {
//!     balance = 0;
//!     Ok(())
//! });
//! assert!(stale.is_err());
//! assert_eq!(balance, 10);
//! ```
//!
//! # Not done yet
//! - One lock for all resources: writes to different resources through one
//!   gate are serialised.

use std::collections::HashMap;

use parking_lot::Mutex;

use crate::types::FencingToken;

/// Default bound on the resources one gate tracks.
pub const DEFAULT_MAX_RESOURCES: usize = 100_000;

/// Why a gate refused a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FenceRejected {
    /// The token is lower than one already admitted for the resource.
    #[error("stale fencing token {presented} for {resource:?}: {highest} was already admitted")]
    Stale {
        resource: String,
        presented: FencingToken,
        highest: FencingToken,
    },
    /// The gate already tracks its maximum number of resources. Forgetting
    /// one would make it unsafe, so it refuses new ones instead.
    #[error("fence gate tracks {max} resources already; {resource:?} is refused")]
    Full { resource: String, max: usize },
}

/// A write refused by the gate, or refused by the store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FencedWriteError<E> {
    #[error(transparent)]
    Rejected(FenceRejected),
    /// The write itself failed; the gate did not advance.
    #[error("fenced write failed: {0}")]
    Write(E),
}

/// The highest fencing token admitted per resource. See the module docs.
#[derive(Debug)]
pub struct FenceGate {
    highest: Mutex<HashMap<String, FencingToken>>,
    max_resources: usize,
}

impl Default for FenceGate {
    fn default() -> Self {
        FenceGate::new()
    }
}

impl FenceGate {
    /// A gate that has admitted nothing, tracking up to
    /// [`DEFAULT_MAX_RESOURCES`] resources.
    pub fn new() -> FenceGate {
        FenceGate::with_max_resources(DEFAULT_MAX_RESOURCES)
    }

    pub fn with_max_resources(max_resources: usize) -> FenceGate {
        FenceGate {
            highest: Mutex::new(HashMap::new()),
            max_resources,
        }
    }

    /// Admits `token` for `resource` if it is not lower than the highest
    /// admitted so far, and raises the highest to it. Atomic on its own, but
    /// see the module docs: the *write* that follows must be ordered too.
    pub fn check_and_advance(
        &self,
        resource: &str,
        token: FencingToken,
    ) -> Result<(), FenceRejected> {
        let mut highest = self.highest.lock();
        self.check(&highest, resource, token)?;
        highest.insert(resource.to_string(), token);
        Ok(())
    }

    /// Runs `write` only if `token` is admitted for `resource`, holding the
    /// gate for the whole write so that no other fenced write to any
    /// resource of this gate interleaves. The highest token advances only if
    /// the write succeeds.
    ///
    /// `write` must not call back into this gate (`highest`, `restore`,
    /// another fenced write): the gate is not re-entrant and would
    /// deadlock. To persist the token with the data, as a store that must
    /// stay fenced across restarts should, write `token` itself: once
    /// `write` runs, it is the highest admitted.
    pub fn write_fenced<T, E>(
        &self,
        resource: &str,
        token: FencingToken,
        write: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, FencedWriteError<E>> {
        let mut highest = self.highest.lock();
        self.check(&highest, resource, token)
            .map_err(FencedWriteError::Rejected)?;
        let written = write().map_err(FencedWriteError::Write)?;
        highest.insert(resource.to_string(), token);
        Ok(written)
    }

    /// The highest token admitted for `resource`, to store with its data.
    pub fn highest(&self, resource: &str) -> Option<FencingToken> {
        self.highest.lock().get(resource).copied()
    }

    /// Raises the highest token of `resource` to at least `token`: loads a
    /// token persisted before a restart. Never lowers it.
    pub fn restore(&self, resource: &str, token: FencingToken) -> Result<(), FenceRejected> {
        let mut highest = self.highest.lock();
        if let Some(current) = highest.get_mut(resource) {
            *current = (*current).max(token);
            return Ok(());
        }
        self.check(&highest, resource, token)?;
        highest.insert(resource.to_string(), token);
        Ok(())
    }

    fn check(
        &self,
        highest: &HashMap<String, FencingToken>,
        resource: &str,
        token: FencingToken,
    ) -> Result<(), FenceRejected> {
        match highest.get(resource) {
            Some(&current) if token < current => Err(FenceRejected::Stale {
                resource: resource.to_string(),
                presented: token,
                highest: current,
            }),
            Some(_) => Ok(()),
            None if highest.len() >= self.max_resources => Err(FenceRejected::Full {
                resource: resource.to_string(),
                max: self.max_resources,
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T5: FencingToken = FencingToken(5);
    const T6: FencingToken = FencingToken(6);

    #[test]
    fn lower_token_is_rejected_after_a_higher_one_was_admitted() {
        let gate = FenceGate::new();
        gate.check_and_advance("r", T6).expect("admitted");
        let rejected = gate.check_and_advance("r", T5).expect_err("stale");
        assert_eq!(
            rejected,
            FenceRejected::Stale {
                resource: "r".into(),
                presented: T5,
                highest: T6,
            }
        );
        assert_eq!(gate.highest("r"), Some(T6));
    }

    #[test]
    fn equal_and_higher_tokens_are_admitted_and_advance_the_gate() {
        let gate = FenceGate::new();
        gate.check_and_advance("r", T5).expect("admitted");
        gate.check_and_advance("r", T5).expect("admitted");
        gate.check_and_advance("r", T6).expect("admitted");
        assert_eq!(gate.highest("r"), Some(T6));
    }

    #[test]
    fn resources_are_fenced_independently() {
        let gate = FenceGate::new();
        gate.check_and_advance("a", T6).expect("admitted");
        gate.check_and_advance("b", T5).expect("admitted");
        assert_eq!(gate.highest("a"), Some(T6));
        assert_eq!(gate.highest("b"), Some(T5));
    }

    #[test]
    fn rejected_fenced_write_does_not_run() {
        let gate = FenceGate::new();
        gate.check_and_advance("r", T6).expect("admitted");
        let mut ran = false;
        let result = gate.write_fenced("r", T5, || -> Result<(), ()> {
            ran = true;
            Ok(())
        });
        assert!(matches!(result, Err(FencedWriteError::Rejected(_))));
        assert!(!ran);
    }

    #[test]
    fn failed_write_does_not_advance_the_gate() {
        let gate = FenceGate::new();
        gate.check_and_advance("r", T5).expect("admitted");
        let result = gate.write_fenced("r", T6, || Err::<(), _>("disk full"));
        assert_eq!(result, Err(FencedWriteError::Write("disk full")));
        assert_eq!(gate.highest("r"), Some(T5));
        gate.check_and_advance("r", T5).expect("admitted");
    }

    #[test]
    fn restore_never_lowers_the_highest_token() {
        let gate = FenceGate::new();
        gate.restore("r", T6).expect("admitted");
        gate.restore("r", T5).expect("admitted");
        assert_eq!(gate.highest("r"), Some(T6));
        assert!(gate.check_and_advance("r", T5).is_err());
    }

    #[test]
    fn full_gate_refuses_new_resources_but_serves_known_ones() {
        let gate = FenceGate::with_max_resources(1);
        gate.check_and_advance("a", T5).expect("admitted");
        assert!(matches!(
            gate.check_and_advance("b", T5),
            Err(FenceRejected::Full { .. })
        ));
        gate.check_and_advance("a", T6).expect("admitted");
    }

    #[test]
    fn concurrent_writers_never_apply_a_lower_token_after_a_higher_one() {
        let gate = std::sync::Arc::new(FenceGate::new());
        let applied = std::sync::Arc::new(Mutex::new(Vec::new()));
        let writers: Vec<_> = (1..=8u64)
            .map(|token| {
                let (gate, applied) = (gate.clone(), applied.clone());
                std::thread::spawn(move || {
                    let _ = gate.write_fenced("r", FencingToken(token), || -> Result<(), ()> {
                        applied.lock().push(token);
                        Ok(())
                    });
                })
            })
            .collect();
        for writer in writers {
            writer.join().expect("writer thread does not panic");
        }
        let applied = applied.lock();
        assert!(
            applied.windows(2).all(|w| w[0] <= w[1]),
            "applied out of order: {applied:?}"
        );
    }
}
