//! Tests of [`super::Plan`] (pure) and [`super::Router`] against in-process
//! fake KV servers on loopback.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use latchkey_proto::v1::kv_server::{Kv, KvServer};
use latchkey_proto::v1::{
    DeleteRequest, DeleteResponse, GetRequest, GetResponse, PutRequest, PutResponse, RangeRequest,
    RangeResponse, StaleToken,
};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

use super::*;
use crate::cli::{EXIT_FAILED, EXIT_UNREACHABLE};

fn endpoints(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| n.to_string()).collect()
}

fn not_leader(addr: Option<&str>) -> AttemptError {
    AttemptError::NotLeader {
        leader_addr: addr.map(str::to_string),
    }
}

fn refused() -> AttemptError {
    AttemptError::Connect("Connection refused".into())
}

const TIMEOUT: Duration = Duration::from_secs(5);

#[test]
fn endpoints_are_tried_in_order_and_unreachable_when_all_refuse() {
    let list = endpoints(&["a:1", "b:1", "c:1"]);
    let mut plan = Plan::new(&list, Idempotence::Read, TIMEOUT);
    assert_eq!(plan.first(), "a:1");
    assert_eq!(plan.after("a:1", refused()), Step::Try("b:1".into()));
    assert_eq!(plan.after("b:1", refused()), Step::Try("c:1".into()));
    match plan.after("c:1", refused()) {
        Step::GiveUp(failure) => assert_eq!(failure.code, EXIT_UNREACHABLE, "{failure:?}"),
        step => panic!("expected to give up, got {step:?}"),
    }
}

#[test]
fn a_leader_hint_is_followed_immediately() {
    let list = endpoints(&["a:1", "b:1"]);
    let mut plan = Plan::new(&list, Idempotence::Write, TIMEOUT);
    let first = plan.first();
    assert_eq!(
        plan.after(&first, not_leader(Some("c:1"))),
        Step::Try("c:1".into())
    );
}

#[test]
fn a_hint_naming_an_address_that_just_refused_is_not_followed() {
    let list = endpoints(&["dead:1", "b:1"]);
    let mut plan = Plan::new(&list, Idempotence::Write, TIMEOUT);
    assert_eq!(plan.first(), "dead:1");
    assert_eq!(plan.after("dead:1", refused()), Step::Try("b:1".into()));
    // b still believes in the dead leader: wait for the election instead.
    match plan.after("b:1", not_leader(Some("dead:1"))) {
        Step::WaitThenTry(pause, _) => assert_eq!(pause, BACKOFF_START),
        step => panic!("expected a backoff, got {step:?}"),
    }
}

#[test]
fn no_known_leader_backs_off_with_doubling_waits_then_gives_up() {
    let list = endpoints(&["a:1"]);
    let mut plan = Plan::new(&list, Idempotence::Write, TIMEOUT);
    let mut pauses = Vec::new();
    for _ in 0..MAX_WAITS {
        match plan.after("a:1", not_leader(None)) {
            Step::WaitThenTry(pause, next) => {
                assert_eq!(next, "a:1");
                pauses.push(pause);
            }
            step => panic!("expected a backoff, got {step:?}"),
        }
    }
    assert_eq!(pauses[0], BACKOFF_START);
    assert_eq!(pauses[1], BACKOFF_START * 2);
    assert_eq!(*pauses.last().expect("MAX_WAITS > 0"), BACKOFF_MAX);
    match plan.after("a:1", not_leader(None)) {
        Step::GiveUp(failure) => assert_eq!(failure.code, EXIT_FAILED),
        step => panic!("expected to give up, got {step:?}"),
    }
}

#[test]
fn redirects_are_bounded() {
    let list = endpoints(&["a:1"]);
    let mut plan = Plan::new(&list, Idempotence::Write, TIMEOUT);
    let mut target = plan.first();
    for hop in 0..MAX_REDIRECTS {
        let next = format!("n{hop}:1");
        assert_eq!(
            plan.after(&target, not_leader(Some(&next))),
            Step::Try(next.clone())
        );
        target = next;
    }
    match plan.after(&target, not_leader(Some("again:1"))) {
        Step::GiveUp(failure) => {
            assert_eq!(failure.code, EXIT_FAILED);
            assert!(
                failure.message.contains("leader hints"),
                "{}",
                failure.message
            );
        }
        step => panic!("expected to give up, got {step:?}"),
    }
}

