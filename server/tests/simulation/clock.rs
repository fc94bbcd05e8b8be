//! Time and chance in the simulated world: one virtual timeline, clocks
//! that run at their own rates off it, and the seeded random generator.
//!
//! Virtual time (µs since the start of the run) only moves when the world
//! takes the next event. Each node reads it through a [`NodeClock`] whose
//! rate differs from virtual time by a seeded number of parts per million,
//! and can change while the node runs (a clock fault) without jumping. A
//! client's clock ([`ClientClock`]) has one rate for the whole run. With
//! every rate inside the configured drift bound `ρ`, Invariant 4 must hold;
//! see `checker` for how client deadlines are computed.
//!
//! [`SimRng`] is xoshiro256**: `rand`'s `StdRng` (ChaCha12) took a tenth
//! of the simulator's time in a debug build, and nothing here needs a
//! cryptographic generator.
//!
//! Not done yet: a client's clock rate does not change during a run.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rand::RngCore;

use latchkey_server::node::Clock;

/// Parts per million: the unit of clock rates.
pub const PPM: i64 = 1_000_000;

/// The virtual timeline, shared by every clock.
#[derive(Clone)]
pub struct VirtualTime {
    base: Instant,
    now_us: Arc<AtomicU64>,
}

impl VirtualTime {
    pub fn new() -> VirtualTime {
        VirtualTime {
            base: Instant::now(),
            now_us: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn set(&self, now_us: u64) {
        self.now_us.store(now_us, Ordering::Relaxed);
    }

    fn now_us(&self) -> u64 {
        self.now_us.load(Ordering::Relaxed)
    }
}

/// Where a node's clock stood when its rate last changed.
#[derive(Debug, Clone, Copy)]
struct Rate {
    since_virtual_us: u64,
    local_us_then: u64,
    /// Offset from virtual time's rate, in parts per million.
    offset_ppm: i64,
}

impl Rate {
    fn local_at(&self, virtual_us: u64) -> u64 {
        let elapsed = i128::from(virtual_us - self.since_virtual_us);
        let scaled = elapsed * i128::from(PPM + self.offset_ppm) / i128::from(PPM);
        self.local_us_then + u64::try_from(scaled).expect("clock rates are positive")
    }
}

/// A node's monotonic clock: virtual time at the node's own rate. Clones
/// share the rate, so the world keeps one to change it.
#[derive(Clone)]
pub struct NodeClock {
    time: VirtualTime,
    rate: Arc<Mutex<Rate>>,
}

impl NodeClock {
    pub fn new(time: &VirtualTime, offset_ppm: i64) -> NodeClock {
        NodeClock {
            time: time.clone(),
            rate: Arc::new(Mutex::new(Rate {
                since_virtual_us: time.now_us(),
                local_us_then: time.now_us(),
                offset_ppm,
            })),
        }
    }

    pub fn offset_ppm(&self) -> i64 {
        self.rate.lock().offset_ppm
    }

    /// Changes the rate from now on; the clock does not jump.
    pub fn set_offset_ppm(&self, offset_ppm: i64) {
        let now = self.time.now_us();
        let mut rate = self.rate.lock();
        *rate = Rate {
            since_virtual_us: now,
            local_us_then: rate.local_at(now),
            offset_ppm,
        };
    }

    /// Virtual µs that pass while this clock advances `local_us`.
    pub fn virtual_span_us(&self, local_us: u64) -> u64 {
        let rate = PPM + self.offset_ppm();
        u64::try_from(i128::from(local_us) * i128::from(PPM) / i128::from(rate))
            .expect("spans are positive")
    }
}

impl Clock for NodeClock {
    fn now(&self) -> Instant {
        // Only differences between instants reach the node's logic, so the
        // real `base` does not leak into any result.
        let local = self.rate.lock().local_at(self.time.now_us());
        self.time.base + Duration::from_micros(local)
    }

    fn rate(&self) -> f64 {
        (PPM + self.offset_ppm()) as f64 / PPM as f64
    }
}

/// A client's clock: one rate for the whole run.
#[derive(Debug, Clone, Copy)]
pub struct ClientClock {
    pub offset_ppm: i64,
}

impl ClientClock {
    /// This clock's reading at virtual time `virtual_us`.
    pub fn local_at(&self, virtual_us: u64) -> u64 {
        let scaled = i128::from(virtual_us) * i128::from(PPM + self.offset_ppm) / i128::from(PPM);
        u64::try_from(scaled).expect("clock rates are positive")
    }

    /// The first virtual time at which this clock reads `local_us` or later.
    pub fn virtual_at(&self, local_us: u64) -> u64 {
        let rate = i128::from(PPM + self.offset_ppm);
        let scaled = (i128::from(local_us) * i128::from(PPM) + rate - 1) / rate;
        u64::try_from(scaled).expect("clock rates are positive")
    }
}

/// xoshiro256**, seeded through SplitMix64.
pub struct SimRng {
    state: [u64; 4],
}

impl SimRng {
    pub fn seed_from_u64(seed: u64) -> SimRng {
        let mut mix = seed;
        let mut next = || {
            mix = mix.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = mix;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        SimRng {
            state: [next(), next(), next(), next()],
        }
    }
}

impl RngCore for SimRng {
    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    fn next_u64(&mut self) -> u64 {
        let [a, b, c, d] = &mut self.state;
        let result = b.wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = *b << 17;
        *c ^= *a;
        *d ^= *b;
        *b ^= *c;
        *a ^= *d;
        *c ^= t;
        *d = d.rotate_left(45);
        result
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_change_does_not_make_a_node_clock_jump() {
        let time = VirtualTime::new();
        let clock = NodeClock::new(&time, 10_000);
        time.set(1_000_000);
        let before = clock.now();
        clock.set_offset_ppm(-10_000);
        assert_eq!(clock.now(), before);
        time.set(2_000_000);
        assert_eq!(clock.now() - before, Duration::from_micros(990_000));
    }

    #[test]
    fn client_clock_conversions_round_trip() {
        let clock = ClientClock { offset_ppm: -7_000 };
        for virtual_us in [0, 1, 999_999, 123_456_789] {
            let local = clock.local_at(virtual_us);
            assert!(clock.virtual_at(local) <= virtual_us);
            assert!(clock.local_at(clock.virtual_at(local)) >= local);
        }
    }
}
