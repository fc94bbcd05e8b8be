//! Authentication and authorisation: users, roles and permissions,
//! replicated through Raft so that every node enforces the same rules.
//!
//! - [`store`]: the replicated state ([`AuthState`]): whether enforcement
//!   is on, the users (with argon2id password hashes) and the roles, kept
//!   in memory and persisted as records under [`keys::AUTH_PREFIX`]. It
//!   changes only by applying an `AuthChange` command, deterministically.
//! - [`token`]: bearer tokens, HMAC-SHA256-signed with a key drawn when
//!   authentication is enabled and replicated with it, so any node verifies
//!   a token any other node issued. A token names the user, the user's
//!   password generation and an expiry; a new password or a deleted user
//!   invalidates the tokens issued before.
//! - [`password`]: argon2id hashing, done by the node that receives the
//!   request, before proposing; apply only stores the hash.
//! - [`identity`]: who a request comes from (a bearer token, or the user
//!   named by its TLS client certificate) and whether it may do what it
//!   asks.
//!
//! While authentication is off every request is anonymous and allowed, as
//! before. Once on, every client call except `Cluster.Status`,
//! `Cluster.Members`, `Auth.Authenticate`, `Auth.Status` and the health and
//! reflection services needs an identity, and each needs its permission
//! (see `docs/security.md`).
//!
//! [`keys::AUTH_PREFIX`]: crate::storage::keys::AUTH_PREFIX

pub mod identity;
pub mod password;
pub mod store;
pub mod token;

pub use identity::{Authenticator, Identity};
pub use store::{AuthError, AuthState, SharedAuth};

/// Longest user or role name, in bytes.
pub const MAX_NAME_BYTES: usize = 128;
/// Longest password accepted, in bytes.
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// Checks a user or role name: 1 to [`MAX_NAME_BYTES`] bytes, no control
/// characters, no surrounding whitespace.
pub fn validate_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{what} name must not be empty"));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(format!(
            "{what} name is {} bytes; the limit is {MAX_NAME_BYTES}",
            name.len()
        ));
    }
    if name.chars().any(char::is_control) || name.trim() != name {
        return Err(format!(
            "{what} name {name:?} has control characters or surrounding spaces"
        ));
    }
    Ok(())
}
