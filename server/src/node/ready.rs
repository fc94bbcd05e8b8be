//! Handling a Ready on the node task: send, install a snapshot, apply and
//! persist (in the order the role wants), advance, then answer the read
//! states (see [`Node::on_ready`]);
//! and what applying an entry does (answers, events, membership changes).

use latchkey_proto::state::v1::ProposalContext;

use super::*;

/// Most entries whose changes share one write; bounds the batch and the
/// key-value overlay the state machine keeps until it is written.
pub const MAX_APPLY_BATCH_ENTRIES: usize = 256;

/// What applying one entry produced, announced once its batch is written.
#[derive(Default)]
pub(super) struct EntryOutput {
    /// The command's result (`None` for an empty entry).
    result: Option<CommandResult>,
    events: Vec<Event>,
}

impl EntryOutput {
    fn done(result: Option<CommandResult>) -> EntryOutput {
        EntryOutput {
            result,
            events: Vec::new(),
        }
    }
}

impl Node {
    /// Handles the pending Ready, and the one that answering its reads may
    /// have made (an expiry proposed by a confirmed lease-clock round), so
    /// that proposal does not wait for the next tick.
    ///
    /// With `pause`, the Ready is handled with [`Pause`]s, at which this
    /// future lets the other tasks of its worker run (the production loop);
    /// without, it never waits and completes in its first poll (drivers
    /// that own the schedule, see [`Node::tick`]).
    pub(super) async fn on_ready(&mut self, pause: Pause) -> Result<(), FatalError> {
        // Bounded: the second pass answers reads too, and whatever they
        // propose waits for the loop's next iteration.
        for _ in 0..2 {
            if !self.raw.has_ready() {
                break;
            }
            self.handle_ready(pause).await?;
        }
        Ok(())
    }

    async fn handle_ready(&mut self, pause: Pause) -> Result<(), FatalError> {
        let mut ready = self.raw.ready();
        if let Some(soft_state) = ready.ss() {
            self.on_role(soft_state.raft_state.into());
        }
        self.transport.send(ready.take_messages());
        if !ready.snapshot().is_empty() {
            self.install_snapshot(ready.snapshot())?;
        }
        // Answered only once this Ready is fully handled: confirming a
        // lease-clock round may propose an expiry, and a proposal between
        // `ready()` and `advance()` appends to the unstable log behind the
        // Ready's back (raft-rs then panics in `advance`).
        let read_states = ready.take_read_states();
        // A leader or a follower writes its new entries without syncing
        // and leaves the fsync to another thread (`log_sync.rs`): a leader
        // goes on stepping acknowledgements meanwhile, a follower applies
        // and takes the next append, and its acknowledgement waits for the
        // sync. A Ready that installs a snapshot or changes the term or the
        // vote (a vote given; a single voter's election: it leads in the
        // step that made it a candidate), and any Ready of a candidate,
        // takes the synchronous path.
        let same_term_and_vote = ready.hs().is_none_or(|hs| {
            let stored = self.raw.store().hard_state();
            hs.term == stored.term && hs.vote == stored.vote
        });
        if ready.snapshot().is_empty() && same_term_and_vote {
            match self.role {
                Role::Leader => {
                    self.handle_leader_ready(ready)?;
                    self.answer_reads(read_states);
                    return Ok(());
                }
                Role::Follower => {
                    self.handle_follower_ready(ready)?;
                    self.answer_reads(read_states);
                    return Ok(());
                }
                Role::Candidate | Role::PreCandidate => {}
            }
        }
        // The synchronous path, having first synced what the other one
        // left unsynced. A follower on it acknowledges the new entries (its
        // persisted messages) before it applies what it has learnt is
        // committed (both orders are allowed: the committed entries were
        // persisted by an earlier Ready), since the leader's commit waits
        // for that ack. A message handed to the transport wakes the peer's
        // link task, which runs on this worker once this task lets it: the
        // pause lets it write the ack before the apply instead of after.
        self.sync_what_is_pending()?;
        self.persist(ready.entries(), ready.hs().cloned(), ready.must_sync())?;
        let acks = ready.take_persisted_messages();
        let acked = !acks.is_empty();
        self.transport.send(acks);
        let committed = ready.take_committed_entries();
        if acked && !committed.is_empty() {
            pause.now().await;
        }
        self.apply(committed)?;
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            let mut batch = Batch::new(self.raw.store().engine());
            self.raw.mut_store().set_commit(&mut batch, commit);
            self.raw.store().engine().write(batch, false)?;
        }
        self.transport.send(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.raw.advance_apply();
        self.answer_reads(read_states);
        Ok(())
    }

