//! What `--nemesis` names: kinds of fault, their variants, and mixes of
//! faults applied together.
//!
//! Grammar: `none`, or a comma-separated list of *mixes*; a mix is one or
//! more faults joined by `+`, applied together in one cycle; a fault is a
//! kind, optionally narrowed to one variant with `:`. For example
//! `partition,kill,clock-rate:leader+client-partition:holder` deals three
//! cards: any partition, any kill, and "the leader's clock runs at another
//! rate while the next lock holder is cut off".
//!
//! # Not done yet
//! - No weights: every mix in the deck comes up equally often.

use serde::Serialize;

/// The kinds of fault `--nemesis` can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    Partition,
    Kill,
    Pause,
    Clock,
    ClockRate,
    DiskStall,
    ClientPartition,
}

impl FaultKind {
    pub const ALL: [FaultKind; 7] = [
        FaultKind::Partition,
        FaultKind::Kill,
        FaultKind::Pause,
        FaultKind::Clock,
        FaultKind::ClockRate,
        FaultKind::DiskStall,
        FaultKind::ClientPartition,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Partition => "partition",
            FaultKind::Kill => "kill",
            FaultKind::Pause => "pause",
            FaultKind::Clock => "clock",
            FaultKind::ClockRate => "clock-rate",
            FaultKind::DiskStall => "disk-stall",
            FaultKind::ClientPartition => "client-partition",
        }
    }

    /// Every variant of the kind; an unnarrowed fault draws one of them.
    pub fn variants(self) -> &'static [&'static str] {
        match self {
            FaultKind::Partition => &[
                "isolate-one",
                "isolate-leader",
                "halves",
                "majorities-ring",
                "bridge",
                "one-way",
                "leader-with-clients",
                "clients-cut-from-leader",
            ],
            FaultKind::Kill => &["one", "leader", "minority"],
            FaultKind::Pause => &["node", "leader", "client-at-write", "client"],
            FaultKind::Clock => &["node"],
            FaultKind::ClockRate => &["leader", "node", "all"],
            FaultKind::DiskStall => &["leader", "node", "minority"],
            FaultKind::ClientPartition => &["holder", "random"],
        }
    }

    pub fn parse(name: &str) -> Result<FaultKind, String> {
        FaultKind::ALL
            .into_iter()
            .find(|kind| kind.name() == name)
            .ok_or_else(|| {
                let names: Vec<&str> = FaultKind::ALL.iter().map(|k| k.name()).collect();
                format!("unknown nemesis {name:?}; choose from {}", names.join(", "))
            })
    }
}

/// One fault: a kind, and the variant when `--nemesis` named one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultSpec {
    pub kind: FaultKind,
    pub variant: Option<&'static str>,
}

impl FaultSpec {
    fn parse(text: &str) -> Result<FaultSpec, String> {
        let (name, variant) = match text.split_once(':') {
            Some((name, variant)) => (name.trim(), Some(variant.trim())),
            None => (text.trim(), None),
        };
        let kind = FaultKind::parse(name)?;
        let variant = match variant {
            None => None,
            Some(wanted) => Some(
                kind.variants()
                    .iter()
                    .copied()
                    .find(|v| *v == wanted)
                    .ok_or_else(|| {
                        format!(
                            "{} has no variant {wanted:?}; choose from {}",
                            kind.name(),
                            kind.variants().join(", ")
                        )
                    })?,
            ),
        };
        Ok(FaultSpec { kind, variant })
    }
}

impl std::fmt::Display for FaultSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.variant {
            Some(variant) => write!(f, "{}:{variant}", self.kind.name()),
            None => f.write_str(self.kind.name()),
        }
    }
}

/// Faults applied together in one cycle (`a+b`), in the order written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultMix(pub Vec<FaultSpec>);

impl FaultMix {
    pub fn has(&self, kind: FaultKind) -> bool {
        self.0.iter().any(|spec| spec.kind == kind)
    }
}

impl std::fmt::Display for FaultMix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&parts.join("+"))
    }
}

/// Parses `--nemesis` (module docs). Repeated mixes are dealt once.
pub fn parse_nemesis(text: &str) -> Result<Vec<FaultMix>, String> {
    if text.trim() == "none" {
        return Ok(Vec::new());
    }
    let mut mixes: Vec<FaultMix> = Vec::new();
    for part in text.split(',') {
        let specs = part
            .split('+')
            .map(FaultSpec::parse)
            .collect::<Result<Vec<_>, _>>()?;
        let mix = FaultMix(specs);
        for kind in FaultKind::ALL {
            if mix.0.iter().filter(|s| s.kind == kind).count() > 1 {
                return Err(format!(
                    "{mix} names {} twice; a mix holds one fault of each kind",
                    kind.name()
                ));
            }
        }
        if !mixes.contains(&mix) {
            mixes.push(mix);
        }
    }
    Ok(mixes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nemesis_names_parse_and_unknown_ones_are_refused() {
        assert_eq!(FaultKind::parse("kill"), Ok(FaultKind::Kill));
        assert_eq!(FaultKind::parse("clock-rate"), Ok(FaultKind::ClockRate));
        assert!(FaultKind::parse("flood").unwrap_err().contains("partition"));
    }

    #[test]
    fn mixes_join_faults_with_plus_and_variants_follow_a_colon() {
        let mixes =
            parse_nemesis("partition,clock-rate:leader+client-partition:holder").expect("parses");
        assert_eq!(mixes.len(), 2);
        assert_eq!(
            mixes[0].0,
            vec![FaultSpec {
                kind: FaultKind::Partition,
                variant: None
            }]
        );
        assert_eq!(
            mixes[1].to_string(),
            "clock-rate:leader+client-partition:holder"
        );
        assert!(mixes[1].has(FaultKind::ClientPartition));
        assert_eq!(parse_nemesis("none").expect("none"), Vec::new());
        assert_eq!(parse_nemesis("kill,kill").expect("dedup").len(), 1);
    }

    #[test]
    fn unknown_variants_and_a_kind_twice_in_one_mix_are_refused() {
        let error = parse_nemesis("partition:sideways").unwrap_err();
        assert!(error.contains("leader-with-clients"), "{error}");
        assert!(parse_nemesis("kill+kill:leader").is_err());
    }
}
