//! `latchkey kv put|get|del|range`: the replicated key-value store.
//!
//! Each command sends one request through `latchkey-client`, as a
//! sessionless one-shot client (it takes no slot in the cluster's session
//! table, and a write whose outcome is unknown is reported, not resent;
//! see [`super::session::connect_one_shot`]), and prints the answer:
//! plain text by default (`kv get` prints the value alone, so scripts can
//! use `$(latchkey kv get K)`), or one JSON object with `--json`. JSON output
//! shows keys and values as UTF-8 text; bytes that are not valid UTF-8
//! become U+FFFD, while plain `kv get` writes the stored bytes unchanged.

use std::time::Duration;

use latchkey_client::{Client, Fence, FenceKind, FencingToken, KeyValue, RangeAnswer};
use serde::Serialize;

use super::session::{connect_one_shot, failure};
use super::{parse_duration, print_error, write_json, write_stdout, Failure};
use super::{EXIT_NOT_FOUND, EXIT_OK};

/// Flags of `latchkey kv`.
#[derive(clap::Args, Debug)]
pub struct KvArgs {
    /// Client endpoints, comma-separated HOST:PORT; tried in order, the leader is found from there.
    #[arg(long, env = "LATCHKEY_ENDPOINTS", value_delimiter = ',', global = true)]
    pub endpoints: Vec<String>,
    /// Print one JSON object per result.
    #[arg(long, global = true)]
    pub json: bool,
    /// Give up after this long, retries and leader changes included (500ms, 5s, …).
    #[arg(long, default_value = "5s", value_parser = parse_duration, global = true)]
    pub timeout: Duration,
    #[command(flatten)]
    pub security: super::session::SecurityArgs,
    #[command(subcommand)]
    pub command: KvCommand,
}

/// The `kv` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum KvCommand {
    /// Write VALUE under KEY; prints the revision of the write.
    Put {
        key: String,
        value: String,
        #[command(flatten)]
        fence: FenceArgs,
    },
    /// Print the value of KEY (exit code 1 if it does not exist).
    Get {
        key: String,
        /// Answer from the contacted node's local state without confirming
        /// with a quorum; faster, but may be stale.
        #[arg(long)]
        serializable: bool,
    },
    /// Delete KEY (deleting a missing key succeeds and says so).
    #[command(alias = "delete")]
    Del {
        key: String,
        #[command(flatten)]
        fence: FenceArgs,
    },
    /// List keys starting with PREFIX (every key when omitted), in key order.
    Range {
        prefix: Option<String>,
        /// At most this many keys (0 = the server's maximum).
        #[arg(long, default_value_t = 0)]
        limit: u32,
        /// Answer from local state without confirming with a quorum (may be stale).
        #[arg(long)]
        serializable: bool,
    },
}

/// `--lock NAME --token T` or `--election NAME --token T`: a fenced write,
/// applied only while T is the current grant of that lock or leadership and
/// not lower than the token already stored on the key (exit code 6
/// otherwise).
#[derive(clap::Args, Debug, Default)]
pub struct FenceArgs {
    /// Fence the write with this lock's grant (needs --token).
    #[arg(long, requires = "token", conflicts_with = "election")]
    pub lock: Option<String>,
    /// Fence the write with this election's leadership (needs --token).
    #[arg(long, requires = "token")]
    pub election: Option<String>,
    /// The fencing token of the grant (from `lock`, `acquire` or `elect`).
    #[arg(long)]
    pub token: Option<u64>,
}

impl FenceArgs {
    fn into_fence(self) -> Result<Option<Fence>, Failure> {
        let (name, kind) = match (self.lock, self.election) {
            (Some(name), None) => (name, FenceKind::Lock),
            (None, Some(name)) => (name, FenceKind::Election),
            (None, None) if self.token.is_some() => {
                return Err(Failure::usage(
                    "--token needs --lock NAME or --election NAME to say whose token it is",
                ))
            }
            _ => return Ok(None),
        };
        // clap enforces `requires = "token"`.
        let token = self.token.unwrap_or_default();
        Ok(Some(Fence {
            name,
            token: FencingToken(token),
            kind,
        }))
    }
}

