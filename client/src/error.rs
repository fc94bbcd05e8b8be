//! Typed errors.
//!
//! The server refuses a request with a gRPC status whose `details` carry an
//! encoded `latchkey.v1.ErrorDetails`; [`Error::from_status`] turns those
//! facts into variants a caller can match on. Everything the client retries
//! by itself (no leader, a leader change, a broken connection) reaches the
//! caller only once the retry deadline has passed, as [`Error::Unavailable`].

use latchkey_proto::v1::{error_details, ErrorDetails};
use prost::Message as _;
use tonic::Code;

use crate::types::{FencingToken, LeaseId, Revision};

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A non-waiting acquire found the lock held by another lease.
    #[error("lock {name:?} is held by lease {holder_lease} with token {holder_token}")]
    LockHeld {
        name: String,
        holder_lease: LeaseId,
        holder_token: FencingToken,
    },
    /// A token was presented that is not the current grant of the lock (or
    /// is lower than the token stored on the key). `current` is `None` when
    /// the lock is free. Nothing was changed.
    #[error("stale fencing token {presented} for {name:?}; current: {}", describe_current(.current))]
    StaleToken {
        name: String,
        presented: FencingToken,
        current: Option<FencingToken>,
    },
    /// The lease expired or was revoked on the server.
    #[error("lease {} not found: it expired or was revoked", describe_lease(.lease))]
    LeaseNotFound { lease: Option<LeaseId> },
    /// This client already considers the lease lost (its deadline passed,
    /// or it was revoked), so it did not ask the server.
    #[error("lease {lease} is lost; grant a new one")]
    LeaseLost { lease: LeaseId },
    /// The request was malformed; `field` says which part and `reason` why.
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// A compare-and-set found another modification revision.
    #[error("key {key:?} is at revision {actual}, not the expected {expected}")]
    RevisionMismatch {
        key: Vec<u8>,
        expected: Revision,
        actual: Revision,
    },
    /// No node served the request within the retry deadline: no leader, no
    /// quorum, or no reachable endpoint. The last failure is in `message`.
    /// A write that ends this way may or may not have been applied.
    #[error("cluster unavailable: {message}")]
    Unavailable { message: String },
    /// The client's exactly-once session had ended on the cluster (idle for
    /// longer than its idle timeout) while a write was being retried. The
    /// write was not applied by the attempt that found this out, but an
    /// earlier attempt may have been: check before doing it again.
    #[error("session {session} expired while request {seq} was being retried; it may or may not have been applied")]
    SessionExpired { session: u64, seq: u64 },
    /// A write of a [`crate::ClientBuilder::sessionless`] client failed in
    /// a way that leaves its outcome unknown (a timeout, a leader lost
    /// mid-request). It was not resent, since a resend could apply it twice.
    #[error("outcome unknown: the write may or may not have been applied ({message})")]
    OutcomeUnknown { message: String },
    /// A wait the caller bounded (for example
    /// [`crate::Lease::lock_with_timeout`]) ran out.
    #[error("timed out: {message}")]
    Timeout { message: String },
    /// The server refused the request for a reason without typed details.
    #[error("rejected ({code:?}): {message}")]
    Rejected { code: Code, message: String },
    /// The cluster has authentication on and could not tell who this client
    /// is: no credentials, a wrong password, or a token that expired or was
    /// revoked. `reason` is the server's word for it; nothing was changed.
    #[error("unauthenticated ({reason}): {message}")]
    Unauthenticated { reason: String, message: String },
    /// The client's user lacks `permission` on `resource`; nothing was changed.
    #[error("permission denied: user {user:?} lacks {permission} on {resource:?}")]
    PermissionDenied {
        user: String,
        permission: String,
        resource: String,
    },
    /// A configured limit of the cluster was reached; nothing was changed.
    #[error("limit exceeded: {limit} allows {allowed}")]
    LimitExceeded { limit: String, allowed: u64 },
    /// The client was given something it cannot use (an endpoint that does
    /// not parse, an empty endpoint list, a TTL out of range).
    #[error("invalid configuration: {0}")]
    Config(String),
}

fn describe_current(current: &Option<FencingToken>) -> String {
    match current {
        Some(token) => format!("token {token}"),
        None => "the lock is free".to_string(),
    }
}

fn describe_lease(lease: &Option<LeaseId>) -> String {
    match lease {
        Some(lease) => lease.to_string(),
        None => "(unknown id)".to_string(),
    }
}

impl Error {
    /// Maps a refusal from the server to its typed error. Statuses the client
    /// would retry are mapped too (to [`Error::Unavailable`]) for the moment
    /// the retry deadline passes.
    pub fn from_status(status: &tonic::Status) -> Error {
        if let Some(detail) = decode_details(status) {
            return match from_detail(detail) {
                Error::Unauthenticated { reason, .. } => Error::Unauthenticated {
                    reason,
                    message: status.message().to_string(),
                },
                other => other,
            };
        }
        match status.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
                Error::Unavailable {
                    message: describe_status(status),
                }
            }
            Code::InvalidArgument => invalid_argument(status.message()),
            code => Error::Rejected {
                code,
                message: status.message().to_string(),
            },
        }
    }

    /// Fills in the lease a lease-bound request was about: the server
    /// answers `NOT_FOUND` without details when a lease ends while a request
    /// waits on it.
    pub(crate) fn about_lease(self, lease: LeaseId) -> Error {
        match self {
            Error::LeaseNotFound { lease: None } => Error::LeaseNotFound { lease: Some(lease) },
            Error::Rejected {
                code: Code::NotFound,
                ..
            } => Error::LeaseNotFound { lease: Some(lease) },
            other => other,
        }
    }
}

