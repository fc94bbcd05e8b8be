//! Leases against a five-node in-process cluster: keepalives across a leader
//! change, and a client that stops renewing seeing its lease lost no later
//! than the cluster hands its lock to someone else.

use std::time::Duration;

use latchkey_client::{Client, Error, FencingToken, Lease, LeaseLost, LeaseState};
use latchkey_proto::v1::lease_client::LeaseClient;
use latchkey_proto::v1::lock_client::LockClient;
use latchkey_proto::v1::{AcquireRequest, LeaseGrantRequest, LeaseRevokeRequest};
use tokio::time::Instant;

mod support;

use support::{eventually, within, TestCluster, DEADLINE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_keeps_a_lease_alive_across_a_leader_stop() {
    let mut cluster = TestCluster::start(5).await;
    let client = cluster.client().await;
    let ttl = Duration::from_secs(5);
    let lease = client.grant_lease(ttl).await.expect("grant");
    let guard = lease.try_lock("job").await.expect("free lock");

    let old_leader = cluster.leader().await;
    cluster.stop(old_leader).await;
    assert_ne!(cluster.leader().await, old_leader);
    // Two TTLs without a single lost moment: only renewals acknowledged by
    // the new leader can carry the lease that far.
    let watch_until = Instant::now() + ttl * 2;
    while Instant::now() < watch_until {
        assert_ne!(lease.state(), LeaseState::Lost, "lease lost: {lease:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eventually("lease held again", || lease.state() == LeaseState::Held).await;

    // The cluster agrees: the lock is still the lease's.
    let other = client.grant_lease(ttl).await.expect("grant");
    match other.try_lock("job").await {
        Err(Error::LockHeld {
            holder_lease,
            holder_token,
            ..
        }) => assert_eq!((holder_lease, holder_token), (lease.id(), guard.token())),
        other => panic!("expected LockHeld, got {other:?}"),
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_of_a_paused_client_is_in_jeopardy_then_lost_before_its_lock_passes_on() {
    let cluster = TestCluster::start(5).await;
    let endpoints = cluster.endpoints();
    let ttl = Duration::from_secs(3);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (resume_tx, resume_rx) = std::sync::mpsc::channel::<()>();
    // The paused client runs on its own single-threaded runtime, which the
    // test then blocks, as a GC pause or SIGSTOP would: its keepalive task
    // cannot run, while its lease handle can still be asked for its state.
    let paused = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let client = Client::connect(endpoints).await.expect("connect");
            let lease = client.grant_lease(ttl).await.expect("grant");
            let guard = lease.try_lock("job").await.expect("free lock");
            ready_tx.send((lease, guard)).expect("the test waits");
            let _ = resume_rx.recv_timeout(DEADLINE);
        });
    });
    let (lease_a, guard_a) = within("paused client ready", ready_rx)
        .await
        .expect("paused client started");

    let client_b = cluster.client().await;
    let lease_b = client_b
        .grant_lease(Duration::from_secs(30))
        .await
        .expect("grant");
    let observed_a = lease_a.clone();
    let waiter = tokio::spawn(async move {
        let guard = lease_b.lock("job").await.expect("granted after A's expiry");
        (guard, observed_a.state())
    });

    assert_eq!(
        states_until_lost(&lease_a).await,
        [LeaseState::Held, LeaseState::Jeopardy, LeaseState::Lost]
    );
    assert_eq!(
        within("A's lost()", guard_a.lost()).await,
        LeaseLost::DeadlinePassed
    );

    let (guard_b, a_when_b_was_granted) = within("B's lock", waiter).await.expect("waiter");
    assert_eq!(
        a_when_b_was_granted,
        LeaseState::Lost,
        "A must know it lost the lock before B is granted it"
    );
    assert!(guard_b.token() > guard_a.token());

    resume_tx.send(()).expect("paused thread waits");
    paused.join().expect("paused client thread");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_whose_keepalives_are_cut_off_is_in_jeopardy_then_lost_before_its_lock_passes_on() {
    let cluster = TestCluster::start(5).await;
    let client = cluster.client().await;
    let lease_a = client
        .grant_lease(Duration::from_secs(3))
        .await
        .expect("grant");
    let guard_a = lease_a.try_lock("job").await.expect("free lock");

    // B waits for the lock over a direct connection that the cut leaves
    // alone; its lease outlives the test, so it needs no keepalives.
    let leader = cluster.leader().await;
    let channel = cluster.channel(leader).await;
    let grant = LeaseGrantRequest {
        ttl_ms: 60_000,
        request: None,
    };
    let lease_b = LeaseClient::new(channel.clone())
        .grant(grant)
        .await
        .expect("grant B")
        .into_inner()
        .lease;
    let observed_a = lease_a.clone();
    let waiter = tokio::spawn(async move {
        let acquire = AcquireRequest {
            name: "job".into(),
            lease: lease_b,
            wait: true,
            request: None,
        };
        let granted = LockClient::new(channel).acquire(acquire).await;
        (granted, observed_a.state())
    });

    for proxy in cluster.proxies.values() {
        proxy.block();
    }
    assert_eq!(
        states_until_lost(&lease_a).await,
        [LeaseState::Held, LeaseState::Jeopardy, LeaseState::Lost]
    );
    let (granted, a_when_b_was_granted) = within("B's lock", waiter).await.expect("waiter");
    let token_b = granted
        .expect("granted after A's expiry")
        .into_inner()
        .grant
        .expect("a grant")
        .token;
    assert_eq!(
        a_when_b_was_granted,
        LeaseState::Lost,
        "A must know it lost the lock before B is granted it"
    );
    assert!(FencingToken(token_b) > guard_a.token());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_revoked_elsewhere_is_reported_lost_because_the_server_no_longer_has_it() {
    let cluster = TestCluster::start(5).await;
    let client = cluster.client().await;
    // A short TTL, so that the next renewal comes soon.
    let lease = client
        .grant_lease(Duration::from_secs(3))
        .await
        .expect("grant");

    let leader = cluster.leader().await;
    let revoke = LeaseRevokeRequest {
        lease: lease.id().0,
        request: None,
    };
    LeaseClient::new(cluster.channel(leader).await)
        .revoke(revoke)
        .await
        .expect("revoke from another client");

    assert_eq!(within("lost()", lease.lost()).await, LeaseLost::NotFound);
    assert_eq!(lease.state(), LeaseState::Lost);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_lease_is_lost_at_once_and_its_lock_goes_to_another_lease() {
    let cluster = TestCluster::start(5).await;
    let client = cluster.client().await;
    let ttl = Duration::from_secs(30);
    let lease = client.grant_lease(ttl).await.expect("grant");
    let guard = lease.try_lock("job").await.expect("free lock");

    lease.revoke().await.expect("revoke");
    assert_eq!(lease.state(), LeaseState::Lost);
    assert_eq!(guard.lost().await, LeaseLost::Revoked);
    match lease.try_lock("other").await {
        Err(Error::LeaseLost { lease: id }) => assert_eq!(id, lease.id()),
        other => panic!("expected LeaseLost, got {other:?}"),
    }

    let next = client.grant_lease(ttl).await.expect("grant");
    let next_guard = next.try_lock("job").await.expect("lock freed by revoke");
    assert!(next_guard.token() > guard.token());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_shorter_than_the_server_minimum_is_refused_as_invalid() {
    let cluster = TestCluster::start(5).await;
    let client = cluster.client().await;
    match client.grant_lease(Duration::from_millis(10)).await {
        Err(Error::InvalidArgument { field, reason }) => {
            assert_eq!(field, "ttl_ms", "reason: {reason}")
        }
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    cluster.shutdown().await;
}

/// Every state `lease` passes through, polled, until it is lost.
/// A client's leases share one keepalive stream: with the server allowing
/// two streams per connection, twenty leases of one client all stay held
/// through many renewals (one stream per lease would have had eighteen
/// refused), and each renewal extends its own lease only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_of_one_client_share_one_keepalive_stream() {
    let cluster = TestCluster::start_with(3, |config| {
        config.limits.max_streams_per_connection = 2;
    })
    .await;
    let client = Client::builder(cluster.endpoints())
        .keepalive_interval(Duration::from_millis(100))
        .connect()
        .await
        .expect("client connects");
    let ttl = Duration::from_secs(3);
    let mut leases = Vec::new();
    for _ in 0..20 {
        leases.push(client.grant_lease(ttl).await.expect("grant"));
    }
    // Ten keepalive intervals, each lease renewed in each.
    let watch_until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < watch_until {
        for lease in &leases {
            assert_eq!(lease.state(), LeaseState::Held, "{lease:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Revoking one ends that lease alone.
    let revoked = leases.pop().expect("twenty leases");
    client
        .raw()
        .revoke_lease(revoked.id())
        .await
        .expect("revoke");
    within("the revoked lease is lost", revoked.lost()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for lease in &leases {
        assert_eq!(lease.state(), LeaseState::Held, "{lease:?}");
    }
    // Raw renewals from many tasks at once go on the same stream.
    let renewals = leases.iter().map(|lease| {
        let client = client.clone();
        let id = lease.id();
        tokio::spawn(async move { client.raw().keepalive(id).await })
    });
    for renewal in renewals.collect::<Vec<_>>() {
        let left = renewal.await.expect("task").expect("renewed");
        assert!(left <= ttl && left > ttl / 2, "{left:?}");
    }
    match client.raw().keepalive(revoked.id()).await {
        Err(Error::LeaseNotFound { lease }) => assert_eq!(lease, Some(revoked.id())),
        other => panic!("expected LeaseNotFound, got {other:?}"),
    }
    cluster.shutdown().await;
}

async fn states_until_lost(lease: &Lease) -> Vec<LeaseState> {
    let mut states = vec![lease.state()];
    let start = Instant::now();
    while *states.last().expect("not empty") != LeaseState::Lost {
        assert!(start.elapsed() < DEADLINE, "states so far: {states:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
        let state = lease.state();
        if states.last() != Some(&state) {
            states.push(state);
        }
    }
    states
}
