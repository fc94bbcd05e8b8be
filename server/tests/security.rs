//! Security, on in-process clusters over real loopback gRPC: mutual TLS on
//! the peer port keeps out a node whose certificate another CA signed;
//! authentication refuses callers without credentials and users without
//! the permission, changing nothing; every configured limit is enforced
//! with an error that names it; a flooding client does not starve other
//! clients' keepalives; plaintext on a TLS port is refused at once.
//!
//! Certificates are made per test with the same code as `latchkey dev
//! --tls`, under temp dirs.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use latchkey_client::auth::PermissionKind;
use latchkey_client::{Client, Error, LeaseState};
use latchkey_proto::v1::kv_client::KvClient;
use latchkey_proto::v1::GetRequest;
use latchkey_server::config::Config;
use latchkey_server::tls::{TlsFiles, TlsSettings};
use latchkey_server::types::NodeId;
use support::{TestCluster, DEADLINE};

fn make_ca(dir: &Path, nodes: u64) {
    latchkey_server::dev::tls::ensure_ca(dir).expect("ca");
    for id in 1..=nodes {
        latchkey_server::dev::tls::ensure_node(dir, id).expect("node certificate");
    }
}

fn files(dir: &Path, id: u64, ca: &Path) -> TlsFiles {
    let tls = dir.join("tls");
    TlsFiles {
        cert: tls.join(format!("node-{id}.pem")),
        key: tls.join(format!("node-{id}-key.pem")),
        client_ca: Some(ca.to_path_buf()),
        crl: None,
    }
}

fn client_tls(dir: &Path, user: &str) -> latchkey_client::TlsConfig {
    let tls = dir.join("tls");
    latchkey_client::TlsConfig::from_files(
        &tls.join("ca.pem"),
        Some(&tls.join(format!("{user}.pem"))),
        Some(&tls.join(format!("{user}-key.pem"))),
    )
    .expect("client tls")
}

