//! `latchkey lease grant|keepalive|revoke|ttl|list`: leases by id, for
//! scripts and tests that manage them by hand (`lock` and `elect` grant and
//! renew their own).

use std::time::Duration;

use latchkey_client::raw::LeaseInfo;
use latchkey_client::{Error, LeaseId};
use serde::Serialize;

use super::session::{connect_once, failure, ClientArgs, StopSignals};
use super::{format_duration, parse_ttl, print_error, write_json, write_stdout, Failure};
use super::{EXIT_NOT_FOUND, EXIT_OK};

/// Flags of `latchkey lease`.
#[derive(clap::Args, Debug)]
pub struct LeaseArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: LeaseCommand,
}

/// The `lease` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum LeaseCommand {
    /// Grant a lease; prints its id. Nothing renews it: use `lease keepalive`.
    Grant {
        /// Time to live without a keepalive (at least twice the cluster's election timeout).
        #[arg(long, value_parser = parse_ttl)]
        ttl: Duration,
    },
    /// Renew a lease every third of its TTL until Ctrl-C (or once with --once).
    #[command(alias = "keep-alive")]
    Keepalive {
        id: u64,
        /// Renew once and exit.
        #[arg(long)]
        once: bool,
    },
    /// End a lease now, releasing every lock and leadership it holds.
    Revoke { id: u64 },
    /// Show a lease's TTL, time left, grants and waits (exit code 1 if it does not exist).
    #[command(alias = "timetolive")]
    Ttl { id: u64 },
    /// List every lease.
    List,
}

/// `lease grant --json`.
#[derive(Serialize, Debug)]
pub struct GrantedOutput {
    pub lease: u64,
    pub ttl_ms: u64,
}

/// `lease keepalive --json`, one line per renewal.
#[derive(Serialize, Debug)]
pub struct RenewedOutput {
    pub lease: u64,
    pub remaining_ms: u64,
}

/// `lease revoke --json`.
#[derive(Serialize, Debug)]
pub struct RevokedOutput {
    pub lease: u64,
    pub revoked: bool,
}

/// `lease ttl --json`.
#[derive(Serialize, Debug)]
pub struct TtlOutput {
    pub lease: u64,
    pub found: bool,
    pub ttl_ms: u64,
    pub remaining_ms: u64,
    pub grants: Vec<HeldOutput>,
    pub waiting: Vec<String>,
}

/// A lock or leadership a lease holds.
#[derive(Serialize, Debug)]
pub struct HeldOutput {
    pub name: String,
    pub token: u64,
}

/// `lease list --json`.
#[derive(Serialize, Debug)]
pub struct ListOutput {
    pub leases: Vec<ListedOutput>,
}

/// One lease of [`ListOutput`].
#[derive(Serialize, Debug)]
pub struct ListedOutput {
    pub lease: u64,
    pub ttl_ms: u64,
    pub grants: u32,
}

