//! The linearizability search: Wing & Gong's backtracking with Lowe's
//! memoization, in the shape Porcupine uses.
//!
//! # Algorithm
//! The ops of one object become a doubly linked list of call and return
//! entries in history order. The search walks the list from the front:
//! - at a **call** entry it tries to linearize that op now: if the model
//!   accepts the op in the current state, and the configuration reached
//!   (the set of linearized ops as a bitset, and the new state) was never
//!   seen before, the op's two entries are lifted out of the list, the old
//!   state is pushed on a stack, and the walk restarts at the front;
//!   otherwise the walk moves on to the next entry;
//! - at a **return** entry the op it closes has not been linearized, and
//!   every op that could still go first has been tried, so the search
//!   backtracks: it pops the last linearized op, puts its entries back, and
//!   continues after its call entry. An empty stack means no order exists.
//!
//! The list is empty exactly when every op is linearized. The cache makes
//! each configuration cost one visit, so the search is exponential only in
//! the number of ops that are concurrent with each other, not in the length
//! of the history.
//!
//! An op whose outcome is unknown (`ret: None`) may take effect at any
//! point after its call, or never. Its return entry sorts after every known
//! one, so reaching such an entry means every op with a known outcome is
//! linearized: success, whatever the unknown ops left over did (nothing).
//! Two reductions keep unknown ops from multiplying the configurations:
//! - one the model refuses is skipped, never linearized as a no-op ("it was
//!   refused" and "it did not happen" leave the same state, and "did not
//!   happen" is always available);
//! - of several *identical* unknown ops, only the earliest-invoked one not
//!   yet linearized is tried: any linearization that uses a later twin can
//!   use the earlier one at the same point instead (it was invoked before,
//!   and has no return to respect), so nothing is lost.
//!
//! # Bounds
//! The search stops with [`Verdict::Exhausted`] when [`Limits::deadline`]
//! passes or when the cache would outgrow [`Limits::max_cache_bytes`]; the
//! caller turns that into `unknown`, never into `valid`.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::mem;
use std::time::Instant;

/// A sequential specification of one object.
pub trait Model {
    /// The object's state. Cached once per configuration, so keep it small.
    type State: Clone + Eq + Hash;
    /// One operation together with what it returned.
    type Op: Clone + PartialEq;

    /// The state after `op`, or `None` when `op` cannot return what it
    /// returned in `state`.
    fn step(&self, state: &Self::State, op: &Self::Op) -> Option<Self::State>;

    /// True when `op` never changes the state, so that forgetting it only
    /// removes a constraint (a read, a failed compare-and-set). The witness
    /// reducer drops such ops instead of making them optional.
    fn is_read_only(&self, op: &Self::Op) -> bool;

    /// A finite set of states that stands for "any state" for `ops`: every
    /// state must behave, for every op in `ops`, like one of these. `None`
    /// when there is no small such set; the witness reducer then keeps the
    /// history's real start.
    fn any_state(&self, ops: &[Timed<Self::Op>]) -> Option<Vec<Self::State>> {
        let _ = ops;
        None
    }

    /// Adds to `ops`, before a search, constraints that every
    /// linearization obeys anyway, so that the search cuts dead branches
    /// early (an op's `ret` says whether its outcome is known in this
    /// search; the witness reducer makes ops unknown, so this runs again
    /// on each history it searches). Must not change which histories are
    /// linearizable. By default, none.
    fn prepare(&self, ops: &mut [Timed<Self::Op>]) {
        let _ = ops;
    }

    /// Heap bytes a cached state holds, for the memory bound.
    fn state_heap_bytes(&self, state: &Self::State) -> usize {
        let _ = state;
        0
    }
}

/// An op with its place in the history.
#[derive(Debug, Clone, PartialEq)]
pub struct Timed<O> {
    pub op: O,
    /// Position of the invoke in event order.
    pub call: u64,
    /// Position of the completion; `None` when the outcome is unknown.
    pub ret: Option<u64>,
    /// The caller's handle for the op (an index into its own list).
    pub source: usize,
}

/// What the search found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    NotLinearizable,
    Exhausted(Limit),
}

/// Which bound stopped a search.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Time,
    Memory,
}

/// Bounds of one search.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub deadline: Instant,
    pub max_cache_bytes: usize,
}

/// Default memory bound of one search's cache.
pub const MAX_CACHE_BYTES: usize = 1 << 30;

/// How many steps run between two looks at the clock.
const STEPS_PER_CLOCK_CHECK: u32 = 1024;