#[test]
fn a_write_whose_connection_broke_is_not_resent() {
    let list = endpoints(&["a:1", "b:1"]);
    let mut plan = Plan::new(&list, Idempotence::Write, TIMEOUT);
    match plan.after(
        "a:1",
        AttemptError::OutcomeUnknown("connection reset".into()),
    ) {
        Step::GiveUp(failure) => {
            assert_eq!(failure.code, EXIT_FAILED);
            assert!(
                failure.message.contains("may or may not"),
                "{}",
                failure.message
            );
        }
        step => panic!("expected to give up, got {step:?}"),
    }
}

#[test]
fn giving_up_on_a_resent_write_says_it_may_have_been_applied() {
    let list = endpoints(&["a:1"]);
    let mut plan = Plan::new(&list, Idempotence::DeduplicatedWrite, TIMEOUT);
    let mut last = plan.after(
        "a:1",
        AttemptError::OutcomeUnknown("leadership lost".into()),
    );
    for _ in 0..MAX_WAITS {
        last = plan.after("a:1", not_leader(None));
    }
    match last {
        Step::GiveUp(failure) => {
            assert!(
                failure.message.contains("may or may not"),
                "{}",
                failure.message
            );
        }
        step => panic!("expected to give up, got {step:?}"),
    }
    assert!(plan.timed_out().message.contains("may or may not"));
}

#[test]
fn a_write_refused_by_followers_only_is_known_not_applied() {
    let list = endpoints(&["a:1"]);
    let mut plan = Plan::new(&list, Idempotence::DeduplicatedWrite, TIMEOUT);
    plan.after("a:1", not_leader(None));
    assert!(!plan.timed_out().message.contains("may or may not"));
}

#[test]
fn a_read_whose_connection_broke_is_resent_elsewhere() {
    let list = endpoints(&["a:1", "b:1"]);
    let mut plan = Plan::new(&list, Idempotence::Read, TIMEOUT);
    let first = plan.first();
    let step = plan.after(
        &first,
        AttemptError::OutcomeUnknown("connection reset".into()),
    );
    assert_eq!(step, Step::WaitThenTry(BACKOFF_START, "b:1".into()));
}

#[test]
fn a_rejected_request_is_not_retried() {
    let list = endpoints(&["a:1", "b:1"]);
    let mut plan = Plan::new(&list, Idempotence::Read, TIMEOUT);
    let step = plan.after(
        "a:1",
        AttemptError::Rejected(Failure::failed("key is empty")),
    );
    assert_eq!(step, Step::GiveUp(Failure::failed("key is empty")));
}

