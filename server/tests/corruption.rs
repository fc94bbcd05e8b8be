//! Real-process tests: a node whose stored data is damaged refuses to start
//! with one line that names what is wrong, never a panic, never serving.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_latchkey");
const DEADLINE: Duration = Duration::from_secs(30);

fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
    listener.local_addr().expect("addr").to_string()
}

/// A single-member cluster: enough to write data and stop cleanly.
struct Node {
    data_dir: PathBuf,
    client: String,
    peer: String,
}

/// Kills the child if the test fails before it stops it.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Node {
    fn serve(&self) -> Command {
        let mut command = Command::new(BIN);
        command
            .args(["serve", "--id", "1", "--data-dir"])
            .arg(&self.data_dir)
            .args(["--listen-client", &self.client, "--listen-peer", &self.peer])
            .args(["--initial-cluster", &format!("1={}", self.peer)])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .args(["--endpoints", &self.client])
            .output()
            .expect("run latchkey")
    }
}

fn wait_for_write(node: &Node) {
    let start = Instant::now();
    loop {
        if node
            .cli(&["kv", "put", "greeting", "hello"])
            .status
            .success()
        {
            return;
        }
        assert!(start.elapsed() < DEADLINE, "node never accepted a write");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn stop(mut running: Running) {
    // SIGTERM: a clean stop flushes memtables into table files.
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(running.0.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    while running.0.try_wait().expect("wait").is_none() {
        assert!(start.elapsed() < DEADLINE, "node did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn largest_table_file(db: &Path) -> PathBuf {
    std::fs::read_dir(db)
        .expect("db dir")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "sst"))
        .max_by_key(|path| path.metadata().map(|m| m.len()).unwrap_or(0))
        .expect("a clean stop leaves table files")
}

fn start_expecting_failure(node: &Node) -> String {
    let child = node.serve().spawn().expect("spawn");
    let mut running = Running(child);
    let start = Instant::now();
    let status = loop {
        if let Some(status) = running.0.try_wait().expect("wait") {
            break status;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "a damaged node must refuse to start"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "exit status must be non-zero");
    let mut stderr = String::new();
    use std::io::Read as _;
    running
        .0
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read");
    stderr
}

#[test]
fn byte_flipped_in_a_table_file_stops_the_node_with_one_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let node = Node {
        data_dir: dir.path().join("node-1"),
        client: free_addr(),
        peer: free_addr(),
    };
    let running = Running(node.serve().spawn().expect("spawn"));
    wait_for_write(&node);
    stop(running);

    let table = largest_table_file(&node.data_dir.join("db"));
    let mut bytes = std::fs::read(&table).expect("read table");
    let middle = bytes.len() / 3;
    bytes[middle] ^= 0x5a;
    std::fs::write(&table, bytes).expect("write table");

    let stderr = start_expecting_failure(&node);
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("latchkey: error"))
        .collect();
    assert_eq!(lines.len(), 1, "one error line: {stderr}");
    assert!(
        lines[0].to_lowercase().contains("corrupt") || lines[0].contains("checksum"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
