//! Who a request comes from, and whether it may do what it asks.
//!
//! A request proves its identity with `authorization: Bearer <token>`
//! metadata (a token from `Auth.Authenticate`), or else with its TLS client
//! certificate: the certificate's common name (or, lacking one, its first
//! DNS name) is the user, who must exist. A token wins over a certificate.
//! Every refusal is logged once, with the peer's address and the user name
//! when known, never with a token or password.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message as _;
use tonic::{Request, Status};

use latchkey_proto::v1::error_details::Detail;
use latchkey_proto::v1::unauthenticated::Reason;
use latchkey_proto::v1::{ErrorDetails, Permission, PermissionKind};

use super::store::SharedAuth;
use super::token::{self, Claims};

/// The metadata key of bearer tokens.
pub const AUTHORIZATION: &str = "authorization";

/// The identity behind one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// Authentication is off: everything is allowed, nothing is owned.
    Anonymous,
    User {
        name: String,
        admin: bool,
        permissions: Vec<Permission>,
    },
}

impl Identity {
    /// The user's name; `None` when anonymous.
    pub fn name(&self) -> Option<&str> {
        match self {
            Identity::Anonymous => None,
            Identity::User { name, .. } => Some(name),
        }
    }

    /// Whether ownership checks apply: a user that is not an admin may only
    /// use and revoke its own leases.
    pub fn checks_owner(&self) -> bool {
        matches!(self, Identity::User { admin: false, .. })
    }

    pub fn is_admin(&self) -> bool {
        match self {
            Identity::Anonymous => true,
            Identity::User { admin, .. } => *admin,
        }
    }

    /// Refuses unless the identity holds `kind` on a prefix of `resource`.
    pub fn require(&self, kind: PermissionKind, resource: &str) -> Result<(), Status> {
        let allowed = match self {
            Identity::Anonymous => true,
            Identity::User { admin: true, .. } => true,
            Identity::User { permissions, .. } => permissions.iter().any(|p| {
                p.kind == kind as i32
                    && (kind == PermissionKind::Lease || resource.starts_with(&p.prefix))
            }),
        };
        if allowed {
            return Ok(());
        }
        let user = self.name().unwrap_or_default();
        let permission = permission_name(kind);
        tracing::info!(%user, %permission, %resource, "request refused: permission denied");
        Err(permission_denied(user, permission, resource))
    }

    pub fn require_admin(&self) -> Result<(), Status> {
        self.require(PermissionKind::Admin, "")
    }
}

/// The CLI and documentation name of a permission kind.
pub fn permission_name(kind: PermissionKind) -> &'static str {
    match kind {
        PermissionKind::Unspecified => "unspecified",
        PermissionKind::Read => "read",
        PermissionKind::Write => "write",
        PermissionKind::Lock => "lock",
        PermissionKind::Elect => "elect",
        PermissionKind::Lease => "lease",
        PermissionKind::Admin => "admin",
    }
}

/// A `PERMISSION_DENIED` status with typed details.
pub fn permission_denied(user: &str, permission: &str, resource: &str) -> Status {
    let details = ErrorDetails {
        detail: Some(Detail::PermissionDenied(
            latchkey_proto::v1::PermissionDenied {
                user: user.to_string(),
                permission: permission.to_string(),
                resource: resource.to_string(),
            },
        )),
    };
    let message = if resource.is_empty() {
        format!("user {user:?} lacks the {permission} permission")
    } else {
        format!("user {user:?} lacks the {permission} permission on {resource:?}")
    };
    Status::with_details(
        tonic::Code::PermissionDenied,
        message,
        details.encode_to_vec().into(),
    )
}

/// An `UNAUTHENTICATED` status with typed details.
pub fn unauthenticated(reason: Reason, message: &str) -> Status {
    let details = ErrorDetails {
        detail: Some(Detail::Unauthenticated(
            latchkey_proto::v1::Unauthenticated {
                reason: reason as i32,
            },
        )),
    };
    Status::with_details(
        tonic::Code::Unauthenticated,
        message.to_string(),
        details.encode_to_vec().into(),
    )
}

/// Resolves identities and issues tokens for one node.
#[derive(Clone)]
pub struct Authenticator {
    auth: SharedAuth,
    token_ttl: Duration,
}

impl Authenticator {
    pub fn new(auth: SharedAuth, token_ttl: Duration) -> Authenticator {
        Authenticator { auth, token_ttl }
    }

