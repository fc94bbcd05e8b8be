//! The fsync of the Raft log, off the node task.
//!
//! A leader writes the entries of a Ready to RocksDB without syncing (they
//! can be read back at once, which raft-rs needs), sends them to the
//! followers, and hands the sync of the write-ahead log to a thread of its
//! own. raft-rs is told with `advance_append_async` and counts the leader's
//! own copy only when that thread reports the sync done
//! (`RawNode::on_persist_ready`): a commit still needs a quorum of synced
//! copies, and raft-rs hands out committed entries only up to what this node
//! has synced. Meanwhile the node task goes on stepping acknowledgements,
//! committing, applying and answering, where it used to sit in the fsync
//! while the acknowledgements of the entries before piled up in its inbox.
//!
//! A follower does the same with the appends it receives. Its
//! acknowledgements are raft-rs's persisted messages: they wait here with
//! their Ready and leave only once the sync is reported, so no leader
//! counts a copy that a power loss could take back. Meanwhile the
//! follower's task applies what is committed and takes the next append,
//! whose sync follows as soon as the one in flight ends; before, each of a
//! follower's rounds was its fsync and then its apply, in series. An
//! append that replaces an unsynced suffix (a new leader's) is written
//! after it in the same write-ahead log, so a power loss keeps either the
//! old suffix, never acknowledged, or both; raft-rs's `on_persist_ready`
//! counts a synced index only if the entry there still has the term it was
//! written with.
//!
//! Two facts of the storage make this sound:
//!
//! - **A sync makes every earlier write durable.** RocksDB's write-ahead log
//!   is one sequence, and a power loss keeps a prefix of it (the memory
//!   backend models exactly that). So syncing once covers every Ready
//!   written before, and the checkpoints of the state machine written after
//!   an entry (not synced) can never survive a crash that loses it.
//! - **Readies are numbered in order**, and `on_persist_ready(n)` marks every
//!   Ready up to `n`. The thread reports the highest number it was given
//!   before it began a sync, so many Readies share one fsync under load.
//!
//! A candidate's Ready, and any Ready that installs a snapshot or changes
//! the term or the vote (a vote given; a single voter wins its election in
//! the step that made it a candidate), keeps the synchronous path. The
//! synchronous path first syncs whatever the other one left unsynced, so
//! that raft-rs's synchronous `advance`, which marks every earlier Ready
//! persisted, is true when it is called.
//!
//! A driver that owns the schedule (the simulator) gets the same path with
//! the sync deferred to the node's next step instead of a thread, so a
//! power loss can fall between a leader's or a follower's write and its
//! sync.
//!
//! **A sync that stalls stops the leader, as the fsync on the node task
//! did.** Once the oldest unsynced Ready has waited longer than a tick, the
//! production loop takes no input until the sync ends
//! ([`Node::wait_out_stalled_sync`]). A leader that went on meanwhile would
//! tick through a disk stall: with a cluster on one disk its followers,
//! stalled in their own fsyncs, answer nothing for an election timeout and
//! check-quorum makes it step down for nothing; and a leader whose own disk
//! is stuck would go on sending appends and heartbeats, keeping healthy
//! followers from replacing it while it cannot apply anything. Stopped, it
//! does neither, and its followers elect another leader if their disks
//! work, as they did before the sync left the node task. A follower whose
//! sync stalls stops the same way, as it did when it synced on its task:
//! it neither ticks nor takes appends it could not acknowledge. Once the
//! stall has lasted twice the election timeout, the node also stops
//! keeping its clients waiting ([`Node::refuse_while_stalled`]): they go
//! to another node instead of waiting for their own timeouts.

use std::collections::VecDeque;
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::Instant;

use raft::Ready;
use tokio::sync::watch;

use super::*;

/// A Ready written without syncing, before its sync is asked for.
struct Unsynced {
    number: u64,
    /// The messages raft-rs wants sent only once the Ready is durable.
    held: Vec<Message>,
    must_sync: bool,
}

/// Readies a leader or a follower has written but not yet synced.
pub(super) struct LogSync {
    /// Oldest first: each Ready's number, the messages raft-rs wants sent
    /// only once it is durable, and when it was written.
    waiting: VecDeque<(u64, Vec<Message>, Instant)>,
    syncer: Syncer,
    /// Syncs run at the node's steps, not on a thread (a synchronous
    /// driver; set at its first step).
    deferred: bool,
    /// The production loop has waited out a stalled sync for longer than
    /// twice the election timeout, and refuses its clients meanwhile;
    /// published as `NodeStatus::sync_stalled`.
    pub(super) refusing: bool,
    /// What the inbox held when the node refused its requests during a
    /// stall, other than those requests: handled once the stall ends.
    held_input: Vec<NodeMsg>,
}