/// Decides whether `ops`, started from `init`, have a linearization.
pub fn check<M: Model>(
    model: &M,
    init: &M::State,
    ops: &[Timed<M::Op>],
    limits: &Limits,
) -> Verdict {
    check_from_any(model, std::slice::from_ref(init), ops, limits)
}

/// Decides whether `ops` have a linearization from at least one of
/// `inits`. The searches share one cache: a configuration is a set of ops
/// and a state, and what can follow it does not depend on how it was
/// reached, so a configuration that failed from one start fails from all.
pub fn check_from_any<M: Model>(
    model: &M,
    inits: &[M::State],
    ops: &[Timed<M::Op>],
    limits: &Limits,
) -> Verdict {
    let mut prepared = ops.to_vec();
    model.prepare(&mut prepared);
    let ops = &prepared[..];
    let mut list = EntryList::new(ops);
    let mut cache: Cache<M::State> = Cache::new(ops.len().div_ceil(64));
    let twins = earlier_twins(ops);
    for init in inits {
        match search(model, init, ops, &twins, limits, &mut list, &mut cache) {
            Verdict::NotLinearizable => continue,
            other => return other,
        }
    }
    Verdict::NotLinearizable
}

/// For each op of unknown outcome, the latest earlier-invoked op of
/// unknown outcome that is the same op (see the module docs).
fn earlier_twins<O: PartialEq>(ops: &[Timed<O>]) -> Vec<Option<usize>> {
    let mut unknown: Vec<usize> = (0..ops.len()).filter(|&i| ops[i].ret.is_none()).collect();
    unknown.sort_by_key(|&i| (ops[i].call, i));
    let mut twins = vec![None; ops.len()];
    for (rank, &i) in unknown.iter().enumerate() {
        twins[i] = unknown[..rank]
            .iter()
            .rev()
            .find(|&&j| ops[j].op == ops[i].op)
            .copied();
    }
    twins
}

/// One depth-first search from `init`; leaves `list` as it found it when
/// it returns `NotLinearizable`.
fn search<M: Model>(
    model: &M,
    init: &M::State,
    ops: &[Timed<M::Op>],
    twins: &[Option<usize>],
    limits: &Limits,
    list: &mut EntryList,
    cache: &mut Cache<M::State>,
) -> Verdict {
    let mut linearized = Bitset::new(ops.len());
    let mut stack: Vec<(usize, M::State)> = Vec::new();
    let mut state = init.clone();
    let mut cursor = list.first();
    let mut steps = 0u32;
    while let Some(node) = cursor {
        steps = steps.wrapping_add(1);
        if steps.is_multiple_of(STEPS_PER_CLOCK_CHECK) && Instant::now() >= limits.deadline {
            return Verdict::Exhausted(Limit::Time);
        }
        let entry = list.entries[node];
        if !entry.is_call && ops[entry.op].ret.is_none() {
            // Every op with a known return is linearized; the rest may
            // never have happened.
            return Verdict::Linearizable;
        }
        if !entry.is_call {
            // The op closed here was not linearized before its return.
            let Some((call, previous)) = stack.pop() else {
                return Verdict::NotLinearizable;
            };
            state = previous;
            linearized.flip(list.entries[call].op);
            list.unlift(call);
            cursor = list.next(call);
            continue;
        }
        let twin_waits = twins[entry.op].is_some_and(|twin| !linearized.contains(twin));
        let next = match twin_waits {
            true => None,
            false => model.step(&state, &ops[entry.op].op),
        };
        let Some(next) = next else {
            cursor = list.next(node);
            continue;
        };
        linearized.flip(entry.op);
        if cache.insert(&linearized, &next, model.state_heap_bytes(&next)) {
            if cache.bytes() > limits.max_cache_bytes {
                return Verdict::Exhausted(Limit::Memory);
            }
            stack.push((node, mem::replace(&mut state, next)));
            list.lift(node);
            cursor = list.first();
        } else {
            linearized.flip(entry.op);
            cursor = list.next(node);
        }
    }
    Verdict::Linearizable
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    op: usize,
    is_call: bool,
    /// The node of the other entry of the same op.
    partner: usize,
}

/// The call/return entries as a doubly linked list over arrays. Node 0 is
/// the head sentinel; lifting and unlifting follow dancing links, which is
/// exact because the search always unlifts in the reverse order it lifted.
struct EntryList {
    entries: Vec<Entry>,
    next: Vec<usize>,
    prev: Vec<usize>,
}

const NIL: usize = usize::MAX;

