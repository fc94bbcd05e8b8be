//! Cluster tests of leases, locks, fencing and elections: five in-process
//! nodes over loopback gRPC.

use std::time::{Duration, Instant};

use latchkey_proto::v1::election_client::ElectionClient;
use latchkey_proto::v1::lease_client::LeaseClient;
use latchkey_proto::v1::lock_client::LockClient;
use latchkey_proto::v1::{
    error_details, pipeline_request, pipeline_response, AcquireRequest, CampaignRequest,
    DescribeRequest, ErrorDetails, Fence, GetRequest, LeaseGrantRequest, LeaseKeepAliveRequest,
    LeaseTimeToLiveRequest, ObserveRequest, PipelineCancel, PipelineError, PipelineRequest,
    PipelineResponse, PutRequest, ReleaseRequest,
};
use prost::Message as _;
use tonic::Code;

mod support;

use support::TestCluster;

fn details(status: &tonic::Status) -> error_details::Detail {
    ErrorDetails::decode(status.details())
        .expect("typed details")
        .detail
        .expect("a detail")
}

impl TestCluster {
    async fn grant(&self, ttl_ms: u64) -> u64 {
        let leader = self.leader().await;
        let mut leases = LeaseClient::new(self.channel(leader).await);
        let request = LeaseGrantRequest {
            ttl_ms,
            request: None,
        };
        leases
            .grant(request)
            .await
            .expect("grant")
            .into_inner()
            .lease
    }

    async fn acquire(&self, name: &str, lease: u64, wait: bool) -> Result<u64, tonic::Status> {
        let leader = self.leader().await;
        let mut locks = LockClient::new(self.channel(leader).await);
        let request = AcquireRequest {
            name: name.into(),
            lease,
            wait,
            request: None,
        };
        Ok(locks
            .acquire(request)
            .await?
            .into_inner()
            .grant
            .expect("grant")
            .token)
    }

    async fn fenced_put(
        &self,
        key: &str,
        value: &str,
        lock: &str,
        token: u64,
    ) -> Result<(), tonic::Status> {
        let leader = self.leader().await;
        let request = PutRequest {
            key: key.into(),
            value: value.into(),
            fence: Some(Fence {
                name: lock.into(),
                token,
                ..Fence::default()
            }),
            ..PutRequest::default()
        };
        self.client(leader).await.put(request).await.map(|_| ())
    }