/// Reads the field out of a refusal without typed details, which the
/// server words as `invalid argument: FIELD: REASON`; otherwise the field
/// is left empty and the whole message is the reason.
fn invalid_argument(message: &str) -> Error {
    let described = message
        .strip_prefix("invalid argument: ")
        .and_then(|rest| rest.split_once(": "))
        .filter(|(field, _)| !field.is_empty() && !field.contains(' '));
    match described {
        Some((field, reason)) => Error::InvalidArgument {
            field: field.to_string(),
            reason: reason.to_string(),
        },
        None => Error::InvalidArgument {
            field: String::new(),
            reason: message.to_string(),
        },
    }
}

fn from_detail(detail: error_details::Detail) -> Error {
    use error_details::Detail;
    match detail {
        Detail::LockHeld(held) => Error::LockHeld {
            name: held.name,
            holder_lease: LeaseId(held.holder_lease),
            holder_token: FencingToken(held.holder_token),
        },
        Detail::StaleToken(stale) => Error::StaleToken {
            name: stale.name,
            presented: FencingToken(stale.presented),
            current: Some(FencingToken(stale.current)).filter(|t| t.0 != 0),
        },
        Detail::LeaseNotFound(missing) => Error::LeaseNotFound {
            lease: Some(LeaseId(missing.lease)).filter(|l| l.0 != 0),
        },
        Detail::InvalidField(invalid) => Error::InvalidArgument {
            field: invalid.field,
            reason: invalid.reason,
        },
        Detail::RevisionMismatch(mismatch) => Error::RevisionMismatch {
            key: mismatch.key,
            expected: Revision(mismatch.expected),
            actual: Revision(mismatch.actual),
        },
        Detail::SessionExpired(expired) => Error::SessionExpired {
            session: expired.session,
            seq: expired.seq,
        },
        Detail::Unauthenticated(refusal) => Error::Unauthenticated {
            reason: latchkey_proto::v1::unauthenticated::Reason::try_from(refusal.reason)
                .map(|r| r.as_str_name().to_ascii_lowercase())
                .unwrap_or_else(|_| "unknown".into()),
            message: String::new(),
        },
        Detail::PermissionDenied(denied) => Error::PermissionDenied {
            user: denied.user,
            permission: denied.permission,
            resource: denied.resource,
        },
        Detail::LimitExceeded(limit) => Error::LimitExceeded {
            limit: limit.limit,
            allowed: limit.allowed,
        },
        Detail::NotLeader(not_leader) => Error::Unavailable {
            message: format!(
                "node is not the leader (leader: {:?})",
                not_leader.leader_client_addr
            ),
        },
    }
}

/// The typed details of a status, if it carries any that decode.
pub(crate) fn decode_details(status: &tonic::Status) -> Option<error_details::Detail> {
    if status.details().is_empty() {
        return None;
    }
    ErrorDetails::decode(status.details()).ok()?.detail
}

/// One line describing a status, including the transport error behind a
/// locally generated one.
pub(crate) fn describe_status(status: &tonic::Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    let mut source = std::error::Error::source(status);
    // Bounded: error source chains are short and finite.
    while let Some(error) = source {
        text.push_str(&format!(": {error}"));
        source = error.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use latchkey_proto::v1::{LockHeld, StaleToken};

    fn status_with(code: Code, detail: error_details::Detail) -> tonic::Status {
        let details = ErrorDetails {
            detail: Some(detail),
        };
        tonic::Status::with_details(code, "refused", details.encode_to_vec().into())
    }

    #[test]
    fn lock_held_details_become_lock_held_with_the_holders_token() {
        let status = status_with(
            Code::FailedPrecondition,
            error_details::Detail::LockHeld(LockHeld {
                name: "job".into(),
                holder_lease: 7,
                holder_token: 42,
            }),
        );
        assert_eq!(
            Error::from_status(&status),
            Error::LockHeld {
                name: "job".into(),
                holder_lease: LeaseId(7),
                holder_token: FencingToken(42),
            }
        );
    }

    #[test]
    fn stale_token_against_a_free_lock_has_no_current_token() {
        let status = status_with(
            Code::FailedPrecondition,
            error_details::Detail::StaleToken(StaleToken {
                name: "job".into(),
                presented: 3,
                current: 0,
            }),
        );
        assert_eq!(
            Error::from_status(&status),
            Error::StaleToken {
                name: "job".into(),
                presented: FencingToken(3),
                current: None,
            }
        );
    }

    #[test]
    fn not_found_without_details_names_the_lease_it_was_about() {
        let status = tonic::Status::not_found("lease ended while waiting");
        let error = Error::from_status(&status).about_lease(LeaseId(9));
        assert_eq!(
            error,
            Error::LeaseNotFound {
                lease: Some(LeaseId(9))
            }
        );
    }

    #[test]
    fn invalid_argument_without_details_names_the_field_the_message_names() {
        let status = tonic::Status::invalid_argument("invalid argument: ttl_ms: is too short");
        assert_eq!(
            Error::from_status(&status),
            Error::InvalidArgument {
                field: "ttl_ms".into(),
                reason: "is too short".into(),
            }
        );
        let status = tonic::Status::invalid_argument("name must not be empty");
        assert_eq!(
            Error::from_status(&status),
            Error::InvalidArgument {
                field: String::new(),
                reason: "name must not be empty".into(),
            }
        );
    }

    #[test]
    fn refusal_without_details_keeps_its_code_and_message() {
        let status = tonic::Status::failed_precondition("request too old");
        assert_eq!(
            Error::from_status(&status),
            Error::Rejected {
                code: Code::FailedPrecondition,
                message: "request too old".into(),
            }
        );
    }
}