pub(crate) async fn run(args: KvArgs) -> Result<u8, Failure> {
    let client = connect_one_shot(&args.endpoints, args.timeout, &args.security).await?;
    let json = args.json;
    match args.command {
        KvCommand::Put { key, value, fence } => {
            put(&client, key, value, fence.into_fence()?, json).await
        }
        KvCommand::Get { key, serializable } => get(&client, key, serializable, json).await,
        KvCommand::Del { key, fence } => delete(&client, key, fence.into_fence()?, json).await,
        KvCommand::Range {
            prefix,
            limit,
            serializable,
        } => {
            let mut request = client.range(prefix.unwrap_or_default()).limit(limit);
            if serializable {
                request = request.serializable();
            }
            range(request, json).await
        }
    }
}

async fn put(
    client: &Client,
    key: String,
    value: String,
    fence: Option<Fence>,
    json: bool,
) -> Result<u8, Failure> {
    let mut request = client.put(key.clone(), value);
    if let Some(fence) = &fence {
        request = request.fence(fence);
    }
    let revision = request.await.map_err(failure)?;
    if json {
        write_json(&PutOutput {
            key,
            revision: revision.0,
        })?;
    } else {
        write_stdout(format!("OK revision {}\n", revision.0).as_bytes())?;
    }
    Ok(EXIT_OK)
}

async fn get(client: &Client, key: String, serializable: bool, json: bool) -> Result<u8, Failure> {
    let mut request = client.get(key.clone());
    if serializable {
        request = request.serializable();
    }
    let found = request.await.map_err(failure)?;
    if json {
        write_json(&GetOutput::new(key.clone(), found.as_ref()))?;
    } else if let Some(kv) = &found {
        let mut line = kv.value.clone();
        line.push(b'\n');
        write_stdout(&line)?;
    }
    if found.is_none() {
        if !json {
            print_error(&format!("key not found: {key}"));
        }
        return Ok(EXIT_NOT_FOUND);
    }
    Ok(EXIT_OK)
}

async fn delete(
    client: &Client,
    key: String,
    fence: Option<Fence>,
    json: bool,
) -> Result<u8, Failure> {
    let mut request = client.delete(key.clone());
    if let Some(fence) = &fence {
        request = request.fence(fence);
    }
    let deleted = request.await.map_err(failure)?;
    if json {
        write_json(&DeleteOutput {
            key,
            deleted: deleted.existed,
            revision: deleted.revision.0,
        })?;
    } else if deleted.existed {
        write_stdout(format!("OK deleted, revision {}\n", deleted.revision.0).as_bytes())?;
    } else {
        write_stdout(format!("OK nothing to delete: key not found: {key}\n").as_bytes())?;
    }
    Ok(EXIT_OK)
}

async fn range(request: latchkey_client::kv::Range, json: bool) -> Result<u8, Failure> {
    let answer = request.await.map_err(failure)?;
    if json {
        write_json(&RangeOutput::new(&answer))?;
        return Ok(EXIT_OK);
    }
    let mut out = Vec::new();
    for kv in &answer.kvs {
        out.extend_from_slice(&kv.key);
        out.push(b'\t');
        out.extend_from_slice(&kv.value);
        out.push(b'\n');
    }
    write_stdout(&out)?;
    if answer.more {
        print_note(answer.kvs.len());
    }
    Ok(EXIT_OK)
}

