//! Chunked snapshots: a node that fell behind the compacted log, and a
//! learner that joins, catch up through a snapshot file streamed in chunks.
//!
//! The state machine is `LATCHKEY_SNAPSHOT_TEST_MB` megabytes (default 16,
//! so that the suite stays quick); `LATCHKEY_SNAPSHOT_TEST_MB=210` is the
//! documented run with a state machine of over 200 MB.

mod support;

use std::time::{Duration, Instant};

use latchkey_proto::v1::PutRequest;
use latchkey_server::types::NodeId;
use support::TestCluster;

/// Values written per megabyte of state.
const VALUE_BYTES: usize = 512 * 1024;
/// Longest wait for a node to catch up, per 100 MB of state.
const CATCH_UP_DEADLINE_PER_100_MB: Duration = Duration::from_secs(120);

fn state_megabytes() -> usize {
    std::env::var("LATCHKEY_SNAPSHOT_TEST_MB")
        .ok()
        .and_then(|mb| mb.parse().ok())
        .unwrap_or(16)
}

/// Writes `megabytes` of values through the leader.
async fn fill(cluster: &TestCluster, megabytes: usize) {
    let values = megabytes * 1024 * 1024 / VALUE_BYTES;
    for i in 0..values {
        let leader = cluster.leader().await;
        let value = vec![b'a' + (i % 26) as u8; VALUE_BYTES];
        let request = PutRequest {
            key: format!("big/{i:05}").into_bytes(),
            value,
            ..PutRequest::default()
        };
        cluster
            .client(leader)
            .await
            .put(request)
            .await
            .unwrap_or_else(|e| panic!("put {i}: {e}"));
    }
}

/// Waits until node `id` has applied everything the leader has, then checks
/// a value from the far end of the state through it.
async fn caught_up(cluster: &TestCluster, id: NodeId, megabytes: usize) {
    let deadline = CATCH_UP_DEADLINE_PER_100_MB * (megabytes as u32 / 100 + 1);
    let start = Instant::now();
    let leader = cluster.leader().await;
    let target = cluster.servers[&leader].node.status().commit_index;
    cluster.wait_applied_within(id, target, deadline).await;
    let status = cluster.servers[&id].node.status();
    assert!(
        status.first_index > 2,
        "node {id} installed a snapshot (its log starts at {})",
        status.first_index
    );
    let last = megabytes * 1024 * 1024 / VALUE_BYTES - 1;
    let value = cluster
        .get(id, &format!("big/{last:05}"), true)
        .await
        .expect("the last value is there");
    assert_eq!(value.len(), VALUE_BYTES);
    println!(
        "node {id} caught up on {megabytes} MB in {:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_the_compacted_log_catches_up_through_a_chunked_snapshot() {
    let megabytes = state_megabytes();
    let mut cluster = TestCluster::start(3, 20).await;
    let leader = cluster.leader().await;
    let behind = cluster
        .servers_ids()
        .into_iter()
        .find(|id| *id != leader)
        .expect("a follower");
    cluster.stop(behind).await;
    fill(&cluster, megabytes).await;
    let leader = cluster.leader().await;
    assert!(
        cluster.servers[&leader].node.status().first_index > 10,
        "the log was compacted past what the stopped node has"
    );
    cluster.restart(behind).await;
    caught_up(&cluster, behind, megabytes).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_learner_catches_up_through_a_chunked_snapshot() {
    let megabytes = state_megabytes();
    let mut cluster = TestCluster::start(3, 20).await;
    cluster.leader().await;
    fill(&cluster, megabytes).await;
    cluster.join(NodeId(4)).await;
    caught_up(&cluster, NodeId(4), megabytes).await;
    cluster.shutdown().await;
}
