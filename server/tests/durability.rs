//! What a leader's answer and a follower's ack promise about their disks. A leader writes its
//! new entries without syncing and leaves the fsync to another thread
//! (`node/log_sync.rs`); raft-rs counts its copy only once that sync is
//! reported. Under a synchronous driver the sync happens at the node's next
//! step, so these tests can cut the power between a leader's write and its
//! sync. A single voter makes the leader's copy the whole quorum: if it
//! counted an unsynced copy, it would commit and answer a write that a
//! power loss then takes back.
//!
//! A follower writes the appends it receives the same way, and its
//! acknowledgement waits for the sync: three voters, node 3 given one
//! append alone, show that no ack leaves before the sync and that a power
//! loss before it takes back only an entry nobody was told was kept.
//!
//! The state machine's checkpoints: the entries applied after the last one
//! are kept by the log alone, so a power loss or a kill (even after the log
//! was compacted) leaves them to be applied again, to the same state.
//!
//! The last tests run the production loop, with the sync on its thread,
//! over a disk whose syncs hang: a leader or a follower whose sync stalls
//! takes no input until it ends, as when the fsync ran on the node task,
//! and the follower's ack waits for that end; past an election timeout
//! the leader refuses new requests at once.

#[allow(dead_code)]
#[path = "fuzz/node.rs"]
mod node;

use std::time::Duration;

use raft::prelude::{Message, MessageType};
use tokio::sync::oneshot::{self, error::TryRecvError};

use latchkey_proto::state::v1::{command, command_result, Command, GrantLease};
use latchkey_proto::v1::RequestId;
use latchkey_server::config::Config;
use latchkey_server::coordination::LeaseId;
use latchkey_server::error::RequestError;
use latchkey_server::node::{Applied, NodeHandle, NodeMsg, Role};
use latchkey_server::storage::{MemoryDisk, PowerLoss};

use node::{lead_alone, TestNode, ELECTION_TICKS};

type Answer = oneshot::Receiver<Result<Applied, RequestError>>;

/// A single voter that leads, with everything of its election applied.
fn leader_on(disk: &MemoryDisk) -> TestNode {
    let mut node = TestNode::start(disk, 1, &[1], ELECTION_TICKS).expect("the node opens");
    lead_alone(&mut node).expect("it leads");
    for _ in 0..3 {
        node.node.tick().expect("it runs");
    }
    let status = node.handle.status();
    assert_eq!(
        status.applied_index, status.last_index,
        "settled: {status:?}"
    );
    node
}

/// Hands a lease grant to the node and lets it take one step.
fn propose_one_step(node: &mut TestNode) -> Answer {
    let answer = propose(&node.handle);
    node.node.handle_inbox().expect("it runs");
    answer
}

const EVERYTHING_UNSYNCED_LOST: PowerLoss = PowerLoss {
    kept_bytes: 0,
    torn_fill: None,
};

#[test]
fn a_write_cut_off_before_the_leaders_sync_is_neither_answered_nor_kept() {
    let disk = MemoryDisk::new();
    let mut node = leader_on(&disk);
    let before = node.handle.status();
    let mut answer = propose_one_step(&mut node);

    let written = node.handle.status();
    assert_eq!(written.last_index, before.last_index + 1, "{written:?}");
    assert_eq!(
        written.commit_index, before.commit_index,
        "committed on an unsynced copy"
    );
    assert!(matches!(answer.try_recv(), Err(TryRecvError::Empty)));
    assert!(disk.unsynced_bytes() > 0, "the entry was synced at once");

    disk.lose_power(EVERYTHING_UNSYNCED_LOST);
    drop(node);
    assert!(
        matches!(answer.try_recv(), Err(TryRecvError::Closed)),
        "the write was answered"
    );
    let node = leader_on(&disk);
    let after = node.handle.status();
    // The new term's empty entry took the lost entry's place.
    assert_eq!(after.last_index, before.last_index + 1, "{after:?}");
    assert!(after.term > written.term, "{after:?}");
}