/// Tells a person (on stderr, so pipes stay clean) that the list is cut short.
fn print_note(shown: usize) {
    use std::io::Write;
    // A lost note on a closed stderr changes nothing.
    let _ = writeln!(
        std::io::stderr().lock(),
        "latchkey: note: more keys match than the {shown} shown; narrow the prefix or raise --limit"
    );
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `kv put --json`.
#[derive(Serialize, Debug)]
pub struct PutOutput {
    pub key: String,
    pub revision: u64,
}

/// `kv get --json`; `value` is null and the revisions 0 when not found.
#[derive(Serialize, Debug)]
pub struct GetOutput {
    pub key: String,
    pub value: Option<String>,
    pub found: bool,
    pub create_revision: u64,
    pub mod_revision: u64,
}

impl GetOutput {
    fn new(key: String, kv: Option<&KeyValue>) -> Self {
        GetOutput {
            key,
            value: kv.map(|kv| text(&kv.value)),
            found: kv.is_some(),
            create_revision: kv.map_or(0, |kv| kv.create_revision.0),
            mod_revision: kv.map_or(0, |kv| kv.mod_revision.0),
        }
    }
}

/// `kv del --json`.
#[derive(Serialize, Debug)]
pub struct DeleteOutput {
    pub key: String,
    pub deleted: bool,
    pub revision: u64,
}

/// `kv range --json`.
#[derive(Serialize, Debug)]
pub struct RangeOutput {
    pub kvs: Vec<KeyValueOutput>,
    pub more: bool,
}

/// One entry of [`RangeOutput`].
#[derive(Serialize, Debug)]
pub struct KeyValueOutput {
    pub key: String,
    pub value: String,
    pub create_revision: u64,
    pub mod_revision: u64,
}

impl RangeOutput {
    fn new(answer: &RangeAnswer) -> Self {
        RangeOutput {
            kvs: answer
                .kvs
                .iter()
                .map(|kv| KeyValueOutput {
                    key: text(&kv.key),
                    value: text(&kv.value),
                    create_revision: kv.create_revision.0,
                    mod_revision: kv.mod_revision.0,
                })
                .collect(),
            more: answer.more,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &[u8]) -> KeyValue {
        KeyValue {
            key: key.as_bytes().to_vec(),
            value: value.to_vec(),
            create_revision: latchkey_client::Revision(3),
            mod_revision: latchkey_client::Revision(5),
            token: None,
            fence_name: None,
        }
    }

    #[test]
    fn get_json_for_a_found_key_has_value_and_revisions() {
        let found = kv("a", b"1");
        let json = serde_json::to_value(GetOutput::new("a".into(), Some(&found))).expect("json");
        assert_eq!(
            json,
            serde_json::json!({"key":"a","value":"1","found":true,"create_revision":3,"mod_revision":5})
        );
    }

    #[test]
    fn get_json_for_a_missing_key_has_found_false_and_null_value() {
        let json = serde_json::to_value(GetOutput::new("a".into(), None)).expect("json");
        assert_eq!(
            json,
            serde_json::json!({"key":"a","value":null,"found":false,"create_revision":0,"mod_revision":0})
        );
    }

    #[test]
    fn range_json_shows_invalid_utf8_lossily() {
        let answer = RangeAnswer {
            kvs: vec![kv("a", &[0x66, 0xff])],
            more: true,
        };
        let json = serde_json::to_value(RangeOutput::new(&answer)).expect("json");
        assert_eq!(json["kvs"][0]["value"], "f\u{fffd}");
        assert_eq!(json["more"], true);
    }

    #[test]
    fn kv_flags_work_before_or_after_the_subcommand() {
        use clap::Parser;
        #[derive(clap::Parser)]
        enum Top {
            Kv(KvArgs),
        }
        let Top::Kv(args) = Top::try_parse_from([
            "latchkey",
            "kv",
            "get",
            "k",
            "--json",
            "--endpoints",
            "a:1,b:2",
        ])
        .expect("flags after the subcommand");
        assert!(args.json);
        assert_eq!(args.endpoints, vec!["a:1".to_string(), "b:2".to_string()]);
        let Top::Kv(args) =
            Top::try_parse_from(["latchkey", "kv", "--timeout", "1s", "range", "--limit", "3"])
                .expect("flags before the subcommand");
        assert_eq!(args.timeout, Duration::from_secs(1));
        assert!(matches!(
            args.command,
            KvCommand::Range {
                limit: 3,
                prefix: None,
                ..
            }
        ));
    }
}
