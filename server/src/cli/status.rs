//! `latchkey status`: every endpoint's own view of the Raft group.
//!
//! All endpoints are asked at once, each within `--timeout`. The answers are
//! not merged: a partitioned node that still believes in an old leader shows
//! up as such, which is exactly what an operator needs to see. `Cluster.Status`
//! never goes through Raft, so it works on a node that lost its quorum.

use std::time::Duration;

use latchkey_proto::v1::{Role, StatusResponse};
use serde::Serialize;

use super::connect::fetch_status_tls;
use super::{parse_duration, parse_endpoints, print_error, write_json, write_stdout, Failure};
use super::{EXIT_OK, EXIT_UNREACHABLE};

/// Flags of `latchkey status`.
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Client endpoints to ask, comma-separated HOST:PORT.
    #[arg(long, env = "LATCHKEY_ENDPOINTS", value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// How long to wait for each endpoint (500ms, 2s, …).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub security: super::session::SecurityArgs,
}

/// The `--json` output.
#[derive(Serialize, Debug, Default)]
pub struct StatusReport {
    pub nodes: Vec<NodeStatus>,
    pub unreachable: Vec<Unreachable>,
}

/// One node's answer.
#[derive(Serialize, Debug)]
pub struct NodeStatus {
    pub endpoint: String,
    pub id: u64,
    pub role: &'static str,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    /// 0 when the node knows no leader.
    pub leader_id: u64,
    pub first_index: u64,
    pub last_index: u64,
    pub client_addr: String,
    pub peer_addr: String,
}

/// An endpoint that did not answer.
#[derive(Serialize, Debug)]
pub struct Unreachable {
    pub endpoint: String,
    pub error: String,
}

pub(crate) async fn run(args: StatusArgs) -> Result<u8, Failure> {
    let endpoints = parse_endpoints(&args.endpoints)?;
    let tls = args.security.tls()?;
    let answers = futures::future::join_all(
        endpoints
            .iter()
            .map(|e| fetch_status_tls(e, args.timeout, tls.as_ref())),
    )
    .await;
    let report = build_report(&endpoints, answers);
    if args.json {
        write_json(&report)?;
    } else {
        write_stdout(render_table(&report).as_bytes())?;
    }
    if report.nodes.is_empty() {
        print_error(&format!(
            "none of the {} endpoint(s) answered",
            report.unreachable.len()
        ));
        return Ok(EXIT_UNREACHABLE);
    }
    Ok(EXIT_OK)
}

fn build_report(
    endpoints: &[String],
    answers: Vec<Result<StatusResponse, String>>,
) -> StatusReport {
    let mut report = StatusReport::default();
    for (endpoint, answer) in endpoints.iter().zip(answers) {
        match answer {
            Ok(status) => report.nodes.push(node_status(endpoint, &status)),
            Err(error) => report.unreachable.push(Unreachable {
                endpoint: endpoint.clone(),
                error,
            }),
        }
    }
    report
}

fn node_status(endpoint: &str, status: &StatusResponse) -> NodeStatus {
    NodeStatus {
        endpoint: endpoint.to_string(),
        id: status.id,
        role: role_name(status.role()),
        term: status.term,
        commit_index: status.commit_index,
        applied_index: status.applied_index,
        leader_id: status.leader_id,
        first_index: status.first_index,
        last_index: status.last_index,
        client_addr: status.client_addr.clone(),
        peer_addr: status.peer_addr.clone(),
    }
}

/// The role as printed and as in `--json`.
pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Leader => "leader",
        Role::Follower => "follower",
        Role::Candidate => "candidate",
        Role::PreCandidate => "pre_candidate",
        Role::Unspecified => "unknown",
    }
}

const TABLE_HEADER: [&str; 9] = [
    "ENDPOINT", "ID", "ROLE", "TERM", "LEADER", "COMMIT", "APPLIED", "FIRST", "LAST",
];

fn render_table(report: &StatusReport) -> String {
    let mut rows: Vec<Vec<String>> = Vec::new();
    if !report.nodes.is_empty() {
        rows.push(TABLE_HEADER.iter().map(|h| h.to_string()).collect());
    }
    for node in &report.nodes {
        let leader = match node.leader_id {
            0 => "-".to_string(),
            id => id.to_string(),
        };
        rows.push(vec![
            node.endpoint.clone(),
            node.id.to_string(),
            node.role.to_string(),
            node.term.to_string(),
            leader,
            node.commit_index.to_string(),
            node.applied_index.to_string(),
            node.first_index.to_string(),
            node.last_index.to_string(),
        ]);
    }
    let mut out = align_columns(&rows);
    for unreachable in &report.unreachable {
        out.push_str(&format!(
            "{}  unreachable: {}\n",
            unreachable.endpoint, unreachable.error
        ));
    }
    out
}

/// Left-aligns every column to its widest cell, two spaces apart; each row
/// ends with a newline, without trailing spaces.
pub fn align_columns(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(id: u64, role: Role, leader_id: u64) -> StatusResponse {
        StatusResponse {
            id,
            role: role as i32,
            term: 7,
            commit_index: 12,
            applied_index: 11,
            leader_id,
            client_addr: format!("127.0.0.1:700{id}"),
            peer_addr: format!("127.0.0.1:800{id}"),
            first_index: 1,
            last_index: 12,
            ..StatusResponse::default()
        }
    }

    #[test]
    fn json_report_has_the_documented_fields() {
        let endpoints = vec!["127.0.0.1:7001".to_string(), "127.0.0.1:7002".to_string()];
        let report = build_report(
            &endpoints,
            vec![
                Ok(response(1, Role::Leader, 1)),
                Err("connection refused".into()),
            ],
        );
        let json = serde_json::to_value(&report).expect("serializable");
        let node = &json["nodes"][0];
        for field in [
            "endpoint",
            "id",
            "role",
            "term",
            "commit_index",
            "applied_index",
            "leader_id",
            "first_index",
            "last_index",
            "client_addr",
            "peer_addr",
        ] {
            assert!(node.get(field).is_some(), "missing {field} in {node}");
        }
        assert_eq!(node["role"], "leader");
        assert_eq!(json["unreachable"][0]["endpoint"], "127.0.0.1:7002");
        assert_eq!(json["unreachable"][0]["error"], "connection refused");
    }

    #[test]
    fn every_role_has_a_stable_name() {
        assert_eq!(role_name(Role::Follower), "follower");
        assert_eq!(role_name(Role::Candidate), "candidate");
        assert_eq!(role_name(Role::PreCandidate), "pre_candidate");
        assert_eq!(role_name(Role::Leader), "leader");
    }

    #[test]
    fn table_aligns_columns_and_lists_unreachable_endpoints_last() {
        let endpoints = vec!["127.0.0.1:7001".to_string(), "127.0.0.1:7002".to_string()];
        let report = build_report(
            &endpoints,
            vec![Err("timed out".into()), Ok(response(2, Role::Follower, 0))],
        );
        let table = render_table(&report);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(lines[0].starts_with("ENDPOINT        ID  ROLE"), "{table}");
        assert!(
            lines[1].starts_with("127.0.0.1:7002  2   follower"),
            "{table}"
        );
        assert!(lines[1].contains(" - "), "no leader shown as '-': {table}");
        assert_eq!(lines[2], "127.0.0.1:7001  unreachable: timed out");
    }
}