enum Syncer {
    /// No Ready has needed a sync yet.
    None,
    /// The production thread, fed Ready numbers. Besides its report
    /// through the inbox, it publishes the highest number it has synced on
    /// `synced`, for a node that waits out a stalled sync; the channel
    /// closes when the thread stops.
    Thread {
        requests: Option<std_mpsc::Sender<u64>>,
        thread: Option<JoinHandle<()>>,
        synced: watch::Receiver<u64>,
    },
    /// A synchronous driver: the highest number to sync at the next step.
    Deferred(Option<u64>),
}

impl LogSync {
    pub(super) fn new() -> LogSync {
        LogSync {
            waiting: VecDeque::new(),
            syncer: Syncer::None,
            deferred: false,
            refusing: false,
            held_input: Vec::new(),
        }
    }

    /// Whether some written Ready is not yet known synced.
    pub(super) fn pending(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Takes the messages of every Ready up to `number`, now synced.
    fn synced(&mut self, number: u64) -> Vec<Message> {
        let mut messages = Vec::new();
        while let Some((first, _, _)) = self.waiting.front() {
            if *first > number {
                break;
            }
            if let Some((_, held, _)) = self.waiting.pop_front() {
                messages.extend(held);
            }
        }
        messages
    }

    /// The number of the oldest unsynced Ready and a view of the thread's
    /// progress, if that Ready was written longer than `stall` ago.
    fn stalled(&self, stall: Duration) -> Option<(u64, watch::Receiver<u64>)> {
        let (number, _, written) = self.waiting.front()?;
        match &self.syncer {
            Syncer::Thread { synced, .. } if written.elapsed() >= stall => {
                Some((*number, synced.clone()))
            }
            _ => None,
        }
    }

    /// The number a deferred sync is due for, taken.
    fn take_deferred(&mut self) -> Option<u64> {
        match &mut self.syncer {
            Syncer::Deferred(due) => due.take(),
            _ => None,
        }
    }
}

impl Drop for LogSync {
    /// Stops the thread and waits for it, so that the engine it holds is
    /// closed when the node is (a restart in the same process reopens it).
    /// The node's inbox, which the thread may be waiting to send to, is
    /// dropped before this (field order in [`Node`]).
    fn drop(&mut self) {
        if let Syncer::Thread {
            requests, thread, ..
        } = &mut self.syncer
        {
            requests.take();
            if let Some(thread) = thread.take() {
                let _ = thread.join();
            }
        }
    }
}

impl Node {
    /// The leader's way with a Ready that installs no snapshot and changes
    /// neither term nor vote (`ready.rs` picks the path): apply what
    /// is committed, write the new entries and hard state without syncing,
    /// and leave the sync to [`LogSync`]. Returns nothing to advance: raft-rs
    /// has been told, and what the sync makes possible (the leader's own
    /// vote for its entries, hence commits) comes in a later Ready.
    pub(super) fn handle_leader_ready(&mut self, mut ready: Ready) -> Result<(), FatalError> {
        self.apply(ready.take_committed_entries())?;
        let written = self.write_unsynced(&mut ready)?;
        self.raw.advance_append_async(ready);
        self.raw.advance_apply();
        self.sync_later(written)
    }

    /// A follower's way with a Ready that installs no snapshot and changes
    /// neither term nor vote: write the new entries and hard state without
    /// syncing and ask for the sync first, so that the fsync runs while
    /// this task applies what is committed (persisted by earlier Readies)
    /// and takes the next append. The acknowledgements (all of a
    /// follower's messages are persisted messages) leave once the sync is
    /// done.
    pub(super) fn handle_follower_ready(&mut self, mut ready: Ready) -> Result<(), FatalError> {
        let committed = ready.take_committed_entries();
        let written = self.write_unsynced(&mut ready)?;
        self.raw.advance_append_async(ready);
        self.sync_later(written)?;
        self.apply(committed)?;
        self.raw.advance_apply();
        Ok(())
    }

    /// Writes a Ready's entries and hard state without syncing.
    fn write_unsynced(&mut self, ready: &mut Ready) -> Result<Unsynced, FatalError> {
        self.persist(ready.entries(), ready.hs().cloned(), false)?;
        Ok(Unsynced {
            number: ready.number(),
            held: ready.take_persisted_messages(),
            must_sync: ready.must_sync(),
        })
    }