    pub fn enabled(&self) -> bool {
        self.auth.read().enabled()
    }

    /// The identity behind `request`, or `UNAUTHENTICATED`.
    pub fn identify<T>(&self, request: &Request<T>) -> Result<Identity, Status> {
        let auth = self.auth.read();
        if !auth.enabled() {
            return Ok(Identity::Anonymous);
        }
        let peer = request.remote_addr();
        let refuse = |reason: Reason, message: &str, user: Option<&str>| {
            log_refusal(peer, user, message);
            unauthenticated(reason, message)
        };
        let name = if let Some(header) = request.metadata().get(AUTHORIZATION) {
            let token = header
                .to_str()
                .ok()
                .and_then(|value| value.strip_prefix("Bearer "))
                .map(str::trim)
                .ok_or_else(|| {
                    refuse(
                        Reason::MalformedToken,
                        "the authorization header is not `Bearer <token>`",
                        None,
                    )
                })?;
            let (key, enabled_index) = auth.token_key();
            // Revocation is checked before expiry: it is the stronger news.
            let Ok(claims) = token::verify_signature(key, token) else {
                return Err(refuse(
                    Reason::MalformedToken,
                    "the token is not valid",
                    None,
                ));
            };
            let current = auth.user(&claims.user).map(|u| u.generation);
            if claims.enabled_index != enabled_index || current != Some(claims.generation) {
                return Err(refuse(
                    Reason::TokenRevoked,
                    "the token was revoked (the password changed, the user was deleted, or authentication was re-enabled); log in again",
                    Some(&claims.user),
                ));
            }
            if claims.expired(unix_ms()) {
                return Err(refuse(
                    Reason::TokenExpired,
                    "the token has expired; log in again",
                    Some(&claims.user),
                ));
            }
            claims.user
        } else if let Some(name) = certificate_user(request) {
            if auth.user(&name).is_none() {
                return Err(refuse(
                    Reason::UnknownUser,
                    "the client certificate names no user of this cluster",
                    Some(&name),
                ));
            }
            name
        } else {
            return Err(refuse(
                Reason::NoCredentials,
                "authentication is on: log in (`latchkey auth login`) or present a client certificate",
                None,
            ));
        };
        Ok(Identity::User {
            admin: auth.is_admin(&name),
            permissions: auth.permissions(&name),
            name,
        })
    }

    /// Checks `user`'s password and issues a token; `UNAUTHENTICATED` when
    /// the user does not exist or the password is wrong (not saying which).
    /// Hashing is slow on purpose; the caller runs this off the runtime.
    pub fn login(
        &self,
        user: &str,
        password: &str,
        peer: Option<SocketAddr>,
    ) -> Result<(String, Duration), Status> {
        let (stored, generation, key, enabled_index) = {
            let auth = self.auth.read();
            if !auth.enabled() {
                return Err(Status::failed_precondition(
                    "authentication is off; no token is needed",
                ));
            }
            let (key, enabled_index) = auth.token_key();
            let user = auth.user(user);
            (
                user.map(|u| u.password_hash.clone()).unwrap_or_default(),
                user.map(|u| u.generation).unwrap_or(0),
                key.to_vec(),
                enabled_index,
            )
        };
        if !super::password::verify(password, &stored) {
            let message = "wrong user name or password";
            log_refusal(peer, Some(user), message);
            return Err(unauthenticated(Reason::BadPassword, message));
        }
        let claims = Claims {
            user: user.to_string(),
            generation,
            enabled_index,
            expires_unix_ms: unix_ms().saturating_add(self.token_ttl.as_millis() as u64),
        };
        Ok((token::issue(&key, &claims), self.token_ttl))
    }
}

fn log_refusal(peer: Option<SocketAddr>, user: Option<&str>, why: &str) {
    let peer = peer
        .map(|p| p.to_string())
        .unwrap_or_else(|| "unknown".into());
    tracing::warn!(%peer, user = user.unwrap_or(""), "request refused: {why}");
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The user a verified TLS client certificate names: its common name, or
/// else its first DNS subject alternative name.
fn certificate_user<T>(request: &Request<T>) -> Option<String> {
    let certs = request.peer_certs()?;
    let leaf = certs.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    if let Some(cn) = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
    {
        return Some(cn.to_string());
    }
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::DNSName(dns) => Some(dns.to_string()),
        _ => None,
    })
}