async fn connect(
    cluster: &TestCluster,
    configure: impl Fn(latchkey_client::ClientBuilder) -> latchkey_client::ClientBuilder,
) -> Result<Client, Error> {
    let builder = Client::builder(cluster.endpoints().split(',').map(str::to_string))
        .sessionless()
        .retry_timeout(Duration::from_secs(10));
    configure(builder).connect().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_certificate_another_ca_signed_cannot_take_part() {
    let cluster_ca = tempfile::tempdir().expect("tempdir");
    let other_ca = tempfile::tempdir().expect("tempdir");
    make_ca(cluster_ca.path(), 3);
    make_ca(other_ca.path(), 3);
    let ca = cluster_ca.path().join("tls/ca.pem");
    let (good, bad) = (
        cluster_ca.path().to_path_buf(),
        other_ca.path().to_path_buf(),
    );
    let cluster = TestCluster::start_with(3, |config: &mut Config| {
        // Node 3 trusts the cluster CA but its own certificate is the other CA's.
        let signer = if config.id == NodeId(3) { &bad } else { &good };
        config.tls = TlsSettings {
            client: None,
            peer: Some(files(signer, config.id.0, &ca)),
        };
    })
    .await;
    let start = Instant::now();
    let leader = loop {
        let leaders: Vec<_> = [1, 2]
            .iter()
            .filter(|id| {
                cluster.servers[&NodeId(**id)].node.status().role
                    == latchkey_server::node::Role::Leader
            })
            .copied()
            .collect();
        if let [leader] = leaders.as_slice() {
            break NodeId(*leader);
        }
        assert!(start.elapsed() < DEADLINE, "nodes 1 and 2 elect a leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_ne!(leader, NodeId(3));
    let request = latchkey_proto::v1::PutRequest {
        key: b"k".to_vec(),
        value: b"v".to_vec(),
        ..Default::default()
    };
    let revision = cluster
        .client(leader)
        .await
        .put(request)
        .await
        .expect("the two good nodes take writes")
        .into_inner()
        .revision;
    cluster.wait_applied(NodeId(1), revision).await;
    cluster.wait_applied(NodeId(2), revision).await;
    // Give node 3 ample time: it never hears from the others, and they never from it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let outsider = cluster.servers[&NodeId(3)].node.status();
    assert!(
        outsider.applied_index < revision,
        "node 3 applied the write: {outsider:?}"
    );
    assert_ne!(
        outsider.leader_id, leader.0,
        "node 3 learnt the leader: {outsider:?}"
    );
    for id in [1, 2] {
        let status = cluster.servers[&NodeId(id)].node.status();
        assert_eq!(
            status.leader_id, leader.0,
            "node 3's campaigns did not disturb node {id}"
        );
    }
    cluster.shutdown().await;
}

/// Makes `root` (admin) and `alice` (may lock `app/`, grant leases, read
/// and write `app/`), then turns authentication on.
async fn set_up_users(cluster: &TestCluster) {
    let anyone = connect(cluster, |b| b).await.expect("connect");
    let refused = anyone.auth_enable().await.expect_err("no admin yet");
    assert!(
        matches!(
            refused,
            Error::Rejected {
                code: tonic::Code::FailedPrecondition,
                ..
            }
        ),
        "{refused:?}"
    );
    anyone.user_add("root", "rootpw").await.expect("root");
    anyone.role_add("root").await.expect("role root");
    anyone
        .role_grant("root", PermissionKind::Admin, "")
        .await
        .expect("admin");
    anyone
        .user_grant_role("root", "root")
        .await
        .expect("grant root");
    anyone.user_add("alice", "alicepw").await.expect("alice");
    anyone.role_add("app").await.expect("role app");
    for (kind, prefix) in [
        (PermissionKind::Lock, "app/"),
        (PermissionKind::Lease, ""),
        (PermissionKind::Read, "app/"),
        (PermissionKind::Write, "app/"),
    ] {
        anyone.role_grant("app", kind, prefix).await.expect("grant");
    }
    anyone
        .user_grant_role("alice", "app")
        .await
        .expect("grant app");
    anyone.auth_enable().await.expect("enable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_credentials_or_permission_nothing_is_done() {
    let cluster = TestCluster::start_with(3, |config: &mut Config| {
        config.auth_token_ttl = Duration::from_secs(3);
    })
    .await;
    cluster.leader().await;
    set_up_users(&cluster).await;

    // No credentials at all.
    let anonymous = connect(&cluster, |b| b)
        .await
        .expect("status needs no credentials");
    for refused in [
        anonymous
            .raw()
            .grant_lease(Duration::from_secs(5))
            .await
            .map(|_| ()),
        anonymous.get(b"app/x".to_vec()).await.map(|_| ()),
    ] {
        match refused {
            Err(Error::Unauthenticated { reason, .. }) => assert_eq!(reason, "no_credentials"),
            other => panic!("anonymous call must be refused: {other:?}"),
        }
    }

    // root holds locks/billing/main.
    let root = connect(&cluster, |b| b.credentials("root", "rootpw"))
        .await
        .expect("root");
    let (root_lease, _) = root
        .raw()
        .grant_lease(Duration::from_secs(30))
        .await
        .expect("lease");
    let grant = root
        .raw()
        .acquire("locks/billing/main", root_lease, false, None)
        .await
        .expect("root locks");

    // alice may not acquire, release, read it, nor touch root's lease.
    let alice = connect(&cluster, |b| b.credentials("alice", "alicepw"))
        .await
        .expect("alice");
    let (alice_lease, _) = alice
        .raw()
        .grant_lease(Duration::from_secs(30))
        .await
        .expect("alice's lease");
    let denied = |result: Result<(), Error>, what: &str| match result {
        Err(Error::PermissionDenied { user, .. }) => assert_eq!(user, "alice", "{what}"),
        other => panic!("{what} must be denied: {other:?}"),
    };
    denied(
        alice
            .raw()
            .acquire("locks/billing/main", alice_lease, false, None)
            .await
            .map(|_| ()),
        "acquire",
    );
    denied(
        alice.raw().release("locks/billing/main", grant.token).await,
        "release",
    );
    denied(
        alice
            .raw()
            .describe_lock("locks/billing/main")
            .await
            .map(|_| ()),
        "describe",
    );
    denied(
        alice.raw().revoke_lease(root_lease).await,
        "revoke root's lease",
    );
    denied(
        alice.raw().keepalive(root_lease).await.map(|_| ()),
        "keepalive root's lease",
    );
    // Alice's renewals share one stream: the refusal answers root's lease
    // alone, and her own renewal beside it goes through.
    let raw = alice.raw();
    let (own, foreign) = tokio::join!(raw.keepalive(alice_lease), raw.keepalive(root_lease));
    own.expect("alice renews her own lease beside a refused one");
    denied(foreign.map(|_| ()), "keepalive root's lease beside her own");
    denied(
        alice
            .raw()
            .acquire("app/job", root_lease, false, None)
            .await
            .map(|_| ()),
        "acquire with root's lease",
    );
    // Nothing changed: root still holds the lock with the same token.
    let info = root
        .raw()
        .describe_lock("locks/billing/main")
        .await
        .expect("describe");
    assert_eq!(info.holder.map(|h| h.token), Some(grant.token));
    assert!(root
        .raw()
        .lease_info(root_lease)
        .await
        .expect("ttl")
        .is_some());
    // What alice may do, she can.
    alice
        .raw()
        .acquire("app/job", alice_lease, false, None)
        .await
        .expect("alice locks app/job");
    alice
        .put(b"app/x".to_vec(), b"1".to_vec())
        .await
        .expect("alice writes app/");

    // Bad tokens: malformed header, expired, revoked by a new password.
    let addr = cluster.servers.values().next().expect("node").client_addr;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("channel");
    let get = |header: String| {
        let channel = channel.clone();
        async move {
            let mut request = tonic::Request::new(GetRequest {
                key: b"app/x".to_vec(),
                serializable: true,
            });
            request
                .metadata_mut()
                .insert("authorization", header.parse().expect("header"));
            KvClient::new(channel).get(request).await
        }
    };
    let reason = |status: tonic::Status| match Error::from_status(&status) {
        Error::Unauthenticated { reason, .. } => reason,
        other => panic!("expected unauthenticated, got {other:?}"),
    };
    assert_eq!(
        reason(get("Basic YWxpY2U6YWxpY2Vwdw==".into()).await.unwrap_err()),
        "malformed_token"
    );
    assert_eq!(
        reason(get("Bearer lk1.garbage.sig".into()).await.unwrap_err()),
        "malformed_token"
    );
    let (token, _) = alice.authenticate("alice", "alicepw").await.expect("token");
    get(format!("Bearer {token}"))
        .await
        .expect("a fresh token works");
    let wrong = alice
        .authenticate("alice", "wrong")
        .await
        .expect_err("wrong password");
    assert!(
        matches!(wrong, Error::Unauthenticated { ref reason, .. } if reason == "bad_password"),
        "{wrong:?}"
    );
    // A lock taken on alice's lock pipeline, whose stream carries the
    // token she logged in with.
    let held = alice
        .raw()
        .acquire("app/held", alice_lease, false, None)
        .await
        .expect("alice locks app/held");
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert_eq!(
        reason(get(format!("Bearer {token}")).await.unwrap_err()),
        "token_expired"
    );
    // Her client's token has expired too: the pipeline's next request is
    // refused, and the client logs in again and sends it on a new stream.
    alice
        .raw()
        .release("app/held", held.token)
        .await
        .expect("released once the client has logged in again");
    let (token, _) = alice.authenticate("alice", "alicepw").await.expect("token");
    root.user_change_password("alice", "newpw")
        .await
        .expect("passwd");
    // The node answering may apply the new password a moment after the leader.
    let start = Instant::now();
    let revoked = loop {
        match get(format!("Bearer {token}")).await {
            Err(status) => break status,
            Ok(_) => assert!(start.elapsed() < DEADLINE, "the old token still works"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(reason(revoked), "token_revoked");
    // The client logs in again by itself only with a password that still holds.
    let stale = alice
        .raw()
        .keepalive(alice_lease)
        .await
        .expect_err("old password");
    assert!(matches!(stale, Error::Unauthenticated { .. }), "{stale:?}");

    // Nobody can remove the last admin while authentication is on.
    let last = root.user_delete("root").await.expect_err("last admin");
    assert!(
        matches!(
            last,
            Error::Rejected {
                code: tonic::Code::FailedPrecondition,
                ..
            }
        ),
        "{last:?}"
    );
    root.auth_disable().await.expect("disable");
    anonymous.get(b"app/x".to_vec()).await.expect("open again");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_limit_is_enforced_with_an_error_that_names_it() {
    let cluster = TestCluster::start_with(3, |config: &mut Config| {
        config.limits.max_leases_per_identity = 3;
        config.limits.max_waiters_per_lock = 1;
        config.limits.max_key_bytes = 16;
        config.limits.max_value_bytes = 1024;
        config.limits.max_request_bytes = 8 * 1024;
        config.limits.max_streams_per_connection = 4;
    })
    .await;
    cluster.leader().await;
    let client = connect(&cluster, |b| b).await.expect("connect");
    let raw = client.raw();
    let mut leases = Vec::new();
    for _ in 0..3 {
        leases.push(
            raw.grant_lease(Duration::from_secs(30))
                .await
                .expect("lease")
                .0,
        );
    }
    match raw.grant_lease(Duration::from_secs(30)).await {
        Err(Error::LimitExceeded { limit, allowed }) => {
            assert!(limit.contains("max-leases-per-identity"), "{limit}");
            assert_eq!(allowed, 3);
        }
        other => panic!("a fourth lease must be refused: {other:?}"),
    }
    raw.acquire("q", leases[0], false, None)
        .await
        .expect("holder");
    let waiter = {
        let client = client.clone();
        let lease = leases[1];
        tokio::spawn(async move {
            client
                .raw()
                .acquire("q", lease, true, Some(Duration::from_secs(20)))
                .await
        })
    };
    let start = Instant::now();
    loop {
        let info = raw.describe_lock("q").await.expect("describe");
        if info.waiters.len() == 1 {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "the first waiter queues");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    match raw
        .acquire("q", leases[2], true, Some(Duration::from_secs(5)))
        .await
    {
        Err(Error::LimitExceeded { limit, .. }) => {
            assert!(limit.contains("max-waiters-per-lock"), "{limit}")
        }
        other => panic!("a second waiter must be refused: {other:?}"),
    }
    waiter.abort();

    let key = client
        .put(vec![b'k'; 17], b"v".to_vec())
        .await
        .expect_err("long key");
    assert!(key.to_string().contains("--max-key-bytes"), "{key}");
    let value = client
        .put(b"k".to_vec(), vec![0; 2000])
        .await
        .expect_err("big value");
    assert!(value.to_string().contains("--max-value-bytes"), "{value}");
    let request = client
        .put(b"k".to_vec(), vec![0; 10_000])
        .await
        .expect_err("big request");
    assert!(
        matches!(
            request,
            Error::Rejected {
                code: tonic::Code::OutOfRange | tonic::Code::ResourceExhausted,
                ..
            }
        ),
        "{request:?}"
    );
    assert!(
        client.get(b"k".to_vec()).await.expect("get").is_none(),
        "nothing was written"
    );

    // Streams: four keepalive streams on one connection, the fifth refused.
    let addr = cluster.servers.values().next().expect("node").client_addr;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("channel");
    let mut open = Vec::new();
    let mut refused = None;
    for _ in 0..5 {
        let (sender, receiver) = tokio::sync::mpsc::channel(1);
        let stream = tokio_stream::wrappers::ReceiverStream::new(receiver);
        match latchkey_proto::v1::lease_client::LeaseClient::new(channel.clone())
            .keep_alive(stream)
            .await
        {
            Ok(response) => open.push((sender, response)),
            Err(status) => refused = Some(status),
        }
    }
    assert_eq!(open.len(), 4);
    let status = refused.expect("the fifth stream is refused");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(
        status.message().contains("max-streams-per-connection"),
        "{}",
        status.message()
    );
    drop(open);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_client_does_not_stop_other_keepalives() {
    let cluster = TestCluster::start(3, 10_000).await;
    cluster.leader().await;
    let keeper = connect(&cluster, |b| b).await.expect("connect");
    let mut leases = Vec::new();
    for _ in 0..100 {
        leases.push(
            keeper
                .grant_lease(Duration::from_millis(1500))
                .await
                .expect("lease"),
        );
    }
    let stop = Instant::now() + Duration::from_secs(8);
    let mut flooders = Vec::new();
    for worker in 0..8 {
        let flood = connect(&cluster, |b| b).await.expect("flooder connects");
        flooders.push(tokio::spawn(async move {
            let mut sent = 0u64;
            let mut n = 0u64;
            // Bounded by the deadline.
            while Instant::now() < stop {
                let key = format!("flood/{worker}/{}", n % 64).into_bytes();
                n += 1;
                if flood.put(key, vec![7; 16 * 1024]).await.is_ok() {
                    sent += 1;
                }
            }
            sent
        }));
    }
    let mut flooded = 0;
    for flooder in flooders {
        flooded += flooder.await.expect("flooder");
    }
    assert!(flooded > 0, "the flood ran");
    for lease in &leases {
        assert_ne!(
            lease.state(),
            LeaseState::Lost,
            "lease {} lost during the flood",
            lease.id()
        );
        let info = keeper.raw().lease_info(lease.id()).await.expect("ttl");
        assert!(
            info.is_some(),
            "lease {} expired on the cluster",
            lease.id()
        );
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_to_a_tls_port_is_refused_at_once_and_the_node_serves_on() {
    let certs = tempfile::tempdir().expect("tempdir");
    make_ca(certs.path(), 1);
    let ca = certs.path().join("tls/ca.pem");
    let dir = certs.path().to_path_buf();
    let cluster = TestCluster::start_with(1, |config: &mut Config| {
        config.tls = TlsSettings {
            client: Some(files(&dir, 1, &ca)),
            peer: Some(files(&dir, 1, &ca)),
        };
    })
    .await;
    cluster.leader().await;
    let addr = cluster.servers[&NodeId(1)].client_addr;
    for _ in 0..3 {
        let started = Instant::now();
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("tcp");
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .expect("write");
        let mut buffer = [0u8; 256];
        let read = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buffer)).await;
        match read {
            // Closed, reset, or a TLS alert; never an HTTP/2 answer.
            Ok(Ok(n)) => assert!(n == 0 || buffer[0] == 0x15, "{:?}", &buffer[..n]),
            Ok(Err(_)) => {}
            Err(_) => panic!("plaintext was not refused within 3 s"),
        }
        assert!(started.elapsed() < Duration::from_secs(3));
    }
    // Without a client certificate the handshake fails too.
    let ca_only = latchkey_client::TlsConfig::new(&std::fs::read(&ca).expect("ca")).expect("ca");
    let no_cert = connect(&cluster, |b| {
        b.tls(ca_only.clone()).retry_timeout(Duration::from_secs(1))
    })
    .await;
    assert!(no_cert.is_err(), "mutual TLS needs a client certificate");
    let client = connect(&cluster, |b| b.tls(client_tls(&dir, "root")))
        .await
        .expect("TLS client");
    client
        .put(b"still".to_vec(), b"serving".to_vec())
        .await
        .expect("the node serves on");
    cluster.shutdown().await;
}
