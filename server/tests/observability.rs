//! What operators and monitoring see: the HTTP port (`/metrics`,
//! `/healthz`, `/readyz`, `/api/status` and the status page, the latter in
//! a real headless Chromium), and the gRPC health and reflection services
//! on the client port. In-process clusters on loopback; every HTTP request
//! and every wait has a deadline.

mod support;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use latchkey_client::Client;
use latchkey_proto::v1::kv_client::KvClient;
use latchkey_proto::v1::{Fence, PutRequest};
use latchkey_server::api::Api;
use latchkey_server::types::NodeId;
use serde_json::Value;
use support::http::{get, request, sample, wait_for_sample};
use support::{TestCluster, DEADLINE};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

/// How long a headless Chromium run may take before the test gives up.
const BROWSER_DEADLINE: Duration = Duration::from_secs(90);

async fn start(nodes: u64) -> TestCluster {
    TestCluster::start_with(nodes, |config| {
        config.listen_http = Some("127.0.0.1:0".parse().expect("loopback address"));
    })
    .await
}

fn http_addr(cluster: &TestCluster, id: NodeId) -> SocketAddr {
    cluster.servers[&id]
        .http_addr
        .expect("nodes of this test serve HTTP")
}

/// Polls `check` every 50 ms until it returns `Some`, or fails the test
/// after `deadline` with the last observation.
async fn poll<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        match check().await {
            Ok(value) => return value,
            Err(last) if start.elapsed() > deadline => {
                panic!("{what}: not within {deadline:?}; last: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn expect_code(addr: SocketAddr, path: &str, code: u16) -> String {
    poll(
        &format!("{path} on {addr} answers {code}"),
        DEADLINE,
        || async {
            match get(addr, path).await {
                Ok((got, body)) if got == code => Ok(body),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await
}

/// Polls `addr`'s `/metrics` until sample `name` equals `wanted`.
async fn metric_reaches(addr: SocketAddr, name: &str, wanted: f64) -> String {
    wait_for_sample(addr, name, |v| (v - wanted).abs() < f64::EPSILON, DEADLINE).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_503_when_a_node_loses_its_leader_and_200_when_one_returns() {
    let mut cluster = start(5).await;
    let leader = cluster.leader().await;
    let watched = (1..=5).map(NodeId).find(|id| *id != leader).unwrap();
    for id in cluster.servers_ids() {
        expect_code(http_addr(&cluster, id), "/readyz", 200).await;
        expect_code(http_addr(&cluster, id), "/healthz", 200).await;
    }
    let metrics = expect_code(http_addr(&cluster, watched), "/metrics", 200).await;
    assert_eq!(sample(&metrics, "latchkey_node_ready"), Some(1.0));
    assert_eq!(
        sample(&metrics, "latchkey_raft_leader_id"),
        Some(leader.0 as f64)
    );

    // Three of five gone, the leader among them: no quorum, no leader.
    let stopped: Vec<NodeId> = std::iter::once(leader)
        .chain(
            (1..=5)
                .map(NodeId)
                .filter(|id| *id != leader && *id != watched),
        )
        .take(3)
        .collect();
    for id in &stopped {
        cluster.stop(*id).await;
    }
    let addr = http_addr(&cluster, watched);
    let body = expect_code(addr, "/readyz", 503).await;
    assert!(body.contains("no leader known"), "{body}");
    // Still alive: only readiness depends on the leader.
    expect_code(addr, "/healthz", 200).await;
    let metrics = expect_code(addr, "/metrics", 200).await;
    assert_eq!(sample(&metrics, "latchkey_node_ready"), Some(0.0));
    assert_eq!(sample(&metrics, "latchkey_raft_leader_id"), Some(0.0));

    for id in &stopped {
        cluster.restart(*id).await;
    }
    expect_code(addr, "/readyz", 200).await;
    let metrics = expect_code(addr, "/metrics", 200).await;
    assert!(
        sample(&metrics, "latchkey_raft_leader_changes_total").unwrap_or(0.0) >= 2.0,
        "a first leader and a second one were seen:\n{metrics}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_locks_granted_and_released_and_count_stale_tokens() {
    let cluster = start(3).await;
    let leader = cluster.leader().await;
    let addr = http_addr(&cluster, leader);
    let client = Client::connect(cluster.endpoints().split(','))
        .await
        .expect("client connects");
    let lease = client
        .grant_lease(Duration::from_secs(10))
        .await
        .expect("lease");
    let guard = lease.lock("metrics/a").await.expect("lock");
    let held = metric_reaches(addr, "latchkey_locks_held", 1.0).await;
    assert_eq!(sample(&held, "latchkey_leases"), Some(1.0));
    assert_eq!(
        sample(&held, "latchkey_grants_total{kind=\"lock\"}"),
        Some(1.0)
    );
    assert!(
        sample(
            &held,
            "latchkey_grpc_requests_total{code=\"Ok\",method=\"/latchkey.v1.Lock/Acquire\"}"
        )
        .is_some(),
        "acquire counted on the leader:\n{held}"
    );
    assert!(
        sample(&held, "latchkey_proposal_duration_seconds_count").unwrap_or(0.0) >= 2.0,
        "{held}"
    );
    assert!(sample(&held, "latchkey_fsync_duration_seconds_count").unwrap_or(0.0) >= 1.0);
    assert!(sample(&held, "latchkey_apply_duration_seconds_count").unwrap_or(0.0) >= 1.0);

    // A fenced write with a token that is not the current grant.
    let token = guard.token().0;
    let refused = KvClient::new(cluster.channel(leader).await)
        .put(PutRequest {
            key: b"metrics/key".to_vec(),
            value: b"v".to_vec(),
            fence: Some(Fence {
                name: "metrics/a".into(),
                token: token + 1000,
                kind: 0,
            }),
            ..PutRequest::default()
        })
        .await
        .expect_err("a stale token is refused");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);

    guard.release().await.expect("release");
    let released = metric_reaches(addr, "latchkey_locks_held", 0.0).await;
    assert_eq!(
        sample(&released, "latchkey_stale_token_refusals_total"),
        Some(1.0)
    );
    assert_eq!(sample(&released, "latchkey_leases"), Some(1.0));
    lease.revoke().await.expect("revoke");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_in_chromium_shows_a_held_lock_its_token_and_its_waiter() {
    let cluster = start(3).await;
    let leader = cluster.leader().await;
    let follower = cluster
        .servers_ids()
        .into_iter()
        .find(|id| *id != leader)
        .unwrap();
    let client = Client::connect(cluster.endpoints().split(','))
        .await
        .expect("client connects");
    let holder = client
        .grant_lease(Duration::from_secs(30))
        .await
        .expect("lease");
    let waiter = client
        .grant_lease(Duration::from_secs(30))
        .await
        .expect("lease");
    let guard = holder.lock("billing").await.expect("lock");
    let token = guard.token().0;
    let leadership = client
        .election("scheduler")
        .campaign(&holder, "10.1.2.3:8080")
        .await
        .expect("elected");
    let waiter_id = waiter.id().0;
    let waiting = {
        let waiter = waiter.clone();
        tokio::spawn(async move { waiter.lock("billing").await })
    };
    // The page of a follower: its lease times come from the leader.
    let addr = http_addr(&cluster, follower);
    poll("the waiter is queued", DEADLINE, || async {
        let (_, body) = get(addr, "/api/status").await?;
        let status: Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
        let queued = status["locks"][0]["waiters"][0]["lease"].as_u64();
        let timed = status["leases"][0]["remaining_ms"].as_u64().is_some();
        (queued == Some(waiter_id) && timed)
            .then_some(())
            .ok_or(body)
    })
    .await;

    let dom = chromium(&["--dump-dom".into(), format!("http://{addr}/")]);
    let row = element(&dom, "<tr data-lock=\"billing\"")
        .unwrap_or_else(|| panic!("no row for lock billing in the page:\n{dom}"));
    assert!(
        row.contains(&format!("class=\"num token\">{token}<")),
        "token {token} not shown in {row}"
    );
    assert!(
        row.contains(&format!("data-lease=\"{waiter_id}\"")),
        "waiter lease {waiter_id} not shown in {row}"
    );
    let election = element(&dom, "<tr data-election=\"scheduler\"")
        .unwrap_or_else(|| panic!("no row for election scheduler:\n{dom}"));
    assert!(election.contains(">10.1.2.3:8080<"), "{election}");
    assert!(
        election.contains(&format!("class=\"num token\">{}<", leadership.token().0)),
        "{election}"
    );
    let holder_row = element(&dom, &format!("<tr data-lease=\"{}\"", holder.id().0))
        .unwrap_or_else(|| panic!("no row for the holder's lease:\n{dom}"));
    assert!(holder_row.contains("billing"), "{holder_row}");
    assert!(
        holder_row.contains(&format!("time left as leader {} sees it", leader.0)),
        "the lease's time left comes from the leader: {holder_row}"
    );

    let screenshot = artifact_path("status-page.png");
    let _ = std::fs::remove_file(&screenshot);
    chromium(&[
        format!("--screenshot={}", screenshot.display()),
        "--window-size=1280,900".into(),
        "--hide-scrollbars".into(),
        format!("http://{addr}/"),
    ]);
    let png = std::fs::read(&screenshot).expect("the screenshot was written");
    assert!(
        png.starts_with(b"\x89PNG"),
        "not a PNG: {}",
        screenshot.display()
    );
    println!("status page screenshot: {}", screenshot.display());

    leadership.resign().await.expect("resign");
    guard.release().await.expect("release");
    let next = tokio::time::timeout(DEADLINE, waiting)
        .await
        .expect("the waiter is granted in time")
        .expect("waiter task")
        .expect("waiter acquires");
    assert!(next.token().0 > token);
    next.release().await.expect("release");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_and_reflection_answer_on_the_client_port() {
    let cluster = start(1).await;
    let id = cluster.leader().await;
    let mut health = HealthClient::new(cluster.channel(id).await);
    for service in std::iter::once("").chain(Api::SERVICE_NAMES) {
        poll(&format!("health of {service:?}"), DEADLINE, || {
            let mut health = health.clone();
            async move {
                let answer = health
                    .check(HealthCheckRequest {
                        service: service.into(),
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                (answer.get_ref().status() == ServingStatus::Serving)
                    .then_some(())
                    .ok_or_else(|| format!("{:?}", answer.get_ref()))
            }
        })
        .await;
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .expect_err("an unknown service is not found");
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    let mut reflection = ServerReflectionClient::new(cluster.channel(id).await);
    let ask = |message| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message),
    };
    let requests = vec![
        ask(MessageRequest::ListServices(String::new())),
        ask(MessageRequest::FileContainingSymbol(
            "latchkey.v1.Lock".into(),
        )),
    ];
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .expect("reflection stream")
        .into_inner();
    let listed = answers
        .message()
        .await
        .expect("answer")
        .expect("a first answer");
    let Some(MessageResponse::ListServicesResponse(list)) = listed.message_response else {
        panic!("not a service list: {listed:?}");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for service in Api::SERVICE_NAMES
        .into_iter()
        .chain(["grpc.health.v1.Health"])
    {
        assert!(
            names.contains(&service),
            "{service} not listed in {names:?}"
        );
    }
    assert!(
        !names.iter().any(|name| name.contains("peer")),
        "the peer service is not on the client port: {names:?}"
    );
    let file = answers
        .message()
        .await
        .expect("answer")
        .expect("a second answer");
    let Some(MessageResponse::FileDescriptorResponse(files)) = file.message_response else {
        panic!("no descriptor for latchkey.v1.Lock: {file:?}");
    };
    assert!(!files.file_descriptor_proto.is_empty());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_port_serves_reads_only_and_unknown_paths_get_404() {
    let cluster = start(1).await;
    let id = cluster.leader().await;
    let addr = http_addr(&cluster, id);
    expect_code(addr, "/readyz", 200).await;
    let before = cluster.servers[&id].node.status();
    let (_, state_before) = get(addr, "/api/status").await.expect("status");

    let (code, body) = get(addr, "/no/such/page").await.expect("answer");
    assert_eq!(code, 404, "{body}");
    assert!(
        body.contains("/metrics"),
        "the 404 says what exists: {body}"
    );
    for (method, path) in [
        ("POST", "/metrics"),
        ("PUT", "/api/status"),
        ("DELETE", "/"),
        ("POST", "/readyz"),
        ("PATCH", "/healthz"),
    ] {
        let (code, body) = request(method, addr, path).await.expect("answer");
        assert_eq!(code, 405, "{method} {path}: {body}");
    }
    let (code, page) = get(addr, "/").await.expect("page");
    assert_eq!(code, 200);
    assert!(page.contains("<title>latchkey status</title>"));
    assert!(
        !page.contains("src=\"http") && !page.contains("href=\"http"),
        "the page loads nothing from elsewhere"
    );

    let after = cluster.servers[&id].node.status();
    assert_eq!(
        (before.commit_index, before.applied_index),
        (after.commit_index, after.applied_index),
        "nothing was written"
    );
    let (_, state_after) = get(addr, "/api/status").await.expect("status");
    let strip = |text: &str| {
        let mut value: Value = serde_json::from_str(text).expect("json");
        value["generated_at_ms"] = Value::Null;
        value
    };
    assert_eq!(strip(&state_before), strip(&state_after));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_requests_while_the_node_stops_are_answered_or_closed_never_hung() {
    let mut cluster = start(1).await;
    let id = cluster.leader().await;
    let addr = http_addr(&cluster, id);
    expect_code(addr, "/readyz", 200).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let askers: Vec<_> = ["/metrics", "/api/status", "/readyz", "/healthz", "/"]
        .into_iter()
        .map(|path| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let started = Instant::now();
                    let outcome = get(addr, path).await;
                    outcomes.push((path, outcome, started.elapsed()));
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                outcomes
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    cluster.stop(id).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut answered = 0;
    let mut refused = 0;
    for asker in askers {
        for (path, outcome, took) in asker.await.expect("asker") {
            match outcome {
                Ok((code, _)) => {
                    assert!(
                        [200, 503].contains(&code),
                        "{path} answered {code} while stopping"
                    );
                    answered += 1;
                }
                Err(error) => {
                    assert!(!error.contains("no answer"), "{path} hung: {error}");
                    refused += 1;
                }
            }
            assert!(took < Duration::from_secs(5), "{path} took {took:?}");
        }
    }
    assert!(answered > 0, "requests were answered before the stop");
    assert!(refused > 0, "the port closed after the stop");
    cluster.shutdown().await;
}

/// Runs Debian's `chromium` headless on a page with `args`, the flags that
/// keep it off the network but for loopback, and a fresh profile; returns
/// what it printed. The page gets a few seconds of virtual time to fetch
/// and render.
fn chromium(args: &[String]) -> String {
    let browser = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|name| {
            Command::new(name)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .expect("chromium is installed (scripts/install-deps installs Debian's chromium)");
    let profile = tempfile::tempdir().expect("profile dir");
    let mut child = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chromium starts");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for chromium") {
            break status;
        }
        if start.elapsed() > BROWSER_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within {BROWSER_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = child.wait_with_output().expect("chromium output");
    assert!(
        status.success(),
        "chromium failed ({status}): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// From `start` (an opening tag's beginning) to the end of that element
/// (no nesting of the same tag inside).
fn element(dom: &str, start: &str) -> Option<String> {
    let from = dom.find(start)?;
    let tag = start.trim_start_matches('<').split(' ').next()?;
    let end = dom[from..].find(&format!("</{tag}>"))?;
    Some(dom[from..from + end].to_string())
}

/// Where test artefacts (the screenshot) are kept: `LATCHKEY_TEST_ARTIFACTS`
/// or `artifacts/` under cargo's per-target temp dir.
fn artifact_path(name: &str) -> std::path::PathBuf {
    let dir = std::env::var_os("LATCHKEY_TEST_ARTIFACTS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("artifacts"));
    std::fs::create_dir_all(&dir).expect("artefact dir");
    dir.join(name)
}
