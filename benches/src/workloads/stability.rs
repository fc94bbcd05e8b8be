//! `leader-stability`: elections nobody asked for, in an idle cluster and
//! in a loaded one.
//!
//! Fast failover comes from short election timeouts, and short timeouts
//! risk elections when nothing failed (a slow fsync, a starved CPU, a
//! heartbeat stuck behind client traffic). Each variant watches the
//! cluster for [`Settings::stability_duration`](super::Settings) (10
//! minutes in a full run) after the warm-up:
//! - `idle`: no client at all;
//! - `loaded, N clients`: [`FAILOVER_CLIENTS`] clients cycle
//!   acquire+release on their own locks the whole time, as in `lock-nc`,
//!   which saturates both cores of the reference machine.
//!
//! Both windows run on one cluster, the idle one first.
//!
//! Every [`POLL_INTERVAL`] each node is asked for its Raft term and the
//! leader it names (latchkey's `Cluster.Status`, etcd's `Maintenance.Status`).
//! A term grows each time some node starts an election (with latchkey's
//! pre-vote, only after a majority agreed that the leader was gone; etcd
//! 3.4 runs without pre-vote by default). The metric is the number of
//! elections in the window, the highest term at the end less the highest
//! at the start; the notes add how often the leader named changed and how
//! many polls found no leader. Each system runs with its default timing.

use std::time::Duration;

use tokio::time::Instant;

use super::{
    clients_variant, failover::FAILOVER_CLIENTS, join_until, locks::cycle_loop, Measurement,
    Metric, Run, Workload, DRAIN_TIMEOUT, LOCK_LEASE_TTL,
};
use crate::cluster::{Cluster, RaftView};
use crate::procfs::UsageProbe;
use crate::stats::{per_second, Recorder, Window};

/// Time between two polls of every node's term and leader.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Variant without clients.
pub const IDLE: &str = "idle";
/// Unit of the metric.
pub const ELECTIONS: &str = "elections";

/// What the polls of one window add up to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    pub polls: usize,
    /// Highest term any node reported in the first and in the last poll
    /// that had an answer.
    pub first_term: u64,
    pub last_term: u64,
    /// Times the leader named at the highest term differed from the one
    /// named in the poll before.
    pub leader_changes: usize,
    /// Polls in which no node at the highest term named a leader.
    pub leaderless_polls: usize,
    /// Polls in which a node did not answer (one count per node).
    pub unanswered: usize,
    /// The leader named by the last poll that named one.
    last_leader: Option<u64>,
}

impl Tally {
    /// Elections held between the first and the last poll.
    pub fn elections(&self) -> u64 {
        self.last_term.saturating_sub(self.first_term)
    }

    /// Adds one poll: what each node answered, `None` if it did not.
    pub fn add(&mut self, views: &[Option<RaftView>]) {
        self.polls += 1;
        self.unanswered += views.iter().filter(|v| v.is_none()).count();
        let answered: Vec<RaftView> = views.iter().flatten().copied().collect();
        let Some(term) = answered.iter().map(|v| v.term).max() else {
            self.leaderless_polls += 1;
            return;
        };
        if self.first_term == 0 {
            self.first_term = term;
        }
        self.last_term = self.last_term.max(term);
        let leader = answered
            .iter()
            .filter(|v| v.term == term)
            .map(|v| v.leader)
            .find(|&l| l != 0);
        match (leader, self.last_leader) {
            (None, _) => self.leaderless_polls += 1,
            (Some(now), Some(before)) if now != before => self.leader_changes += 1,
            _ => {}
        }
        if leader.is_some() {
            self.last_leader = leader;
        }
    }
}

/// Both variants on one cluster: idle first, then loaded.
pub async fn leader_stability(run: &mut Run<'_>) -> Result<Vec<Measurement>, String> {
    let idle = watch(run, 0).await?;
    let loaded = watch(run, FAILOVER_CLIENTS).await?;
    Ok(vec![idle, loaded])
}

