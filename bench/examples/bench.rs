//! `cargo run --release -p cache-bench --example bench` (`BENCH_ONLY=hits,eager` runs some sections): the toolkit against a hand-written `redis` client and
//! against the `cached` crate, side by side in one run, on one server (started here, or
//! `REDIS_URL`), with one ~200-byte JSON value. Prints a table, then one JSON line of ratios.
//!
//! Throughput is measured in alternating rounds (raw, ours, cached crate, raw, ...) and each
//! contender's median round is used: on shared virtual machines absolute figures swing from run
//! to run while ratios measured this way hold. In those rounds, one call in `SAMPLED` is timed
//! for the latency percentiles (two clock reads a call cost a near hit about a tenth of its
//! throughput, and the raw client's round trip nothing measurable); the concurrency-1 p50s of
//! in-process hits (`hit_loop`) time every call. `BENCH_ALONE=raw`, `=ours`, `=near`, `=near64` or `=memory` runs one contender's warm hits alone, for
//! `perf stat` or valgrind.

use std::future::Future;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use cache_runtime::db::{Indicator, MarketData};
use cache_runtime::{cached, Cache, CacheConfig, Runtime};
use serde::{Deserialize, Serialize};

/// About 200 bytes of JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quote {
    symbol: String,
    exchange: String,
    currency: String,
    bid: f64,
    ask: f64,
    last: f64,
    volume: u64,
    open_interest: u64,
    timestamp_ms: u64,
    source: String,
}

fn make_quote(symbol: &str) -> Quote {
    Quote {
        symbol: symbol.to_owned(),
        exchange: "XNAS".into(),
        currency: "USD".into(),
        bid: 150.24,
        ask: 150.26,
        last: 150.25,
        volume: 48_213_377,
        open_interest: 1_204_551,
        timestamp_ms: 1_763_769_600_000,
        source: "consolidated-feed-primary-a".into(),
    }
}

#[derive(Debug, Clone)]
#[allow(dead_code)] // carried for the caller, never read here
pub struct FeedError(String);

static EXECUTIONS: AtomicUsize = AtomicUsize::new(0);
static BODY_DELAY_MS: AtomicUsize = AtomicUsize::new(0);

async fn feed(symbol: &str) -> Quote {
    EXECUTIONS.fetch_add(1, SeqCst);
    let delay = BODY_DELAY_MS.load(SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay as u64)).await;
    }
    make_quote(symbol)
}

// --- the three contenders -------------------------------------------------------------------

#[cached(db = MarketData, prefix = "bench", ttl = 600)]
async fn ours(symbol: &str) -> Result<Quote, FeedError> {
    Ok(feed(symbol).await)
}

/// The same, stored as MessagePack (the `cached` crate's format) instead of JSON.
#[cached(db = MarketData, prefix = "bench", ttl = 600, format = MessagePack)]
async fn ours_packed(symbol: &str) -> Result<Quote, FeedError> {
    Ok(feed(symbol).await)
}

/// The hot key of section 9, refreshed before it expires.
#[cached(db = MarketData, prefix = "bench-eager", ttl = 1, eager_refresh = "50%")]
async fn eager_quote(symbol: &str) -> u64 {
    tokio::time::sleep(Duration::from_millis(100)).await;
    symbol.len() as u64
}

/// The same without the option.
#[cached(db = MarketData, prefix = "bench-eager", ttl = 1)]
async fn plain_quote(symbol: &str) -> u64 {
    tokio::time::sleep(Duration::from_millis(100)).await;
    symbol.len() as u64
}

static DATABASE_DOWN: AtomicBool = AtomicBool::new(false);
static PRICE_TRIES: AtomicUsize = AtomicUsize::new(0);

async fn database(i: u32) -> Result<u64, FeedError> {
    PRICE_TRIES.fetch_add(1, SeqCst);
    tokio::time::sleep(Duration::from_millis(5)).await;
    if DATABASE_DOWN.load(SeqCst) {
        return Err(FeedError("the database is down".into()));
    }
    Ok(u64::from(i))
}

/// Section 10's function, answering with its stale entry when the database fails.
#[cached(db = MarketData, prefix = "bench-failsafe", ttl = 1, stale_if_error = "1h")]
async fn safe_price(i: u32) -> Result<u64, FeedError> {
    database(i).await
}

/// The same without the option.
#[cached(db = MarketData, prefix = "bench-failsafe", ttl = 1)]
async fn plain_price(i: u32) -> Result<u64, FeedError> {
    database(i).await
}

static URL: OnceLock<String> = OnceLock::new();

#[cached::macros::concurrent_cached(
    ty = "cached::AsyncRedisCache<String, Quote>",
    create = r##"{
        cached::AsyncRedisCache::builder("bench-cached-crate")
            .ttl(std::time::Duration::from_secs(600))
            .connection_string(URL.get().expect("url set"))
            .build()
            .await
            .expect("the cached crate's store connects")
    }"##,
    convert = r##"{ symbol.to_owned() }"##,
    map_error = r##"|e| FeedError(format!("{e:?}"))"##
)]
async fn theirs(symbol: &str) -> Result<Quote, FeedError> {
    Ok(feed(symbol).await)
}

/// The near tier: typed copies in process, dropped by Redis's tracking notifications.
#[cached(db = MarketData, prefix = "bench-near", ttl = 600, near = "60s")]
async fn ours_near(symbol: &str) -> Result<Quote, FeedError> {
    Ok(feed(symbol).await)
}

/// The floor under any in-process hit that returns an owned value: a clone of one kept `Quote`.
async fn clone_only(_symbol: &str) -> Result<Quote, FeedError> {
    static KEPT: OnceLock<Quote> = OnceLock::new();
    Ok(KEPT.get_or_init(|| make_quote("SYM0000")).clone())
}

/// The cached crate with its own RESP3 client-side cache (redis-rs `cache-aio`).
#[cached::macros::concurrent_cached(
    ty = "cached::AsyncRedisCache<String, Quote>",
    create = r##"{
        cached::AsyncRedisCache::builder("bench-cached-crate-csc")
            .ttl(std::time::Duration::from_secs(600))
            .connection_string(URL.get().expect("url set"))
            .client_side_caching(true)
            .build()
            .await
            .expect("the cached crate's store connects")
    }"##,
    convert = r##"{ symbol.to_owned() }"##,
    map_error = r##"|e| FeedError(format!("{e:?}"))"##
)]
async fn theirs_near(symbol: &str) -> Result<Quote, FeedError> {
    Ok(feed(symbol).await)
}

/// What a team writes by hand today: GET, decode; on a miss, compute and SET EX.
/// One warm hit of the raw contender on `conn` (a clone), on key `i` of the hot keys: what each
/// raw round runs.
async fn raw_hit(mut conn: impl redis::aio::ConnectionLike + Send, i: usize) {
    raw(&mut conn, &symbols()[i % HOT_KEYS]).await;
}

