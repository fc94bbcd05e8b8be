//! `latchkey-jepsen check`: exit codes, `--out`, `--export-edn`, formats.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn testdata(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(file)
}

fn check(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_latchkey-jepsen"))
        .arg("check")
        .args(args)
        .output()
        .expect("run latchkey-jepsen")
}

fn code(output: &Output) -> i32 {
    output.status.code().expect("exited, not signalled")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

#[test]
fn a_valid_history_exits_zero_and_says_valid() {
    let output = check(&[path_str(&testdata("good-lock-fenced.jsonl"))]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(code(&output), 0, "{stdout}{}", stderr(&output));
    assert!(stdout.lines().last() == Some("valid"), "{stdout}");
}

#[test]
fn an_invalid_history_exits_one_and_writes_the_witness_to_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("results.json");
    let output = check(&[
        path_str(&testdata("bad-stale-read.jsonl")),
        "--out",
        path_str(&out),
    ]);
    assert_eq!(code(&output), 1, "{}", stderr(&output));
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).expect("results written"))
            .expect("JSON");
    assert_eq!(results["valid"], serde_json::json!(false));
    let witness = &results["checkers"][0]["witness"]["ops"];
    assert_eq!(witness.as_array().map(Vec::len), Some(4), "{results:#}");
}

#[test]
fn a_history_with_nothing_to_check_exits_three() {
    let dir = tempfile::tempdir().expect("tempdir");
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").expect("write");
    assert_eq!(code(&check(&[path_str(&empty)])), 3);
    // A register history has nothing for the KV model either.
    let register = testdata("good-register.jsonl");
    assert_eq!(code(&check(&[path_str(&register), "--model", "kv"])), 3);
}

#[test]
fn a_missing_or_unreadable_history_exits_two_with_one_error_line() {
    let output = check(&["/nonexistent/history.jsonl"]);
    assert_eq!(code(&output), 2);
    let message = stderr(&output);
    assert!(
        message.starts_with("latchkey-jepsen: error: /nonexistent/history.jsonl"),
        "{message}"
    );
    assert_eq!(message.lines().count(), 1, "{message}");

    let dir = tempfile::tempdir().expect("tempdir");
    let garbage = dir.path().join("garbage.jsonl");
    std::fs::write(&garbage, "{\"index\": 0}\nnot json\n").expect("write");
    let output = check(&[path_str(&garbage), "--format", "jsonl"]);
    assert_eq!(code(&output), 2);
    assert!(
        stderr(&output).starts_with("latchkey-jepsen: error: "),
        "{}",
        stderr(&output)
    );
}

#[test]
fn bad_flags_are_usage_errors() {
    let history = testdata("good-register.jsonl");
    assert_eq!(code(&check(&[path_str(&history), "--budget", "soon"])), 2);
    assert_eq!(code(&check(&[path_str(&history), "--model", "paxos"])), 2);
}

#[test]
fn an_exported_edn_history_checks_the_same_as_its_source() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (file, expected) in [
        ("good-lock-fenced.jsonl", 0),
        ("bad-lost-increment.jsonl", 1),
    ] {
        let edn = dir.path().join(file.replace(".jsonl", ".edn"));
        let output = check(&[path_str(&testdata(file)), "--export-edn", path_str(&edn)]);
        assert_eq!(code(&output), expected, "{file}: {}", stderr(&output));
        let text = std::fs::read_to_string(&edn).expect("EDN written");
        assert!(text.starts_with("{:index 0, :time "), "{text}");
        let again = check(&[path_str(&edn), "--format", "edn"]);
        assert_eq!(code(&again), expected, "{file} as EDN: {}", stderr(&again));
    }
}

#[test]
fn a_jepsen_log_is_read_and_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("etcd.log");
    let text = "INFO  jepsen.core - starting\n\
                INFO  jepsen.util - 0\t:invoke\t:write\t1\n\
                INFO  jepsen.util - 0\t:ok\t:write\t1\n\
                INFO  jepsen.util - 1\t:invoke\t:cas\t[1 2]\n\
                INFO  jepsen.util - 1\t:ok\t:cas\t[1 2]\n\
                INFO  jepsen.util - 2\t:invoke\t:read\tnil\n\
                INFO  jepsen.util - 2\t:ok\t:read\t1\n";
    std::fs::write(&log, text).expect("write");
    let output = check(&[path_str(&log)]);
    assert_eq!(
        code(&output),
        1,
        "a read of 1 after cas 1→2: {}",
        String::from_utf8_lossy(&output.stdout)
    );
}
