//! Bearer tokens: `lk1.<payload>.<signature>`, both base64url without
//! padding. The payload is the expiry (Unix milliseconds), the user's
//! password generation and the index that enabled authentication (each a
//! big-endian u64), then the user name. The signature is HMAC-SHA256 of
//! the payload under the cluster's token key.
//!
//! A token is refused when its signature does not verify, when it has
//! expired on the verifying node's clock, when the user's password changed
//! or the user was re-created since (generation), or when authentication
//! was turned off and on again (a new key and index).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::hmac;

const PREFIX: &str = "lk1.";
/// Longest token accepted, in bytes; longer input is refused unread.
pub const MAX_TOKEN_BYTES: usize = 1024;

/// What a valid token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub user: String,
    pub generation: u64,
    pub enabled_index: u64,
    pub expires_unix_ms: u64,
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    Malformed,
    Expired,
}

/// Signs `claims` with `key`.
pub fn issue(key: &[u8], claims: &Claims) -> String {
    let mut payload = Vec::with_capacity(24 + claims.user.len());
    payload.extend_from_slice(&claims.expires_unix_ms.to_be_bytes());
    payload.extend_from_slice(&claims.generation.to_be_bytes());
    payload.extend_from_slice(&claims.enabled_index.to_be_bytes());
    payload.extend_from_slice(claims.user.as_bytes());
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), &payload);
    format!(
        "{PREFIX}{}.{}",
        URL_SAFE_NO_PAD.encode(&payload),
        URL_SAFE_NO_PAD.encode(tag.as_ref())
    )
}

impl Claims {
    /// Whether the token's lifetime has passed at `now_unix_ms`.
    pub fn expired(&self, now_unix_ms: u64) -> bool {
        now_unix_ms >= self.expires_unix_ms
    }
}

/// Checks `token`'s signature under `key` and its expiry against
/// `now_unix_ms`.
pub fn verify(key: &[u8], token: &str, now_unix_ms: u64) -> Result<Claims, TokenError> {
    let claims = verify_signature(key, token)?;
    if claims.expired(now_unix_ms) {
        return Err(TokenError::Expired);
    }
    Ok(claims)
}

/// Checks `token`'s signature under `key` only: the claims are the
/// issuer's, expired or not.
pub fn verify_signature(key: &[u8], token: &str) -> Result<Claims, TokenError> {
    if token.len() > MAX_TOKEN_BYTES || key.is_empty() {
        return Err(TokenError::Malformed);
    }
    let rest = token.strip_prefix(PREFIX).ok_or(TokenError::Malformed)?;
    let (payload, tag) = rest.split_once('.').ok_or(TokenError::Malformed)?;
    let payload = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| TokenError::Malformed)?;
    let tag = URL_SAFE_NO_PAD
        .decode(tag)
        .map_err(|_| TokenError::Malformed)?;
    hmac::verify(&hmac::Key::new(hmac::HMAC_SHA256, key), &payload, &tag)
        .map_err(|_| TokenError::Malformed)?;
    if payload.len() < 24 {
        return Err(TokenError::Malformed);
    }
    let u64_at = |at: usize| {
        let bytes: [u8; 8] = payload[at..at + 8].try_into().expect("eight bytes");
        u64::from_be_bytes(bytes)
    };
    let claims = Claims {
        expires_unix_ms: u64_at(0),
        generation: u64_at(8),
        enabled_index: u64_at(16),
        user: String::from_utf8(payload[24..].to_vec()).map_err(|_| TokenError::Malformed)?,
    };
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> Claims {
        Claims {
            user: "alice".into(),
            generation: 7,
            enabled_index: 3,
            expires_unix_ms: 10_000,
        }
    }

    #[test]
    fn a_token_verifies_until_it_expires_and_only_under_its_key() {
        let token = issue(&[1; 32], &claims());
        assert_eq!(verify(&[1; 32], &token, 9_999), Ok(claims()));
        assert_eq!(verify(&[1; 32], &token, 10_000), Err(TokenError::Expired));
        assert_eq!(verify(&[2; 32], &token, 0), Err(TokenError::Malformed));
    }

    #[test]
    fn tampered_or_garbage_tokens_are_malformed() {
        let token = issue(&[1; 32], &claims());
        let mut tampered = token.clone().into_bytes();
        let at = PREFIX.len() + 2;
        tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap();
        for bad in [
            tampered.as_str(),
            "",
            "lk1.",
            "lk1.a.b",
            "Bearer x",
            &"x".repeat(5000),
        ] {
            assert_eq!(
                verify(&[1; 32], bad, 0),
                Err(TokenError::Malformed),
                "{bad:?}"
            );
        }
    }
}
