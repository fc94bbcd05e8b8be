//! Helpers the examples share: where the cluster is, checking a claim,
//! and timestamped output. Each example uses some of them.

#![allow(dead_code)]

use std::sync::OnceLock;
use std::time::Instant;

use latchkey_client::FencingToken;

/// The environment variable that lists the cluster's client endpoints.
pub const ENDPOINTS_VAR: &str = "LATCHKEY_ENDPOINTS";

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub fn endpoints_from_env() -> Result<Vec<String>, BoxError> {
    let value = std::env::var(ENDPOINTS_VAR).map_err(|_| {
        format!(
            "{ENDPOINTS_VAR} is not set; start a cluster with `latchkey dev` and export the \
             line it prints, e.g. {ENDPOINTS_VAR}=127.0.0.1:41001,127.0.0.1:41003"
        )
    })?;
    let endpoints: Vec<String> = value
        .split(',')
        .map(str::trim)
        .filter(|endpoint| !endpoint.is_empty())
        .map(String::from)
        .collect();
    if endpoints.is_empty() {
        return Err(format!("{ENDPOINTS_VAR} lists no endpoints").into());
    }
    Ok(endpoints)
}

pub fn ensure(holds: bool, claim: impl Into<String>) -> Result<(), BoxError> {
    if holds {
        Ok(())
    } else {
        Err(claim.into().into())
    }
}

pub fn describe_token(token: Option<FencingToken>) -> String {
    token.map_or_else(|| "none".to_string(), |token| token.to_string())
}

/// Prints one line, stamped with the time since the example started.
pub fn log(who: &str, what: impl std::fmt::Display) {
    static START: OnceLock<Instant> = OnceLock::new();
    let elapsed = START.get_or_init(Instant::now).elapsed();
    println!("[{:>5.2}s] {who:<9} {what}", elapsed.as_secs_f64());
}