#[test]
fn a_write_the_leader_answered_survives_a_power_loss() {
    let disk = MemoryDisk::new();
    let mut node = leader_on(&disk);
    let mut answer = propose_one_step(&mut node);
    node.node.tick().expect("it runs");
    let applied = match answer.try_recv() {
        Ok(Ok(applied)) => applied,
        other => panic!("not answered after the sync: {other:?}"),
    };

    disk.lose_power(EVERYTHING_UNSYNCED_LOST);
    drop(node);
    let node = leader_on(&disk);
    let after = node.handle.status();
    assert!(
        after.last_index > applied.index.0,
        "the answered entry {} is gone: {after:?}",
        applied.index.0
    );
    assert!(after.applied_index > applied.index.0, "{after:?}");
}

/// Has a single-voter leader apply `count` lease grants; returns their ids.
fn grant_leases(node: &mut TestNode, count: usize) -> Vec<u64> {
    (0..count)
        .map(
            |_| match node::result_of(node.propose(grant().command.unwrap())).result {
                Some(command_result::Result::LeaseGranted(granted)) => granted.lease,
                other => panic!("not granted: {other:?}"),
            },
        )
        .collect()
}

#[test]
fn answered_entries_after_the_last_checkpoint_survive_a_power_loss_applied_again() {
    let disk = MemoryDisk::new();
    let mut node = leader_on(&disk);
    let leases = grant_leases(&mut node, 20);
    let status = node.handle.status();
    assert!(
        status.checkpoint_index < status.applied_index,
        "the grants wrote no checkpoint: {status:?}"
    );
    let applied = node.handle.coordination().read().clone();

    disk.lose_power(EVERYTHING_UNSYNCED_LOST);
    drop(node);
    let node = leader_on(&disk);
    let after = node.handle.status();
    assert!(after.applied_index > status.applied_index, "{after:?}");
    assert_eq!(*node.handle.coordination().read(), applied);
    for lease in leases {
        assert!(node
            .handle
            .coordination()
            .read()
            .lease(LeaseId(lease))
            .is_some());
    }
}

#[test]
fn a_checkpoint_asked_for_holds_everything_applied_and_a_restart_starts_from_it() {
    let disk = MemoryDisk::new();
    let mut node = leader_on(&disk);
    grant_leases(&mut node, 5);
    let before = node.handle.status();
    assert!(before.checkpoint_index < before.applied_index, "{before:?}");
    node.checkpoint();
    assert_eq!(node.handle.status().checkpoint_index, before.applied_index);

    // The process dies; what it wrote stays (a checkpoint is not synced of
    // its own: the next sync of the log makes it durable).
    drop(node);
    let node = TestNode::start(&disk, 1, &[1], ELECTION_TICKS).expect("the node opens");
    let reopened = node.handle.status();
    assert_eq!(
        (reopened.checkpoint_index, reopened.applied_index),
        (before.applied_index, before.applied_index),
        "{reopened:?}"
    );
}

#[test]
fn a_compacted_log_keeps_every_entry_after_the_last_checkpoint() {
    const COMPACT_AFTER: u64 = 20;
    let config = Config {
        compact_log_after_entries: COMPACT_AFTER,
        ..node::config(1, &[1])
    };
    let disk = MemoryDisk::new();
    let mut node = TestNode::start_with(&disk, &config, ELECTION_TICKS).expect("the node opens");
    lead_alone(&mut node).expect("it leads");
    // Far fewer entries than a checkpoint is due after, none of them a
    // key-value write: only compaction writes one.
    grant_leases(&mut node, 3 * COMPACT_AFTER as usize);
    let status = node.handle.status();
    assert!(
        status.first_index > COMPACT_AFTER,
        "not compacted: {status:?}"
    );
    assert!(
        status.checkpoint_index + 1 >= status.first_index,
        "the log lost entries after the checkpoint: {status:?}"
    );
    let applied = node.handle.coordination().read().clone();

    // Killed: no clean stop's checkpoint.
    drop(node);
    let mut node = TestNode::start_with(&disk, &config, ELECTION_TICKS).expect("it reopens");
    lead_alone(&mut node).expect("it leads again");
    for _ in 0..3 {
        node.node.tick().expect("it runs");
    }
    let after = node.handle.status();
    assert!(after.applied_index > status.applied_index, "{after:?}");
    assert_eq!(*node.handle.coordination().read(), applied);
}

