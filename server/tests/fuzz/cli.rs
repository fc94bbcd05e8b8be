//! Target 4: the CLI's parsers of durations and endpoints, the client's
//! endpoint normaliser, and `--initial-cluster`.
//!
//! Arbitrary strings never panic; an error is one line that quotes what
//! was typed; whatever is accepted is in range and usable (an endpoint
//! the CLI accepts is one the client connects to); valid inputs parse to
//! what they say, and a duration shown by `format_duration` parses back
//! to itself.

use std::time::Duration;

use proptest::collection::vec;
use proptest::prelude::*;

use latchkey_server::cli::{
    format_duration, parse_duration, parse_endpoints, parse_ttl, MAX_ENDPOINTS, MAX_TIMEOUT,
    MAX_TTL,
};
use latchkey_server::config::parse_initial_cluster;

/// Strings near the grammar: numbers, units, signs, exponents, spaces and
/// the characters endpoints are made of, plus anything at all.
pub fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => "[0-9.eE+\\-]{0,12}(ms|s|m|h|S|M|H|µs|)?",
        2 => "[ \t]?[-+]?[0-9]{0,20}(\\.[0-9]{0,12})?([eE][-+]?[0-9]{1,4})?[ \t]?(ms|s|m|h)?[ \t]?",
        1 => "(inf|NaN|infinity|-inf|nan)(ms|s|m|h)?",
        2 => "(http://|https://)?[a-z0-9\\[\\]:./@?# -]{0,24}(:[0-9]{0,6})?",
        1 => ".{0,24}",
    ]
}

fn quoted(text: &str) -> String {
    format!("{:?}", text.trim())
}

pub fn check_duration(text: &str) -> Result<(), TestCaseError> {
    match parse_duration(text) {
        Ok(duration) => {
            prop_assert!(
                duration > Duration::ZERO && duration <= MAX_TIMEOUT,
                "{:?} gave {:?}",
                text,
                duration
            );
        }
        Err(message) => {
            prop_assert!(!message.contains('\n'), "a multi-line error: {}", message);
            prop_assert!(
                message.contains(&quoted(text)),
                "{:?} not quoted in: {}",
                text,
                message
            );
        }
    }
    match parse_ttl(text) {
        Ok(duration) => {
            prop_assert!(
                duration > Duration::ZERO && duration <= MAX_TTL,
                "ttl {:?} gave {:?}",
                text,
                duration
            );
        }
        Err(message) => {
            prop_assert!(!message.contains('\n'), "a multi-line error: {}", message);
            prop_assert!(
                message.contains(&quoted(text)) || message.contains(&format!("{text:?}")),
                "{:?} not quoted in: {}",
                text,
                message
            );
        }
    }
    Ok(())
}

/// A duration typed the ways a user types one, and what it means.
#[derive(Debug, Clone)]
pub struct Typed {
    text: String,
    expected: Duration,
}

pub fn typed() -> impl Strategy<Value = Typed> {
    prop_oneof![
        (1u64..=3_600_000, " ?", " ?").prop_map(|(ms, a, b)| Typed {
            text: format!("{a}{ms}{b}ms"),
            expected: Duration::from_millis(ms)
        }),
        (1u64..=3600).prop_map(|s| Typed {
            text: format!("{s}s"),
            expected: Duration::from_secs(s)
        }),
        (1u64..=3600).prop_map(|s| Typed {
            text: s.to_string(),
            expected: Duration::from_secs(s)
        }),
        (1u64..=60).prop_map(|m| Typed {
            text: format!("{m}m"),
            expected: Duration::from_secs(60 * m)
        }),
        (1u64..=36_000).prop_map(|tenths| Typed {
            text: format!("{}.{}s", tenths / 10, tenths % 10),
            expected: Duration::from_millis(tenths * 100),
        }),
    ]
}

pub fn check_typed(typed: &Typed) -> Result<(), TestCaseError> {
    let parsed = parse_duration(&typed.text).map_err(TestCaseError::fail)?;
    // Decimal fractions go through f64: allow a nanosecond either way.
    let error = parsed.abs_diff(typed.expected);
    prop_assert!(
        error <= Duration::from_nanos(1),
        "{:?} gave {:?}",
        typed.text,
        parsed
    );
    let ttl = parse_ttl(&typed.text).map_err(TestCaseError::fail)?;
    prop_assert_eq!(ttl, parsed);
    Ok(())
}

/// Durations in whole milliseconds, as `format_duration` shows them, parse
/// back to themselves.
pub fn check_round_trip(ms: u64) -> Result<(), TestCaseError> {
    let duration = Duration::from_millis(ms);
    let shown = format_duration(duration);
    let parsed = parse_ttl(&shown).map_err(|e| TestCaseError::fail(format!("{shown}: {e}")))?;
    prop_assert_eq!(parsed, duration, "shown as {}", shown);
    if duration <= MAX_TIMEOUT {
        prop_assert_eq!(parse_duration(&shown), Ok(duration));
    }
    let hours = ms / 3_600_000;
    if hours > 0 && ms.is_multiple_of(3_600_000) {
        prop_assert_eq!(parse_ttl(&format!("{hours}h")), Ok(duration));
    }
    Ok(())
}

pub fn endpoint_lists() -> impl Strategy<Value = Vec<String>> {
    vec(text(), 0..5)
}

