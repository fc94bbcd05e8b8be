//! Pure retry decisions: which failures are worth another attempt, where to
//! send it, and how long to pause first.
//!
//! A failed attempt is sorted into one of three [`Verdict`]s:
//! - the node is not the leader and named it → resend there at once;
//! - the node could not serve it (unreachable, no leader known, leadership
//!   lost mid-request, no quorum, shutting down) → pause, then try the
//!   next endpoint;
//! - the node answered with a refusal → give up and return it typed.
//!
//! Resending after an unknown outcome (a broken connection, a lost
//! leadership) is safe because every request the client sends is either a
//! read or a write carrying a request id the server deduplicates; see
//! the `client` module docs. Sessionless clients resend a write only when
//! [`certainly_not_applied`] says so.
//!
//! Pauses double from the first to the longest, with "equal jitter": each
//! pause is half its nominal length plus a random part of the other half,
//! so clients that failed together do not retry together.

use std::time::Duration;

use rand::Rng;
use tonic::Code;

use latchkey_proto::v1::error_details;

use crate::error::{decode_details, Error};

/// Metadata key carrying the leader's client address on a "not the leader" answer.
pub(crate) const LEADER_ADDR_METADATA: &str = "latchkey-leader-addr";

/// What to do after a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The node is not the leader; resend to this endpoint.
    FollowLeader(String),
    /// Pause, then resend to another endpoint.
    TryElsewhere,
    /// The answer is final.
    Fail,
}

/// Sorts a failed attempt. A status built on this side from a transport
/// failure carries a source error; those are always worth another attempt.
pub(crate) fn classify(status: &tonic::Status) -> Verdict {
    if let Some(leader) = leader_hint(status) {
        return Verdict::FollowLeader(leader);
    }
    if std::error::Error::source(status).is_some() {
        return Verdict::TryElsewhere;
    }
    match decode_details(status) {
        // "Not the leader" with no leader known (an election is running):
        // nothing was proposed, so wait and try again.
        Some(error_details::Detail::NotLeader(not_leader)) => {
            return normalize_endpoint(&not_leader.leader_client_addr)
                .map_or(Verdict::TryElsewhere, Verdict::FollowLeader);
        }
        // Other typed details are a refusal recorded by the state machine.
        Some(_) => return Verdict::Fail,
        None => {}
    }
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::DataLoss => {
            Verdict::TryElsewhere
        }
        _ => Verdict::Fail,
    }
}

/// Whether a failed attempt certainly did not apply its request: a
/// follower refused it before proposing (typed `NotLeader`), or no
/// connection was made (the transport's connect errors, which tonic turns
/// into `UNAVAILABLE` with the connector's message).
pub(crate) fn certainly_not_applied(status: &tonic::Status) -> bool {
    if matches!(
        decode_details(status),
        Some(error_details::Detail::NotLeader(_))
    ) {
        return true;
    }
    if status.code() != Code::Unavailable {
        return false;
    }
    let message = status.message().to_ascii_lowercase();
    [
        "connect error",
        "error trying to connect",
        "connection refused",
        "dns error",
    ]
    .iter()
    .any(|phrase| message.contains(phrase))
}

/// The leader's endpoint, when the status names one.
pub(crate) fn leader_hint(status: &tonic::Status) -> Option<String> {
    if status.code() != Code::Unavailable {
        return None;
    }
    let addr = status.metadata().get(LEADER_ADDR_METADATA)?.to_str().ok()?;
    normalize_endpoint(addr).ok()
}

/// Turns `host:port` or `http://host:port` into the form channels are keyed
/// by: with a scheme and without a trailing slash.
pub fn normalize_endpoint(endpoint: &str) -> Result<String, Error> {
    let trimmed = endpoint.trim().trim_end_matches('/');
    if trimmed.is_empty() {
        return Err(Error::Config(format!("empty endpoint in {endpoint:?}")));
    }
    let with_scheme = if trimmed.contains("://") {
        trimmed.to_string()
    } else {
        format!("http://{trimmed}")
    };
    with_scheme
        .parse::<tonic::transport::Uri>()
        .map_err(|e| Error::Config(format!("endpoint {endpoint:?} does not parse: {e}")))?;
    Ok(with_scheme)
}