    async fn value(&self, key: &str) -> Option<Vec<u8>> {
        let leader = self.leader().await;
        let request = GetRequest {
            key: key.into(),
            serializable: false,
        };
        let response = self.client(leader).await.get(request).await.expect("get");
        response.into_inner().kv.map(|kv| kv.value)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_holder_write_is_rejected_after_the_lock_changes_hands_and_a_leader_change() {
    let mut cluster = TestCluster::start(5, 10_000).await;
    let a = cluster.grant(30_000).await;
    let b = cluster.grant(30_000).await;
    let t1 = cluster.acquire("res", a, false).await.expect("A acquires");
    let held = cluster.acquire("res", b, false).await.unwrap_err();
    assert_eq!(held.code(), Code::FailedPrecondition);
    match details(&held) {
        error_details::Detail::LockHeld(held) => {
            assert_eq!((held.holder_lease, held.holder_token), (a, t1));
        }
        other => panic!("expected LockHeld, got {other:?}"),
    }
    cluster
        .fenced_put("k", "by-a", "res", t1)
        .await
        .expect("current token writes");
    assert_eq!(
        cluster.acquire("res", a, false).await.unwrap(),
        t1,
        "reacquire is idempotent"
    );

    let leader = cluster.leader().await;
    let mut locks = LockClient::new(cluster.channel(leader).await);
    let release = ReleaseRequest {
        name: "res".into(),
        token: t1,
        request: None,
    };
    locks.release(release).await.expect("A releases");
    let t2 = cluster.acquire("res", b, false).await.expect("B acquires");
    assert!(t2 > t1, "B's token {t2} must exceed A's {t1}");

    cluster.stop(leader).await;
    let rejected = cluster
        .fenced_put("k", "late-a", "res", t1)
        .await
        .unwrap_err();
    assert_eq!(rejected.code(), Code::FailedPrecondition);
    match details(&rejected) {
        error_details::Detail::StaleToken(stale) => {
            assert_eq!((stale.presented, stale.current), (t1, t2));
        }
        other => panic!("expected StaleToken, got {other:?}"),
    }
    assert_eq!(
        cluster.value("k").await.as_deref(),
        Some(&b"by-a"[..]),
        "value unchanged"
    );

    let c = cluster.grant(30_000).await;
    let t3 = cluster.acquire("other", c, false).await.unwrap();
    assert!(t3 > t2, "tokens keep increasing across a leader change");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_lease_hands_its_lock_to_the_next_waiter() {
    let cluster = TestCluster::start(5, 10_000).await;
    let silent = cluster.grant(2_000).await;
    let waiting = cluster.grant(30_000).await;
    let t1 = cluster.acquire("job", silent, false).await.unwrap();

    // Keep the waiter's lease alive while it waits.
    let leader = cluster.leader().await;
    let mut leases = LeaseClient::new(cluster.channel(leader).await);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let keepalive = tokio::spawn(async move {
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut replies = leases
            .keep_alive(stream)
            .await
            .expect("keepalive stream")
            .into_inner();
        while let Ok(Some(reply)) = replies.message().await {
            assert!(reply.found, "the kept-alive lease must not expire");
        }
    });
    let pinger = tokio::spawn(async move {
        for _ in 0..100 {
            if tx
                .send(LeaseKeepAliveRequest { lease: waiting })
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });

    let start = Instant::now();
    let t2 = cluster
        .acquire("job", waiting, true)
        .await
        .expect("granted after expiry");
    let elapsed = start.elapsed();
    assert!(t2 > t1);
    eprintln!("lock passed to the waiter {elapsed:?} after the wait started (TTL 2 s)");
    pinger.abort();
    keepalive.abort();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observers_see_every_leader_change_in_order() {
    let cluster = TestCluster::start(3, 10_000).await;
    let first = cluster.grant(30_000).await;
    let second = cluster.grant(30_000).await;
    let leader = cluster.leader().await;
    let follower = *cluster
        .servers_ids()
        .iter()
        .find(|id| **id != leader)
        .unwrap();
    let mut observer = ElectionClient::new(cluster.channel(follower).await);
    let mut changes = observer
        .observe(ObserveRequest { name: "svc".into() })
        .await
        .expect("observe")
        .into_inner();
    let initial = changes.message().await.unwrap().unwrap();
    assert!(initial.leader.is_none(), "no leader yet");

    let mut elections = ElectionClient::new(cluster.channel(leader).await);
    let campaign = |lease: u64, value: &str| CampaignRequest {
        name: "svc".into(),
        lease,
        value: value.into(),
        request: None,
    };
    let won = elections
        .campaign(campaign(first, "a"))
        .await
        .unwrap()
        .into_inner();
    let leadership = won.leadership.unwrap();
    let mut second_client = elections.clone();
    let waiting = tokio::spawn(async move { second_client.campaign(campaign(second, "b")).await });
    let seen = changes.message().await.unwrap().unwrap().leader.unwrap();
    assert_eq!((seen.lease, seen.value.as_slice()), (first, &b"a"[..]));
    // Resigning before the second campaign is queued would show a moment
    // with no leader in between, which is a real change but not this test's.
    let mut leases = LeaseClient::new(cluster.channel(leader).await);
    let queued_by = Instant::now() + support::DEADLINE;
    // Bounded by the deadline.
    loop {
        let ttl = leases
            .time_to_live(LeaseTimeToLiveRequest {
                lease: second,
                serializable: false,
            })
            .await
            .expect("time to live")
            .into_inner();
        if ttl.waiting.iter().any(|name| name == "svc") {
            break;
        }
        assert!(
            Instant::now() < queued_by,
            "the second campaign never queued"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let resign = latchkey_proto::v1::ResignRequest {
        name: "svc".into(),
        token: leadership.token,
        request: None,
    };
    elections.resign(resign).await.expect("resign");
    let next = waiting
        .await
        .unwrap()
        .expect("second is elected")
        .into_inner();
    let seen = changes.message().await.unwrap().unwrap().leader.unwrap();
    assert_eq!(seen.lease, second);
    assert!(next.leadership.unwrap().token > leadership.token);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_ttl_outside_the_bounds_is_rejected_naming_both() {
    let cluster = TestCluster::start(3, 10_000).await;
    let leader = cluster.leader().await;
    let mut leases = LeaseClient::new(cluster.channel(leader).await);
    let status = leases
        .grant(LeaseGrantRequest {
            ttl_ms: 10,
            request: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    // The floor is twice the election timeout.
    let min_ttl_ms = 2 * latchkey_server::config::RaftTiming::default().election_timeout_ms();
    assert!(
        status
            .message()
            .contains(&format!("[{min_ttl_ms}, 86400000]")),
        "{}",
        status.message()
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_node_ends_its_open_observe_and_keepalive_streams() {
    let mut cluster = TestCluster::start(3, 10_000).await;
    let leader = cluster.leader().await;
    let lease = cluster.grant(30_000).await;
    let channel = cluster.channel(leader).await;
    let mut changes = ElectionClient::new(channel.clone())
        .observe(ObserveRequest { name: "svc".into() })
        .await
        .expect("observe")
        .into_inner();
    changes
        .message()
        .await
        .expect("first answer")
        .expect("initial state");
    let (renewals, queue) = tokio::sync::mpsc::channel(1);
    renewals
        .send(LeaseKeepAliveRequest { lease })
        .await
        .expect("queue a renewal");
    let mut answers = LeaseClient::new(channel)
        .keep_alive(tokio_stream::wrappers::ReceiverStream::new(queue))
        .await
        .expect("keepalive")
        .into_inner();
    answers
        .message()
        .await
        .expect("renewed")
        .expect("an answer");

    cluster.stop(leader).await;
    let observe_end = tokio::time::timeout(support::DEADLINE, changes.message())
        .await
        .expect("the observe stream ends instead of hanging");
    assert!(
        matches!(&observe_end, Err(s) if s.code() == Code::Unavailable)
            || matches!(observe_end, Ok(None)),
        "{observe_end:?}"
    );
    let keepalive_end = tokio::time::timeout(support::DEADLINE, answers.message())
        .await
        .expect("the keepalive stream ends instead of hanging");
    assert!(
        matches!(&keepalive_end, Err(s) if s.code() == Code::Unavailable)
            || matches!(keepalive_end, Ok(None)),
        "{keepalive_end:?}"
    );
    drop(renewals);
    cluster.restart(leader).await;
    cluster.shutdown().await;
}

/// One stream may renew many leases with many renewals in flight: every
/// request is answered, in the order sent, an unknown lease as not found in
/// its place; the client closing its side first still gets every answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_keepalive_stream_renews_many_leases_answering_in_the_order_sent() {
    let cluster = TestCluster::start(3, 10_000).await;
    let leader = cluster.leader().await;
    let mut leases = Vec::new();
    for _ in 0..20 {
        leases.push(cluster.grant(30_000).await);
    }
    let unknown = leases.iter().max().expect("twenty leases") + 1_000_000;
    let mut sent = Vec::new();
    for round in 0..3 {
        sent.extend(leases.iter().copied());
        if round == 1 {
            sent.push(unknown);
        }
    }
    // All sent before any answer is read, then the sending side closed.
    let requests = tokio_stream::iter(
        sent.clone()
            .into_iter()
            .map(|lease| LeaseKeepAliveRequest { lease }),
    );
    let mut answers = LeaseClient::new(cluster.channel(leader).await)
        .keep_alive(requests)
        .await
        .expect("keepalive")
        .into_inner();
    let mut answered = Vec::new();
    // Bounded: one answer per request, then the end.
    while let Some(answer) = tokio::time::timeout(support::DEADLINE, answers.message())
        .await
        .expect("the answers come")
        .expect("no renewal fails")
    {
        assert_eq!(answer.found, answer.lease != unknown, "{answer:?}");
        if answer.found {
            assert_eq!(answer.ttl_ms, 30_000, "{answer:?}");
        }
        answered.push(answer.lease);
    }
    assert_eq!(answered, sent);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_names_and_values_are_refused_with_the_field_in_typed_details() {
    let cluster = TestCluster::start(3, 10_000).await;
    let leader = cluster.leader().await;
    let lease = cluster.grant(30_000).await;
    let mut locks = LockClient::new(cluster.channel(leader).await);
    let empty_name = locks
        .acquire(AcquireRequest {
            name: String::new(),
            lease,
            wait: false,
            request: None,
        })
        .await
        .unwrap_err();
    assert_eq!(empty_name.code(), Code::InvalidArgument);
    match details(&empty_name) {
        error_details::Detail::InvalidField(field) => assert_eq!(field.field, "name"),
        other => panic!("expected InvalidField, got {other:?}"),
    }
    let mut kv = cluster.client(leader).await;
    let bad_fence = kv
        .put(PutRequest {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            fence: Some(Fence {
                name: String::new(),
                token: 1,
                kind: 0,
            }),
            ..PutRequest::default()
        })
        .await
        .unwrap_err();
    match details(&bad_fence) {
        error_details::Detail::InvalidField(field) => assert_eq!(field.field, "fence.name"),
        other => panic!("expected InvalidField, got {other:?}"),
    }
    let empty_key = kv
        .put(PutRequest {
            key: Vec::new(),
            value: b"v".to_vec(),
            ..PutRequest::default()
        })
        .await
        .unwrap_err();
    match details(&empty_key) {
        error_details::Detail::InvalidField(field) => assert_eq!(field.field, "key"),
        other => panic!("expected InvalidField, got {other:?}"),
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_keep_increasing_across_a_full_cluster_restart() {
    let mut cluster = TestCluster::start(5, 10_000).await;
    let lease = cluster.grant(30_000).await;
    let mut highest = 0;
    for name in ["a", "b", "c"] {
        let token = cluster.acquire(name, lease, false).await.unwrap();
        assert!(token > highest);
        highest = token;
    }
    for id in cluster.servers_ids() {
        cluster.stop(id).await;
    }
    for id in cluster.configs.keys().copied().collect::<Vec<_>>() {
        cluster.restart(id).await;
    }
    // The old lease survived the restart (a new leader restarts its
    // countdown), so its locks are still held: take a fresh name.
    let lease = cluster.grant(30_000).await;
    let token = cluster.acquire("fresh", lease, false).await.unwrap();
    assert!(
        token > highest,
        "first token after restart {token} must exceed {highest}"
    );
    cluster.shutdown().await;
}

/// Lease expiries are proposed when a lease-clock round is confirmed, and
/// confirmations arrive in the same Readies as new entries while writes
/// flow. An expiry proposed in the middle of handling such a Ready once
/// made raft-rs panic on the leader; every node must keep running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_expiring_while_writes_flow_stop_no_node() {
    let cluster = TestCluster::start(3, 10_000).await;
    let leader = cluster.leader().await;
    let load = Duration::from_secs(5);
    let start = Instant::now();
    let mut writers = Vec::new();
    for writer in 0..4 {
        let mut kv = cluster.client(leader).await;
        writers.push(tokio::spawn(async move {
            let mut written = 0u64;
            // Bounded by the load's duration.
            while start.elapsed() < load {
                let request = PutRequest {
                    key: format!("flow/{writer}").into_bytes(),
                    value: written.to_string().into_bytes(),
                    ..PutRequest::default()
                };
                if kv.put(request).await.is_ok() {
                    written += 1;
                }
            }
            written
        }));
    }
    let mut granted = 0;
    // Leases with the shortest TTL, granted all along, nobody renewing
    // them: their expiries are confirmed while the writes flow.
    while start.elapsed() < load - Duration::from_millis(1_500) {
        cluster.grant(1_000).await;
        granted += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut written = 0;
    for writer in writers {
        written += writer.await.expect("writer");
    }
    // Let the last leases expire.
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    assert_eq!(cluster.leader().await, leader, "the leader kept leading");
    let target = cluster.servers[&leader].node.status().commit_index;
    for id in cluster.servers_ids() {
        cluster.wait_applied(id, target).await;
    }
    let mut leases = LeaseClient::new(cluster.channel(leader).await);
    let listed = leases
        .list(latchkey_proto::v1::LeaseListRequest::default())
        .await
        .map(|answer| answer.into_inner().leases.len());
    println!("{granted} leases expired during {written} writes; still listed: {listed:?}");
    assert_eq!(listed.ok(), Some(0), "every lease expired");
    cluster.shutdown().await;
}

/// One `Lock.Pipeline` stream: requests go in with `send`, answers come
/// out of `next`, each within a deadline.
struct Pipe {
    requests: tokio::sync::mpsc::UnboundedSender<PipelineRequest>,
    answers: tonic::Streaming<PipelineResponse>,
}

impl Pipe {
    async fn open(cluster: &TestCluster, node: latchkey_server::types::NodeId) -> Pipe {
        let (requests, queue) = tokio::sync::mpsc::unbounded_channel();
        let answers = LockClient::new(cluster.channel(node).await)
            .pipeline(tokio_stream::wrappers::UnboundedReceiverStream::new(queue))
            .await
            .expect("the pipeline opens")
            .into_inner();
        Pipe { requests, answers }
    }

    fn send(&self, seq: u64, op: pipeline_request::Op) {
        let request = PipelineRequest { seq, op: Some(op) };
        self.requests.send(request).expect("the stream is open");
    }

    fn acquire(&self, seq: u64, name: &str, lease: u64, wait: bool) {
        let request = AcquireRequest {
            name: name.into(),
            lease,
            wait,
            request: None,
        };
        self.send(seq, pipeline_request::Op::Acquire(request));
    }

    fn release(&self, seq: u64, name: &str, token: u64) {
        let request = ReleaseRequest {
            name: name.into(),
            token,
            request: None,
        };
        self.send(seq, pipeline_request::Op::Release(request));
    }

    async fn next(&mut self) -> (u64, pipeline_response::Result) {
        let answer = tokio::time::timeout(Duration::from_secs(10), self.answers.message())
            .await
            .expect("an answer within 10 s")
            .expect("the stream is whole")
            .expect("the stream goes on");
        (answer.seq, answer.result.expect("a result"))
    }

    /// The next answer, which must be a refusal: its status.
    async fn refusal(&mut self) -> (u64, PipelineError) {
        match self.next().await {
            (seq, pipeline_response::Result::Error(error)) => (seq, error),
            (seq, other) => panic!("expected a refusal for {seq}, got {other:?}"),
        }
    }
}

fn granted(result: pipeline_response::Result) -> latchkey_proto::v1::Grant {
    match result {
        pipeline_response::Result::Acquire(answer) => answer.grant.expect("a grant"),
        other => panic!("expected a grant, got {other:?}"),
    }
}

fn pipeline_details(error: &PipelineError) -> error_details::Detail {
    ErrorDetails::decode(error.details.as_slice())
        .expect("typed details")
        .detail
        .expect("a detail")
}

impl TestCluster {
    async fn waiters(&self, name: &str) -> Vec<u64> {
        let leader = self.leader().await;
        let mut locks = LockClient::new(self.channel(leader).await);
        let request = DescribeRequest {
            name: name.into(),
            serializable: false,
        };
        locks
            .describe(request)
            .await
            .expect("describe")
            .into_inner()
            .waiters
    }

    async fn wait_for_waiters(&self, name: &str, expected: &[u64]) {
        let start = Instant::now();
        // Bounded by the deadline.
        loop {
            let waiters = self.waiters(name).await;
            if waiters == expected {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "waiters of {name}: {waiters:?}, expected {expected:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A 3-node cluster where `holder`'s lease holds "job" with token `held`,
/// `waiter`'s lease holds nothing, and a pipeline is open to the leader.
struct JobHeld {
    cluster: TestCluster,
    leader: latchkey_server::types::NodeId,
    holder: u64,
    waiter: u64,
    held: u64,
    pipe: Pipe,
}

impl JobHeld {
    async fn start() -> JobHeld {
        let cluster = TestCluster::start(3, 10_000).await;
        let leader = cluster.leader().await;
        let holder = cluster.grant(30_000).await;
        let waiter = cluster.grant(30_000).await;
        let held = cluster.acquire("job", holder, false).await.expect("free");
        let pipe = Pipe::open(&cluster, leader).await;
        JobHeld {
            cluster,
            leader,
            holder,
            waiter,
            held,
            pipe,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_answers_each_request_when_it_completes_so_a_waiting_acquire_holds_up_nothing() {
    let JobHeld {
        cluster,
        waiter,
        held,
        mut pipe,
        ..
    } = JobHeld::start().await;

    pipe.acquire(1, "job", waiter, true);
    cluster.wait_for_waiters("job", &[waiter]).await;
    pipe.acquire(2, "other", waiter, false);
    let (seq, other) = pipe.next().await;
    assert_eq!(seq, 2, "the free lock is answered while the other waits");
    assert_eq!(granted(other).lease, waiter);

    pipe.release(3, "job", held);
    let mut answers = [pipe.next().await, pipe.next().await];
    answers.sort_by_key(|(seq, _)| *seq);
    let [(1, acquired), (3, released)] = answers else {
        panic!("expected answers to 1 and 3, got {answers:?}");
    };
    assert!(matches!(released, pipeline_response::Result::Release(_)));
    let grant = granted(acquired);
    assert_eq!((grant.lease, grant.name.as_str()), (waiter, "job"));
    assert!(grant.token > held, "the next holder's token is higher");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_pipeline_acquire_leaves_the_queue_unanswered() {
    let JobHeld {
        cluster,
        waiter,
        mut pipe,
        ..
    } = JobHeld::start().await;

    pipe.acquire(1, "job", waiter, true);
    cluster.wait_for_waiters("job", &[waiter]).await;
    pipe.send(1, pipeline_request::Op::Cancel(PipelineCancel {}));
    cluster.wait_for_waiters("job", &[]).await;
    pipe.acquire(2, "other", waiter, false);
    let (seq, _) = pipe.next().await;
    assert_eq!(seq, 2, "the cancelled acquire gets no answer");

    // Breaking the stream gives up what is in flight, as a unary caller
    // going away does.
    pipe.acquire(3, "job", waiter, true);
    cluster.wait_for_waiters("job", &[waiter]).await;
    drop(pipe);
    cluster.wait_for_waiters("job", &[]).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_refusals_carry_the_unary_status_and_change_nothing() {
    let JobHeld {
        cluster,
        leader,
        holder,
        waiter,
        held,
        mut pipe,
    } = JobHeld::start().await;

    // A bad name: the same code and typed details as the unary call's.
    pipe.acquire(1, "", waiter, false);
    let (seq, refused) = pipe.refusal().await;
    let unary = cluster.acquire("", waiter, false).await.unwrap_err();
    assert_eq!(seq, 1);
    assert_eq!(refused.code, unary.code() as i32);
    assert_eq!(refused.details, unary.details().to_vec());
    assert!(
        matches!(pipeline_details(&refused), error_details::Detail::InvalidField(f) if f.field == "name")
    );

    // A held lock, without waiting: LockHeld, naming the holder.
    pipe.acquire(2, "job", waiter, false);
    let (_, refused) = pipe.refusal().await;
    assert_eq!(refused.code, Code::FailedPrecondition as i32);
    match pipeline_details(&refused) {
        error_details::Detail::LockHeld(lock) => assert_eq!(lock.holder_token, held),
        other => panic!("expected LockHeld, got {other:?}"),
    }

    // A stale token: StaleToken.
    pipe.release(3, "job", held + 1000);
    let (_, refused) = pipe.refusal().await;
    assert!(matches!(
        pipeline_details(&refused),
        error_details::Detail::StaleToken(_)
    ));

    // No operation, and a seq already in flight.
    pipe.send(4, pipeline_request::Op::Cancel(PipelineCancel {}));
    pipe.requests
        .send(PipelineRequest { seq: 5, op: None })
        .expect("open");
    let (seq, refused) = pipe.refusal().await;
    assert_eq!((seq, refused.code), (5, Code::InvalidArgument as i32));
    pipe.acquire(6, "job", waiter, true);
    cluster.wait_for_waiters("job", &[waiter]).await;
    pipe.acquire(6, "other", waiter, false);
    let (seq, refused) = pipe.refusal().await;
    assert_eq!((seq, refused.code), (6, Code::InvalidArgument as i32));
    assert!(refused.message.contains("in flight"), "{refused:?}");

    // A follower refuses with the leader's address, as in the metadata a
    // unary refusal carries.
    let follower = cluster
        .servers_ids()
        .into_iter()
        .find(|id| *id != leader)
        .expect("a follower");
    let mut there = Pipe::open(&cluster, follower).await;
    there.acquire(1, "elsewhere", waiter, false);
    let (_, refused) = there.refusal().await;
    assert_eq!(refused.code, Code::Unavailable as i32);
    assert!(matches!(
        pipeline_details(&refused),
        error_details::Detail::NotLeader(_)
    ));
    assert!(
        refused
            .metadata
            .get("latchkey-leader-addr")
            .is_some_and(|addr| !addr.is_empty()),
        "{refused:?}"
    );

    // Nothing changed hands: the holder still holds, the waiter still waits.
    let unary_again = cluster
        .acquire("job", holder, false)
        .await
        .expect("re-acquire");
    assert_eq!(unary_again, held);
    assert_eq!(cluster.waiters("job").await, vec![waiter]);
    assert_eq!(cluster.waiters("other").await, Vec::<u64>::new());
    cluster.shutdown().await;
}