    /// Hands a written Ready's sync to [`LogSync`], with the messages that
    /// must wait for it; or, if it needs no sync and none is pending, marks
    /// it persisted and sends them. Call once raft-rs has been told
    /// (`advance_append_async`).
    fn sync_later(&mut self, written: Unsynced) -> Result<(), FatalError> {
        let Unsynced {
            number,
            held,
            must_sync,
        } = written;
        if !must_sync {
            if !self.log_sync.pending() {
                // Nothing to make durable, nothing before it waiting.
                self.raw.on_persist_ready(number);
                self.transport.send(held);
                return Ok(());
            }
            if held.is_empty() {
                // Nothing to wait for: a later sync's number covers it.
                return Ok(());
            }
        }
        self.log_sync
            .waiting
            .push_back((number, held, Instant::now()));
        self.request_sync(number)
    }

    fn request_sync(&mut self, number: u64) -> Result<(), FatalError> {
        if matches!(self.log_sync.syncer, Syncer::None) {
            self.log_sync.syncer = if self.log_sync.deferred {
                Syncer::Deferred(None)
            } else {
                self.spawn_syncer()?
            };
        }
        match &mut self.log_sync.syncer {
            Syncer::Deferred(due) => *due = Some(number),
            Syncer::Thread { requests, .. } => {
                let sent = requests.as_ref().map(|r| r.send(number));
                if !matches!(sent, Some(Ok(()))) {
                    return Err(self.sync_thread_stopped());
                }
            }
            Syncer::None => unreachable!("a syncer was just made"),
        }
        Ok(())
    }

    /// Why the log sync thread stopped: the error it left in the fatal
    /// slot.
    fn sync_thread_stopped(&self) -> FatalError {
        self.fatal
            .lock()
            .take()
            .unwrap_or_else(|| FatalError::Raft("the log sync thread stopped".into()))
    }

