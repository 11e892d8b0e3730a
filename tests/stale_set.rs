//! The cache-aside stale-set race, as a property over seeded random interleavings.
//!
//! A reader misses, reads the source of truth, and is slow to write back; meanwhile a writer
//! updates the source and invalidates. Without protection the reader then writes the old value,
//! which lives until its TTL. With fill leases (`#[cached]` + `#[invalidates]`) that write is
//! refused. Property: after a write and its invalidation have returned, no read returns an older
//! value. The same schedules drive a naive cache-aside (GET/SET/DEL through a `Cache` handle), which
//! must break the property: that is what shows this test can fail.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cache_runtime::db::MarketData;
use cache_runtime::{cached, invalidates, Cache, Runtime};
use support::Fixture;
use tokio::task::JoinSet;

/// Rounds per backend and mode. Each round is one fresh key, several readers and one writer.
const ROUNDS: u64 = 2000;
/// Rounds run at once (on distinct keys), to keep the run short.
const LANES: u64 = 16;
const READERS: usize = 3;

/// splitmix64: a seeded schedule, reproducible from the seed printed on failure.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Suspends the task `n` times: the schedule's unit of delay.
async fn pause(n: u64) {
    for _ in 0..n {
        tokio::task::yield_now().await;
    }
}

/// The database: a version per key, and per key the newest version whose invalidation returned.
#[derive(Default)]
pub struct Truth {
    version: Mutex<HashMap<u64, u64>>,
    committed: Mutex<HashMap<u64, u64>>,
}

impl Truth {
    fn read(&self, key: u64) -> u64 {
        *self.version.lock().unwrap().get(&key).unwrap_or(&0)
    }
    fn write(&self, key: u64) -> u64 {
        let mut v = self.version.lock().unwrap();
        let e = v.entry(key).or_insert(0);
        *e += 1;
        *e
    }
    fn commit(&self, key: u64, version: u64) {
        let mut c = self.committed.lock().unwrap();
        let e = c.entry(key).or_insert(0);
        *e = (*e).max(version);
    }
    fn floor(&self, key: u64) -> u64 {
        *self.committed.lock().unwrap().get(&key).unwrap_or(&0)
    }
}

#[cached(db = MarketData, prefix = "race", ttl = 60, skip(truth, slowness))]
async fn price(key: u64, truth: &Truth, slowness: u64) -> u64 {
    let v = truth.read(key);
    pause(slowness).await; // the slow part of a read, after the source was read
    v
}

#[invalidates(price(key))]
async fn update(key: u64, truth: &Truth) -> u64 {
    truth.write(key)
}

/// How a round's reads and writes reach the cache.
#[derive(Clone, Copy, Debug)]
enum Mode {
    Leases,
    Naive,
}

async fn read(
    mode: Mode,
    runtime: &Runtime,
    naive: &Cache<MarketData, u64>,
    key: u64,
    truth: &Truth,
    slowness: u64,
) -> u64 {
    match mode {
        Mode::Leases => runtime.scope(price(key, truth, slowness)).await,
        Mode::Naive => {
            let k = key.to_string();
            if let Ok(Some(v)) = naive.get(&k).await {
                return v;
            }
            let v = truth.read(key);
            pause(slowness).await;
            naive.set(&k, &v).await.unwrap();
            v
        }
    }
}

async fn write(
    mode: Mode,
    runtime: &Runtime,
    naive: &Cache<MarketData, u64>,
    key: u64,
    truth: &Truth,
) -> u64 {
    match mode {
        Mode::Leases => runtime.scope(update(key, truth)).await,
        Mode::Naive => {
            let v = truth.write(key);
            naive.delete(&key.to_string()).await.unwrap();
            v
        }
    }
}

/// Runs `ROUNDS` seeded rounds; returns how many reads broke the property.
async fn stale_reads(fx: &Fixture, mode: Mode, seed: u64) -> usize {
    let truth = Arc::new(Truth::default());
    let naive: Cache<MarketData, u64> =
        Cache::new("naive", Duration::from_secs(60)).unwrap().with_runtime(fx.runtime.clone());
    let stale = Arc::new(AtomicUsize::new(0));
    let next_round = Arc::new(AtomicU64::new(0));
    let mut lanes = JoinSet::new();
    for lane in 0..LANES {
        let (truth, naive, stale, next_round, runtime) =
            (truth.clone(), naive.clone(), stale.clone(), next_round.clone(), fx.runtime.clone());
        lanes.spawn(async move {
            let mut rng = Rng(seed ^ lane.wrapping_mul(0x2545_F491_4F6C_DD1D));
            loop {
                let key = next_round.fetch_add(1, SeqCst);
                if key >= ROUNDS {
                    return;
                }
                let mut round = JoinSet::new();
                for _ in 0..READERS {
                    let (start, slowness) = (rng.below(8), rng.below(12));
                    let (truth, naive, stale, runtime) =
                        (truth.clone(), naive.clone(), stale.clone(), runtime.clone());
                    round.spawn(async move {
                        pause(start).await;
                        let floor = truth.floor(key);
                        let got = read(mode, &runtime, &naive, key, &truth, slowness).await;
                        if got < floor {
                            stale.fetch_add(1, SeqCst);
                        }
                    });
                }
                let start = rng.below(8);
                let (t, n, r) = (truth.clone(), naive.clone(), runtime.clone());
                round.spawn(async move {
                    pause(start).await;
                    let version = write(mode, &r, &n, key, &t).await;
                    t.commit(key, version);
                });
                while round.join_next().await.transpose().unwrap().is_some() {}
                // After the round has settled, a read must see the last write.
                let last = read(mode, &runtime, &naive, key, &truth, 0).await;
                if last < truth.floor(key) {
                    stale.fetch_add(1, SeqCst);
                }
            }
        });
    }
    while lanes.join_next().await.transpose().unwrap().is_some() {}
    stale.load(SeqCst)
}

async fn leases_prevent_stale_sets_that_naive_cache_aside_makes(fx: &mut Fixture) {
    let seed = 0x5EED_0000_0000_0001;
    let naive = stale_reads(fx, Mode::Naive, seed).await;
    let leases = stale_reads(fx, Mode::Leases, seed).await;
    let refused = fx.runtime.stats().get(5, "race").map_or(0, |s| s.refused_fills);
    eprintln!(
        "{ROUNDS} rounds (seed {seed:#x}): naive cache-aside {naive} stale reads; leases {leases} stale reads, {refused} stale fills refused"
    );
    assert!(naive > 0, "the naive schedule must show the race, or this test proves nothing (seed {seed:#x})");
    assert_eq!(leases, 0, "a read returned a value older than a completed write (seed {seed:#x})");
    assert!(refused > 0, "the leases refused the stale fills the naive run wrote");
}

on_every_backend!(leases_prevent_stale_sets_that_naive_cache_aside_makes);
