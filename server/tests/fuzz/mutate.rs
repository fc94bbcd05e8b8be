//! Byte-level mutations of valid encodings: flips, overwrites, truncation,
//! insertion, removal and splices of the input's own bytes.

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;

/// One change to a byte string; positions scale to its length.
#[derive(Debug, Clone)]
pub enum Mutation {
    FlipBit {
        at: Index,
        bit: u8,
    },
    SetByte {
        at: Index,
        byte: u8,
    },
    Truncate {
        at: Index,
    },
    Insert {
        at: Index,
        bytes: Vec<u8>,
    },
    Remove {
        at: Index,
        len: usize,
    },
    /// Copies `len` bytes from `from` over the bytes at `at`.
    Splice {
        at: Index,
        from: Index,
        len: usize,
    },
    /// Inserts a copy of `len` bytes from `from` at `at`.
    Repeat {
        at: Index,
        from: Index,
        len: usize,
    },
}

/// Bytes that often mean something to a decoder: zero, all ones, a varint
/// continuation, the largest one-byte varint, lengths and tags.
fn interesting_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        3 => any::<u8>(),
        1 => prop::sample::select(vec![0x00, 0xff, 0x80, 0x7f, 0x01, 0x08, 0x0a, 0x12, 0x1a, 0x22]),
    ]
}

pub fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<Index>(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
        3 => (any::<Index>(), interesting_byte()).prop_map(|(at, byte)| Mutation::SetByte { at, byte }),
        1 => any::<Index>().prop_map(|at| Mutation::Truncate { at }),
        2 => (any::<Index>(), vec(interesting_byte(), 1..12)).prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        1 => (any::<Index>(), 1usize..16).prop_map(|(at, len)| Mutation::Remove { at, len }),
        1 => (any::<Index>(), any::<Index>(), 1usize..32).prop_map(|(at, from, len)| Mutation::Splice { at, from, len }),
        1 => (any::<Index>(), any::<Index>(), 1usize..32).prop_map(|(at, from, len)| Mutation::Repeat { at, from, len }),
    ]
}

/// One to four mutations.
pub fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    vec(mutation(), 1..5)
}

/// Applies `mutations` to `bytes` in order.
pub fn apply(bytes: &mut Vec<u8>, mutations: &[Mutation]) {
    for mutation in mutations {
        apply_one(bytes, mutation);
    }
}

fn apply_one(bytes: &mut Vec<u8>, mutation: &Mutation) {
    let len = bytes.len();
    // An index into the bytes, or 0 for an empty string.
    let at = |index: &Index| if len == 0 { 0 } else { index.index(len) };
    match mutation {
        Mutation::FlipBit { at: i, bit } if len > 0 => bytes[at(i)] ^= 1 << bit,
        Mutation::SetByte { at: i, byte } if len > 0 => bytes[at(i)] = *byte,
        Mutation::Truncate { at: i } => bytes.truncate(at(i)),
        Mutation::Insert { at: i, bytes: new } => {
            let position = if len == 0 { 0 } else { i.index(len + 1) };
            bytes.splice(position..position, new.iter().copied());
        }
        Mutation::Remove { at: i, len: n } if len > 0 => {
            let start = at(i);
            let end = (start + n).min(len);
            bytes.drain(start..end);
        }
        Mutation::Splice {
            at: i,
            from,
            len: n,
        } if len > 0 => {
            let (start, source) = (at(i), at(from));
            let n = (*n).min(len - start).min(len - source);
            let copied = bytes[source..source + n].to_vec();
            bytes[start..start + n].copy_from_slice(&copied);
        }
        Mutation::Repeat {
            at: i,
            from,
            len: n,
        } if len > 0 => {
            let (start, source) = (at(i), at(from));
            let n = (*n).min(len - source);
            let copied = bytes[source..source + n].to_vec();
            bytes.splice(start..start, copied);
        }
        _ => {}
    }
}

/// Bytes for a decoder: arbitrary, or a valid encoding (picked by index
/// from `valid`) with mutations.
#[derive(Debug, Clone)]
pub enum Input {
    Arbitrary(Vec<u8>),
    Mutated {
        base: Index,
        mutations: Vec<Mutation>,
    },
}

pub fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        1 => vec(any::<u8>(), 0..96).prop_map(Input::Arbitrary),
        3 => (any::<Index>(), mutations()).prop_map(|(base, mutations)| Input::Mutated { base, mutations }),
    ]
}

impl Input {
    /// The bytes: `valid` must not be empty.
    pub fn bytes(&self, valid: &[Vec<u8>]) -> Vec<u8> {
        match self {
            Input::Arbitrary(bytes) => bytes.clone(),
            Input::Mutated { base, mutations } => {
                let mut bytes = valid[base.index(valid.len())].clone();
                apply(&mut bytes, mutations);
                bytes
            }
        }
    }
}