/// Watches the cluster for one window while `clients` clients cycle locks.
async fn watch(run: &mut Run<'_>, clients: usize) -> Result<Measurement, String> {
    let leased = run.clients_with_leases(clients, LOCK_LEASE_TTL).await?;
    let window = Window::after(run.settings.warmup, run.settings.stability_duration);
    let cyclers = leased
        .into_iter()
        .enumerate()
        .map(|(i, (conn, lease))| {
            let name = format!("leader-stability/{i}");
            tokio::spawn(cycle_loop(conn, lease, name, window))
        })
        .collect();
    tokio::time::sleep_until(window.start).await;
    let probe = UsageProbe::start(&run.cluster.pids(), &run.settings.data_dir);
    let tally = poll(run.cluster, window.end).await;
    let usage = probe.finish();
    let (recorders, stuck) = join_until(cyclers, window.end + DRAIN_TIMEOUT).await;
    let variant = if clients == 0 {
        IDLE.to_string()
    } else {
        format!("loaded, {}", clients_variant(clients))
    };
    let total = Recorder::merged(&recorders);
    let mut m = Measurement::new(Workload::LeaderStability, variant, run.system);
    m.errors = total.errors + stuck as u64;
    m.error_samples = total.error_samples.clone();
    m.usage = Some(usage);
    m.metric = Some(Metric {
        value: tally.elections() as f64,
        unit: ELECTIONS,
        higher_is_better: false,
    });
    describe(&mut m, &tally, window.length());
    if clients > 0 {
        m.notes.push(format!(
            "{:.0} cycles/s beside the polls",
            per_second(total.count(), window.length())
        ));
    }
    Ok(m)
}

/// Polls every node now, then every [`POLL_INTERVAL`], and once more at
/// `end`.
async fn poll(cluster: &Cluster, end: Instant) -> Tally {
    let mut tally = Tally::default();
    let mut next = Instant::now();
    // Bounded by `end`: the loop stops after the poll made at or past it.
    loop {
        tally.add(&cluster.raft_views().await);
        if Instant::now() >= end {
            return tally;
        }
        next += POLL_INTERVAL;
        tokio::time::sleep_until(next.min(end)).await;
    }
}

fn describe(m: &mut Measurement, tally: &Tally, length: Duration) {
    m.notes.push(format!(
        "over {length:?}: term {} → {}, {} leader changes, {} polls without a leader, \
         {} unanswered node polls, {} polls",
        tally.first_term,
        tally.last_term,
        tally.leader_changes,
        tally.leaderless_polls,
        tally.unanswered,
        tally.polls
    ));
    m.numbers.insert("window_s".into(), length.as_secs_f64());
    m.numbers
        .insert("leader_changes".into(), tally.leader_changes as f64);
    m.numbers
        .insert("leaderless_polls".into(), tally.leaderless_polls as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(term: u64, leader: u64) -> Option<RaftView> {
        Some(RaftView { term, leader })
    }

    fn tally(polls: &[Vec<Option<RaftView>>]) -> Tally {
        let mut tally = Tally::default();
        for views in polls {
            tally.add(views);
        }
        tally
    }

    #[test]
    fn a_steady_cluster_has_no_election() {
        let steady = vec![vec![view(2, 1), view(2, 1), view(2, 1)]; 5];
        let t = tally(&steady);
        assert_eq!(t.elections(), 0);
        assert_eq!(t.leader_changes, 0);
        assert_eq!(t.leaderless_polls, 0);
        assert_eq!(t.polls, 5);
    }

    #[test]
    fn a_new_term_and_leader_are_counted() {
        let polls = vec![
            vec![view(2, 1), view(2, 1), view(2, 1)],
            // Mid-election: the new term has no leader yet; a lagging
            // node still names the old one at the old term.
            vec![view(3, 0), view(2, 1), view(3, 0)],
            vec![view(3, 3), view(3, 3), view(3, 3)],
            vec![view(3, 3), None, view(3, 3)],
        ];
        let t = tally(&polls);
        assert_eq!(t.elections(), 1);
        assert_eq!(t.leader_changes, 1);
        assert_eq!(t.leaderless_polls, 1);
        assert_eq!(t.unanswered, 1);
        assert_eq!((t.first_term, t.last_term), (2, 3));
    }

    #[test]
    fn re_electing_the_same_leader_is_an_election_not_a_change() {
        let polls = vec![vec![view(2, 1)], vec![view(4, 1)]];
        let t = tally(&polls);
        assert_eq!(t.elections(), 2);
        assert_eq!(t.leader_changes, 0);
    }

    #[test]
    fn no_answer_at_all_is_a_poll_without_a_leader() {
        let t = tally(&[vec![None, None]]);
        assert_eq!(t.leaderless_polls, 1);
        assert_eq!(t.unanswered, 2);
        assert_eq!(t.elections(), 0);
    }
}