/// Election timeout of the voters that should never campaign here.
const PATIENT_TICKS: usize = 1000;

/// Three voters on memory disks, node 1 leading, every message routed by
/// the test.
struct Trio {
    disks: Vec<MemoryDisk>,
    nodes: Vec<TestNode>,
}

impl Trio {
    fn start() -> Trio {
        let voters = [1, 2, 3];
        let disks: Vec<MemoryDisk> = voters.iter().map(|_| MemoryDisk::new()).collect();
        let nodes = voters
            .iter()
            .zip(&disks)
            .map(|(&id, disk)| {
                let ticks = if id == 1 {
                    ELECTION_TICKS
                } else {
                    PATIENT_TICKS
                };
                TestNode::start(disk, id, &voters, ticks).expect("the node opens")
            })
            .collect();
        let mut trio = Trio { disks, nodes };
        for _ in 0..4 * ELECTION_TICKS {
            trio.nodes[0].node.tick().expect("it runs");
            trio.settle();
            if trio.nodes[0].role() == Role::Leader {
                return trio;
            }
        }
        panic!("node 1 did not become leader");
    }

    /// Steps every node (an empty inbox still steps: a sync deferred at a
    /// node's last step ends at its next) and delivers what they send,
    /// until two rounds in a row send nothing.
    fn settle(&mut self) {
        let mut quiet_rounds = 0;
        for _ in 0..200 {
            for node in &mut self.nodes {
                node.node.handle_inbox().expect("it runs");
            }
            let sent: Vec<Message> = self.nodes.iter().flat_map(|n| n.take_sent()).collect();
            if sent.is_empty() {
                quiet_rounds += 1;
                if quiet_rounds == 2 {
                    return;
                }
                continue;
            }
            quiet_rounds = 0;
            for message in sent {
                let to = usize::try_from(message.to).expect("small id") - 1;
                self.nodes[to]
                    .handle
                    .report(NodeMsg::Raft(Box::new(message)));
            }
        }
        panic!("the nodes still send after 200 rounds");
    }

    /// Hands node 1 (the leader) a proposal and takes one step: returns
    /// its append to node `to`, leaving the others undelivered.
    fn append_of_one_proposal_to(&mut self, to: u64) -> Message {
        // Its answer is not awaited.
        let _answer = propose(&self.nodes[0].handle);
        self.nodes[0].node.handle_inbox().expect("it runs");
        let mut appends: Vec<Message> = self.nodes[0]
            .take_sent()
            .into_iter()
            .filter(|m| m.to == to && m.get_msg_type() == MessageType::MsgAppend)
            .collect();
        assert_eq!(appends.len(), 1, "one append to node {to}");
        appends.remove(0)
    }
}

fn acks(sent: &[Message]) -> Vec<(u64, bool)> {
    sent.iter()
        .filter(|m| m.get_msg_type() == MessageType::MsgAppendResponse)
        .map(|m| (m.index, m.reject))
        .collect()
}

