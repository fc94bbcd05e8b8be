//! Backup and restore with the real `latchkey` binary: `snapshot save` from
//! a running cluster, more grants after it, the cluster destroyed,
//! `snapshot restore` of a new cluster from the file, and the first token
//! the new cluster grants is above every token the old one ever granted.
//! A corrupt or truncated file, and a data dir that already holds data, are
//! refused with one line and nothing written.

mod support;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use latchkey_client::Client;
use latchkey_server::config::Config;
use latchkey_server::server::RunningServer;
use latchkey_server::types::NodeId;
use support::TestCluster;

const LATCHKEY: &str = env!("CARGO_BIN_EXE_latchkey");
/// The exit code of a command refused for bad input or a failed check.
const EXIT_FAILED: i32 = 4;

fn latchkey(args: &[&str]) -> Output {
    Command::new(LATCHKEY)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run latchkey")
}

fn free_addr() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").to_string()
}

/// Grants `count` locks, one after another, and returns their tokens.
async fn grant_tokens(endpoints: &str, count: usize) -> Vec<u64> {
    let client = Client::connect(endpoints.split(','))
        .await
        .expect("client connects");
    let lease = client
        .grant_lease(Duration::from_secs(10))
        .await
        .expect("lease granted");
    let mut tokens = Vec::new();
    for i in 0..count {
        let guard = lease
            .lock(&format!("backup/{}", i % 3))
            .await
            .expect("lock");
        tokens.push(guard.token().0);
        guard.release().await.expect("release");
    }
    lease.revoke().await.expect("revoke");
    tokens
}

fn refused_with_one_line(output: &Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
    assert_eq!(
        output.status.code(),
        Some(EXIT_FAILED),
        "{what} is refused: {stderr}"
    );
    assert_eq!(
        stderr.lines().count(),
        1,
        "{what}: one line, got {stderr:?}"
    );
    stderr
}

