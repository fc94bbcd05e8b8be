//! Shrinks a non-linearizable history to the few ops that show it.
//!
//! Every step below only ever *weakens* the history it checks: a read-only
//! op is dropped (one constraint fewer), any other op becomes optional (it
//! may take effect at any time after its invoke, or never), and a prefix of
//! the history may be replaced by "any state". A weaker history has every
//! linearization the stronger one has, so when the weakened one still has
//! none, neither has the original: each intermediate witness is sound, and
//! the reduction may stop at any time.
//!
//! 1. **Prefix.** Cut the history at the k-th completion; ops still running
//!    at the cut become optional, later ones go. The smallest k whose cut is
//!    not linearizable (binary search; cuts only get stronger as k grows)
//!    names the *culprit*: the op whose completion could not be placed.
//! 2. **Window.** When the model has a small "any state" set, drop the ops
//!    that completed before some start `s`, make those running at `s`
//!    optional, and start from every state of the set. The latest `s` that
//!    is still not linearizable is found by binary search.
//! 3. **One by one.** Try weakening each remaining op; keep the change when
//!    the history stays non-linearizable. What is left is 1-minimal: no
//!    single op of the witness can be weakened.
//!
//! Each check runs the full search, so the reduction takes a time limit of
//! its own; when it runs out the witness is sound but maybe not minimal.

use std::time::{Duration, Instant};

use super::search::{self, Limits, Model, Timed, Verdict};

/// Above this many "any" states, the window step is skipped.
const MAX_ANY_STATES: usize = 64;

/// A reduced witness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Witness {
    /// Indices into the ops given to [`reduce`], in invoke order.
    pub ops: Vec<usize>,
    /// Ops the proof lets take effect at any time after their invoke, or
    /// never, in invoke order; every other op is left out.
    pub unknown: Vec<usize>,
    /// The op whose completion could first not be linearized, when it is
    /// still part of `ops`.
    pub culprit: Option<usize>,
    /// The witness starts from any state, not the initial one.
    pub from_any_state: bool,
    /// False when the time limit stopped the reduction early.
    pub minimal: bool,
}

/// A window's statuses and the states it starts from.
type Window<S> = (Vec<Status>, Vec<S>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Excluded,
    Strong,
    Optional,
}

struct Reducer<'m, M: Model> {
    model: &'m M,
    ops: &'m [Timed<M::Op>],
    limits: Limits,
    check_time: Duration,
}

/// Each search of the reduction may use this share of its time.
const CHECKS_PER_BUDGET: u32 = 8;

/// Reduces `ops`, known not to be linearizable from `init`. `None` when the
/// limit ran out before even the prefix step finished.
pub fn reduce<M: Model>(
    model: &M,
    init: &M::State,
    ops: &[Timed<M::Op>],
    limits: Limits,
) -> Option<Witness> {
    let reducer = Reducer {
        model,
        ops,
        limits,
        check_time: limits.deadline.saturating_duration_since(Instant::now()) / CHECKS_PER_BUDGET,
    };
    let (mut statuses, culprit) = reducer.shortest_prefix(init)?;
    let mut inits = vec![init.clone()];
    let mut from_any_state = false;
    if let Some((window, any)) = reducer.latest_window(&statuses) {
        statuses = window;
        inits = any;
        from_any_state = true;
    }
    let minimal = reducer.weaken_one_by_one(&mut statuses, &inits);
    let with_status = |status: Status| {
        let mut chosen: Vec<usize> = (0..ops.len()).filter(|&i| statuses[i] == status).collect();
        chosen.sort_by_key(|&i| (ops[i].call, i));
        chosen
    };
    let kept = with_status(Status::Strong);
    Some(Witness {
        culprit: kept.contains(&culprit).then_some(culprit),
        ops: kept,
        unknown: with_status(Status::Optional),
        from_any_state,
        minimal,
    })
}