async fn raw(conn: &mut (impl redis::aio::ConnectionLike + Send), symbol: &str) -> Quote {
    let key = format!("raw:quote:{symbol}");
    let bytes: Option<Vec<u8>> = redis::cmd("GET").arg(&key).query_async(conn).await.expect("GET");
    if let Some(quote) = bytes.and_then(|b| serde_json::from_slice(&b).ok()) {
        return quote;
    }
    let quote = feed(symbol).await;
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(serde_json::to_vec(&quote).unwrap())
        .arg("EX")
        .arg(600)
        .query_async(conn)
        .await
        .expect("SET");
    quote
}

// --- measurement ----------------------------------------------------------------------------

struct Round {
    ops: u64,
    elapsed: Duration,
    latencies_ns: Vec<u64>,
    /// This process's CPU time (user and system, every thread) during the round. The
    /// `redis-server` the benchmark starts is another process, not counted.
    cpu: Duration,
}

/// This process's CPU time so far (`getrusage(RUSAGE_SELF)`: every thread, not child processes).
fn process_cpu() -> Duration {
    // SAFETY: `getrusage` writes one `rusage` into the zeroed value it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut usage) != 0 {
            return Duration::ZERO;
        }
        usage
    };
    let time =
        |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
    time(usage.ru_utime) + time(usage.ru_stime)
}

impl Round {
    fn throughput(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
}

/// In a `round`, one call in this many is timed for the latency percentiles (each task's
/// seventh, fourteenth...; not its first, which may wait for the round to start); every call
/// counts for throughput. Prime to tokio's cooperative budget (128 per poll), so that the calls
/// that spend a task's budget (and wait for the other tasks' turns) are timed as often as any
/// other: with 8, every one of them would be, a sixteenth of the timed calls instead of a 128th.
const SAMPLED: u64 = 7;

/// `concurrency` tasks calling `op(i)` in a loop for `duration`.
async fn round<F, Fut>(concurrency: usize, duration: Duration, op: F) -> Round
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let cpu_before = process_cpu();
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let (op, stop) = (Arc::clone(&op), Arc::clone(&stop));
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(1 << 13);
            let (mut i, mut ops) = (t, 0u64);
            while !stop.load(SeqCst) {
                if ops % SAMPLED == SAMPLED - 1 {
                    let t0 = Instant::now();
                    op(i).await;
                    latencies.push(t0.elapsed().as_nanos() as u64);
                } else {
                    op(i).await;
                }
                ops += 1;
                i += concurrency;
            }
            (ops, latencies)
        }));
    }
    // A std thread, not a tokio timer, ends the round: tasks that never wait on I/O (embedded
    // hits) may keep every worker busy until they see the flag.
    let stopper = Arc::clone(&stop);
    std::thread::spawn(move || {
        std::thread::sleep(duration);
        stopper.store(true, SeqCst);
    });
    let (mut ops, mut latencies_ns) = (0, Vec::new());
    for task in tasks {
        let (n, latencies) = task.await.unwrap();
        ops += n;
        latencies_ns.extend(latencies);
    }
    let cpu = process_cpu().saturating_sub(cpu_before);
    Round { ops, elapsed: started.elapsed(), latencies_ns, cpu }
}

#[derive(Default)]
struct Contender {
    throughputs: Vec<f64>,
    ops: u64,
    latencies_ns: Vec<u64>,
    cpu: Duration,
}

impl Contender {
    fn add(&mut self, r: Round) {
        self.throughputs.push(r.throughput());
        self.ops += r.ops;
        self.cpu += r.cpu;
        self.latencies_ns.extend(r.latencies_ns);
    }
    /// This process's CPU time per operation over every round, in ns.
    fn cpu_ns_per_op(&self) -> f64 {
        self.cpu.as_nanos() as f64 / self.ops.max(1) as f64
    }
    fn median(&self) -> f64 {
        let mut t = self.throughputs.clone();
        t.sort_by(|a, b| a.partial_cmp(b).unwrap());
        t[t.len() / 2]
    }
    fn percentile_us(&mut self, p: f64) -> f64 {
        self.latencies_ns.sort_unstable();
        let i = ((self.latencies_ns.len() as f64 - 1.0) * p).round() as usize;
        self.latencies_ns[i] as f64 / 1000.0
    }
}

const HOT_KEYS: usize = 1000;

fn symbols() -> &'static [String] {
    static S: OnceLock<Vec<String>> = OnceLock::new();
    S.get_or_init(|| (0..HOT_KEYS).map(|i| format!("SYM{i:04}")).collect())
}

struct Table(Vec<[String; 5]>);

impl Table {
    fn row(&mut self, what: &str, who: &str, throughput: String, p50: String, p99: String) {
        self.0.push([what.into(), who.into(), throughput, p50, p99]);
    }
    fn print(&self) {
        println!("{:<34} {:<22} {:>14} {:>10} {:>10}", "measure", "contender", "ops/s", "p50 us", "p99 us");
        for r in &self.0 {
            println!("{:<34} {:<22} {:>14} {:>10} {:>10}", r[0], r[1], r[2], r[3], r[4]);
        }
    }
}