#[test]
fn a_follower_acknowledges_an_append_only_once_it_has_synced_it() {
    let mut trio = Trio::start();
    let before = trio.nodes[2].handle.status().last_index;

    // The leader's append of one proposal, delivered to node 3 alone.
    let append = trio.append_of_one_proposal_to(3);
    trio.nodes[2].handle.report(NodeMsg::Raft(Box::new(append)));
    trio.nodes[2].node.handle_inbox().expect("it runs");
    assert_eq!(trio.nodes[2].handle.status().last_index, before + 1);
    assert_eq!(
        acks(&trio.nodes[2].take_sent()),
        vec![],
        "node 3 acknowledged an entry it has not synced"
    );
    assert!(trio.disks[2].unsynced_bytes() > 0, "synced at once");

    // A power loss now takes the entry back, and nobody was told it was kept.
    let cut = trio.disks[2].clone_for_test();
    cut.lose_power(EVERYTHING_UNSYNCED_LOST);
    let restarted = TestNode::start(&cut, 3, &[1, 2, 3], PATIENT_TICKS).expect("node 3 reopens");
    assert_eq!(restarted.handle.status().last_index, before);

    // Its next step syncs it, and only then does the ack leave.
    trio.nodes[2].node.handle_inbox().expect("it runs");
    assert_eq!(acks(&trio.nodes[2].take_sent()), vec![(before + 1, false)]);
    assert_eq!(trio.disks[2].unsynced_bytes(), 0);
}