impl<M: Model> Reducer<'_, M> {
    /// The weakest form of op `i`.
    fn weakened(&self, i: usize) -> Status {
        if self.model.is_read_only(&self.ops[i].op) {
            Status::Excluded
        } else {
            Status::Optional
        }
    }

    /// The history described by `statuses`.
    fn build(&self, statuses: &[Status]) -> Vec<Timed<M::Op>> {
        let mut built = Vec::with_capacity(self.ops.len());
        for (timed, status) in self.ops.iter().zip(statuses) {
            match status {
                Status::Excluded => {}
                Status::Strong => built.push(timed.clone()),
                Status::Optional => built.push(Timed {
                    ret: None,
                    ..timed.clone()
                }),
            }
        }
        built
    }

    /// The search's verdict on the history described by `statuses`, from
    /// any of `inits`. One search gets at most a [`CHECKS_PER_BUDGET`]th
    /// of the reducer's time, so a single hard window cannot starve the
    /// rest.
    fn verdict(&self, statuses: &[Status], inits: &[M::State]) -> Verdict {
        let limits = Limits {
            deadline: self.limits.deadline.min(Instant::now() + self.check_time),
            ..self.limits
        };
        search::check_from_any(self.model, inits, &self.build(statuses), &limits)
    }

    /// True when the history has no linearization from any of `inits`. A
    /// search that runs out counts as "has one": the reducer only keeps
    /// changes it could prove.
    fn holds(&self, statuses: &[Status], inits: &[M::State]) -> bool {
        self.verdict(statuses, inits) == Verdict::NotLinearizable
    }

    fn prefix(&self, cut: u64) -> Vec<Status> {
        let mut statuses = Vec::with_capacity(self.ops.len());
        for (i, timed) in self.ops.iter().enumerate() {
            statuses.push(match timed.ret {
                _ if timed.call > cut => Status::Excluded,
                Some(ret) if ret <= cut => Status::Strong,
                _ => self.weakened(i),
            });
        }
        statuses
    }

    /// Step 1: the shortest non-linearizable prefix and its culprit.
    fn shortest_prefix(&self, init: &M::State) -> Option<(Vec<Status>, usize)> {
        let mut completions: Vec<(u64, usize)> = (0..self.ops.len())
            .filter_map(|i| self.ops[i].ret.map(|ret| (ret, i)))
            .collect();
        completions.sort_unstable();
        let inits = std::slice::from_ref(init);
        let last = completions.len().checked_sub(1)?;
        if !self.holds(&self.prefix(completions[last].0), inits) {
            return None;
        }
        let (mut low, mut high) = (0, last);
        while low < high {
            let middle = (low + high) / 2;
            if self.holds(&self.prefix(completions[middle].0), inits) {
                high = middle;
            } else {
                low = middle + 1;
            }
        }
        Some((self.prefix(completions[high].0), completions[high].1))
    }

    fn window(&self, prefix: &[Status], start: u64) -> Vec<Status> {
        let mut statuses = prefix.to_vec();
        for (i, status) in statuses.iter_mut().enumerate() {
            let timed = &self.ops[i];
            if *status != Status::Strong || timed.call >= start {
                continue;
            }
            *status = match timed.ret {
                Some(ret) if ret < start => Status::Excluded,
                _ => self.weakened(i),
            };
        }
        statuses
    }

    /// Whether the window from `start` fails from every "any" state;
    /// `None` when the model has no small such set for it.
    fn window_holds(&self, prefix: &[Status], start: u64) -> Option<Window<M::State>> {
        let window = self.window(prefix, start);
        let any = self
            .model
            .any_state(&self.build(&window))
            .filter(|states| !states.is_empty() && states.len() <= MAX_ANY_STATES)?;
        Some((window, any))
    }

    /// Step 2: the latest start from which any state still fails. Windows
    /// only get weaker as the start moves later, so: step back from the
    /// last start, doubling the stride, until a window fails; then
    /// bisect. Early starts are never tried when a later one works, which
    /// matters because the "any" set grows with the window.
    fn latest_window(&self, prefix: &[Status]) -> Option<Window<M::State>> {
        let mut starts: Vec<u64> = (0..self.ops.len())
            .filter(|&i| prefix[i] == Status::Strong)
            .map(|i| self.ops[i].call)
            .collect();
        starts.sort_unstable();
        starts.dedup();
        let holds = |j: usize| -> Option<Option<Window<M::State>>> {
            let (window, any) = self.window_holds(prefix, starts[j])?;
            Some(self.holds(&window, &any).then_some((window, any)))
        };
        // `fails` is the latest known failing start, `passes` the earliest
        // known start past it that does not fail.
        let mut passes = starts.len();
        let mut stride = 1;
        let (mut fails, mut found) = loop {
            if passes == 0 {
                return None;
            }
            let j = passes.saturating_sub(stride);
            match holds(j)? {
                Some(found) => break (j, found),
                None => {
                    passes = j;
                    stride *= 2;
                }
            }
        };
        while passes - fails > 1 {
            let middle = (fails + passes) / 2;
            match holds(middle) {
                Some(Some(better)) => (fails, found) = (middle, better),
                _ => passes = middle,
            }
        }
        Some(found)
    }

    /// Step 3; false when the time limit cut it short or left a change
    /// undecided, so that the result may not be 1-minimal.
    fn weaken_one_by_one(&self, statuses: &mut [Status], inits: &[M::State]) -> bool {
        let mut strong: Vec<usize> = (0..self.ops.len())
            .filter(|&i| statuses[i] == Status::Strong)
            .collect();
        strong.sort_by_key(|&i| (self.ops[i].call, i));
        let mut decided = true;
        for i in strong {
            if Instant::now() >= self.limits.deadline {
                return false;
            }
            statuses[i] = self.weakened(i);
            match self.verdict(statuses, inits) {
                Verdict::NotLinearizable => {}
                Verdict::Linearizable => statuses[i] = Status::Strong,
                Verdict::Exhausted(_) => {
                    statuses[i] = Status::Strong;
                    decided = false;
                }
            }
        }
        decided
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    /// A register of small integers starting at 0.
    #[derive(Clone, Debug, PartialEq)]
    enum Reg {
        Write(u8),
        Read(u8),
    }

    struct RegModel;

    impl Model for RegModel {
        type State = u8;
        type Op = Reg;

        fn step(&self, state: &u8, op: &Reg) -> Option<u8> {
            match *op {
                Reg::Write(value) => Some(value),
                Reg::Read(value) => (value == *state).then_some(*state),
            }
        }

        fn is_read_only(&self, op: &Reg) -> bool {
            matches!(op, Reg::Read(_))
        }

        fn any_state(&self, ops: &[Timed<Reg>]) -> Option<Vec<u8>> {
            let mut states: Vec<u8> = ops
                .iter()
                .map(|t| match t.op {
                    Reg::Write(v) | Reg::Read(v) => v,
                })
                .chain([0, 255])
                .collect();
            states.sort_unstable();
            states.dedup();
            Some(states)
        }
    }

    fn sequential(ops: &[Reg]) -> Vec<Timed<Reg>> {
        ops.iter()
            .enumerate()
            .map(|(i, op)| Timed {
                op: op.clone(),
                call: 2 * i as u64,
                ret: Some(2 * i as u64 + 1),
                source: i,
            })
            .collect()
    }

    fn limits() -> Limits {
        Limits {
            deadline: Instant::now() + Duration::from_secs(10),
            max_cache_bytes: search::MAX_CACHE_BYTES,
        }
    }

    #[test]
    fn a_stale_read_shrinks_to_the_overwrite_and_the_read() {
        use Reg::*;
        // Noise, then write 3, write 4, read 3 (stale), then more noise.
        let ops = sequential(&[
            Write(1),
            Read(1),
            Write(2),
            Read(2),
            Write(3),
            Write(4),
            Read(3),
            Write(5),
            Read(5),
        ]);
        let witness = reduce(&RegModel, &0, &ops, limits()).expect("reduced");
        assert_eq!(witness.ops, vec![5, 6], "write 4 then read 3");
        assert_eq!(witness.culprit, Some(6));
        assert!(witness.from_any_state);
        assert!(witness.minimal);
    }

    #[test]
    fn a_violation_that_needs_the_initial_state_keeps_the_real_start() {
        use Reg::*;
        // Reading 7 first is only wrong because the register starts at 0.
        let ops = sequential(&[Read(7), Write(1), Read(1)]);
        let witness = reduce(&RegModel, &0, &ops, limits()).expect("reduced");
        assert_eq!(witness.ops, vec![0]);
        assert_eq!(witness.culprit, Some(0));
        assert!(!witness.from_any_state);
    }
}