/// The server started here (if any) and its directory, both removed on drop.
struct Server(Option<Child>, #[allow(dead_code)] Option<tempdir::Dir>);

mod tempdir {
    /// A temporary directory removed on drop (the benchmark's redis-server works in it).
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `REDIS_URL`, or a `redis-server` started on a free loopback port with no persistence.
fn server() -> (String, Server) {
    if let Ok(url) = std::env::var("REDIS_URL") {
        return (url, Server(None, None));
    }
    let (port, server) = spawn("redis-server", "REDIS_URL", |port, _| {
        vec!["--port".into(), port.to_string(), "--bind".into(), "127.0.0.1".into()]
    });
    (format!("redis://127.0.0.1:{port}"), server)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `program` (`redis-server` or `redis-sentinel`) on a free loopback port, in a temporary
/// directory of its own, with no persistence, started with `args(port, dir)` and answering
/// connections; `instead` is the variable that names a server of one's own instead.
fn spawn(
    program: &str,
    instead: &str,
    args: impl FnOnce(u16, &std::path::Path) -> Vec<String>,
) -> (u16, Server) {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("cache-bench-{program}-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let child = Command::new(program)
        .args(args(port, &dir))
        .args(["--save", "", "--appendonly", "no", "--dir"])
        .arg(&dir)
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            let package = if program == "redis-sentinel" { "redis-sentinel" } else { "redis-server" };
            panic!("{program} could not start ({e}); install it (apt-get install {package}) or set {instead}")
        });
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{program} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    (port, Server(Some(child), Some(tempdir::Dir(dir))))
}

/// `REDIS_CLUSTER_NODES`, or three cluster-enabled `redis-server`s joined by `redis-cli --cluster
/// create` (no replicas: the benchmark measures the primaries' path), removed on drop.
fn cluster() -> (Vec<String>, Vec<Server>) {
    if let Ok(nodes) = std::env::var("REDIS_CLUSTER_NODES") {
        return (nodes.split(',').map(|n| n.trim().to_owned()).collect(), Vec::new());
    }
    let mut servers = Vec::new();
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let (port, server) = spawn("redis-server", "REDIS_CLUSTER_NODES", |port, _| {
            let (port, bus) = (port.to_string(), free_port().to_string());
            let args =
                ["--port", &port, "--cluster-port", &bus, "--bind", "127.0.0.1", "--cluster-enabled", "yes"];
            args.map(String::from).to_vec()
        });
        servers.push(server);
        nodes.push(format!("127.0.0.1:{port}"));
    }
    let created = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&nodes)
        .arg("--cluster-yes")
        .output()
        .unwrap_or_else(|e| {
            panic!("redis-cli could not run ({e}); install it (apt-get install redis-tools)")
        });
    assert!(
        created.status.success(),
        "redis-cli --cluster create: {}",
        String::from_utf8_lossy(&created.stdout)
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    for node in &nodes {
        let port = node.rsplit(':').next().unwrap();
        loop {
            let info = Command::new("redis-cli").args(["-p", port, "CLUSTER", "INFO"]).output().unwrap();
            if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                break;
            }
            assert!(Instant::now() < deadline, "the cluster did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    (nodes, servers)
}

/// `REDIS_SENTINEL_URL` (`redis+sentinel://...`), or a `redis-server` and one `redis-sentinel`
/// watching it (quorum 1, no replica: the benchmark measures the hit path behind Sentinel, not a
/// failover); the URL, and the primary's own URL for the raw client.
fn sentinel() -> (String, String, Vec<Server>) {
    if let Ok(url) = std::env::var("REDIS_SENTINEL_URL") {
        let primary = std::env::var("REDIS_SENTINEL_PRIMARY_URL")
            .expect("REDIS_SENTINEL_PRIMARY_URL: the primary behind REDIS_SENTINEL_URL, for the raw client");
        return (url, primary, Vec::new());
    }
    let (primary_port, primary) = spawn("redis-server", "REDIS_SENTINEL_URL", |port, _| {
        vec!["--port".into(), port.to_string(), "--bind".into(), "127.0.0.1".into()]
    });
    let (sentinel_port, sentinel) = spawn("redis-sentinel", "REDIS_SENTINEL_URL", |port, dir| {
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!("port {port}\nbind 127.0.0.1\nsentinel monitor bench 127.0.0.1 {primary_port} 1\n"),
        )
        .unwrap();
        vec![conf.display().to_string()]
    });
    (
        format!("redis+sentinel://127.0.0.1:{sentinel_port}/bench"),
        format!("redis://127.0.0.1:{primary_port}"),
        vec![sentinel, primary],
    )
}

fn main() {
    if let Ok(url) = std::env::var("BENCH_NEAR_CHILD") {
        return near_child(&url);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(run());
}

async fn run() {
    let (url, _server) = server();
    URL.set(url.clone()).unwrap();
    let rounds: usize = std::env::var("BENCH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(7);
    let round_time = Duration::from_millis(
        std::env::var("BENCH_ROUND_MS").ok().and_then(|r| r.parse().ok()).unwrap_or(1000),
    );
    let fill_keys: usize =
        std::env::var("BENCH_FILL_KEYS").ok().and_then(|r| r.parse().ok()).unwrap_or(20_000);
    let runtime = cache_runtime::init(CacheConfig::redis(&url).unwrap()).unwrap();
    let raw_conn =
        redis::aio::ConnectionManager::new(redis::Client::open(format!("{url}/5")).unwrap()).await.unwrap();
    let mut table = Table(Vec::new());
    let mut json = serde_json::Map::new();
    println!("server: {url}; {rounds} alternating rounds of {round_time:?}; tokio with 2 worker threads");

    // Warm every contender on the hot keys.
    for s in symbols() {
        ours(s).await.unwrap();
        ours_packed(s).await.unwrap();
        theirs(s).await.unwrap();
        raw(&mut raw_conn.clone(), s).await;
    }
    runtime.flush().await.unwrap();

    // 0. One contender alone (`BENCH_ALONE=raw` or `=ours`): warm hits at concurrency 64 for all
    // the rounds' time, then exit; for `perf stat`, which measures a whole process (CPU per hit:
    // its task-clock over the hits printed).
    if let Ok(alone) = std::env::var("BENCH_ALONE") {
        let conn = redis::Client::open(format!("{url}/5"))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("a multiplexed connection");
        let time = round_time * u32::try_from(rounds).unwrap_or(1);
        // `BENCH_CONCURRENCY=1` measures `raw`, `ours` and `near64` at another concurrency.
        let callers: usize =
            std::env::var("BENCH_CONCURRENCY").ok().and_then(|n| n.trim().parse().ok()).unwrap_or(64);
        let r = match alone.as_str() {
            "raw" => round(callers, time, move |i| raw_hit(conn.clone(), i)).await,
            "ours" => {
                round(callers, time, |i| async move {
                    ours(&symbols()[i % HOT_KEYS]).await.unwrap();
                })
                .await
            }
            // Near hits on the current task (concurrency 1), as `near_hit_p50_ns` measures them.
            "near" => {
                warm_near().await;
                return print_p50("near", hit_loop(time, ours_near).await);
            }
            // Near hits at concurrency 64, as `near_hit_vs_raw_c64` measures them.
            "near64" => {
                warm_near().await;
                round(callers, time, |i| async move {
                    ours_near(&symbols()[i % HOT_KEYS]).await.unwrap();
                })
                .await
            }
            // Embedded hits on the current task (concurrency 1), as `memory_hit_p50_ns` measures them.
            "memory" => {
                let memory = Runtime::new(CacheConfig::memory());
                for s in symbols() {
                    memory.scope(ours(s)).await.unwrap();
                }
                return print_p50("memory", memory.scope(hit_loop(time, ours)).await);
            }
            other => panic!("BENCH_ALONE is `raw`, `ours`, `near`, `near64` or `memory`, not `{other}`"),
        };
        println!("{alone} alone, concurrency {callers}: {} hits, {:.0} hits/s", r.ops, r.throughput());
        return;
    }

    // 1. Warm hits at concurrency 1 and 64. The raw side is a plain multiplexed connection (no
    // `ConnectionManager` around it): the cheapest correct client a team could write. The same
    // raw code through a `ConnectionManager` (what the runtime and the cached crate use, for
    // reconnection) is measured beside it.
    if wants("hits") {
        let plain_conn = redis::Client::open(format!("{url}/5"))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("a multiplexed connection");
        // The same hits with every lookup its own GET (`with_read_coalescing(false)`).
        let uncoalesced = Runtime::new(CacheConfig::redis(&url).unwrap().with_read_coalescing(false));
        // `BENCH_CONCURRENCY=2,4,8` measures other concurrencies (each its own `_c{n}` figures).
        let concurrencies: Vec<usize> = std::env::var("BENCH_CONCURRENCY")
            .map(|list| {
                list.split(',').map(|n| n.trim().parse().expect("BENCH_CONCURRENCY: numbers")).collect()
            })
            .unwrap_or_else(|_| vec![1, 64]);
        for concurrency in concurrencies {
            let (mut r, mut o, mut c, mut m, mut rm, mut u) = (
                Contender::default(),
                Contender::default(),
                Contender::default(),
                Contender::default(),
                Contender::default(),
                Contender::default(),
            );
            for _ in 0..rounds {
                let conn = plain_conn.clone();
                r.add(round(concurrency, round_time, move |i| raw_hit(conn.clone(), i)).await);
                o.add(
                    round(concurrency, round_time, |i| async move {
                        ours(&symbols()[i % HOT_KEYS]).await.unwrap();
                    })
                    .await,
                );
                c.add(
                    round(concurrency, round_time, |i| async move {
                        theirs(&symbols()[i % HOT_KEYS]).await.unwrap();
                    })
                    .await,
                );
                m.add(
                    round(concurrency, round_time, |i| async move {
                        ours_packed(&symbols()[i % HOT_KEYS]).await.unwrap();
                    })
                    .await,
                );
                let one_get_each = uncoalesced.clone();
                u.add(
                    round(concurrency, round_time, move |i| {
                        let rt = one_get_each.clone();
                        async move {
                            rt.scope(ours(&symbols()[i % HOT_KEYS])).await.unwrap();
                        }
                    })
                    .await,
                );
                let manager = raw_conn.clone();
                rm.add(round(concurrency, round_time, move |i| raw_hit(manager.clone(), i)).await);
            }
            for (name, x) in [
                ("raw redis GET+decode", &mut r),
                ("raw, ConnectionManager", &mut rm),
                ("#[cached]", &mut o),
                ("#[cached], one GET per lookup", &mut u),
                ("#[cached] MessagePack", &mut m),
                ("cached crate", &mut c),
            ] {
                let (p50, p99) = (x.percentile_us(0.5), x.percentile_us(0.99));
                table.row(
                    &format!("warm hit, concurrency {concurrency}"),
                    name,
                    format!("{:.0}", x.median()),
                    format!("{p50:.1}"),
                    format!("{p99:.1}"),
                );
            }
            json.insert(format!("hit_vs_raw_c{concurrency}"), ratio(o.median(), r.median()));
            json.insert(format!("hit_uncoalesced_vs_raw_c{concurrency}"), ratio(u.median(), r.median()));
            json.insert(format!("hit_vs_cached_crate_c{concurrency}"), ratio(o.median(), c.median()));
            json.insert(format!("hit_ops_per_s_c{concurrency}"), (o.median().round()).into());
            json.insert(format!("hit_msgpack_vs_cached_crate_c{concurrency}"), ratio(m.median(), c.median()));
            json.insert(format!("hit_msgpack_vs_raw_c{concurrency}"), ratio(m.median(), r.median()));
            json.insert(format!("raw_manager_vs_raw_c{concurrency}"), ratio(rm.median(), r.median()));
            // CPU per hit in this process (client side only), ours over the raw client's: the
            // figure that moves least with the machine's load. Above 1: ours costs more.
            json.insert(format!("hit_cpu_ns_c{concurrency}"), (o.cpu_ns_per_op().round() as u64).into());
            json.insert(format!("hit_cpu_ns_raw_c{concurrency}"), (r.cpu_ns_per_op().round() as u64).into());
            json.insert(
                format!("hit_cpu_vs_raw_c{concurrency}"),
                ratio(o.cpu_ns_per_op(), r.cpu_ns_per_op()),
            );
            json.insert(format!("hit_vs_raw_manager_c{concurrency}"), ratio(o.median(), rm.median()));
        }
    }
    // 2. Pool size: one multiplexed connection against four, same workload, alternating.
    if wants("pool") {
        let pool4 = Runtime::new(CacheConfig::redis(&url).unwrap().with_pool_size(4));
        let (mut one, mut four) = (Contender::default(), Contender::default());
        for _ in 0..rounds {
            one.add(
                round(64, round_time, |i| async move {
                    ours(&symbols()[i % HOT_KEYS]).await.unwrap();
                })
                .await,
            );
            let p = pool4.clone();
            four.add(
                round(64, round_time, move |i| {
                    let p = p.clone();
                    async move {
                        p.scope(ours(&symbols()[i % HOT_KEYS])).await.unwrap();
                    }
                })
                .await,
            );
        }
        table.row(
            "warm hit c64, pool of 1",
            "#[cached]",
            format!("{:.0}", one.median()),
            "".into(),
            "".into(),
        );
        table.row(
            "warm hit c64, pool of 4",
            "#[cached]",
            format!("{:.0}", four.median()),
            "".into(),
            "".into(),
        );
        json.insert("pool4_vs_pool1_c64".into(), ratio(four.median(), one.median()));
    }

    // 3. Fills of distinct keys: a loop of single SET EX, the write-behind batcher, the cached
    //    crate's store (each awaited in a loop, as their APIs are used).
    if wants("fills") {
        let set_loop = set_loop(&mut raw_conn.clone(), fill_keys).await;
        let handle: Cache<Indicator, Quote> = Cache::new("fill", Duration::from_secs(600)).unwrap();
        let quote = make_quote("FILL");
        let batched = batched_fills(&handle, &runtime, fill_keys).await;

        // The batcher's settings, same loop, each on its own runtime: what chose the defaults.
        for (max, delay_ms) in [(64usize, 0u64), (256, 1), (1024, 0)] {
            let config =
                CacheConfig::redis(&url).unwrap().with_batching(max, Duration::from_millis(delay_ms), 16_384);
            let other = Runtime::new(config);
            let handle = handle.clone().with_runtime(other.clone());
            let t0 = Instant::now();
            for i in 0..fill_keys {
                handle.set_behind(&format!("{max}-{delay_ms}-{i}"), &quote).await.unwrap();
            }
            other.flush().await.unwrap();
            let rate = fill_keys as f64 / t0.elapsed().as_secs_f64();
            let label = format!("batcher max {max}, delay {delay_ms} ms");
            table.row(
                &format!("fill {fill_keys} distinct keys"),
                &label,
                format!("{rate:.0}"),
                "".into(),
                "".into(),
            );
            json.insert(format!("batched_fill_max{max}_delay{delay_ms}ms_vs_default"), ratio(rate, batched));
        }

        use cached::ConcurrentCachedAsync;
        let store: cached::AsyncRedisCache<String, Quote> = cached::AsyncRedisCache::builder("bench-fill")
            .ttl(Duration::from_secs(600))
            .connection_string(&url)
            .build()
            .await
            .unwrap();
        let t0 = Instant::now();
        for i in 0..fill_keys {
            store.async_cache_set(i.to_string(), quote.clone()).await.unwrap();
        }
        let theirs_fill = fill_keys as f64 / t0.elapsed().as_secs_f64();
        let label = format!("fill {fill_keys} distinct keys");
        table.row(&label, "loop of single SET EX", format!("{set_loop:.0}"), "".into(), "".into());
        table.row(&label, "write-behind batcher", format!("{batched:.0}"), "".into(), "".into());
        table.row(&label, "cached crate cache_set", format!("{theirs_fill:.0}"), "".into(), "".into());
        json.insert("batched_fill_vs_set_loop".into(), ratio(batched, set_loop));
        json.insert("batched_fill_vs_cached_crate".into(), ratio(batched, theirs_fill));
        let stats = runtime.stats();
        let s = stats.get(7, "fill").unwrap();
        assert_eq!((s.fills, s.backend_errors), (fill_keys as u64, 0), "every batched fill was written");
    }

    // 4. The miss path per call (hash + lookup + lease + encode + fill), sequential, distinct
    //    keys, on both backends; and the hand-written miss (GET, SET) for scale.
    if wants("miss") {
        let n = 5_000;
        let memory = Runtime::new(CacheConfig::memory());
        let mut per_call = Vec::new();
        for (name, rt) in [("redis", runtime.clone()), ("memory", memory.clone())] {
            let t0 = Instant::now();
            for i in 0..n {
                rt.scope(ours(&format!("MISS-{name}-{i}"))).await.unwrap();
            }
            rt.flush().await.unwrap();
            let us = t0.elapsed().as_secs_f64() * 1e6 / n as f64;
            table.row(
                &format!("miss path, sequential ({name})"),
                "#[cached]",
                format!("{:.0}", 1e6 / us),
                format!("{us:.1}"),
                "".into(),
            );
            per_call.push(us);
        }
        let mut conn = raw_conn.clone();
        let t0 = Instant::now();
        for i in 0..n {
            raw(&mut conn, &format!("MISS-raw-{i}")).await;
        }
        let raw_us = t0.elapsed().as_secs_f64() * 1e6 / n as f64;
        table.row(
            "miss path, sequential (redis)",
            "raw GET + SET EX",
            format!("{:.0}", 1e6 / raw_us),
            format!("{raw_us:.1}"),
            "".into(),
        );
        json.insert("miss_us_redis".into(), round2(per_call[0]));
        json.insert("miss_us_memory".into(), round2(per_call[1]));
        json.insert("miss_vs_raw_redis".into(), ratio(per_call[0], raw_us));
    }

    // 5. The embedded backend: warm hits, one task looping inside the runtime's scope (as a
    //    service with the embedded backend installed by `init` runs), JSON and MessagePack.
    if wants("memory") {
        let memory = Runtime::new(CacheConfig::memory());
        // The same backend with typed copies turned off: every hit decodes bytes.
        let decoding = Runtime::new(CacheConfig::memory().with_near(false));
        for s in symbols() {
            for rt in [&memory, &decoding] {
                for _ in 0..2 {
                    rt.scope(ours(s)).await.unwrap();
                    rt.scope(ours_packed(s)).await.unwrap();
                }
            }
        }
        let (mut json_c1, mut packed_c1, mut decoded_c1) =
            (Contender::default(), Contender::default(), Contender::default());
        for _ in 0..rounds {
            json_c1.add(memory.scope(hit_loop(round_time, ours)).await);
            packed_c1.add(memory.scope(hit_loop(round_time, ours_packed)).await);
            decoded_c1.add(decoding.scope(hit_loop(round_time, ours)).await);
        }
        json.insert(
            "memory_hit_p50_ns_decoded".into(),
            ((decoded_c1.percentile_us(0.5) * 1000.0).round()).into(),
        );
        for (name, c) in [
            ("#[cached]", &mut json_c1),
            ("#[cached] MessagePack", &mut packed_c1),
            ("#[cached], near tier off (decodes)", &mut decoded_c1),
        ] {
            let (p50, p99) = (c.percentile_us(0.5), c.percentile_us(0.99));
            let (ops, p50s, p99s) = (format!("{:.0}", c.median()), format!("{p50:.2}"), format!("{p99:.2}"));
            table.row("embedded warm hit, concurrency 1", name, ops, p50s, p99s);
        }
        json.insert("memory_hit_p50_ns".into(), ((json_c1.percentile_us(0.5) * 1000.0).round()).into());
        json.insert(
            "memory_hit_p50_ns_msgpack".into(),
            ((packed_c1.percentile_us(0.5) * 1000.0).round()).into(),
        );
        json.insert("memory_hit_ops_per_s_c1".into(), (json_c1.median().round()).into());
    }

    // 5b. The near tier on Redis: hits answered in process at 64 concurrent callers, against the
    //     raw client's GET and the cached crate's own RESP3 client-side cache; the latency of one
    //     near hit; and how long after an invalidation returns in this process the copy is gone
    //     in another process.
    if wants("near") {
        warm_near().await;
        for s in symbols() {
            for _ in 0..3 {
                theirs_near(s).await.unwrap();
            }
        }
        let plain_conn = redis::Client::open(format!("{url}/5"))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("a multiplexed connection");
        let (mut r, mut n, mut c) = (Contender::default(), Contender::default(), Contender::default());
        let near_hits = || runtime.stats().get(5, "bench-near").map_or(0, |s| s.near_hits);
        let near_before = near_hits();
        for _ in 0..rounds {
            let conn = plain_conn.clone();
            r.add(round(64, round_time, move |i| raw_hit(conn.clone(), i)).await);
            n.add(
                round(64, round_time, |i| async move {
                    ours_near(&symbols()[i % HOT_KEYS]).await.unwrap();
                })
                .await,
            );
            c.add(
                round(64, round_time, |i| async move {
                    theirs_near(&symbols()[i % HOT_KEYS]).await.unwrap();
                })
                .await,
            );
        }
        let near_share = (near_hits() - near_before) as f64 / n.ops.max(1) as f64;
        let (mut n1, mut floor) = (Contender::default(), Contender::default());
        for _ in 0..rounds {
            n1.add(hit_loop(round_time, ours_near).await);
            floor.add(hit_loop(round_time, clone_only).await);
        }
        for (name, x) in [
            ("raw redis GET+decode", &mut r),
            ("#[cached(near)]", &mut n),
            ("cached crate, client-side caching", &mut c),
        ] {
            let (p50, p99) = (x.percentile_us(0.5), x.percentile_us(0.99));
            let (ops, p50s, p99s) = (format!("{:.0}", x.median()), format!("{p50:.2}"), format!("{p99:.2}"));
            table.row("near hit, concurrency 64", name, ops, p50s, p99s);
        }
        let (p50, p99) = (n1.percentile_us(0.5), n1.percentile_us(0.99));
        let (ops, p50s, p99s) = (format!("{:.0}", n1.median()), format!("{p50:.2}"), format!("{p99:.2}"));
        table.row("near hit, concurrency 1", "#[cached(near)]", ops, p50s, p99s);
        let (p50, p99) = (floor.percentile_us(0.5), floor.percentile_us(0.99));
        let (ops, p50s, p99s) = (format!("{:.0}", floor.median()), format!("{p50:.2}"), format!("{p99:.2}"));
        table.row("near hit, concurrency 1", "the value's clone alone (floor)", ops, p50s, p99s);
        json.insert("near_hit_vs_raw_c64".into(), ratio(n.median(), r.median()));
        json.insert("near_hit_vs_cached_crate_c64".into(), ratio(n.median(), c.median()));
        json.insert("near_hit_ops_per_s_c64".into(), (n.median().round()).into());
        json.insert("near_hit_share_c64".into(), round2(near_share));
        json.insert("near_hit_p50_ns".into(), ((n1.percentile_us(0.5) * 1000.0).round()).into());
        json.insert("near_hit_floor_p50_ns".into(), ((floor.percentile_us(0.5) * 1000.0).round()).into());

        let (mut gone_us, early) = near_invalidations(&url, 1000).await;
        gone_us.sort_by(f64::total_cmp);
        let at = |p: f64| gone_us[((gone_us.len() as f64 - 1.0) * p).round() as usize];
        table.row(
            "near copy gone in another process, after the invalidation returned (µs)",
            "#[cached(near)]",
            format!("{} invalidations", gone_us.len()),
            format!("{:.1}", at(0.5)),
            format!("{:.1}", at(0.99)),
        );
        json.insert("near_invalidation_p50_us".into(), round2(at(0.5)));
        json.insert("near_invalidation_p99_us".into(), round2(at(0.99)));
        json.insert("near_invalidation_max_us".into(), round2(at(1.0)));
        json.insert("near_invalidation_gone_before_return".into(), early.into());
    }

    // 6. Stampede: 1,000 concurrent calls on a cold key, the body taking 50 ms.
    if wants("stampede") {
        BODY_DELAY_MS.store(50, SeqCst);
        let count = |f: fn(usize) -> tokio::task::JoinHandle<()>| async move {
            EXECUTIONS.store(0, SeqCst);
            let tasks: Vec<_> = (0..1000).map(f).collect();
            for t in tasks {
                t.await.unwrap();
            }
            EXECUTIONS.load(SeqCst)
        };
        let ours_execs = count(|_| {
            tokio::spawn(async {
                ours("COLD-STAMPEDE").await.unwrap();
            })
        })
        .await;
        let theirs_execs = count(|_| {
            tokio::spawn(async {
                theirs("COLD-STAMPEDE").await.unwrap();
            })
        })
        .await;
        BODY_DELAY_MS.store(0, SeqCst);
        table.row(
            "stampede: 1000 calls, cold key",
            "#[cached]",
            format!("{ours_execs} exec"),
            "".into(),
            "".into(),
        );
        table.row(
            "stampede: 1000 calls, cold key",
            "cached crate",
            format!("{theirs_execs} exec"),
            "".into(),
            "".into(),
        );
        json.insert("stampede_execs".into(), ours_execs.into());
        json.insert("cached_crate_stampede_execs".into(), theirs_execs.into());
    }

    // 7. Redis Cluster (3 primaries started here, or REDIS_CLUSTER_NODES): warm hits at
    //    concurrency 64 and fills of distinct keys, against the raw cluster client, alternating.
    if wants("cluster") {
        let (nodes, _cluster) = cluster();
        let on_cluster = Runtime::new(CacheConfig::cluster(&nodes).unwrap());
        let client = redis::cluster::ClusterClient::new(
            nodes.iter().map(|n| format!("redis://{n}")).collect::<Vec<_>>(),
        )
        .unwrap();
        let raw_cluster = client.get_async_connection().await.unwrap();
        for s in symbols() {
            on_cluster.scope(ours(s)).await.unwrap();
            raw(&mut raw_cluster.clone(), s).await;
        }
        on_cluster.flush().await.unwrap();
        let (mut r, mut o) = (Contender::default(), Contender::default());
        for _ in 0..rounds {
            let conn = raw_cluster.clone();
            r.add(round(64, round_time, move |i| raw_hit(conn.clone(), i)).await);
            let c = on_cluster.clone();
            o.add(
                round(64, round_time, move |i| {
                    let c = c.clone();
                    async move {
                        c.scope(ours(&symbols()[i % HOT_KEYS])).await.unwrap();
                    }
                })
                .await,
            );
        }
        for (name, x) in [("raw cluster GET+decode", &mut r), ("#[cached] on Cluster", &mut o)] {
            let (p50, p99) = (x.percentile_us(0.5), x.percentile_us(0.99));
            let (ops, p50s, p99s) = (format!("{:.0}", x.median()), format!("{p50:.1}"), format!("{p99:.1}"));
            table.row("cluster warm hit, concurrency 64", name, ops, p50s, p99s);
        }
        json.insert("cluster_hit_vs_raw_c64".into(), ratio(o.median(), r.median()));
        json.insert("cluster_hit_ops_per_s_c64".into(), (o.median().round()).into());

        let set_loop = set_loop(&mut raw_cluster.clone(), fill_keys).await;
        let handle: Cache<Indicator, Quote> =
            Cache::new("fill", Duration::from_secs(600)).unwrap().with_runtime(on_cluster.clone());
        let batched = batched_fills(&handle, &on_cluster, fill_keys).await;
        let label = format!("cluster fill {fill_keys} keys");
        table.row(&label, "raw loop of SET EX", format!("{set_loop:.0}"), "".into(), "".into());
        table.row(&label, "write-behind batcher", format!("{batched:.0}"), "".into(), "".into());
        json.insert("cluster_fill_vs_set_loop".into(), ratio(batched, set_loop));
        json.insert("cluster_fill_per_s".into(), (batched.round()).into());
        let stats = on_cluster.stats();
        let s = stats.get(7, "fill").unwrap();
        assert_eq!((s.fills, s.backend_errors), (fill_keys as u64, 0), "every batched fill was written");
        on_cluster.shutdown().await.unwrap();
    }

    // 7b. A primary behind Sentinel (one sentinel started here, or REDIS_SENTINEL_URL): warm
    //     hits at concurrency 1 and 64 against the raw client on the same primary, alternating.
    if wants("sentinel") {
        let (url, primary_url, _servers) = sentinel();
        let behind = Runtime::new(CacheConfig::redis(&url).unwrap());
        let uncoalesced = Runtime::new(CacheConfig::redis(&url).unwrap().with_read_coalescing(false));
        let plain = redis::Client::open(format!("{primary_url}/5"))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("a connection to the primary");
        for s in symbols() {
            behind.scope(ours(s)).await.unwrap();
            raw(&mut plain.clone(), s).await;
        }
        behind.flush().await.unwrap();
        // Warm hits through `rt` (coalesced, or one GET per lookup).
        let hit = |rt: &Runtime| {
            let rt = rt.clone();
            move |i: usize| {
                let rt = rt.clone();
                async move {
                    rt.scope(ours(&symbols()[i % HOT_KEYS])).await.unwrap();
                }
            }
        };
        for concurrency in [1, 64] {
            let (mut r, mut o, mut u) = (Contender::default(), Contender::default(), Contender::default());
            for _ in 0..rounds {
                let conn = plain.clone();
                r.add(round(concurrency, round_time, move |i| raw_hit(conn.clone(), i)).await);
                o.add(round(concurrency, round_time, hit(&behind)).await);
                u.add(round(concurrency, round_time, hit(&uncoalesced)).await);
            }
            let what = format!("sentinel warm hit, concurrency {concurrency}");
            let contenders = [
                ("raw GET+decode, primary", &mut r),
                ("#[cached] via Sentinel", &mut o),
                ("  one GET per lookup", &mut u),
            ];
            for (name, x) in contenders {
                let (p50, p99) = (x.percentile_us(0.5), x.percentile_us(0.99));
                let (ops, p50s, p99s) =
                    (format!("{:.0}", x.median()), format!("{p50:.1}"), format!("{p99:.1}"));
                table.row(&what, name, ops, p50s, p99s);
            }
            json.insert(format!("sentinel_hit_vs_raw_c{concurrency}"), ratio(o.median(), r.median()));
            json.insert(
                format!("sentinel_hit_uncoalesced_vs_raw_c{concurrency}"),
                ratio(u.median(), r.median()),
            );
        }
        let stats = behind.stats();
        let s = stats.get(5, "bench").unwrap();
        assert_eq!(s.backend_errors, 0, "every lookup behind Sentinel was answered");
        behind.shutdown().await.unwrap();
        uncoalesced.shutdown().await.unwrap();
    }

    // 8. The disk backend against Python's diskcache (seed 003's engine): sets of distinct keys
    //    (each a miss through `#[cached]`: lookup, lease, body, fill), then gets of them (hits),
    //    one task, the same ~200-byte JSON value; diskcache by bench/examples/diskcache_bench.py.
    if wants("disk") {
        let keys: usize =
            std::env::var("BENCH_DISK_KEYS").ok().and_then(|r| r.parse().ok()).unwrap_or(20_000);
        let dir = tempfile::tempdir().unwrap();
        let disk = Runtime::new(CacheConfig::disk(dir.path()));
        let names: Vec<String> = (0..keys).map(|i| format!("D{i}")).collect();
        let t0 = Instant::now();
        for name in &names {
            disk.scope(ours(name)).await.unwrap();
        }
        let sets = keys as f64 / t0.elapsed().as_secs_f64();
        let before = EXECUTIONS.load(SeqCst);
        let t0 = Instant::now();
        for name in &names {
            std::hint::black_box(disk.scope(ours(name)).await.unwrap());
        }
        let gets = keys as f64 / t0.elapsed().as_secs_f64();
        assert_eq!(EXECUTIONS.load(SeqCst), before, "every get was a hit");
        let stats = disk.stats();
        let s = stats.get(5, "bench").unwrap();
        assert_eq!(s.backend_errors, 0, "the disk answered every call");
        disk.shutdown().await.unwrap();
        let label = format!("disk, {keys} keys, one task");
        table.row(&label, "#[cached] disk set (miss)", format!("{sets:.0}"), "".into(), "".into());
        table.row(&label, "#[cached] disk get (hit)", format!("{gets:.0}"), "".into(), "".into());
        json.insert("disk_set_per_s".into(), sets.round().into());
        json.insert("disk_get_per_s".into(), gets.round().into());
        let peer_dir = tempfile::tempdir().unwrap();
        let peer = Command::new("python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/diskcache_bench.py"))
            .arg(peer_dir.path())
            .arg(keys.to_string())
            .output();
        let peer = peer
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| serde_json::from_slice::<serde_json::Value>(o.stdout.trim_ascii()).ok());
        match peer {
            Some(peer) => {
                let (psets, pgets) =
                    (peer["set_per_s"].as_f64().unwrap(), peer["get_per_s"].as_f64().unwrap());
                table.row(&label, "diskcache set (Python)", format!("{psets:.0}"), "".into(), "".into());
                table.row(&label, "diskcache get (Python)", format!("{pgets:.0}"), "".into(), "".into());
                json.insert("disk_set_vs_diskcache".into(), ratio(sets, psets));
                json.insert("disk_get_vs_diskcache".into(), ratio(gets, pgets));
            }
            None => println!(
                "diskcache column skipped: python3 with diskcache is needed (`pip install diskcache`)"
            ),
        }
    }

    // 9. Eager refresh: one hot key with `ttl = 1` and a 100 ms body, 8 tasks per function calling
    // it every 5 ms across about ten expiries, with `eager_refresh = "50%"` and without, at once on
    // this server. A caller "sees the expiry" when its call takes most of the body's time (it
    // computed, or waited for whoever did); with the option only the refreshers themselves do.
    if wants("eager") {
        let run = Duration::from_millis(10_500);
        let with = Arc::new(AtomicUsize::new(0));
        let without = Arc::new(AtomicUsize::new(0));
        eager_quote("HOT").await;
        plain_quote("HOT").await;
        let deadline = Instant::now() + run;
        let mut tasks = tokio::task::JoinSet::new();
        for task in 0..16 {
            let waited = Arc::clone(if task % 2 == 0 { &with } else { &without });
            tasks.spawn(async move {
                while Instant::now() < deadline {
                    let started = Instant::now();
                    if task % 2 == 0 {
                        eager_quote("HOT").await;
                    } else {
                        plain_quote("HOT").await;
                    }
                    if started.elapsed() >= Duration::from_millis(80) {
                        waited.fetch_add(1, SeqCst);
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        let (with, without) = (with.load(SeqCst), without.load(SeqCst));
        let label = format!("hot key, ttl 1 s, {run:?}");
        table.row(&label, "eager_refresh callers that waited", with.to_string(), "".into(), "".into());
        table.row(&label, "plain: callers that waited", without.to_string(), "".into(), "".into());
        json.insert("early_refresh_misses".into(), with.into());
        json.insert("early_refresh_misses_without".into(), without.into());
    }

    // 10. Fail-safe: the database behind a function fails for 30 s (`BENCH_OUTAGE_S`) while 16
    // tasks call it on 100 keys every 2 ms, with `stale_if_error = "1h"` and without, at once.
    if wants("failsafe") {
        let outage = Duration::from_secs(
            std::env::var("BENCH_OUTAGE_S").ok().and_then(|s| s.parse().ok()).unwrap_or(30),
        );
        for i in 0..100u32 {
            safe_price(i).await.unwrap();
            plain_price(i).await.unwrap();
        }
        runtime.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(1_100)).await; // every entry past its 1 s TTL
        DATABASE_DOWN.store(true, SeqCst);
        let tries_before = PRICE_TRIES.load(SeqCst);
        let deadline = Instant::now() + outage;
        let counts: Arc<[AtomicUsize; 4]> = Arc::new(Default::default());
        let mut tasks = tokio::task::JoinSet::new();
        for task in 0..16u32 {
            let counts = Arc::clone(&counts);
            tasks.spawn(async move {
                let mut i = task;
                while Instant::now() < deadline {
                    i = (i + 7) % 100;
                    let (ok, slot) = if task % 2 == 0 {
                        (safe_price(i).await.is_ok(), 0)
                    } else {
                        (plain_price(i).await.is_ok(), 2)
                    };
                    counts[slot + usize::from(!ok)].fetch_add(1, SeqCst);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        DATABASE_DOWN.store(false, SeqCst);
        let tries = PRICE_TRIES.load(SeqCst) - tries_before;
        let [safe_ok, safe_err, plain_ok, plain_err] = [0, 1, 2, 3].map(|i| counts[i].load(SeqCst));
        let label = format!("database down {outage:?}, 16 tasks");
        table.row(
            &label,
            "stale_if_error: answered / errors",
            format!("{safe_ok} / {safe_err}"),
            "".into(),
            "".into(),
        );
        table.row(
            &label,
            "plain: answered / errors",
            format!("{plain_ok} / {plain_err}"),
            "".into(),
            "".into(),
        );
        // Without the option nothing is cached during the outage: each plain call tried once.
        let safe_tries = tries - (plain_ok + plain_err);
        table.row(&label, "stale_if_error: database tried", safe_tries.to_string(), "".into(), "".into());
        json.insert("fail_safe_answered".into(), safe_ok.into());
        json.insert("fail_safe_errors".into(), safe_err.into());
        json.insert("fail_safe_errors_without".into(), plain_err.into());
        json.insert("fail_safe_tries".into(), safe_tries.into());
    }

    runtime.shutdown().await.unwrap();
    table.print();
    println!("{}", serde_json::Value::Object(json));
}

/// Fills per second of a loop of single `SET ... EX` of distinct keys, each awaited.
async fn set_loop(conn: &mut (impl redis::aio::ConnectionLike + Send), keys: usize) -> f64 {
    let value = serde_json::to_vec(&make_quote("FILL")).unwrap();
    let t0 = Instant::now();
    for i in 0..keys {
        let mut set = redis::cmd("SET");
        set.arg(format!("rawfill:{i}")).arg(&value).arg("EX").arg(600);
        let _: () = set.query_async(conn).await.unwrap();
    }
    keys as f64 / t0.elapsed().as_secs_f64()
}

/// Fills per second of `set_behind` of distinct keys through `handle`, flushed on `runtime`.
async fn batched_fills(handle: &Cache<Indicator, Quote>, runtime: &Runtime, keys: usize) -> f64 {
    let quote = make_quote("FILL");
    let t0 = Instant::now();
    for i in 0..keys {
        handle.set_behind(&i.to_string(), &quote).await.unwrap();
    }
    runtime.flush().await.unwrap();
    keys as f64 / t0.elapsed().as_secs_f64()
}

/// Calls the near function on every hot key until its copies are kept (the tracking connection
/// starts with the first call).
async fn warm_near() {
    for s in symbols() {
        for _ in 0..3 {
            ours_near(s).await.unwrap();
        }
    }
}

/// What `BENCH_ALONE` prints for a contender measured at concurrency 1.
fn print_p50(name: &str, mut r: Round) {
    let hits = r.throughput();
    r.latencies_ns.sort_unstable();
    let p50 = r.latencies_ns.get(r.latencies_ns.len() / 2).copied().unwrap_or(0);
    println!("{name} alone, concurrency 1: {} hits, {hits:.0} hits/s, p50 {p50} ns", r.ops);
}

/// Warm hits of `call` in a loop on the current task for `duration`, each timed from the call to
/// the value in hand.
async fn hit_loop<F, Fut>(duration: Duration, call: F) -> Round
where
    F: Fn(&'static str) -> Fut,
    Fut: Future<Output = Result<Quote, FeedError>>,
{
    let mut latencies_ns = Vec::with_capacity(1 << 20);
    let started = Instant::now();
    let cpu_before = process_cpu();
    let mut i = 0;
    while started.elapsed() < duration {
        let symbol = &symbols()[i % HOT_KEYS];
        let t0 = Instant::now();
        let value = call(symbol).await.unwrap();
        latencies_ns.push(t0.elapsed().as_nanos() as u64);
        // Timed to the value in hand: dropping it is the caller's work, after.
        drop(std::hint::black_box(value));
        i += 1;
    }
    let cpu = process_cpu().saturating_sub(cpu_before);
    Round { ops: latencies_ns.len() as u64, elapsed: started.elapsed(), latencies_ns, cpu }
}

fn unix_nanos() -> i128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i128
}

/// `n` invalidations in this process of keys another process (this binary, started with
/// `BENCH_NEAR_CHILD`) holds near copies of: per invalidation, the µs from its return here to
/// the copy being dropped there (0 when it was dropped before the call returned), and how many
/// were. Both processes read the same wall clock.
async fn near_invalidations(url: &str, n: usize) -> (Vec<f64>, usize) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .env("BENCH_NEAR_CHILD", url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the bench starts a copy of itself");
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut gone_us, mut early) = (Vec::with_capacity(n), 0);
    for i in 0..n {
        let symbol = format!("INV{i}");
        stdin.write_all(format!("{symbol}\n").as_bytes()).await.unwrap();
        stdin.flush().await.unwrap();
        assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("ready"));
        cache_runtime::invalidate!(ours_near(&symbol)).await;
        let returned = unix_nanos();
        let gone: i128 = lines.next_line().await.unwrap().expect("the child answers").parse().unwrap();
        if gone <= returned {
            early += 1;
        }
        gone_us.push((gone - returned).max(0) as f64 / 1000.0);
    }
    drop(stdin);
    let _ = child.wait().await;
    (gone_us, early)
}

/// The other process of `near_invalidations`: for each symbol read from stdin, calls
/// `ours_near` until a near copy answers, says `ready`, then spins until the copy is dropped
/// and prints the wall-clock time it saw that.
fn near_child(url: &str) {
    use std::io::{BufRead, Write};
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let runtime = cache_runtime::init(CacheConfig::redis(url).unwrap()).unwrap();
        let near_hits = || runtime.stats().get(5, "bench-near").map_or(0, |s| s.near_hits);
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let symbol = line.unwrap();
            loop {
                let before = near_hits();
                ours_near(&symbol).await.unwrap();
                if near_hits() > before {
                    break;
                }
            }
            let dropped = runtime.near_status().dropped;
            let mut out = std::io::stdout().lock();
            writeln!(out, "ready").unwrap();
            out.flush().unwrap();
            // Polled without holding a core: the tracking task must run too (two cores here,
            // shared with the other process and the server).
            while runtime.near_status().dropped == dropped {
                std::thread::yield_now();
            }
            writeln!(out, "{}", unix_nanos()).unwrap();
            out.flush().unwrap();
        }
    });
}

/// Whether section `name` runs: every section unless `BENCH_ONLY` lists some (`hits,memory`).
fn wants(name: &str) -> bool {
    match std::env::var("BENCH_ONLY") {
        Ok(only) => only.split(',').any(|s| s.trim() == name),
        Err(_) => true,
    }
}

fn ratio(ours: f64, theirs: f64) -> serde_json::Value {
    round2(ours / theirs)
}

fn round2(x: f64) -> serde_json::Value {
    ((x * 100.0).round() / 100.0).into()
}