impl EntryList {
    fn new<O>(ops: &[Timed<O>]) -> EntryList {
        // (position, returns after calls at the same position, op, is_call)
        let mut order: Vec<(u64, bool, usize, bool)> = Vec::with_capacity(2 * ops.len());
        for (op, timed) in ops.iter().enumerate() {
            order.push((timed.call, false, op, true));
            order.push((timed.ret.unwrap_or(u64::MAX), true, op, false));
        }
        order.sort_unstable();
        let sentinel = Entry {
            op: usize::MAX,
            is_call: false,
            partner: NIL,
        };
        let mut entries = vec![sentinel; order.len() + 1];
        let mut call_node = vec![NIL; ops.len()];
        for (position, &(_, _, op, is_call)) in order.iter().enumerate() {
            let node = position + 1;
            entries[node] = Entry {
                op,
                is_call,
                partner: NIL,
            };
            if is_call {
                call_node[op] = node;
            } else {
                let call = call_node[op];
                entries[node].partner = call;
                entries[call].partner = node;
            }
        }
        let count = entries.len();
        let next = (0..count)
            .map(|node| if node + 1 < count { node + 1 } else { NIL })
            .collect();
        let prev = (0..count)
            .map(|node| if node == 0 { NIL } else { node - 1 })
            .collect();
        EntryList {
            entries,
            next,
            prev,
        }
    }

    fn first(&self) -> Option<usize> {
        self.next(0)
    }

    fn next(&self, node: usize) -> Option<usize> {
        Some(self.next[node]).filter(|&next| next != NIL)
    }

    fn lift(&mut self, call: usize) {
        let ret = self.entries[call].partner;
        self.unlink(call);
        self.unlink(ret);
    }

    fn unlift(&mut self, call: usize) {
        let ret = self.entries[call].partner;
        self.relink(ret);
        self.relink(call);
    }

    fn unlink(&mut self, node: usize) {
        let (prev, next) = (self.prev[node], self.next[node]);
        self.next[prev] = next;
        if next != NIL {
            self.prev[next] = prev;
        }
    }

    fn relink(&mut self, node: usize) {
        let (prev, next) = (self.prev[node], self.next[node]);
        self.next[prev] = node;
        if next != NIL {
            self.prev[next] = node;
        }
    }
}

/// The set of linearized ops, with a Zobrist hash kept up to date: each
/// op has a random 64-bit key, and the hash is the XOR of the keys of the
/// ops in the set, so a flip costs one XOR instead of a pass over the words.
struct Bitset {
    words: Vec<u64>,
    hash: u64,
}

impl Bitset {
    fn new(bits: usize) -> Bitset {
        Bitset {
            words: vec![0; bits.div_ceil(64)],
            hash: 0,
        }
    }

    fn contains(&self, bit: usize) -> bool {
        self.words[bit / 64] & (1 << (bit % 64)) != 0
    }

    fn flip(&mut self, bit: usize) {
        self.words[bit / 64] ^= 1 << (bit % 64);
        self.hash ^= zobrist_key(bit);
    }
}

/// SplitMix64 of the op's position: a fixed pseudo-random key per op.
fn zobrist_key(bit: usize) -> u64 {
    let mut z = (bit as u64)
        .wrapping_add(1)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Configurations already visited: (linearized set, state). Entries live
/// in flat arrays — bitset words in one `Vec<u64>`, states in another —
/// chained per hash, so a lookup allocates nothing and an entry costs its
/// words, its state and about 24 bytes.
struct Cache<S> {
    words_per_entry: usize,
    words: Vec<u64>,
    states: Vec<S>,
    /// Next entry with the same hash; `NIL` ends a chain.
    chain: Vec<usize>,
    heads: HashMap<u64, usize, FxBuild>,
    state_heap_bytes: usize,
}

impl<S: Eq + Hash> Cache<S> {
    fn new(words_per_entry: usize) -> Cache<S> {
        Cache {
            words_per_entry,
            words: Vec::new(),
            states: Vec::new(),
            chain: Vec::new(),
            heads: HashMap::default(),
            state_heap_bytes: 0,
        }
    }

    /// Approximate memory held.
    fn bytes(&self) -> usize {
        let per_entry = 8 * self.words_per_entry + mem::size_of::<S>() + 8 + 24;
        self.states.len() * per_entry + self.state_heap_bytes
    }

    /// Adds the configuration; false when it was already there.
    fn insert(&mut self, bits: &Bitset, state: &S, heap_bytes: usize) -> bool
    where
        S: Clone,
    {
        let mut hasher = FxHasher { hash: bits.hash };
        state.hash(&mut hasher);
        let hash = hasher.finish();
        let head = self.heads.get(&hash).copied().unwrap_or(NIL);
        let mut entry = head;
        while entry != NIL {
            let words = &self.words[entry * self.words_per_entry..][..self.words_per_entry];
            if words == bits.words.as_slice() && self.states[entry] == *state {
                return false;
            }
            entry = self.chain[entry];
        }
        self.heads.insert(hash, self.states.len());
        self.words.extend_from_slice(&bits.words);
        self.states.push(state.clone());
        self.chain.push(head);
        self.state_heap_bytes += heap_bytes;
        true
    }
}

/// The multiply-rotate hash of rustc (`FxHasher`): the cache hashes
/// bitsets millions of times, and SipHash's DoS resistance buys nothing
/// here.
#[derive(Default)]
struct FxHasher {
    hash: u64,
}

const FX_SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(FX_SEED);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        for &byte in chunks.remainder() {
            self.add(u64::from(byte));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        self.hash
    }
}