pub fn check_endpoints(raw: &[String]) -> Result<(), TestCaseError> {
    // The CLI splits at commas before this (clap's value delimiter).
    let split: Vec<String> = raw
        .iter()
        .flat_map(|r| r.split(',').map(String::from))
        .collect();
    match parse_endpoints(&split) {
        Ok(endpoints) => {
            prop_assert!(!endpoints.is_empty() && endpoints.len() <= MAX_ENDPOINTS);
            for (i, endpoint) in endpoints.iter().enumerate() {
                prop_assert!(
                    !endpoints[..i].contains(endpoint),
                    "{} listed twice",
                    endpoint
                );
                let normalized = latchkey_client::normalize_endpoint(endpoint);
                prop_assert!(
                    normalized.is_ok(),
                    "the CLI accepts {:?}, the client does not: {:?}",
                    endpoint,
                    normalized
                );
            }
        }
        Err(failure) => {
            prop_assert_eq!(failure.code, latchkey_server::cli::EXIT_USAGE);
            prop_assert!(
                !failure.message.contains('\n'),
                "a multi-line error: {}",
                failure.message
            );
        }
    }
    for text in raw {
        // Never panics, whatever it says.
        let _ = latchkey_client::normalize_endpoint(text);
        let _ = parse_initial_cluster(text);
    }
    Ok(())
}

/// Host and port lists that must parse to themselves.
pub fn valid_endpoints() -> impl Strategy<Value = Vec<(String, u16)>> {
    let host = prop_oneof![
        "[a-z][a-z0-9-]{0,10}(\\.[a-z][a-z0-9-]{0,6}){0,2}",
        (0u8..=255, 0u8..=255, 0u8..=255, 0u8..=255)
            .prop_map(|(a, b, c, d)| format!("{a}.{b}.{c}.{d}")),
        Just("[::1]".to_string()),
    ];
    vec((host, 1u16..), 1..6)
}

pub fn check_valid_endpoints(endpoints: &[(String, u16)]) -> Result<(), TestCaseError> {
    let typed: Vec<String> = endpoints
        .iter()
        .enumerate()
        .map(|(i, (host, port))| {
            let scheme = if i % 2 == 1 { "http://" } else { "" };
            format!(" {scheme}{host}:{port} ")
        })
        .collect();
    let mut expected: Vec<String> = Vec::new();
    for (host, port) in endpoints {
        let endpoint = format!("{host}:{port}");
        if !expected.contains(&endpoint) {
            expected.push(endpoint);
        }
    }
    let parsed = parse_endpoints(&typed).map_err(|f| TestCaseError::fail(f.message))?;
    prop_assert_eq!(parsed, expected);
    let cluster: Vec<String> = endpoints
        .iter()
        .enumerate()
        .map(|(i, (host, port))| format!("{}={host}:{port}", i + 1))
        .collect();
    let peers = parse_initial_cluster(&cluster.join(","))
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(peers.len(), endpoints.len());
    for (i, (host, port)) in endpoints.iter().enumerate() {
        let id = latchkey_server::types::NodeId(i as u64 + 1);
        prop_assert_eq!(&peers[&id], &format!("{host}:{port}"));
    }
    Ok(())
}

#[test]
fn fuzz_duration_parsers_accept_only_what_is_in_range_and_quote_what_they_refuse() {
    crate::runner::run(
        "cli::fuzz_duration_parsers_accept_only_what_is_in_range_and_quote_what_they_refuse",
        2000,
        text(),
        |text| check_duration(&text),
    );
}

#[test]
fn fuzz_typed_durations_parse_to_what_they_say() {
    crate::runner::run(
        "cli::fuzz_typed_durations_parse_to_what_they_say",
        1000,
        typed(),
        |typed| check_typed(&typed),
    );
}

#[test]
fn fuzz_shown_durations_parse_back_to_themselves() {
    crate::runner::run(
        "cli::fuzz_shown_durations_parse_back_to_themselves",
        1000,
        1u64..=MAX_TTL.as_millis() as u64,
        check_round_trip,
    );
}

#[test]
fn fuzz_accepted_endpoints_are_ones_the_client_connects_to() {
    crate::runner::run(
        "cli::fuzz_accepted_endpoints_are_ones_the_client_connects_to",
        2000,
        endpoint_lists(),
        |raw| check_endpoints(&raw),
    );
}

#[test]
fn fuzz_valid_endpoints_parse_to_themselves() {
    crate::runner::run(
        "cli::fuzz_valid_endpoints_parse_to_themselves",
        500,
        valid_endpoints(),
        |endpoints| check_valid_endpoints(&endpoints),
    );
}

#[test]
fn an_endpoint_the_client_cannot_dial_is_a_usage_error() {
    // Found by fuzzing: the CLI took "[:1" and the client then refused it.
    for bad in ["[:1", "a b:1", "a?:1", "[::1:7"] {
        let failure = parse_endpoints(&[bad.to_string()]).expect_err(bad);
        assert_eq!(failure.code, latchkey_server::cli::EXIT_USAGE, "{bad}");
    }
}

#[test]
fn a_duration_that_rounds_to_zero_is_refused() {
    // Found by fuzzing: ".1E-10" gave a zero duration.
    for tiny in [".1E-10", "1e-12s", "0.0000000001ms"] {
        assert!(parse_duration(tiny).is_err(), "{tiny:?} accepted");
        assert!(parse_ttl(tiny).is_err(), "ttl {tiny:?} accepted");
    }
}

#[test]
fn a_shown_duration_keeps_its_milliseconds() {
    // Found by fuzzing: 1234 ms was shown as "1.2s".
    assert_eq!(format_duration(Duration::from_millis(1234)), "1.234s");
    assert_eq!(format_duration(Duration::from_millis(1050)), "1.05s");
    assert_eq!(parse_duration("1.234s"), Ok(Duration::from_millis(1234)));
}
