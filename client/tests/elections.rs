//! Elections against a five-node in-process cluster.

use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use latchkey_client::{Election, Error, Fenced, FencingToken, GrantInfo, Lease};
use latchkey_proto::v1::lease_client::LeaseClient;
use latchkey_proto::v1::LeaseTimeToLiveRequest;
use tokio::time::Instant;

mod support;

use support::{within, TestCluster, DEADLINE};

const TTL: Duration = Duration::from_secs(10);

type Changes = Pin<Box<dyn Stream<Item = Result<Option<GrantInfo>, Error>> + Send>>;

/// The next change: `None` for "no leader", else the leader's token and value.
async fn next_change(changes: &mut Changes) -> Option<(FencingToken, String)> {
    let change = within("next leader change", changes.next())
        .await
        .expect("the stream goes on")
        .expect("no error");
    change.map(|leader| {
        let value = String::from_utf8(leader.value).expect("utf-8 value");
        (leader.token, value)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_sees_leader_changes_in_order() {
    let cluster = TestCluster::start(5).await;
    let client = cluster.client().await;
    let election = client.election("primary");
    let mut changes: Changes = Box::pin(election.observe());
    assert_eq!(next_change(&mut changes).await, None);

    let first = client.grant_lease(TTL).await.expect("grant");
    let one = election.campaign(&first, "one").await.expect("elected");
    assert_eq!(
        next_change(&mut changes).await,
        Some((one.token(), "one".into()))
    );
    assert_eq!(
        election.leader().await.expect("leader").map(|l| l.token),
        Some(one.token())
    );

    let second = client.grant_lease(TTL).await.expect("grant");
    let candidate = tokio::spawn(campaign(election.clone(), second.clone(), "two"));
    wait_until_waiting(&cluster, &second, "primary").await;

    one.proclaim("one-b").await.expect("proclaim");
    assert_eq!(
        next_change(&mut changes).await,
        Some((one.token(), "one-b".into()))
    );

    let one_token = one.token();
    one.resign().await.expect("resign");
    let two = within("second elected", candidate)
        .await
        .expect("campaign task")
        .expect("elected");
    assert!(two.token() > one_token);
    assert_eq!(
        next_change(&mut changes).await,
        Some((two.token(), "two".into()))
    );

    two.resign().await.expect("resign");
    assert_eq!(next_change(&mut changes).await, None);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_keeps_delivering_after_the_leader_node_stops() {
    let mut cluster = TestCluster::start(5).await;
    let client = cluster.client().await;
    let election = client.election("primary");
    let mut changes: Changes = Box::pin(election.observe());
    assert_eq!(next_change(&mut changes).await, None);
    let first = client.grant_lease(TTL).await.expect("grant");
    let one = election.campaign(&first, "one").await.expect("elected");
    assert_eq!(
        next_change(&mut changes).await,
        Some((one.token(), "one".into()))
    );

    // The client streams from the node it knows as leader.
    let leader = cluster.leader().await;
    cluster.stop(leader).await;
    cluster.leader().await;

    one.resign().await.expect("resign after the leader change");
    assert_eq!(next_change(&mut changes).await, None);
    let second = client.grant_lease(TTL).await.expect("grant");
    let two = election.campaign(&second, "two").await.expect("elected");
    assert_eq!(
        next_change(&mut changes).await,
        Some((two.token(), "two".into()))
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deposed_leaders_fenced_write_is_rejected_with_stale_token() {
    let cluster = TestCluster::start(5).await;
    let client = cluster.client().await;
    let election = client.election("primary");
    let first = client.grant_lease(TTL).await.expect("grant");
    let one = election.campaign(&first, "one").await.expect("elected");
    client
        .put("config", "from-one")
        .fence(&one)
        .await
        .expect("leader writes");
    let deposed = one.fence();
    first.revoke().await.expect("revoke");

    let second = client.grant_lease(TTL).await.expect("grant");
    let two = election.campaign(&second, "two").await.expect("elected");
    match client.put("config", "late").fence(&deposed).await {
        Err(Error::StaleToken {
            presented, current, ..
        }) => assert_eq!((presented, current), (one.token(), Some(two.token()))),
        result => panic!("expected StaleToken, got {result:?}"),
    }
    match one.proclaim("still me").await {
        Err(Error::StaleToken { .. }) => {}
        result => panic!("expected StaleToken, got {result:?}"),
    }
    let stored = client.get("config").await.expect("get").expect("exists");
    assert_eq!(stored.value, b"from-one");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaigning_again_gives_the_leadership_back_with_the_value_it_leads_with() {
    let cluster = TestCluster::start(5).await;
    let client = cluster.client().await;
    let election = client.election("primary");
    let first = client.grant_lease(TTL).await.expect("grant");
    let one = election.campaign(&first, "one").await.expect("elected");
    assert_eq!(one.value(), b"one");

    let again = election
        .campaign(&first, "one-again")
        .await
        .expect("given back");
    assert_eq!(again.token(), one.token());
    assert_eq!(again.value(), b"one", "a second campaign publishes nothing");
    let leader = election.leader().await.expect("leader").expect("a leader");
    assert_eq!((leader.token, leader.value), (one.token(), b"one".to_vec()));
    again.resign().await.expect("resign");
    cluster.shutdown().await;
}

async fn campaign(
    election: Election,
    lease: Lease,
    value: &'static str,
) -> Result<latchkey_client::Leadership, Error> {
    election.campaign(&lease, value).await
}

/// Waits until `lease` is queued for `name`.
async fn wait_until_waiting(cluster: &TestCluster, lease: &Lease, name: &str) {
    let start = Instant::now();
    loop {
        let leader = cluster.leader().await;
        let request = LeaseTimeToLiveRequest {
            lease: lease.id().0,
            serializable: false,
        };
        let answer = LeaseClient::new(cluster.channel(leader).await)
            .time_to_live(request)
            .await
            .expect("time to live")
            .into_inner();
        if answer.waiting.iter().any(|waiting| waiting == name) {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "lease {} never queued for {name}",
            lease.id()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
