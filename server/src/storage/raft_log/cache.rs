//! [`EntryCache`]: the newest entries of the log, decoded, so that the
//! reads raft-rs makes on the node's loop — the committed entries of every
//! Ready, the terms it matches appends against — do not go to RocksDB.
//!
//! The cache mirrors the log and never leads it: it takes exactly the
//! entries [`super::RaftLog::append`] adds to the batch that writes them
//! (that batch is written before raft-rs can ask for them, and a failed
//! write stops the node), drops the same suffix a conflicting append
//! replaces, the same prefix compaction removes, and everything when a
//! snapshot replaces the log. It holds a contiguous run that ends at the
//! log's last entry; older entries, and whatever was evicted to keep it
//! within its bounds, are read from RocksDB as before. A node that
//! restarts starts with it empty.

use std::collections::VecDeque;

use protobuf::Message as _;
use raft::prelude::Entry;

/// Entries kept at most: a Ready applies far fewer, and a follower that
/// is further behind is caught up from RocksDB.
pub const MAX_ENTRIES: usize = 4096;
/// Encoded bytes kept at most, so that a few big entries do not hold memory.
pub const MAX_BYTES: u64 = 2 << 20;

#[derive(Debug)]
pub(super) struct EntryCache {
    /// Entries with consecutive indexes, and each one's encoded size.
    entries: VecDeque<(Entry, u64)>,
    bytes: u64,
    max_entries: usize,
    max_bytes: u64,
}

impl Default for EntryCache {
    fn default() -> EntryCache {
        EntryCache::with_limits(MAX_ENTRIES, MAX_BYTES)
    }
}

impl EntryCache {
    pub(super) fn with_limits(max_entries: usize, max_bytes: u64) -> EntryCache {
        EntryCache {
            entries: VecDeque::new(),
            bytes: 0,
            max_entries,
            max_bytes,
        }
    }

    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(entry, _)| entry.index)
    }

    /// Takes `entries`, which follow the log's entries before their first
    /// one (the log's suffix from there on is replaced).
    pub(super) fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else {
            return;
        };
        self.truncate_from(first.index);
        if let Some((last, _)) = self.entries.back() {
            if last.index + 1 != first.index {
                // They do not follow the cached ones. `RaftLog` never
                // does this (the cache ends at the log's last entry, and
                // an append starts at most one past it), but a cache with
                // a gap would serve wrong entries: start again from these.
                self.clear();
            }
        }
        for entry in entries {
            let size = u64::from(entry.compute_size());
            self.bytes += size;
            self.entries.push_back((entry.clone(), size));
        }
        while self.entries.len() > self.max_entries || self.bytes > self.max_bytes {
            let Some((_, size)) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= size;
        }
    }

    /// Drops the entries from `index` on.
    fn truncate_from(&mut self, index: u64) {
        while self.entries.back().is_some_and(|(e, _)| e.index >= index) {
            let (_, size) = self.entries.pop_back().expect("checked");
            self.bytes -= size;
        }
    }

    /// Drops the entries up to and including `index`.
    pub(super) fn compact_to(&mut self, index: u64) {
        while self.entries.front().is_some_and(|(e, _)| e.index <= index) {
            let (_, size) = self.entries.pop_front().expect("checked");
            self.bytes -= size;
        }
    }

    pub(super) fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    pub(super) fn term(&self, index: u64) -> Option<u64> {
        let first = self.first_index()?;
        let offset = usize::try_from(index.checked_sub(first)?).ok()?;
        self.entries.get(offset).map(|(entry, _)| entry.term)
    }

    /// Entries `low..high`, cut as [`raft::Storage::entries`] cuts them at
    /// `max_size` (at least one); `None` unless the cache holds `low` and
    /// everything after it up to `high`.
    pub(super) fn entries(&self, low: u64, high: u64, max_size: Option<u64>) -> Option<Vec<Entry>> {
        let first = self.first_index()?;
        let start = usize::try_from(low.checked_sub(first)?).ok()?;
        let end = usize::try_from(high.checked_sub(first)?).ok()?;
        if end > self.entries.len() || start > end {
            return None;
        }
        let mut out = Vec::with_capacity(end - start);
        let mut size = 0u64;
        for (entry, entry_size) in self.entries.range(start..end) {
            size += entry_size;
            if max_size.is_some_and(|max| size > max) && !out.is_empty() {
                break;
            }
            out.push(entry.clone());
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: vec![0; 10].into(),
            ..Entry::default()
        }
    }

    fn indexes(entries: &[Entry]) -> Vec<(u64, u64)> {
        entries.iter().map(|e| (e.index, e.term)).collect()
    }

    #[test]
    fn holds_a_contiguous_suffix_within_its_bounds() {
        let mut cache = EntryCache::with_limits(3, u64::MAX);
        cache.append(&(1..=5).map(|i| entry(i, 1)).collect::<Vec<_>>());
        assert_eq!(cache.term(2), None, "evicted");
        assert_eq!(cache.term(3), Some(1));
        assert_eq!(cache.entries(2, 6, None), None, "starts before the cache");
        assert_eq!(
            indexes(&cache.entries(3, 6, None).unwrap()),
            [(3, 1), (4, 1), (5, 1)]
        );
        assert_eq!(cache.entries(4, 7, None), None, "runs past the cache");
        assert_eq!(indexes(&cache.entries(5, 5, None).unwrap()), []);
    }

    #[test]
    fn a_conflicting_append_replaces_the_suffix() {
        let mut cache = EntryCache::default();
        cache.append(&(1..=5).map(|i| entry(i, 1)).collect::<Vec<_>>());
        cache.append(&[entry(3, 2), entry(4, 2)]);
        assert_eq!(
            indexes(&cache.entries(1, 5, None).unwrap()),
            [(1, 1), (2, 1), (3, 2), (4, 2)]
        );
        assert_eq!(cache.term(5), None);
    }

    #[test]
    fn an_append_after_a_gap_starts_the_cache_again() {
        let mut cache = EntryCache::default();
        cache.append(&[entry(1, 1), entry(2, 1)]);
        cache.append(&[entry(9, 2)]);
        assert_eq!(cache.term(1), None);
        assert_eq!(indexes(&cache.entries(9, 10, None).unwrap()), [(9, 2)]);
    }

    #[test]
    fn compaction_and_byte_bounds_drop_the_oldest() {
        let size = u64::from(entry(1, 1).compute_size());
        let mut cache = EntryCache::with_limits(usize::MAX, 3 * size);
        cache.append(&(1..=4).map(|i| entry(i, 1)).collect::<Vec<_>>());
        assert_eq!(cache.term(1), None, "over the byte bound");
        cache.compact_to(2);
        assert_eq!(cache.term(2), None);
        assert_eq!(
            indexes(&cache.entries(3, 5, Some(1)).unwrap()),
            [(3, 1)],
            "max_size cuts to one entry at least"
        );
        assert_eq!(
            indexes(&cache.entries(3, 5, Some(2 * size)).unwrap()),
            [(3, 1), (4, 1)]
        );
        cache.clear();
        assert_eq!(cache.entries(3, 5, None), None);
    }
}