type FxBuild = BuildHasherDefault<FxHasher>;

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A register of small integers, starting at 0.
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
    }

    fn op(op: Reg, call: u64, ret: Option<u64>) -> Timed<Reg> {
        Timed {
            op,
            call,
            ret,
            source: 0,
        }
    }

    fn limits() -> Limits {
        Limits {
            deadline: Instant::now() + Duration::from_secs(10),
            max_cache_bytes: MAX_CACHE_BYTES,
        }
    }

    #[test]
    fn reads_overlapping_a_write_may_see_either_value() {
        // write(1) [0,10]; read→1 [2,4]; read→0 [3,5]: read→0, write,
        // read→1 fits inside both reads' windows.
        let ops = [
            op(Reg::Write(1), 0, Some(10)),
            op(Reg::Read(0), 3, Some(5)),
            op(Reg::Read(1), 2, Some(4)),
        ];
        assert_eq!(check(&RegModel, &0, &ops, &limits()), Verdict::Linearizable);
    }

    #[test]
    fn overlapping_reads_that_disagree_with_real_time_order_are_caught() {
        // Porcupine's register example: write(100) [0,100], read→100
        // [25,75], read→0 [30,60] is linearizable (the 0-read goes first).
        let ok = [
            op(Reg::Write(100), 0, Some(100)),
            op(Reg::Read(100), 25, Some(75)),
            op(Reg::Read(0), 30, Some(60)),
        ];
        assert_eq!(check(&RegModel, &0, &ok, &limits()), Verdict::Linearizable);
        // write(200) [0,100], read→200 [10,30], read→0 [40,90] is not:
        // the 0-read starts after the 200-read ended.
        let bad = [
            op(Reg::Write(200), 0, Some(100)),
            op(Reg::Read(200), 10, Some(30)),
            op(Reg::Read(0), 40, Some(90)),
        ];
        assert_eq!(
            check(&RegModel, &0, &bad, &limits()),
            Verdict::NotLinearizable
        );
    }

    #[test]
    fn an_unknown_write_may_take_effect_late_or_never() {
        let late = [
            op(Reg::Write(7), 0, None),
            op(Reg::Read(0), 1, Some(2)),
            op(Reg::Read(7), 3, Some(4)),
        ];
        assert_eq!(
            check(&RegModel, &0, &late, &limits()),
            Verdict::Linearizable
        );
        let never = [op(Reg::Write(7), 0, None), op(Reg::Read(0), 5, Some(6))];
        assert_eq!(
            check(&RegModel, &0, &never, &limits()),
            Verdict::Linearizable
        );
        // But not before its invoke.
        let early = [op(Reg::Read(7), 0, Some(1)), op(Reg::Write(7), 2, None)];
        assert_eq!(
            check(&RegModel, &0, &early, &limits()),
            Verdict::NotLinearizable
        );
    }

    #[test]
    fn a_value_read_back_after_being_overwritten_is_not_linearizable() {
        let ops = [
            op(Reg::Write(1), 0, Some(1)),
            op(Reg::Write(2), 2, Some(3)),
            op(Reg::Read(1), 4, Some(5)),
        ];
        assert_eq!(
            check(&RegModel, &0, &ops, &limits()),
            Verdict::NotLinearizable
        );
    }

    #[test]
    fn an_empty_history_is_linearizable() {
        assert_eq!(check(&RegModel, &0, &[], &limits()), Verdict::Linearizable);
    }

    /// Many concurrent unknown writes and a final impossible read: the
    /// search must explore every subset of writes before giving up.
    fn hard_history(writers: u8) -> Vec<Timed<Reg>> {
        let mut ops: Vec<Timed<Reg>> = (0..writers)
            .map(|w| op(Reg::Write(w + 1), u64::from(w), None))
            .collect();
        for w in 0..writers {
            let at = 100 + 2 * u64::from(w);
            ops.push(op(Reg::Read(w + 1), at, Some(at + 1)));
        }
        ops.push(op(Reg::Read(200), 1000, Some(1001)));
        ops
    }

    #[test]
    fn a_search_past_its_deadline_is_exhausted_not_linearizable() {
        let past = Limits {
            deadline: Instant::now(),
            max_cache_bytes: MAX_CACHE_BYTES,
        };
        assert_eq!(
            check(&RegModel, &0, &hard_history(20), &past),
            Verdict::Exhausted(Limit::Time)
        );
    }

    #[test]
    fn a_search_whose_cache_outgrows_its_bound_is_exhausted() {
        let tiny = Limits {
            deadline: Instant::now() + Duration::from_secs(60),
            max_cache_bytes: 4096,
        };
        assert_eq!(
            check(&RegModel, &0, &hard_history(12), &tiny),
            Verdict::Exhausted(Limit::Memory)
        );
    }

    #[test]
    fn the_hard_history_is_decided_when_the_bounds_allow() {
        assert_eq!(
            check(&RegModel, &0, &hard_history(8), &limits()),
            Verdict::NotLinearizable
        );
    }

    #[test]
    fn several_starts_share_one_search_and_need_only_one_to_succeed() {
        let ops = [op(Reg::Read(3), 0, Some(1)), op(Reg::Read(3), 2, Some(3))];
        assert_eq!(
            check_from_any(&RegModel, &[0, 1, 3], &ops, &limits()),
            Verdict::Linearizable
        );
        assert_eq!(
            check_from_any(&RegModel, &[0, 1, 2], &ops, &limits()),
            Verdict::NotLinearizable
        );
    }

    /// Whether some subset of the unknown ops, in some order that respects
    /// real time, is legal: the definition, by enumeration.
    fn brute_force(ops: &[Timed<Reg>]) -> bool {
        fn extend(ops: &[Timed<Reg>], done: &mut Vec<bool>, state: u8) -> bool {
            if !(0..ops.len()).any(|i| !done[i] && ops[i].ret.is_some()) {
                return true;
            }
            for i in 0..ops.len() {
                // i may go next only if no unplaced op returned before i's call.
                let blocked = done[i]
                    || (0..ops.len()).any(|j| {
                        j != i && !done[j] && ops[j].ret.is_some_and(|ret| ret < ops[i].call)
                    });
                if blocked {
                    continue;
                }
                let Some(next) = RegModel.step(&state, &ops[i].op) else {
                    continue;
                };
                done[i] = true;
                let found = extend(ops, done, next);
                done[i] = false;
                if found {
                    return true;
                }
            }
            false
        }
        // Unknown ops may be dropped: try every subset.
        let unknown: Vec<usize> = (0..ops.len()).filter(|&i| ops[i].ret.is_none()).collect();
        (0..1u32 << unknown.len()).any(|subset| {
            let mut done = vec![false; ops.len()];
            for (bit, &i) in unknown.iter().enumerate() {
                done[i] = subset & (1 << bit) == 0;
            }
            extend(ops, &mut done, 0)
        })
    }

    fn random_history(rng: &mut rand::rngs::StdRng) -> Vec<Timed<Reg>> {
        use rand::Rng;
        let count = rng.gen_range(1..=6);
        let mut points: Vec<u64> = (0..2 * count as u64).collect();
        rand::seq::SliceRandom::shuffle(&mut points[..], rng);
        (0..count)
            .map(|i| {
                let (a, b) = (points[2 * i], points[2 * i + 1]);
                let value = rng.gen_range(0..3);
                let read = rng.gen_bool(0.5);
                let unknown = !read && rng.gen_bool(0.3);
                Timed {
                    op: if read {
                        Reg::Read(value)
                    } else {
                        Reg::Write(value)
                    },
                    call: a.min(b),
                    ret: (!unknown).then_some(a.max(b)),
                    source: i,
                }
            })
            .collect()
    }

    #[test]
    fn the_search_agrees_with_brute_force_on_random_small_histories() {
        use rand::SeedableRng;
        let mut linearizable = 0;
        for seed in 0..3000u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let ops = random_history(&mut rng);
            let expected = brute_force(&ops);
            let verdict = check(&RegModel, &0, &ops, &limits());
            assert_eq!(
                verdict == Verdict::Linearizable,
                expected,
                "seed {seed}: {ops:?} gave {verdict:?}"
            );
            linearizable += usize::from(expected);
        }
        assert!(
            (500..2500).contains(&linearizable),
            "both verdicts must be exercised: {linearizable} of 3000 linearizable"
        );
    }
}
