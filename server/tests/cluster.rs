//! In-process cluster tests: five nodes in one process, talking over real
//! loopback gRPC, each with its own RocksDB in a temp dir.

mod support;

use latchkey_proto::v1::PutRequest;
use latchkey_server::types::NodeId;
use support::TestCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_elect_commit_and_survive_losing_the_leader() {
    let mut cluster = TestCluster::start(5, 10_000).await;
    let first_leader = cluster.leader().await;
    for i in 0..20 {
        cluster
            .put(&format!("key-{i}"), &format!("value-{i}"))
            .await;
    }
    for id in cluster.servers.keys() {
        assert_eq!(
            cluster.get(*id, "key-19", false).await.as_deref(),
            Some("value-19")
        );
    }

    cluster.stop(first_leader).await;
    let second_leader = cluster.leader().await;
    assert_ne!(second_leader, first_leader);
    cluster.put("after-failover", "yes").await;
    for id in cluster.servers.keys() {
        for i in 0..20 {
            let value = cluster.get(*id, &format!("key-{i}"), false).await;
            assert_eq!(value, Some(format!("value-{i}")), "node {id} lost key-{i}");
        }
    }

    cluster.restart(first_leader).await;
    let revision = cluster.put("after-restart", "caught-up").await;
    cluster.wait_applied(first_leader, revision).await;
    assert_eq!(
        cluster
            .get(first_leader, "after-failover", true)
            .await
            .as_deref(),
        Some("yes"),
        "restarted node caught up from the log"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_node_catches_up_by_snapshot_after_compaction() {
    let mut cluster = TestCluster::start(5, 8).await;
    let leader = cluster.leader().await;
    let lagging = NodeId(if leader.0 == 5 { 4 } else { 5 });
    cluster.put("before", "stop").await;
    cluster.stop(lagging).await;
    let mut last = 0;
    for i in 0..40 {
        last = cluster.put(&format!("k{i}"), &format!("v{i}")).await;
    }
    let leader = cluster.leader().await;
    let leader_status = cluster.servers[&leader].node.status();
    assert!(
        leader_status.first_index > 10,
        "leader compacted its log: {leader_status:?}"
    );

    cluster.restart(lagging).await;
    cluster.wait_applied(lagging, last).await;
    let status = cluster.servers[&lagging].node.status();
    assert!(
        status.first_index > 10,
        "the lagging node's log starts after a snapshot: {status:?}"
    );
    assert_eq!(
        cluster.get(lagging, "k39", true).await.as_deref(),
        Some("v39")
    );
    assert_eq!(
        cluster.get(lagging, "before", true).await.as_deref(),
        Some("stop")
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_rejects_writes_with_a_leader_hint() {
    let cluster = TestCluster::start(3, 10_000).await;
    let leader = cluster.leader().await;
    let follower = *cluster.servers.keys().find(|id| **id != leader).unwrap();
    let request = PutRequest {
        key: "k".into(),
        value: "v".into(),
        ..Default::default()
    };
    let status = cluster
        .client(follower)
        .await
        .put(request)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    let hint = status
        .metadata()
        .get("latchkey-leader-addr")
        .expect("leader hint");
    assert_eq!(
        hint.to_str().unwrap(),
        cluster.servers[&leader].client_addr.to_string()
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_keys_are_rejected_and_change_nothing() {
    let cluster = TestCluster::start(3, 10_000).await;
    let revision = cluster.put("warm", "up").await;
    let leader = cluster.leader().await;
    cluster.wait_applied(leader, revision).await;
    let before = cluster.servers[&leader].node.status().applied_index;
    let mut client = cluster.client(leader).await;
    let empty = client
        .put(PutRequest {
            key: vec![],
            value: "v".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(empty.code(), tonic::Code::InvalidArgument);
    assert!(empty.message().contains("key"), "{}", empty.message());
    let long = client
        .put(PutRequest {
            key: vec![b'a'; 5000],
            value: "v".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(long.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        cluster.servers[&leader].node.status().applied_index,
        before,
        "a rejected write proposes nothing"
    );
    cluster.shutdown().await;
}