#[test]
fn a_stale_token_refusal_gets_its_own_exit_code() {
    let details = ErrorDetails {
        detail: Some(error_details::Detail::StaleToken(StaleToken {
            name: "res".into(),
            presented: 3,
            current: 4,
        })),
    };
    let status = Status::with_details(
        tonic::Code::FailedPrecondition,
        "stale fencing token 3 for \"res\"",
        details.encode_to_vec().into(),
    );
    match classify(&status) {
        AttemptError::Rejected(failure) => {
            assert_eq!(failure.code, crate::cli::EXIT_STALE_TOKEN);
            assert!(failure.message.contains("stale"), "{}", failure.message);
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[test]
fn not_leader_status_is_classified_with_its_hint() {
    let mut status = Status::unavailable("not the leader");
    status.metadata_mut().insert(
        LEADER_ADDR_METADATA,
        "127.0.0.1:7005".parse().expect("ascii"),
    );
    match classify(&status) {
        AttemptError::NotLeader { leader_addr } => {
            assert_eq!(leader_addr.as_deref(), Some("127.0.0.1:7005"));
        }
        other => panic!("expected NotLeader, got {other:?}"),
    }
    assert!(matches!(
        classify(&Status::invalid_argument("bad key")),
        AttemptError::Rejected(_)
    ));
}

#[test]
fn not_leader_error_details_give_the_leader_address() {
    use latchkey_proto::v1::{error_details::Detail, ErrorDetails, NotLeader};
    use prost::Message;
    let details = ErrorDetails {
        detail: Some(Detail::NotLeader(NotLeader {
            leader_id: 3,
            leader_client_addr: "127.0.0.1:7005".into(),
        })),
    };
    let status = Status::with_details(
        tonic::Code::Unavailable,
        "leader is elsewhere",
        details.encode_to_vec().into(),
    );
    match classify(&status) {
        AttemptError::NotLeader { leader_addr } => {
            assert_eq!(leader_addr.as_deref(), Some("127.0.0.1:7005"));
        }
        other => panic!("expected NotLeader, got {other:?}"),
    }
}

#[test]
fn a_deduplicated_write_whose_outcome_is_unknown_is_resent() {
    let list = endpoints(&["a:1", "b:1"]);
    let mut plan = Plan::new(&list, Idempotence::DeduplicatedWrite, TIMEOUT);
    let first = plan.first();
    let step = plan.after(
        &first,
        AttemptError::OutcomeUnknown("leadership lost".into()),
    );
    assert_eq!(step, Step::WaitThenTry(BACKOFF_START, "b:1".into()));
}

#[test]
fn not_leader_without_a_known_leader_is_still_not_leader() {
    let status = Status::unavailable("not the leader; no leader known yet");
    assert!(matches!(
        classify(&status),
        AttemptError::NotLeader { leader_addr: None }
    ));
}

#[test]
fn lost_leadership_and_server_timeouts_leave_the_outcome_unknown() {
    for status in [
        Status::unavailable("leadership changed before the request was confirmed; retry"),
        Status::unavailable("node is shutting down"),
        Status::deadline_exceeded("timed out waiting for the cluster"),
    ] {
        assert!(
            matches!(classify(&status), AttemptError::OutcomeUnknown(_)),
            "{status:?}"
        );
    }
}

/// A fake node: the leader answers puts; a follower points at `leader_addr`.
struct FakeNode {
    leader_addr: Option<String>,
    puts: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl Kv for FakeNode {
    async fn put(&self, _request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        match &self.leader_addr {
            None => {
                let revision = self.puts.fetch_add(1, Ordering::SeqCst) as u64 + 1;
                Ok(Response::new(PutResponse {
                    header: None,
                    revision,
                }))
            }
            Some(addr) => {
                let mut status = Status::unavailable("not the leader");
                let value = addr
                    .parse()
                    .map_err(|_| Status::internal("bad test addr"))?;
                status.metadata_mut().insert(LEADER_ADDR_METADATA, value);
                Err(status)
            }
        }
    }

    async fn get(&self, _request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    async fn delete(
        &self,
        _request: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    async fn range(
        &self,
        _request: Request<RangeRequest>,
    ) -> Result<Response<RangeResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }
}

async fn start_fake(leader_addr: Option<String>, puts: Arc<AtomicUsize>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let service = KvServer::new(FakeNode { leader_addr, puts });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}

fn free_port_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("local addr").to_string()
}

async fn put_through(router: &Router) -> Result<u64, Failure> {
    let request = PutRequest {
        key: b"k".to_vec(),
        value: b"v".to_vec(),
        ..PutRequest::default()
    };
    router
        .call(Idempotence::Write, |mut client| {
            let request = request.clone();
            async move { client.put(request).await }
        })
        .await
        .map(|response: PutResponse| response.revision)
}

#[tokio::test]
async fn a_put_sent_to_a_follower_reaches_the_leader_past_a_dead_endpoint() {
    let puts = Arc::new(AtomicUsize::new(0));
    let leader = start_fake(None, puts.clone()).await;
    let follower = start_fake(Some(leader.to_string()), puts.clone()).await;
    let router = Router::new(vec![free_port_addr(), follower.to_string()], TIMEOUT);
    let revision = put_through(&router).await.expect("put reaches the leader");
    assert_eq!(revision, 1);
    assert_eq!(puts.load(Ordering::SeqCst), 1, "applied exactly once");
}

#[tokio::test]
async fn a_redirect_loop_ends_with_a_one_line_failure() {
    let puts = Arc::new(AtomicUsize::new(0));
    // Two followers naming each other: no leader anywhere.
    let a_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let a_addr = a_listener.local_addr().expect("local addr");
    drop(a_listener);
    let b = start_fake(Some(a_addr.to_string()), puts.clone()).await;
    let listener = tokio::net::TcpListener::bind(a_addr).await.expect("rebind");
    let service = KvServer::new(FakeNode {
        leader_addr: Some(b.to_string()),
        puts: puts.clone(),
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let router = Router::new(vec![b.to_string()], TIMEOUT);
    let failure = put_through(&router).await.expect_err("no leader exists");
    assert_eq!(failure.code, EXIT_FAILED);
    assert!(!failure.message.contains('\n'), "{}", failure.message);
    assert_eq!(puts.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_put_with_every_endpoint_down_is_unreachable() {
    let router = Router::new(vec![free_port_addr(), free_port_addr()], TIMEOUT);
    let failure = put_through(&router).await.expect_err("nothing listens");
    assert_eq!(failure.code, EXIT_UNREACHABLE, "{failure:?}");
}