    pub(super) fn on_role(&mut self, role: Role) {
        if self.role == Role::Leader && role != Role::Leader {
            self.fail_all(RequestError::LeadershipLost);
        }
        if role != self.role {
            tracing::info!(node = %self.id, term = self.raw.raft.term, "role is now {role:?}");
            if role == Role::Leader {
                let ready_index = self.raw.raft.raft_log.last_index();
                let state = self.state_machine.coordination();
                let state = state.read();
                let now = self.clock.now();
                self.lease_clock.lead(now, ready_index, &state);
                self.session_clock.lead(now, &state);
            } else {
                self.session_clock.follow();
                for reply in self.lease_clock.follow() {
                    let _ = reply.send(Err(self.not_leader()));
                }
            }
        }
        self.role = role;
    }

    pub(super) fn fail_all(&mut self, error: RequestError) {
        for (_, pending) in self.proposals.drain() {
            let _ = pending.reply.send(Err(error.clone()));
        }
        for (_, reply) in self.deferred_changes.drain(..) {
            let _ = reply.send(Err(error.clone()));
        }
    }

    pub(super) fn install_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), FatalError> {
        let meta = snapshot.get_metadata();
        tracing::info!(node = %self.id, index = meta.index, term = meta.term, "installing snapshot");
        self.raw.mut_store().apply_snapshot(snapshot)?;
        self.state_machine.reload()?;
        self.members = self.load_members()?;
        self.publish_members();
        // Inline snapshots are checked before raft-rs sees them
        // (`peer_messages`); a file's records only here.
        let applied = self.state_machine.applied().index;
        if applied != meta.index {
            return Err(FatalError::Corruption {
                cf: crate::storage::CF_STATE,
                key: "<received snapshot>".into(),
                reason: format!(
                    "the snapshot of index {} holds the state applied at {applied}",
                    meta.index
                ),
            });
        }
        Ok(())
    }

    pub(super) fn persist(
        &mut self,
        entries: &[Entry],
        hard_state: Option<raft::prelude::HardState>,
        must_sync: bool,
    ) -> Result<(), FatalError> {
        if entries.is_empty() && hard_state.is_none() {
            return Ok(());
        }
        let mut batch = Batch::new(self.raw.store().engine());
        let store = self.raw.mut_store();
        store.append(&mut batch, entries);
        if let Some(hard_state) = &hard_state {
            store.set_hard_state(&mut batch, hard_state);
        }
        let started = std::time::Instant::now();
        store.engine().write(batch, must_sync)?;
        if must_sync {
            self.metrics.observe_fsync(started.elapsed());
        }
        Ok(())
    }

    /// Applies `entries` in order, in batches of up to
    /// [`MAX_APPLY_BATCH_ENTRIES`] consecutive entries; a batch is written
    /// (one RocksDB write) only when it is a checkpoint (see
    /// [`crate::state_machine`]). A conf change is applied in a batch of its
    /// own, because what follows it (peers, removal) acts once it is
    /// written. Nobody hears of an entry (its proposer's answer, its
    /// events, the observer) before its batch is finished, and written if
    /// it is to be, so no answer runs ahead of the state a read of this
    /// node would find: key-value records in the engine, the rest in
    /// memory.
    pub(super) fn apply(&mut self, entries: Vec<Entry>) -> Result<(), FatalError> {
        if entries.is_empty() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let mut batch = Batch::new(self.raw.store().engine());
        let mut unannounced = Vec::new();
        for entry in entries {
            let conf_change = entry.get_entry_type() != EntryType::EntryNormal;
            if conf_change || unannounced.len() >= MAX_APPLY_BATCH_ENTRIES {
                self.write_applied(&mut batch, &mut unannounced)?;
            }
            let output = self.apply_entry(&mut batch, &entry)?;
            unannounced.push((entry, output));
            if conf_change {
                self.write_applied(&mut batch, &mut unannounced)?;
            }
        }
        self.write_applied(&mut batch, &mut unannounced)?;
        self.metrics.observe_apply(started.elapsed());
        Ok(())
    }

    /// Finishes `batch` (its last entry's position is applied) and writes
    /// it if it is a checkpoint, leaving an empty one in its place; then
    /// announces each entry it holds: observer, lease clock, events, the
    /// proposer's answer. Each record and the position are written once per
    /// checkpoint, not per entry: the batch is atomic, so only their last
    /// value could ever be read.
    fn write_applied(
        &mut self,
        batch: &mut Batch,
        unannounced: &mut Vec<(Entry, EntryOutput)>,
    ) -> Result<(), FatalError> {
        let Some((last, _)) = unannounced.last() else {
            return Ok(());
        };
        let position = LogPosition {
            index: last.index,
            term: last.term,
        };
        if self.state_machine.finish_batch(batch, position) {
            let written = std::mem::replace(batch, Batch::new(self.raw.store().engine()));
            self.raw.store().engine().write(written, false)?;
        }
        self.state_machine.batch_written();
        self.after_members_changed();
        for (entry, output) in unannounced.drain(..) {
            if let Some(observer) = &mut self.apply_observer {
                observer(&entry, output.result.as_ref());
            }
            self.lease_clock.applied(entry.index);
            if !output.events.is_empty() {
                // No subscriber is fine: nobody is waiting.
                let _ = self.events.send(Arc::new(AppliedEvents {
                    index: LogIndex(entry.index),
                    events: output.events,
                }));
            }
            if let Some(result) = output.result {
                if let Some(command_result::Result::LeaseGranted(granted)) = &result.result {
                    self.lease_clock.granted(
                        self.clock.now(),
                        LeaseId(granted.lease),
                        granted.ttl_ms,
                    );
                }
                self.complete(&entry, result);
            }
        }
        Ok(())
    }

    pub(super) fn apply_entry(
        &mut self,
        batch: &mut Batch,
        entry: &Entry,
    ) -> Result<EntryOutput, FatalError> {
        let undecodable = |what: &str, e: &dyn std::fmt::Display| FatalError::Corruption {
            cf: crate::storage::CF_RAFT_LOG,
            key: entry.index.to_string(),
            reason: format!("committed {what} does not decode: {e}"),
        };
        match entry.get_entry_type() {
            EntryType::EntryNormal if entry.data.is_empty() => Ok(EntryOutput::default()),
            EntryType::EntryNormal => {
                let output = self
                    .state_machine
                    .apply_encoded(batch, entry.index, &entry.data)?;
                self.note_session_activity(output.session, &output.events);
                self.metrics.applied(&output.events, &output.result);
                for event in &output.events {
                    if let Event::LeaseRemoved { lease, .. } = event {
                        self.lease_clock.removed(*lease);
                    }
                }
                Ok(EntryOutput {
                    result: Some(output.result),
                    events: output.events,
                })
            }
            EntryType::EntryConfChange => {
                let change = ConfChange::parse_from_bytes(&entry.data)
                    .map_err(|e| undecodable("conf change", &e))?;
                // The legacy form, as one single-step change of the v2 form.
                let mut single = ConfChangeSingle::default();
                single.set_change_type(change.get_change_type());
                single.node_id = change.node_id;
                let mut v2 = ConfChangeV2::default();
                v2.set_changes(vec![single].into());
                v2.context = change.context;
                let mut converted = entry.clone();
                let data = v2.write_to_bytes();
                converted.data = data.map_err(|e| undecodable("conf change", &e))?.into();
                self.apply_conf_change(batch, &converted)
                    .map(EntryOutput::done)
            }
            EntryType::EntryConfChangeV2 => {
                self.apply_conf_change(batch, entry).map(EntryOutput::done)
            }
        }
    }

    pub(super) fn complete(&mut self, entry: &Entry, result: CommandResult) {
        let Ok(context) = ProposalContext::decode(entry.context.as_ref()) else {
            return;
        };
        if context.node_id != self.id.0 || context.boot_id != self.boot_id {
            return;
        }
        if let Some(pending) = self.proposals.remove(&context.request_id) {
            let _ = pending.reply.send(Ok(Applied {
                index: LogIndex(entry.index),
                term: entry.term,
                result,
            }));
        }
    }
}

/// Whether [`Node::on_ready`] lets other tasks run at its pauses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pause {
    /// Yield to the runtime at each pause.
    Yield,
    /// Never wait: the caller drives the node synchronously.
    Never,
}

impl Pause {
    async fn now(self) {
        if self == Pause::Yield {
            tokio::task::yield_now().await;
        }
    }
}