/// Deadline for what must happen once the stall ends; not a measurement.
const DEADLINE: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_sync_stalls_takes_no_input_and_refuses_requests_until_it_ends() {
    let disk = MemoryDisk::new();
    let TestNode { node, handle, .. } =
        TestNode::start(&disk, 1, &[1], ELECTION_TICKS).expect("the node opens");
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(node.run(async {
        let _ = stopped.await;
    }));
    let elected = tokio::time::timeout(DEADLINE, async {
        loop {
            let status = handle.status();
            if status.role == Role::Leader && status.applied_index == status.last_index {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    elected.await.expect("a single voter leads");

    let stall = disk.stall_syncs();
    // One write without a session (a one-shot client's, which cannot be
    // resent safely) and one with (resent under its request id, applied
    // at most once).
    let mut written = propose(&handle);
    let (reply, mut in_session) = oneshot::channel();
    let mut command = grant();
    command.request = Some(RequestId {
        client_id: 77,
        seq: 1,
        oldest_pending_seq: 1,
    });
    handle.report(NodeMsg::Propose { command, reply });
    // Six ticks (50 ms each in this configuration): the sync is overdue
    // after one, and the loop notices at its next turn, which a loaded
    // machine may run late; short of twice the election timeout (600 ms)
    // counted from then, after which the node refuses requests.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = handle.status();
    assert!(before.last_index > before.commit_index, "{before:?}");
    let (reply, mut remaining) = oneshot::channel();
    handle.report(NodeMsg::LeasesRemaining {
        leases: Vec::new(),
        reply,
    });
    let mut queued = propose(&handle);
    for answer in [&mut written, &mut in_session] {
        assert!(
            matches!(answer.try_recv(), Err(TryRecvError::Empty)),
            "a write was answered before its sync"
        );
    }
    assert!(!handle.status().sync_stalled, "{:?}", handle.status());

    // Past twice the election timeout it says so. The session's write in
    // flight ends as on a loss of leadership (outcome unknown), the
    // one-shot write waits, the request still in its inbox is refused as
    // never proposed, and so is a new one, at once; other input waits for
    // the stall's end.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(handle.status().sync_stalled, "{:?}", handle.status());
    assert!(
        matches!(in_session.try_recv(), Ok(Err(RequestError::LeadershipLost))),
        "the session's write in flight is not answered 'outcome unknown'"
    );
    assert!(
        matches!(written.try_recv(), Err(TryRecvError::Empty)),
        "the one-shot write in flight did not wait"
    );
    assert!(
        matches!(queued.try_recv(), Ok(Err(RequestError::SyncStalled))),
        "the request in the inbox is not refused"
    );
    let refused = tokio::time::timeout(DEADLINE, handle.propose(grant())).await;
    assert!(
        matches!(refused, Ok(Err(RequestError::SyncStalled))),
        "{refused:?}"
    );
    assert!(
        matches!(remaining.try_recv(), Err(TryRecvError::Empty)),
        "the leader took input while its sync stalled"
    );
    assert_eq!(handle.status().commit_index, before.commit_index);

    drop(stall);
    let answered = tokio::time::timeout(DEADLINE, remaining).await;
    assert!(matches!(answered, Ok(Ok(_))), "{answered:?}");
    // Both writes were kept: a single voter commits them once its sync
    // ends; the one-shot write is answered then.
    let applied = tokio::time::timeout(DEADLINE, written).await;
    assert!(matches!(applied, Ok(Ok(Ok(_)))), "{applied:?}");
    let committed = tokio::time::timeout(DEADLINE, async {
        while handle.status().applied_index < before.last_index {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    committed
        .await
        .expect("the session's write is applied after the stall");
    assert!(!handle.status().sync_stalled, "{:?}", handle.status());
    let accepted = tokio::time::timeout(DEADLINE, handle.propose(grant())).await;
    assert!(matches!(accepted, Ok(Ok(_))), "{accepted:?}");
    let _ = stop.send(());
    let result = tokio::time::timeout(DEADLINE, running).await;
    assert!(matches!(result, Ok(Ok(Ok(())))), "{result:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_whose_sync_stalls_takes_no_input_and_acks_nothing_until_it_ends() {
    let mut trio = Trio::start();
    let _first = propose(&trio.nodes[0].handle);
    trio.nodes[0].node.handle_inbox().expect("it runs");
    trio.settle();
    // Node 3 again, from its disk, this time in the production loop (its
    // syncs on their thread); the test routes the leader's messages to it.
    let disk = trio.disks[2].clone_for_test();
    let TestNode {
        node,
        handle,
        outbox,
    } = TestNode::start(&disk, 3, &[1, 2, 3], PATIENT_TICKS).expect("node 3 reopens");
    let before = handle.status().last_index;
    assert_eq!(before, trio.nodes[0].handle.status().last_index);
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(node.run(async {
        let _ = stopped.await;
    }));

    let stall = disk.stall_syncs();
    let append = trio.append_of_one_proposal_to(3);
    handle.report(NodeMsg::Raft(Box::new(append)));
    let written = tokio::time::timeout(DEADLINE, async {
        while handle.status().last_index <= before {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    written.await.expect("node 3 writes the append");
    // Many ticks (50 ms each in this configuration): the sync is overdue.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (reply, mut remaining) = oneshot::channel();
    handle.report(NodeMsg::LeasesRemaining {
        leases: Vec::new(),
        reply,
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        matches!(remaining.try_recv(), Err(TryRecvError::Empty)),
        "the follower took input while its sync stalled"
    );
    assert_eq!(
        acks(&outbox.lock()),
        vec![],
        "the follower acknowledged an append before its sync"
    );

    drop(stall);
    let answered = tokio::time::timeout(DEADLINE, remaining).await;
    assert!(matches!(answered, Ok(Ok(_))), "{answered:?}");
    let acked = tokio::time::timeout(DEADLINE, async {
        loop {
            let acked = acks(&outbox.lock());
            if !acked.is_empty() {
                return acked;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    assert_eq!(
        acked.await.expect("an ack after the sync"),
        vec![(before + 1, false)]
    );
    assert_eq!(disk.unsynced_bytes(), 0);
    let _ = stop.send(());
    let result = tokio::time::timeout(DEADLINE, running).await;
    assert!(matches!(result, Ok(Ok(Ok(())))), "{result:?}");
}

/// Hands a lease grant to a running node.
fn propose(handle: &NodeHandle) -> Answer {
    let (reply, answer) = oneshot::channel();
    handle.report(NodeMsg::Propose {
        command: grant(),
        reply,
    });
    answer
}

fn grant() -> Command {
    Command {
        command: Some(command::Command::GrantLease(GrantLease {
            ttl_ms: 60_000,
            ..GrantLease::default()
        })),
        request: None,
    }
}
