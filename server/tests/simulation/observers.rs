//! Election observers, run the way the API's `Observe` stream runs on a
//! node: subscribe to the node's applied events, take a linearizable read
//! point (ReadIndex, then wait for the node to apply it), report the
//! current leader, then report it again after every applied entry that
//! changed that election's leadership. If the node goes away or the read
//! fails, the observer reconnects to another node and starts over.
//!
//! The checker requires that what one observer reports never goes back
//! (leadership tokens never decrease, across reconnects), that every
//! leader it reports was really granted, and that each read point is at
//! least as new as every write acknowledged before it was taken.
//!
//! Not done yet: an observer that lags behind the node's event buffer
//! re-reads the leader instead of being cut off as the API does.

use std::sync::Arc;

use rand::Rng;
use tokio::sync::{broadcast, oneshot};

use latchkey_server::coordination::Event as AppliedEvent;
use latchkey_server::error::RequestError;
use latchkey_server::node::{AppliedEvents, NodeMsg};
use latchkey_server::types::LogIndex;

use crate::checker::Observation;
use crate::world::{Event, Touched, World, MS, NODES};

/// Observers running at once; more requests are ignored.
const MAX_OBSERVERS: usize = 3;
/// Phases one observer moves through in one poll (connecting, catching
/// up, streaming).
const MAX_PHASES_PER_POLL: usize = 4;

enum Phase {
    /// Waiting for the read point.
    Connecting {
        read: oneshot::Receiver<Result<LogIndex, RequestError>>,
        began_at_us: u64,
    },
    /// Waiting for the node to apply up to the read point.
    CatchingUp {
        read_index: u64,
        began_at_us: u64,
    },
    Streaming,
    /// Reconnecting after this time.
    Backoff {
        until_us: u64,
    },
}

struct Observer {
    id: usize,
    name: &'static str,
    node: u64,
    incarnation: u64,
    events: Option<broadcast::Receiver<Arc<AppliedEvents>>>,
    /// The last leader reported, as `(lease, token)`.
    last: Option<Option<(u64, u64)>>,
    until_us: u64,
    phase: Phase,
}

#[derive(Default)]
pub struct Observers {
    running: Vec<Observer>,
    started: usize,
}

impl Observers {
    /// Starts an observer of `name` for `duration_us`, if there is room.
    pub fn start(&mut self, world: &mut World, name: &'static str, duration_us: u64) {
        if self.running.len() >= MAX_OBSERVERS {
            return;
        }
        self.started += 1;
        let mut observer = Observer {
            id: self.started,
            name,
            node: 0,
            incarnation: 0,
            events: None,
            last: None,
            until_us: world.now_us + duration_us,
            phase: Phase::Backoff { until_us: 0 },
        };
        observer.connect(world);
        self.running.push(observer);
    }

    /// Moves on the observers whose node `touched` moved, and those
    /// waiting to reconnect; called after each event.
    pub fn poll(&mut self, world: &mut World, touched: Touched) {
        self.running
            .retain(|observer| observer.until_us > world.now_us);
        for observer in &mut self.running {
            let moved = match touched {
                Touched::All => true,
                Touched::Node(id) => id == observer.node,
                Touched::Client { .. } => false,
            };
            if moved || matches!(observer.phase, Phase::Backoff { .. }) {
                observer.poll(world);
            }
        }
    }
}

impl Observer {
    fn connect(&mut self, world: &mut World) {
        self.node = world.rng.gen_range(1..=NODES);
        let Some(running) = world.running(self.node) else {
            self.retry(world);
            return;
        };
        self.incarnation = running.incarnation;
        self.events = Some(running.handle.subscribe());
        let (reply, read) = oneshot::channel();
        let delay = world.rng.gen_range(100..3 * MS);
        let node = self.node;
        world.schedule(
            delay,
            Event::Request {
                node,
                message: NodeMsg::ReadIndex { reply },
            },
        );
        self.phase = Phase::Connecting {
            read,
            began_at_us: world.now_us,
        };
    }

    fn retry(&mut self, world: &mut World) {
        self.events = None;
        let until_us = world.now_us + world.rng.gen_range(50 * MS..300 * MS);
        self.phase = Phase::Backoff { until_us };
    }

    /// Moves through as many phases as are ready now (a read point may
    /// already be applied when it arrives).
    fn poll(&mut self, world: &mut World) {
        for _ in 0..MAX_PHASES_PER_POLL {
            let before = std::mem::discriminant(&self.phase);
            self.step(world);
            if std::mem::discriminant(&self.phase) == before {
                break;
            }
        }
    }

    fn step(&mut self, world: &mut World) {
        if !matches!(self.phase, Phase::Backoff { .. }) && !self.node_is_same(world) {
            self.retry(world);
            return;
        }
        match &mut self.phase {
            Phase::Backoff { until_us } => {
                if *until_us <= world.now_us {
                    self.connect(world);
                }
            }
            Phase::Connecting { read, began_at_us } => match read.try_recv() {
                Ok(Ok(index)) => {
                    let began_at_us = *began_at_us;
                    self.phase = Phase::CatchingUp {
                        read_index: index.0,
                        began_at_us,
                    };
                }
                Ok(Err(_)) | Err(oneshot::error::TryRecvError::Closed) => self.retry(world),
                Err(oneshot::error::TryRecvError::Empty) => {}
            },
            Phase::CatchingUp {
                read_index,
                began_at_us,
            } => {
                let (read_index, began_at_us) = (*read_index, *began_at_us);
                let applied = self.applied(world);
                if applied >= read_index {
                    world
                        .checker
                        .read_served("observe", self.node, began_at_us, applied);
                    self.report(world, true);
                    self.phase = Phase::Streaming;
                }
            }
            Phase::Streaming => self.stream(world),
        }
    }

    fn node_is_same(&self, world: &World) -> bool {
        world
            .running(self.node)
            .is_some_and(|running| running.incarnation == self.incarnation)
    }

    fn applied(&self, world: &World) -> u64 {
        world
            .running(self.node)
            .map_or(0, |running| running.handle.status().applied_index)
    }

    /// Reports the leader after every applied entry that changed it.
    fn stream(&mut self, world: &mut World) {
        let Some(events) = self.events.as_mut() else {
            return;
        };
        let mut changed = false;
        loop {
            match events.try_recv() {
                Ok(batch) => {
                    changed |= batch.events.iter().any(|event| {
                        matches!(event, AppliedEvent::LeaderChanged { name, .. } if name == self.name)
                    });
                }
                Err(broadcast::error::TryRecvError::Empty) => break,
                Err(broadcast::error::TryRecvError::Lagged(_)) => changed = true,
                Err(broadcast::error::TryRecvError::Closed) => {
                    self.retry(world);
                    return;
                }
            }
        }
        if changed {
            self.report(world, false);
        }
    }

    /// Reports the node's current leader, unless it is what was reported
    /// last on this connection.
    fn report(&mut self, world: &mut World, first: bool) {
        let Some(running) = world.running(self.node) else {
            return;
        };
        let leader = running
            .handle
            .coordination()
            .read()
            .leader(self.name)
            .map(|grant| (grant.lease.0, grant.token.0));
        if !first && self.last == Some(leader) {
            return;
        }
        self.last = Some(leader);
        let words = [
            world.now_us,
            5,
            self.id as u64,
            leader.map_or(0, |(_, token)| token),
        ];
        world.trace.record(&words);
        world.checker.observed(Observation {
            observer: Some(self.id),
            name: self.name.to_string(),
            node: self.node,
            leader,
        });
    }
}