    fn spawn_syncer(&self) -> Result<Syncer, FatalError> {
        let (requests, incoming) = std_mpsc::channel::<u64>();
        let (published, synced) = watch::channel(0);
        let engine = self.raw.store().engine().clone();
        let inbox = self.own_inbox.clone();
        let fatal = self.fatal.clone();
        let metrics = self.metrics.clone();
        let thread = std::thread::Builder::new()
            .name(format!("log-sync-{}", self.id))
            .spawn(move || {
                while let Ok(mut number) = incoming.recv() {
                    while let Ok(later) = incoming.try_recv() {
                        number = number.max(later);
                    }
                    let started = std::time::Instant::now();
                    if let Err(e) = engine.sync_wal() {
                        *fatal.lock() = Some(e);
                        // Wakes the node, which finds the error.
                        let _ = inbox.blocking_send(NodeMsg::LogSynced(0));
                        return;
                    }
                    metrics.observe_fsync(started.elapsed());
                    published.send_replace(number);
                    if inbox.blocking_send(NodeMsg::LogSynced(number)).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| FatalError::Raft(format!("cannot start the log sync thread: {e}")))?;
        Ok(Syncer::Thread {
            requests: Some(requests),
            thread: Some(thread),
            synced,
        })
    }

    /// Every Ready up to `number` is durable: raft-rs counts this node's
    /// copy, and the messages that waited for it go out.
    pub(super) fn on_log_synced(&mut self, number: u64) {
        let messages = self.log_sync.synced(number);
        if number > 0 {
            self.raw.on_persist_ready(number);
        }
        self.transport.send(messages);
    }

    /// The production loop's guard against a stalled sync (module docs):
    /// once the oldest unsynced Ready has waited longer than a tick, waits
    /// for the thread to sync it, taking no input meanwhile. Its report
    /// through the inbox, read later, then finds nothing left to do.
    ///
    /// Once the wait has lasted twice the election timeout (raft-rs's
    /// longest randomized one: by then every follower that heard no
    /// heartbeat has campaigned), the node stops keeping its clients
    /// waiting ([`Node::refuse_while_stalled`]), so that they go to another
    /// node instead of waiting for their own timeouts.
    pub(super) async fn wait_out_stalled_sync(&mut self) -> Result<(), FatalError> {
        let Some((oldest, mut synced)) = self.log_sync.stalled(self.tick_interval) else {
            return Ok(());
        };
        let started = tokio::time::Instant::now();
        let refuse_after = self.tick_interval * 2 * self.raw.raft.election_timeout() as u32;
        let result = loop {
            let done = *synced.borrow_and_update();
            if done >= oldest {
                self.on_log_synced(done);
                break Ok(());
            }
            let refusing = self.log_sync.refusing;
            tokio::select! {
                changed = synced.changed() => {
                    if changed.is_err() {
                        break Err(self.sync_thread_stopped());
                    }
                }
                () = tokio::time::sleep_until(started + refuse_after), if !refusing => {
                    tracing::warn!(node = %self.id, "a sync of the Raft log has hung for {refuse_after:?}: refusing requests until it ends");
                    self.refuse_while_stalled();
                }
            }
        };
        if self.log_sync.refusing {
            tracing::info!(node = %self.id, "the hung sync ended after {:?}", started.elapsed());
            self.log_sync.refusing = false;
            self.publish_status(true);
            for message in std::mem::take(&mut self.log_sync.held_input) {
                self.handle(message);
            }
        }
        result
    }

    /// A sync has hung for twice the election timeout: the node stops
    /// keeping its clients waiting, without stepping anything into Raft.
    /// - Its status says so: its handle refuses new requests at once
    ///   ([`RequestError::SyncStalled`]: nothing was proposed, try another
    ///   node), its waiting acquires end as a deposed leader's do, and it
    ///   reports itself not ready.
    /// - The requests waiting in its inbox get the same refusal; the rest
    ///   of the inbox (peers' messages, the transport's and the sync
    ///   thread's reports) is held, in order, until the stall ends.
    /// - Its reads and keepalives waiting for a quorum get the same
    ///   refusal (a keepalive refused renews nothing).
    /// - Its proposals in flight that carry a session's request id end as
    ///   on a loss of leadership: outcome unknown, retry. The retry carries
    ///   the same request id, so the leader that takes it applies it at
    ///   most once. Those without (one-shot writes, membership changes)
    ///   cannot be resent safely and wait for their outcome.
    fn refuse_while_stalled(&mut self) {
        self.log_sync.refusing = true;
        self.publish_status(true);
        for (_, pending) in self.proposals.extract_if(|_, pending| pending.resendable) {
            let _ = pending.reply.send(Err(RequestError::LeadershipLost));
        }
        self.refuse_reads(RequestError::SyncStalled);
        for reply in self.lease_clock.take_waiting() {
            let _ = reply.send(Err(RequestError::SyncStalled));
        }
        while let Ok(message) = self.inbox.try_recv() {
            match message {
                NodeMsg::Propose { reply, .. } | NodeMsg::ChangeMembers { reply, .. } => {
                    let _ = reply.send(Err(RequestError::SyncStalled));
                }
                NodeMsg::ReadIndex { reply } => {
                    let _ = reply.send(Err(RequestError::SyncStalled));
                }
                NodeMsg::KeepAlive { reply, .. } => {
                    let _ = reply.send(Err(RequestError::SyncStalled));
                }
                NodeMsg::Members { reply } => {
                    let _ = reply.send(Err(RequestError::SyncStalled));
                }
                NodeMsg::TransferLeader { reply, .. } => {
                    let _ = reply.send(Err(RequestError::SyncStalled));
                }
                NodeMsg::Checkpoint { reply } => {
                    let _ = reply.send(Err(RequestError::SyncStalled));
                }
                other @ (NodeMsg::Raft(_)
                | NodeMsg::Unreachable(_)
                | NodeMsg::SnapshotSent { .. }
                | NodeMsg::LogSynced(_)
                | NodeMsg::LeasesRemaining { .. }) => self.log_sync.held_input.push(other),
            }
        }
    }

    /// A synchronous driver's step: syncs are deferred to the node's steps
    /// instead of a thread, and the one asked for at an earlier step is
    /// done now.
    pub(super) fn finish_deferred_sync(&mut self) -> Result<(), FatalError> {
        self.log_sync.deferred = true;
        if let Some(number) = self.log_sync.take_deferred() {
            self.raw.store().engine().sync_wal()?;
            self.on_log_synced(number);
        }
        Ok(())
    }

    /// Before a Ready on the synchronous path: makes whatever the other
    /// path left unsynced durable, so that raft-rs's `advance` (which marks every
    /// earlier Ready persisted) tells the truth.
    pub(super) fn sync_what_is_pending(&mut self) -> Result<(), FatalError> {
        if !self.log_sync.pending() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        self.raw.store().engine().sync_wal()?;
        self.metrics.observe_fsync(started.elapsed());
        if let Syncer::Deferred(due) = &mut self.log_sync.syncer {
            *due = None;
        }
        let messages = self.log_sync.synced(u64::MAX);
        self.transport.send(messages);
        Ok(())
    }
}
