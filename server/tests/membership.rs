//! Membership changes, leader transfer and graceful stops, against an
//! in-process cluster on loopback (real gRPC, RocksDB in temp dirs).

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use latchkey_client::cluster::MemberStatus;
use latchkey_client::Client;
use latchkey_server::error::FatalError;
use latchkey_server::membership::Change;
use latchkey_server::node::Role;
use latchkey_server::types::NodeId;
use support::{TestCluster, DEADLINE};

async fn connect_admin(cluster: &TestCluster) -> Client {
    Client::builder(cluster.endpoints().split(','))
        .sessionless()
        .connect()
        .await
        .expect("connect")
}

async fn members(client: &Client) -> BTreeMap<u64, MemberStatus> {
    client
        .members()
        .await
        .expect("member list")
        .into_iter()
        .map(|member| (member.id, member))
        .collect()
}

/// Waits until `member list` shows `id` as a caught-up, answering learner.
async fn caught_up_learner(client: &Client, id: u64) {
    let start = Instant::now();
    loop {
        if let Some(member) = members(client).await.get(&id) {
            if member.learner && member.active && member.lag <= 10 {
                return;
            }
        }
        assert!(start.elapsed() < DEADLINE, "learner {id} never caught up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a load of lock cycles and fenced increments saw.
#[derive(Default, Debug)]
struct LoadReport {
    cycles: u64,
    errors: Vec<String>,
    /// Every token granted, in order.
    tokens: Vec<u64>,
    /// The last value written to the counter and acknowledged.
    acked: u64,
}

/// Lock, fenced increment of a counter, release — until `stop`.
async fn load(endpoints: String, stop: Arc<AtomicBool>) -> LoadReport {
    let client = Client::connect(endpoints.split(','))
        .await
        .expect("connect");
    let lease = client
        .grant_lease(Duration::from_secs(5))
        .await
        .expect("lease");
    let mut report = LoadReport::default();
    // Bounded by `stop`, set by the test within its deadline.
    while !stop.load(Ordering::Relaxed) {
        let step = async {
            let guard = lease.lock("load").await?;
            let current = client.get("counter").await?;
            let value: u64 = current
                .map(|kv| String::from_utf8_lossy(&kv.value).parse().unwrap_or(0))
                .unwrap_or(0);
            client
                .put("counter", (value + 1).to_string())
                .fence(&guard)
                .await?;
            let token = guard.token().0;
            guard.release().await?;
            Ok::<_, latchkey_client::Error>((token, value + 1))
        };
        match step.await {
            Ok((token, value)) => {
                report.cycles += 1;
                report.tokens.push(token);
                report.acked = value;
            }
            Err(error) => report.errors.push(error.to_string()),
        }
    }
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_a_node_under_load_adds_a_learner_promotes_it_and_removes_the_old_one() {
    let mut cluster = TestCluster::start(5, 10_000).await;
    let old = cluster.leader().await;
    let stop = Arc::new(AtomicBool::new(false));
    let worker = tokio::spawn(load(cluster.endpoints(), stop.clone()));
    cluster.join(NodeId(6)).await;
    let admin = connect_admin(&cluster).await;
    caught_up_learner(&admin, 6).await;
    let promoted = admin.promote_member(6).await.expect("promote 6");
    assert!(promoted.iter().any(|m| m.id == 6 && !m.learner));
    // The old leader is removed: it hands its leadership on first.
    let left = admin.remove_member(old.0).await.expect("remove the leader");
    assert!(!left.iter().any(|m| m.id == old.0), "{left:?}");
    let removed = cluster.servers.remove(&old).expect("old node ran");
    let stopped = removed.shutdown().await;
    assert!(
        matches!(stopped, Ok(()) | Err(FatalError::Removed(_))),
        "{stopped:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let report = worker.await.expect("load task");
    assert!(report.errors.is_empty(), "clients saw errors: {report:?}");
    assert!(report.cycles > 0, "the load made progress");
    assert!(
        report.tokens.windows(2).all(|pair| pair[0] < pair[1]),
        "tokens keep increasing: {:?}",
        report.tokens
    );
    let admin = connect_admin(&cluster).await;
    let after = members(&admin).await;
    let expected: Vec<u64> = (1..=6).filter(|id| *id != old.0).collect();
    assert_eq!(after.keys().copied().collect::<Vec<_>>(), expected);
    assert!(after.values().all(|m| !m.learner), "{after:?}");
    let counter = admin.get("counter").await.expect("read").expect("written");
    assert_eq!(
        String::from_utf8_lossy(&counter.value),
        report.acked.to_string(),
        "no acknowledged increment was lost"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_membership_changes_are_refused_and_change_nothing() {
    let cluster = TestCluster::start(5, 10_000).await;
    cluster.leader().await;
    let admin = connect_admin(&cluster).await;
    let before = members(&admin).await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let reachable = listener.local_addr().expect("addr").to_string();
    let in_use = before[&3].peer_addr.clone();
    let refusals = [
        (
            admin.add_member(3, &reachable, "127.0.0.1:1").await,
            "already in use",
        ),
        (
            admin.add_member(9, &in_use, "127.0.0.1:1").await,
            "already member 3",
        ),
        (
            admin.add_member(9, "127.0.0.1:1", "127.0.0.1:2").await,
            "cannot reach",
        ),
        (
            admin.add_member(9, "nowhere", "127.0.0.1:2").await,
            "not HOST:PORT",
        ),
        (admin.promote_member(9).await, "not a member"),
        (admin.promote_member(3).await, "already a voter"),
        (admin.remove_member(9).await, "not a member"),
    ];
    for (result, expected) in refusals {
        let error = result.expect_err(expected).to_string();
        assert!(error.contains(expected), "{expected:?} not in {error:?}");
    }
    assert_eq!(
        members(&admin).await.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>()
    );
    drop(listener);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_that_would_leave_no_answering_quorum_is_refused() {
    let mut cluster = TestCluster::start(5, 10_000).await;
    let leader = cluster.leader().await;
    let followers: Vec<NodeId> = cluster
        .servers_ids()
        .into_iter()
        .filter(|id| *id != leader)
        .collect();
    cluster.stop(followers[0]).await;
    cluster.stop(followers[1]).await;
    // Let the leader notice that the two are gone.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let admin = connect_admin(&cluster).await;
    let refused = admin
        .remove_member(followers[2].0)
        .await
        .expect_err("would leave 2 of 4 voters answering");
    assert!(refused.to_string().contains("quorum"), "{refused}");
    assert_eq!(members(&admin).await.len(), 5, "nothing changed");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_change_while_one_is_in_progress_is_refused() {
    let cluster = TestCluster::start(3, 10_000).await;
    let leader = cluster.leader().await;
    let node = cluster.servers[&leader].node.clone();
    let listeners: Vec<_> = (0..2)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let add = |id: u64, listener: &std::net::TcpListener| Change::AddLearner {
        id: NodeId(id),
        peer_addr: listener.local_addr().expect("addr").to_string(),
        client_addr: "127.0.0.1:9".into(),
    };
    let (first, second) = tokio::join!(
        node.change_members(add(7, &listeners[0])),
        node.change_members(add(8, &listeners[1]))
    );
    let outcomes = [first.is_ok(), second.is_ok()];
    assert_eq!(
        outcomes.iter().filter(|ok| **ok).count(),
        1,
        "{first:?} {second:?}"
    );
    let refused = first.err().or(second.err()).expect("one refused");
    assert!(refused.to_string().contains("in progress"), "{refused}");
    cluster.shutdown().await;
}

/// A leader that was just handed the leadership (as when the old leader is
/// removed) cannot propose a conf change until it has applied the log of
/// earlier terms; a change that reaches it then waits for that instead of
/// being refused as if another change were in progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_that_reaches_a_new_leader_at_once_waits_for_it_and_applies() {
    let cluster = TestCluster::start(3, 10_000).await;
    let old = cluster.leader().await;
    let successor = *cluster
        .servers
        .keys()
        .find(|id| **id != old)
        .expect("another node");
    let node = cluster.servers[&successor].node.clone();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let add = Change::AddLearner {
        id: NodeId(7),
        peer_addr: listener.local_addr().expect("addr").to_string(),
        client_addr: "127.0.0.1:9".into(),
    };
    let handover = cluster.servers[&old].node.clone();
    let transfer = tokio::spawn(async move { handover.transfer_leader(Some(successor)).await });
    // Sent again and again until the successor leads: the first one it
    // takes as leader comes in before it has applied its term's first entry.
    let deadline = Instant::now() + DEADLINE;
    let outcome = loop {
        assert!(Instant::now() < deadline, "{successor} never led");
        match node.change_members(add.clone()).await {
            Err(e) if e.to_string().contains("not the leader") => {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            other => break other,
        }
    };
    outcome.expect("the change waits for the new leader instead of being refused");
    assert_eq!(node.status().role, Role::Leader);
    let started = transfer.await.expect("transfer task");
    assert!(matches!(started, Ok(to) if to == successor), "{started:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_survives_a_restart_of_every_node() {
    let mut cluster = TestCluster::start(3, 10_000).await;
    cluster.leader().await;
    cluster.join(NodeId(4)).await;
    let admin = connect_admin(&cluster).await;
    caught_up_learner(&admin, 4).await;
    admin.promote_member(4).await.expect("promote");
    drop(admin);
    let ids = cluster.servers_ids();
    for id in &ids {
        cluster.stop(*id).await;
    }
    for id in &ids {
        cluster.restart(*id).await;
    }
    cluster.leader().await;
    let admin = connect_admin(&cluster).await;
    let after = members(&admin).await;
    assert_eq!(after.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    assert!(after.values().all(|m| !m.learner), "{after:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_moves_to_the_named_voter_and_a_stopping_leader_hands_it_on() {
    let mut cluster = TestCluster::start(5, 10_000).await;
    let leader = cluster.leader().await;
    let target = cluster
        .servers_ids()
        .into_iter()
        .find(|id| *id != leader)
        .expect("a follower");
    let admin = connect_admin(&cluster).await;
    admin.transfer_leadership(target.0).await.expect("transfer");
    assert_eq!(cluster.leader().await, target);
    assert!(admin.transfer_leadership(42).await.is_err(), "not a member");
    let stopping = cluster.servers.remove(&target).expect("running");
    let started = Instant::now();
    stopping.graceful_shutdown().await.expect("clean stop");
    let next = cluster.leader().await;
    println!(
        "leadership moved in {:?} after the stop began",
        started.elapsed()
    );
    assert_ne!(next, target);
    let roles: Vec<Role> = cluster
        .servers
        .values()
        .map(|s| s.node.status().role)
        .collect();
    assert_eq!(roles.iter().filter(|r| **r == Role::Leader).count(), 1);
    cluster.shutdown().await;
}
