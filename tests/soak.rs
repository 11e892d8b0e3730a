//! Soak: three runtimes acting as processes, mixed reads and `#[invalidates]` writes against a
//! versioned source of truth, through a fault proxy, under a schedule of latency spikes, a
//! blackhole, resets, a server kill and restart, `CLIENT PAUSE WRITE` and refused connections.
//! Then the same schedule with a hand-written cache-aside (GET / SET / DEL through a `Cache`
//! handle, no leases, no breaker), to show that the checks can fail.
//!
//! `cargo test --test soak -- --nocapture` prints both reports.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cache_runtime::db::Strategy;
use cache_runtime::{cached, invalidates, Cache, CacheConfig, Runtime};
use support::proxy::{Fault, FaultProxy};
use support::RedisServer;
use tokio::task::JoinSet;

const KEYS: usize = 20;
const RUNTIMES: usize = 3;
const READERS: usize = 8;
const OP_TIMEOUT: Duration = Duration::from_millis(150);
const LEASE: Duration = Duration::from_millis(500);
const BODY: Duration = Duration::from_millis(3);
/// Scheduling on a shared 2-core machine running 27 busy tasks and a server.
const MARGIN: Duration = Duration::from_millis(300);
const RUN: Duration = Duration::from_secs(18);
/// When the last fault ends; the hit rate is measured from `RECOVERED + 2 s` to the end.
const RECOVERED: Duration = Duration::from_secs(13);
/// The longest after a write's invalidation returned that a near copy in another runtime may
/// still answer under these faults (README, "The near tier"): a tracking connection that goes
/// silent (the blackhole) is noticed by its next `PING`, within 500 ms and one op timeout.
const NEAR_BOUND: Duration = Duration::from_millis(500 + 150);

/// The source of truth: a version per key, bumped by each write.
struct Truth {
    versions: Vec<AtomicU64>,
    /// Per key, the highest version whose invalidation is known to have been applied, and when
    /// that became known.
    acked: Vec<Mutex<(u64, Instant)>>,
}

impl Truth {
    fn new() -> Arc<Truth> {
        Arc::new(Truth {
            versions: (0..KEYS).map(|_| AtomicU64::new(0)).collect(),
            acked: (0..KEYS).map(|_| Mutex::new((0, Instant::now()))).collect(),
        })
    }

    fn ack(&self, key: usize, version: u64) {
        let mut acked = self.acked[key].lock().unwrap();
        if version > acked.0 {
            *acked = (version, Instant::now());
        }
    }

    fn acked(&self, key: usize) -> (u64, Instant) {
        *self.acked[key].lock().unwrap()
    }
}

#[cached(db = Strategy, prefix = "soak", ttl = 30, skip(truth, ran))]
async fn position(key: u32, truth: &Truth, ran: &AtomicBool) -> u64 {
    ran.store(true, SeqCst);
    let v = truth.versions[key as usize].load(SeqCst);
    tokio::time::sleep(BODY).await; // a database read: the window of the stale-set race
    v
}

#[invalidates(position(key))]
async fn trade(key: u32, truth: &Truth) -> Result<u64, String> {
    Ok(truth.versions[key as usize].fetch_add(1, SeqCst) + 1)
}

/// What one process does for a read and a write.
#[derive(Clone)]
enum Client {
    Toolkit(Runtime),
    Naive(Cache<Strategy, u64>),
}

impl Client {
    /// The value and whether it was a hit.
    async fn read(&self, key: usize, truth: &Truth) -> (u64, bool) {
        match self {
            Client::Toolkit(rt) => {
                let ran = AtomicBool::new(false);
                let v = rt.scope(position(key as u32, truth, &ran)).await;
                (v, !ran.load(SeqCst))
            }
            Client::Naive(cache) => {
                if let Ok(Some(v)) = cache.get(&key.to_string()).await {
                    return (v, true);
                }
                let v = truth.versions[key].load(SeqCst);
                tokio::time::sleep(BODY).await;
                let _ = cache.set(&key.to_string(), &v).await;
                (v, false)
            }
        }
    }

    /// Writes; returns the version and whether its invalidation is applied already.
    async fn write(&self, key: usize, truth: &Truth) -> (u64, bool) {
        match self {
            Client::Toolkit(rt) => {
                let v = rt.scope(trade(key as u32, truth)).await.unwrap();
                (v, rt.pending_invalidations() == 0)
            }
            Client::Naive(cache) => {
                let v = truth.versions[key].fetch_add(1, SeqCst) + 1;
                (v, cache.delete(&key.to_string()).await.is_ok())
            }
        }
    }

    fn breaker_open(&self) -> bool {
        matches!(self, Client::Toolkit(rt) if rt.breaker_open())
    }

    fn queues(&self) -> (usize, usize) {
        match self {
            Client::Toolkit(rt) => (rt.pending_invalidations(), rt.queued_writes()),
            Client::Naive(_) => (0, 0),
        }
    }
}

