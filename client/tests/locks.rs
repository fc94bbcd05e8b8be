//! Locks and the fenced store against a five-node in-process cluster.

use std::time::Duration;

use latchkey_client::{Client, Error, Fenced, LeaseState};
use latchkey_proto::v1::lock_client::LockClient;
use latchkey_proto::v1::DescribeRequest;
use tokio::time::Instant;

mod support;

use support::{within, TestCluster, DEADLINE};

const TTL: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_lock_on_a_held_lock_returns_lock_held_with_the_holders_token() {
    let cluster = TestCluster::start(5).await;
    let client = cluster.client().await;
    let holder = client.grant_lease(TTL).await.expect("grant");
    let other = client.grant_lease(TTL).await.expect("grant");
    let guard = holder.try_lock("job").await.expect("free lock");

    match other.try_lock("job").await {
        Err(Error::LockHeld {
            name,
            holder_lease,
            holder_token,
        }) => {
            assert_eq!(name, "job");
            assert_eq!((holder_lease, holder_token), (holder.id(), guard.token()));
        }
        result => panic!("expected LockHeld, got {result:?}"),
    }
    let again = holder
        .try_lock("job")
        .await
        .expect("the holder re-acquires");
    assert_eq!(again.token(), guard.token(), "same grant, same token");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_lock_is_granted_with_a_higher_token_when_the_holder_releases() {
    let cluster = TestCluster::start(5).await;
    let client = cluster.client().await;
    let first = client.grant_lease(TTL).await.expect("grant");
    let second = client.grant_lease(TTL).await.expect("grant");
    let guard = first.lock("job").await.expect("free lock");
    let first_token = guard.token();

    let waiter = tokio::spawn(async move { second.lock("job").await });
    wait_for_waiters(&cluster, "job", 1).await;
    guard.release().await.expect("release");
    let granted = within("waiter granted", waiter)
        .await
        .expect("waiter task")
        .expect("granted");
    assert!(granted.token() > first_token);
    assert_eq!(granted.state(), LeaseState::Held);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_with_timeout_gives_up_and_leaves_the_queue() {
    let cluster = TestCluster::start(5).await;
    let client = cluster.client().await;
    let holder = client.grant_lease(TTL).await.expect("grant");
    let impatient = client.grant_lease(TTL).await.expect("grant");
    let guard = holder.try_lock("job").await.expect("free lock");

    let waited = impatient
        .lock_with_timeout("job", Duration::from_millis(300))
        .await;
    assert!(
        matches!(waited, Err(Error::Timeout { .. })),
        "expected Timeout, got {waited:?}"
    );
    wait_for_waiters(&cluster, "job", 0).await;
    guard.release().await.expect("release");
    let third = client.grant_lease(TTL).await.expect("grant");
    third
        .try_lock("job")
        .await
        .expect("nobody else was queued for the released lock");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_put_with_a_released_guards_token_fails_with_stale_token() {
    let cluster = TestCluster::start(5).await;
    let client = cluster.client().await;
    let first = client.grant_lease(TTL).await.expect("grant");
    let guard = first.lock("job").await.expect("free lock");
    let revision = client
        .put("counter", "1")
        .fence(&guard)
        .await
        .expect("current holder writes");
    let stale = guard.fence();
    guard.release().await.expect("release");

    match client.put("counter", "stale").fence(&stale).await {
        Err(Error::StaleToken {
            presented, current, ..
        }) => assert_eq!((presented, current), (stale.token, None)),
        result => panic!("expected StaleToken, got {result:?}"),
    }

    let second = client.grant_lease(TTL).await.expect("grant");
    let next = second.lock("job").await.expect("free lock");
    match client.put("counter", "stale").fence(&stale).await {
        Err(Error::StaleToken {
            presented, current, ..
        }) => assert_eq!((presented, current), (stale.token, Some(next.token()))),
        result => panic!("expected StaleToken, got {result:?}"),
    }
    match client.delete("counter").fence(&stale).await {
        Err(Error::StaleToken { .. }) => {}
        result => panic!("expected StaleToken, got {result:?}"),
    }

    let stored = client.get("counter").await.expect("get").expect("exists");
    assert_eq!(stored.value, b"1", "refused writes change nothing");
    assert_eq!(stored.mod_revision, revision);
    assert_eq!(stored.token, Some(stale.token));
    assert_eq!(stored.fence_name.as_deref(), Some("job"));

    client
        .put("counter", "2")
        .fence(&next)
        .await
        .expect("the new holder writes");
    let stored = client.get("counter").await.expect("get").expect("exists");
    assert_eq!(stored.token, Some(next.token()));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_set_on_a_changed_key_fails_with_revision_mismatch() {
    let cluster = TestCluster::start(5).await;
    let client = cluster.client().await;
    let created = client.put("k", "a").if_absent().await.expect("create");
    client.put("k", "b").await.expect("overwrite");
    match client.put("k", "c").if_mod_revision(created).await {
        Err(Error::RevisionMismatch {
            expected, actual, ..
        }) => {
            assert_eq!(expected, created);
            assert!(actual > created);
        }
        result => panic!("expected RevisionMismatch, got {result:?}"),
    }
    let deleted = client.delete("k").await.expect("delete");
    assert!(deleted.existed);
    assert_eq!(client.get("k").await.expect("get"), None);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_given_only_a_follower_finds_the_leader_for_writes() {
    let cluster = TestCluster::start(5).await;
    let leader = cluster.leader().await;
    let follower = cluster
        .servers_ids()
        .into_iter()
        .find(|id| *id != leader)
        .map(|id| cluster.endpoint(id))
        .expect("a follower");
    let client = Client::connect([follower]).await.expect("connect");
    let lease = client.grant_lease(TTL).await.expect("grant via the leader");
    let guard = lease.try_lock("job").await.expect("free lock");
    client
        .put("k", "v")
        .fence(&guard)
        .await
        .expect("fenced write via the leader");
    cluster.shutdown().await;
}

/// Waits until lock `name` has `count` leases queued.
async fn wait_for_waiters(cluster: &TestCluster, name: &str, count: usize) {
    let start = Instant::now();
    loop {
        let leader = cluster.leader().await;
        let request = DescribeRequest {
            name: name.into(),
            serializable: false,
        };
        let described = LockClient::new(cluster.channel(leader).await)
            .describe(request)
            .await
            .expect("describe")
            .into_inner();
        if described.waiters.len() == count {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{name} has waiters {:?}, not {count}",
            described.waiters
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Lock calls made as unary calls, as with a server that has no lock
/// pipeline, give the same grants, waits and refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_lock_calls_give_the_same_grants_waits_and_refusals() {
    let cluster = TestCluster::start(3).await;
    let client = Client::builder(cluster.endpoints())
        .unary_lock_calls()
        .connect()
        .await
        .expect("connect");
    let first = client.grant_lease(TTL).await.expect("grant");
    let second = client.grant_lease(TTL).await.expect("grant");
    let guard = first.try_lock("job").await.expect("free lock");
    assert!(matches!(
        second.try_lock("job").await,
        Err(Error::LockHeld { .. })
    ));
    let waiter = tokio::spawn(async move { second.lock("job").await });
    wait_for_waiters(&cluster, "job", 1).await;
    let first_token = guard.token();
    guard.release().await.expect("release");
    let granted = within("waiter granted", waiter)
        .await
        .expect("waiter task")
        .expect("granted");
    assert!(granted.token() > first_token);
    assert!(matches!(
        client.raw().release("job", first_token).await,
        Err(Error::StaleToken { .. })
    ));
    granted.release().await.expect("release");
    cluster.shutdown().await;
}
