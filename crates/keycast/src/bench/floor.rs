//! The floor: what the wraps and signatures of a rekey cost alone, with the chosen primitives;
//! and, beside it, what hashing its packets for their hash trees costs alone.
//!
//! Each floor is timed right after the rekey it is compared with, with the same counts, so
//! both see the same machine (a shared VM's speed drifts by tens of percent within a minute).

use std::hint::black_box;
use std::time::{Duration, Instant};

use keycast_core::key::Key;
use keycast_core::wire::auth::leaf_hash;
use keycast_core::wire::{GroupId, Heartbeat, Signer};
use keycast_core::{KeyId, KeyRef, Wrap, Wrapper};
use rayon::prelude::*;

use crate::measure::{median_time, micros, sim_signer};

/// Wrapping keys are cycled so each wrap sets up a different key, as in a rekey.
const KEKS: usize = 64;
/// Wraps per task when the floor is spread over every core.
const WRAPS_PER_TASK: usize = 1024;

pub struct Floor {
    keks: Vec<Key>,
    payload: Key,
    signer: Signer,
    heartbeat: Heartbeat,
}

impl Floor {
    pub fn new() -> Floor {
        Floor {
            keks: (0..KEKS as u8).map(|i| Key::from_bytes([i; 32])).collect(),
            payload: Key::from_bytes([0xa5; 32]),
            signer: sim_signer(),
            heartbeat: Heartbeat {
                group: GroupId(1),
                epoch: 1,
                seq: 1,
                rekey_seq: 1,
                active: KeyRef::new(KeyId(0), 1, 0),
                active_check: [0; 8],
                pending: None,
                pending_check: [0; 8],
                group_size: 1,
                sent_ms: 0,
                activates_in_ms: 0,
            },
        }
    }

    fn wrap(&self, i: usize) -> Wrap {
        let under = Wrapper::Key(KeyRef::new(KeyId(1), (i % KEKS) as u32 + 1, 0));
        Wrap::seal(&self.keks[i % KEKS], under, KeyRef::new(KeyId(2), i as u32 + 2, 0), &self.payload, &[0x3c; 12])
    }

    /// Time for `wraps` wraps and `signatures` signatures on this thread.
    pub fn time(&self, wraps: usize, signatures: usize) -> Duration {
        let start = Instant::now();
        for i in 0..wraps {
            black_box(self.wrap(i));
        }
        for _ in 0..signatures {
            black_box(self.heartbeat.sign(&self.signer));
        }
        start.elapsed()
    }

    /// The same work spread over every core of the thread pool.
    pub fn time_parallel(&self, wraps: usize, signatures: usize) -> Duration {
        let start = Instant::now();
        (0..wraps.div_ceil(WRAPS_PER_TASK)).into_par_iter().for_each(|task| {
            for i in task * WRAPS_PER_TASK..((task + 1) * WRAPS_PER_TASK).min(wraps) {
                black_box(self.wrap(i));
            }
        });
        (0..signatures).into_par_iter().for_each(|_| {
            black_box(self.heartbeat.sign(&self.signer));
        });
        start.elapsed()
    }

    /// Time to hash `bytes` of packet bodies, `packets` bodies of equal size, as the encoder
    /// does for its hash trees; on every core if `parallel`.
    pub fn hashing(&self, bytes: usize, packets: usize, parallel: bool) -> Duration {
        let body = vec![0x5a; bytes.div_ceil(packets.max(1))];
        let start = Instant::now();
        if parallel {
            (0..packets).into_par_iter().for_each(|_| {
                black_box(leaf_hash(black_box(&body)));
            });
        } else {
            for _ in 0..packets {
                black_box(leaf_hash(black_box(&body)));
            }
        }
        start.elapsed()
    }

    /// One wrap in ns and one signature in µs (medians), for the report's first line.
    pub fn unit_costs(&self, reps: usize) -> (f64, f64) {
        const WRAPS: usize = 2000;
        const SIGNS: usize = 200;
        let wraps = median_time(reps, || {
            black_box(self.time(WRAPS, 0));
        });
        let signs = median_time(reps, || {
            black_box(self.time(0, SIGNS));
        });
        (wraps.as_secs_f64() * 1e9 / WRAPS as f64, micros(signs) / SIGNS as f64)
    }
}