fn is_empty_or_absent(dir: &Path) -> bool {
    std::fs::read_dir(dir).map_or(true, |mut entries| entries.next().is_none())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_cluster_grants_tokens_above_every_token_of_the_old_one() {
    let work = tempfile::tempdir().expect("temp dir");
    let backup = work.path().join("backup.lksnap");
    let backup_arg = backup.to_str().unwrap();

    // The old cluster: state, a backup, then more grants after it.
    let old = TestCluster::start(3, 10_000).await;
    old.leader().await;
    let endpoints = old.endpoints();
    old.put("kept", "before the backup").await;
    let before = grant_tokens(&endpoints, 5).await;
    let saved = latchkey(&["snapshot", "save", backup_arg, "--endpoints", &endpoints]);
    assert!(
        saved.status.success(),
        "snapshot save: {}",
        String::from_utf8_lossy(&saved.stderr)
    );
    let line = String::from_utf8_lossy(&saved.stdout);
    assert!(
        line.contains(" index ") && line.contains(" term ") && line.contains(" checksum "),
        "save names index, term and checksum: {line}"
    );
    old.put("lost", "after the backup").await;
    let after = grant_tokens(&endpoints, 20).await;
    let old_max = before.iter().chain(&after).copied().max().unwrap();
    println!("old cluster: tokens up to {old_max}; {}", line.trim());
    old.shutdown().await;

    let info = latchkey(&["snapshot", "info", backup_arg, "--json"]);
    assert!(info.status.success());
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("info is JSON");
    assert!(info["index"].as_u64().unwrap() > 0 && info["term"].as_u64().unwrap() > 0);
    assert_eq!(info["checksum"].as_str().unwrap().len(), 8);

    // A new cluster of three, each member restored from the file.
    let peers: BTreeMap<NodeId, String> = (1..=3).map(|id| (NodeId(id), free_addr())).collect();
    let initial_cluster = peers
        .iter()
        .map(|(id, addr)| format!("{id}={addr}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut servers = Vec::new();
    let mut client_endpoints = Vec::new();
    for (id, peer) in &peers {
        let data_dir = work.path().join(format!("node-{id}"));
        let restored = latchkey(&[
            "snapshot",
            "restore",
            backup_arg,
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--id",
            &id.0.to_string(),
            "--initial-cluster",
            &initial_cluster,
        ]);
        assert!(
            restored.status.success(),
            "restore member {id}: {}",
            String::from_utf8_lossy(&restored.stderr)
        );
        let client: SocketAddr = free_addr().parse().unwrap();
        let config =
            Config::with_defaults(*id, data_dir, client, peer.parse().unwrap(), peers.clone());
        client_endpoints.push(client.to_string());
        servers.push(
            RunningServer::start(config)
                .await
                .expect("restored node starts"),
        );
    }
    let endpoints = client_endpoints.join(",");

    let first = grant_tokens(&endpoints, 3).await;
    println!("restored cluster: first tokens {first:?}");
    assert!(
        first.iter().all(|token| *token > old_max),
        "every token of the restored cluster ({first:?}) is above the old cluster's {old_max}"
    );
    assert!(first.windows(2).all(|pair| pair[0] < pair[1]));
    let client = Client::connect(endpoints.split(',')).await.unwrap();
    let kept = client.get("kept").await.expect("get").map(|kv| kv.value);
    assert_eq!(
        kept.as_deref(),
        Some(&b"before the backup"[..]),
        "state from before the backup is restored"
    );
    assert!(client.get("lost").await.expect("get").is_none());
    for server in servers {
        let _ = server.shutdown().await;
    }

    // Bad input: refused with one line, nothing written.
    let bytes = std::fs::read(&backup).unwrap();
    let truncated = work.path().join("truncated.lksnap");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let mut flipped = bytes.clone();
    let middle = bytes.len() / 2;
    flipped[middle] ^= 0x40;
    let corrupt = work.path().join("corrupt.lksnap");
    std::fs::write(&corrupt, &flipped).unwrap();
    for (file, what) in [
        (&truncated, "a truncated file"),
        (&corrupt, "a corrupt file"),
    ] {
        let data_dir = work.path().join("refused");
        let output = latchkey(&[
            "snapshot",
            "restore",
            file.to_str().unwrap(),
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--id",
            "1",
            "--initial-cluster",
            &initial_cluster,
        ]);
        let line = refused_with_one_line(&output, what);
        println!("{what}: {line}");
        assert!(is_empty_or_absent(&data_dir), "{what}: nothing written");
        let info = latchkey(&["snapshot", "info", file.to_str().unwrap()]);
        refused_with_one_line(&info, what);
    }
    let occupied = work.path().join("node-1");
    let listing = |dir: &Path| {
        let mut names: Vec<_> = walk(dir);
        names.sort();
        names
    };
    let was = listing(&occupied);
    let output = latchkey(&[
        "snapshot",
        "restore",
        backup_arg,
        "--data-dir",
        occupied.to_str().unwrap(),
        "--id",
        "1",
        "--initial-cluster",
        &initial_cluster,
    ]);
    let line = refused_with_one_line(&output, "a data dir with data");
    assert!(line.contains("not empty"), "{line}");
    assert_eq!(listing(&occupied), was, "the occupied dir is untouched");
    let output = latchkey(&[
        "snapshot",
        "restore",
        backup_arg,
        "--data-dir",
        work.path().join("elsewhere").to_str().unwrap(),
        "--id",
        "9",
        "--initial-cluster",
        &initial_cluster,
    ]);
    assert_ne!(output.status.code(), Some(0), "an id outside the cluster");
    assert!(is_empty_or_absent(&work.path().join("elsewhere")));
}

/// Every file under `dir` with its size and modification time.
fn walk(dir: &Path) -> Vec<(String, u64, std::time::SystemTime)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = entry.metadata().unwrap();
        if meta.is_dir() {
            found.extend(walk(&entry.path()));
        } else {
            found.push((
                entry.path().display().to_string(),
                meta.len(),
                meta.modified().unwrap(),
            ));
        }
    }
    found
}