pub(crate) async fn run(args: LeaseArgs) -> Result<u8, Failure> {
    let client = connect_once(&args.client).await?;
    let raw = client.raw();
    let json = args.client.json;
    match args.command {
        LeaseCommand::Grant { ttl } => {
            let (id, ttl) = raw.grant_lease(ttl).await.map_err(failure)?;
            if json {
                write_json(&GrantedOutput {
                    lease: id.0,
                    ttl_ms: millis(ttl),
                })?;
            } else {
                write_stdout(format!("{id}\n").as_bytes())?;
            }
            Ok(EXIT_OK)
        }
        LeaseCommand::Keepalive { id, once } => keepalive(&client, LeaseId(id), once, json).await,
        LeaseCommand::Revoke { id } => match raw.revoke_lease(LeaseId(id)).await {
            Ok(()) => {
                if json {
                    write_json(&RevokedOutput {
                        lease: id,
                        revoked: true,
                    })?;
                } else {
                    write_stdout(format!("OK revoked lease {id}\n").as_bytes())?;
                }
                Ok(EXIT_OK)
            }
            Err(Error::LeaseNotFound { .. }) => not_found(id, json),
            Err(error) => Err(failure(error)),
        },
        LeaseCommand::Ttl { id } => match raw.lease_info(LeaseId(id)).await.map_err(failure)? {
            Some(info) => {
                if json {
                    write_json(&ttl_output(&info))?;
                } else {
                    write_stdout(ttl_text(&info).as_bytes())?;
                }
                Ok(EXIT_OK)
            }
            None => not_found(id, json),
        },
        LeaseCommand::List => {
            let leases = raw.leases().await.map_err(failure)?;
            if json {
                write_json(&ListOutput {
                    leases: leases
                        .iter()
                        .map(|lease| ListedOutput {
                            lease: lease.id.0,
                            ttl_ms: millis(lease.ttl),
                            grants: lease.grants,
                        })
                        .collect(),
                })?;
            } else {
                let mut text = String::new();
                for lease in &leases {
                    text.push_str(&format!(
                        "{}\tttl {}\t{} held\n",
                        lease.id,
                        format_duration(lease.ttl),
                        lease.grants
                    ));
                }
                write_stdout(text.as_bytes())?;
            }
            Ok(EXIT_OK)
        }
    }
}

/// Renews `lease` once, or every third of its TTL until a stop is requested.
async fn keepalive(
    client: &latchkey_client::Client,
    lease: LeaseId,
    once: bool,
    json: bool,
) -> Result<u8, Failure> {
    let mut stops = StopSignals::install(false)?;
    // Bounded by the user and the lease: it ends on a stop request, with
    // --once, or when the lease is gone.
    loop {
        let remaining = match client.raw().keepalive(lease).await {
            Ok(remaining) => remaining,
            Err(Error::LeaseNotFound { .. }) => return not_found(lease.0, json),
            Err(error) => return Err(failure(error)),
        };
        if json {
            write_json(&RenewedOutput {
                lease: lease.0,
                remaining_ms: millis(remaining),
            })?;
        } else {
            write_stdout(
                format!(
                    "lease {lease} renewed, {} left\n",
                    format_duration(remaining)
                )
                .as_bytes(),
            )?;
        }
        if once {
            return Ok(EXIT_OK);
        }
        let pause = (remaining / 3).max(Duration::from_millis(100));
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = stops.next() => return Ok(EXIT_OK),
        }
    }
}

fn not_found(id: u64, json: bool) -> Result<u8, Failure> {
    if json {
        write_json(&TtlOutput {
            lease: id,
            found: false,
            ttl_ms: 0,
            remaining_ms: 0,
            grants: Vec::new(),
            waiting: Vec::new(),
        })?;
    } else {
        print_error(&format!(
            "lease {id} not found: it expired or was revoked (or never existed)"
        ));
    }
    Ok(EXIT_NOT_FOUND)
}

fn ttl_output(info: &LeaseInfo) -> TtlOutput {
    TtlOutput {
        lease: info.id.0,
        found: true,
        ttl_ms: millis(info.ttl),
        remaining_ms: millis(info.remaining),
        grants: info
            .grants
            .iter()
            .map(|grant| HeldOutput {
                name: grant.name.clone(),
                token: grant.token.0,
            })
            .collect(),
        waiting: info.waiting.clone(),
    }
}

fn ttl_text(info: &LeaseInfo) -> String {
    let mut text = format!(
        "lease {}: ttl {}, {} left\n",
        info.id,
        format_duration(info.ttl),
        format_duration(info.remaining)
    );
    for grant in &info.grants {
        text.push_str(&format!(
            "  holds {:?} (token {})\n",
            grant.name, grant.token
        ));
    }
    for name in &info.waiting {
        text.push_str(&format!("  waits for {name:?}\n"));
    }
    text
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