/// Doubling pauses with equal jitter.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    next: Duration,
    longest: Duration,
}

impl Backoff {
    pub(crate) fn new(first: Duration, longest: Duration) -> Backoff {
        Backoff {
            next: first.min(longest),
            longest,
        }
    }

    /// The next pause: between half of and the whole nominal length, which
    /// then doubles up to the longest.
    pub(crate) fn next_pause(&mut self, rng: &mut impl Rng) -> Duration {
        let nominal = self.next;
        self.next = (nominal * 2).min(self.longest);
        let half = nominal / 2;
        let jitter_us = rng.gen_range(0..=half.as_micros() as u64);
        half + Duration::from_micros(jitter_us)
    }

    /// Starts again from the first pause (after a success).
    pub(crate) fn reset(&mut self, first: Duration) {
        self.next = first.min(self.longest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use latchkey_proto::v1::{ErrorDetails, NotLeader, StaleToken};
    use prost::Message as _;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use tonic::metadata::MetadataValue;

    #[test]
    fn not_leader_with_an_address_follows_it() {
        let mut status = tonic::Status::unavailable("not the leader (leader 3)");
        status.metadata_mut().insert(
            LEADER_ADDR_METADATA,
            MetadataValue::from_static("127.0.0.1:7001"),
        );
        assert_eq!(
            classify(&status),
            Verdict::FollowLeader("http://127.0.0.1:7001".into())
        );
    }

    #[test]
    fn unavailable_without_a_hint_tries_elsewhere() {
        let status = tonic::Status::unavailable("leadership changed; retry");
        assert_eq!(classify(&status), Verdict::TryElsewhere);
        let status = tonic::Status::deadline_exceeded("no quorum");
        assert_eq!(classify(&status), Verdict::TryElsewhere);
    }

    #[test]
    fn not_leader_details_without_a_leader_try_elsewhere_and_with_one_follow_it() {
        let not_leader = |addr: &str| {
            let details = ErrorDetails {
                detail: Some(error_details::Detail::NotLeader(NotLeader {
                    leader_id: 0,
                    leader_client_addr: addr.into(),
                })),
            };
            tonic::Status::with_details(
                Code::Unavailable,
                "node is not the leader",
                details.encode_to_vec().into(),
            )
        };
        assert_eq!(classify(&not_leader("")), Verdict::TryElsewhere);
        assert_eq!(
            classify(&not_leader("127.0.0.1:7003")),
            Verdict::FollowLeader("http://127.0.0.1:7003".into())
        );
    }

    #[test]
    fn refusal_with_typed_details_is_final() {
        let details = ErrorDetails {
            detail: Some(error_details::Detail::StaleToken(StaleToken {
                name: "job".into(),
                presented: 1,
                current: 2,
            })),
        };
        let status = tonic::Status::with_details(
            Code::FailedPrecondition,
            "stale",
            details.encode_to_vec().into(),
        );
        assert_eq!(classify(&status), Verdict::Fail);
        assert_eq!(
            classify(&tonic::Status::invalid_argument("bad name")),
            Verdict::Fail
        );
    }

    #[test]
    fn endpoints_are_normalized_with_a_scheme() {
        assert_eq!(
            normalize_endpoint("127.0.0.1:2379").expect("valid"),
            "http://127.0.0.1:2379"
        );
        assert_eq!(
            normalize_endpoint("http://localhost:1/").expect("valid"),
            "http://localhost:1"
        );
        assert!(normalize_endpoint("  ").is_err());
        assert!(normalize_endpoint("http://bad host").is_err());
    }

    #[test]
    fn backoff_doubles_up_to_the_longest_and_stays_within_jitter_bounds() {
        let mut rng = StdRng::seed_from_u64(7);
        let first = Duration::from_millis(10);
        let longest = Duration::from_millis(100);
        let mut backoff = Backoff::new(first, longest);
        let mut nominal = first;
        for _ in 0..10 {
            let pause = backoff.next_pause(&mut rng);
            assert!(
                pause >= nominal / 2 && pause <= nominal,
                "{pause:?} outside [{:?}, {nominal:?}]",
                nominal / 2
            );
            nominal = (nominal * 2).min(longest);
        }
        backoff.reset(first);
        assert!(backoff.next_pause(&mut rng) <= first);
    }
}