#[derive(Default)]
struct Report {
    reads: usize,
    writes: usize,
    stale: usize,
    /// The longest after its write was acknowledged that a stale read returned.
    latest_stale: Duration,
    caller_errors: usize,
    slowest: Duration,
    slowest_with_breaker_open: Duration,
    full_timeouts: usize,
    max_pending_invalidations: usize,
    max_queued_writes: usize,
    hit_rate_after_recovery: f64,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} reads, {} writes; stale reads {} (the latest {:?} after the write's invalidation returned); errors/panics reaching callers {}; slowest call {:?} \
             (started with the breaker open: {:?}); calls that paid a full op timeout {}; \
             max queued invalidations {}, max queued writes {}; hit rate from 2 s after recovery {:.0} %",
            self.reads,
            self.writes,
            self.stale,
            self.latest_stale,
            self.caller_errors,
            self.slowest,
            self.slowest_with_breaker_open,
            self.full_timeouts,
            self.max_pending_invalidations,
            self.max_queued_writes,
            self.hit_rate_after_recovery * 100.0
        )
    }
}

async fn soak(clients: Vec<Client>, server: &mut RedisServer, proxy: &FaultProxy) -> Report {
    let truth = Truth::new();
    let start = Instant::now();
    let report = Arc::new(Mutex::new(Report::default()));
    let late = Arc::new((AtomicUsize::new(0), AtomicUsize::new(0))); // (hits, reads) after recovery
    let mut tasks = JoinSet::new();
    for client in &clients {
        for r in 0..READERS {
            let (client, truth, report, late) =
                (client.clone(), Arc::clone(&truth), Arc::clone(&report), Arc::clone(&late));
            tasks.spawn(async move {
                let mut n = r;
                while start.elapsed() < RUN {
                    let key = (n * 7 + r) % KEYS;
                    n += 1;
                    let (floor, acked_at) = truth.acked(key);
                    let open = client.breaker_open();
                    let began = Instant::now();
                    let (v, hit) = client.read(key, &truth).await;
                    let took = began.elapsed();
                    let at = began - start;
                    {
                        let mut rep = report.lock().unwrap();
                        rep.reads += 1;
                        if v < floor {
                            rep.stale += 1;
                            rep.latest_stale = rep.latest_stale.max(acked_at.elapsed());
                        }
                        rep.slowest = rep.slowest.max(took);
                        rep.full_timeouts += usize::from(took >= OP_TIMEOUT);
                        if open {
                            rep.slowest_with_breaker_open = rep.slowest_with_breaker_open.max(took);
                        }
                    }
                    if at >= RECOVERED + Duration::from_secs(2) {
                        late.0.fetch_add(usize::from(hit), SeqCst);
                        late.1.fetch_add(1, SeqCst);
                    }
                    tokio::time::sleep(Duration::from_millis(4)).await;
                }
            });
        }
        let (client, truth, report) = (client.clone(), Arc::clone(&truth), Arc::clone(&report));
        tasks.spawn(async move {
            // Writes whose invalidation was still queued when they returned: acknowledged once
            // this process has no invalidation pending.
            let mut unacked: Vec<(usize, u64)> = Vec::new();
            let mut n = 0usize;
            while start.elapsed() < RUN {
                let key = (n * 3) % KEYS;
                n += 1;
                let (v, applied) = client.write(key, &truth).await;
                report.lock().unwrap().writes += 1;
                if applied {
                    truth.ack(key, v);
                } else if matches!(client, Client::Toolkit(_)) {
                    unacked.push((key, v));
                }
                if client.queues().0 == 0 {
                    for (k, v) in unacked.drain(..) {
                        truth.ack(k, v);
                    }
                }
                let (pending, queued) = client.queues();
                {
                    let mut rep = report.lock().unwrap();
                    rep.max_pending_invalidations = rep.max_pending_invalidations.max(pending);
                    rep.max_queued_writes = rep.max_queued_writes.max(queued);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }
    faults(server, proxy, start).await;
    while let Some(joined) = tasks.join_next().await {
        if joined.is_err() {
            report.lock().unwrap().caller_errors += 1;
        }
    }
    let mut report = std::mem::take(&mut *report.lock().unwrap());
    let (hits, reads) = (late.0.load(SeqCst), late.1.load(SeqCst));
    report.hit_rate_after_recovery = hits as f64 / reads.max(1) as f64;
    report
}

/// The fault schedule, in seconds from the start: 2-3.5 latency spikes, 4-5.5 blackhole, 6
/// resets, 7-8 server killed then restarted, 9 `CLIENT PAUSE WRITE` 800 ms, 11-12 refused;
/// recovered from 13 (`RECOVERED`).
async fn faults(server: &mut RedisServer, proxy: &FaultProxy, start: Instant) {
    let at = |s: f64| tokio::time::sleep_until((start + Duration::from_secs_f64(s)).into());
    at(2.0).await;
    proxy.set(Fault::Latency(Duration::from_millis(100)));
    at(3.5).await;
    proxy.set(Fault::Pass);
    at(4.0).await;
    proxy.set(Fault::Blackhole);
    at(5.5).await;
    proxy.set(Fault::Pass);
    at(6.0).await;
    proxy.set(Fault::Reset);
    tokio::time::sleep(Duration::from_millis(50)).await;
    proxy.set(Fault::Pass);
    at(7.0).await;
    server.stop();
    at(8.0).await;
    server.restart();
    at(9.0).await;
    server.pause_writes(800).await;
    at(11.0).await;
    proxy.set(Fault::Refuse);
    at(12.0).await;
    proxy.set(Fault::Pass);
    at(RECOVERED.as_secs_f64()).await;
}

fn config(url: &str) -> CacheConfig {
    CacheConfig::redis(url)
        .unwrap()
        .with_op_timeout(OP_TIMEOUT)
        .with_connect_timeout(OP_TIMEOUT)
        .with_lease_ttl(LEASE)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_under_a_fault_schedule() {
    let mut server = RedisServer::start();
    let proxy = FaultProxy::start(server.port());
    let clients = (0..RUNTIMES).map(|_| Client::Toolkit(Runtime::new(config(&proxy.url())))).collect();
    let rss_before = rss();
    let protected = soak(clients, &mut server, &proxy).await;
    let rss_growth = rss().saturating_sub(rss_before);
    eprintln!("soak, #[cached] + #[invalidates]: {protected}; the process grew by {} MiB", rss_growth >> 20);

    // The same, with near copies of every read (typed, in process), kept correct across the
    // three runtimes by Redis's tracking connection, itself through the proxy and its faults.
    let near_rts: Vec<Runtime> = (0..RUNTIMES)
        .map(|_| Runtime::new(config(&proxy.url()).with_near_default(Duration::from_secs(30))))
        .collect();
    let clients = near_rts.iter().cloned().map(Client::Toolkit).collect();
    let near = soak(clients, &mut server, &proxy).await;
    let near_hits: u64 = near_rts.iter().map(|rt| rt.stats().get(8, "soak").map_or(0, |s| s.near_hits)).sum();
    eprintln!("soak, with near copies:            {near}; {near_hits} reads answered by a near copy");

    let naive_rt = || Runtime::new(config(&proxy.url()).with_breaker(0, Duration::ZERO));
    let naive_clients = || {
        (0..RUNTIMES)
            .map(|_| {
                Client::Naive(Cache::new("naive", Duration::from_secs(30)).unwrap().with_runtime(naive_rt()))
            })
            .collect()
    };
    // Its race needs a write to a key within a reader's 3 ms computation of it: a few per
    // schedule, and some schedules have none (seen: 0 stale reads in 2 of 3 runs of one machine,
    // 168 in the third). Up to three schedules, so that the proof of the race rarely misses.
    let mut naive = soak(naive_clients(), &mut server, &proxy).await;
    for _ in 1..3 {
        if naive.stale > 0 {
            break;
        }
        eprintln!("soak, hand-written cache-aside:   no stale read in this schedule ({naive}); again");
        naive = soak(naive_clients(), &mut server, &proxy).await;
    }
    eprintln!("soak, hand-written cache-aside:   {naive}");

    assert_eq!(protected.caller_errors, 0, "no error or panic reached a caller");
    assert_eq!(protected.stale, 0, "no read older than a write whose invalidation had been applied");
    let bound = OP_TIMEOUT * 2 + LEASE + BODY + MARGIN;
    assert!(
        protected.slowest < bound,
        "every call within 2 op timeouts + a lease + the body + {MARGIN:?}: {protected}"
    );
    // A call that starts while the breaker is open is bypassed (the body alone), or is the probe
    // once the cool-down has passed: its lookup and its lease request, each under one timeout.
    let open_bound = OP_TIMEOUT * 2 + BODY + MARGIN;
    assert!(
        protected.slowest_with_breaker_open < open_bound,
        "calls started with the breaker open: at most 2 op timeouts + the body + {MARGIN:?}: {protected}"
    );
    assert!(
        protected.max_pending_invalidations <= KEYS,
        "at most one queued invalidation per key: {protected}"
    );
    assert!(protected.max_queued_writes <= 16_384, "the write-behind queue is bounded: {protected}");
    assert!(protected.hit_rate_after_recovery > 0.5, "caching resumed: {protected}");
    // Near copies: no error, the same bounds, and a stale read only within the notification's
    // way from Redis to another runtime.
    assert_eq!(near.caller_errors, 0, "no error or panic reached a caller: {near}");
    assert!(near.slowest < bound, "every call within the same bound: {near}");
    assert!(near_hits > 0, "near copies answered: {near_hits}");
    assert!(
        near.latest_stale <= NEAR_BOUND,
        "a stale read within {NEAR_BOUND:?} of its write's invalidation: {near}"
    );
    // The checks can fail: the hand-written cache-aside serves stale values under the same load.
    assert!(naive.stale > 0, "the stale-set race exists without leases: {naive}");
}

/// This process's resident memory in bytes (Linux `/proc/self/statm`; 0 elsewhere).
fn rss() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}
