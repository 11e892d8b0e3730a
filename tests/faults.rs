//! Faults injected for real: `CLIENT PAUSE WRITE` (what a failover does), `SIGSTOP` (a hung
//! host), a proxy that blackholes connections or strands them, a wrong password. Each test states the bound it
//! checks and prints its figures (`cargo test --test faults -- --nocapture`).

mod support;

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cache_runtime::db::Indicator;
use cache_runtime::{cached, CacheConfig, KeyBuilder, Runtime};
use support::proxy::{Fault, FaultProxy};
use support::RedisServer;
use tokio::task::JoinSet;

const OP_TIMEOUT: Duration = Duration::from_millis(200);

#[cached(db = Indicator, prefix = "fault", ttl = 60, skip(ran))]
async fn ema(symbol: &str, ran: &AtomicBool) -> u64 {
    ran.store(true, SeqCst);
    symbol.len() as u64
}

/// `ema` in DB 0, which a new connection does not `SELECT`: there a server that asks for a
/// password answers the first commands themselves with `NOAUTH`.
#[cached(db = cache_runtime::db::User, prefix = "fault0", ttl = 60, skip(ran))]
async fn ema_in_db0(symbol: &str, ran: &AtomicBool) -> u64 {
    ran.store(true, SeqCst);
    symbol.len() as u64
}

fn runtime(url: &str, adjust: impl FnOnce(CacheConfig) -> CacheConfig) -> Runtime {
    Runtime::new(adjust(
        CacheConfig::redis(url).unwrap().with_op_timeout(OP_TIMEOUT).with_connect_timeout(OP_TIMEOUT),
    ))
}

/// A runtime through `proxy` whose key `warm` hits. No breaker: every call reaches the
/// connection, so the count of slow calls is the link's. A connect timeout long enough to
/// connect through slow replies.
async fn warm_without_breaker(proxy: &FaultProxy) -> Runtime {
    let rt = runtime(&proxy.url(), |c| {
        c.with_breaker(0, Duration::ZERO).with_connect_timeout(Duration::from_secs(2))
    });
    timed(&rt, "warm").await;
    rt.flush().await.unwrap();
    assert!(timed(&rt, "warm").await.1, "a hit through the proxy");
    rt
}

/// A call's duration, and whether it was a hit (the body did not run).
async fn timed(rt: &Runtime, symbol: &str) -> (Duration, bool) {
    let ran = AtomicBool::new(false);
    let started = Instant::now();
    rt.scope(ema(symbol, &ran)).await;
    (started.elapsed(), !ran.load(SeqCst))
}

/// A lease request whose reply timed out is still run by the server when it resumes; the lease it
/// sets must not make another process wait for a value nobody computes. Shown against the same
/// paused server with a lease set by a request nobody releases (what happened before): that one
/// costs the other process the lease's whole life.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_lease_request_does_not_stall_other_processes() {
    let server = RedisServer::start();
    let lease = Duration::from_secs(2);
    // Generations trusted for an hour: lookups are a plain GET, answered during CLIENT PAUSE WRITE,
    // so the pause hits the lease request.
    let config = |c: CacheConfig| c.with_lease_ttl(lease).with_generation_refresh(Duration::from_secs(3600));
    let (a, b) = (runtime(&server.url(), config), runtime(&server.url(), config));
    for rt in [&a, &b] {
        timed(rt, "warm").await; // reads the generation once
    }

    // Protected: A's lease request times out during a 600 ms pause; the server runs it on resume.
    server.pause_writes(600).await;
    let (took, _) = timed(&a, "orphan").await;
    assert!(
        took >= OP_TIMEOUT && took < OP_TIMEOUT * 2,
        "A paid one timeout for the lease request ({took:?})"
    );
    tokio::time::sleep(Duration::from_millis(700)).await; // the pause is over
    let (waited, _) = timed(&b, "orphan").await;

    // Unprotected: the same request, sent by hand and abandoned after the same timeout.
    let key = KeyBuilder::new("faults", "fault", "ema").arg("naked").finish().unwrap();
    server.pause_writes(600).await;
    let mut raw = server.raw(7).await;
    let orphan =
        redis::cmd("SET").arg(format!("{key}:lease")).arg("42").arg("NX").arg("PX").arg(2000).to_owned();
    let _ = tokio::time::timeout(OP_TIMEOUT, orphan.query_async::<()>(&mut raw)).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (stalled, _) = timed(&b, "naked").await;

    eprintln!("after a 600 ms CLIENT PAUSE WRITE: the other process waited {waited:?} (released orphan) vs {stalled:?} (unreleased orphan, lease {lease:?})");
    assert!(waited < Duration::from_millis(300), "no orphaned lease stalled the other process ({waited:?})");
    assert!(stalled > Duration::from_millis(1000), "the race exists without the release ({stalled:?})");
}

/// A lease request the server ran, whose reply was held back (a slow link) and then lost with
/// its connection (reset before the reply came through): its release cannot follow it on that
/// connection, which is gone, so it is sent on the connection made next, and the lease does not
/// make another process wait for a value nobody computes. Shown against the same sequence for a
/// request sent by hand, whose lease nobody releases: that one costs the other process the
/// lease's whole life.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_request_whose_reply_is_lost_with_its_connection_does_not_stall_other_processes() {
    lease_reply_lost_with_its_connection(Duration::from_secs(1)).await;
}

/// The same with the longest `op_timeout` a caller can give (`Duration::MAX`, taken as one
/// day): the second send of the release is timed by it, and still goes at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_reply_is_released_with_the_longest_op_timeout() {
    lease_reply_lost_with_its_connection(Duration::MAX).await;
}

async fn lease_reply_lost_with_its_connection(op_timeout: Duration) {
    const SLOW: Duration = Duration::from_millis(150);
    let server = RedisServer::start();
    let proxy = FaultProxy::start(server.port());
    let lease = Duration::from_secs(2);
    // A's replies come through the proxy, held back SLOW each: the lookup's reply comes at SLOW,
    // the lease request is sent then and run by the server at once, and its reply would come at
    // 2 x SLOW. The connection is cut halfway between. No call times out (op timeout >= 1 s).
    let config = |c: CacheConfig| {
        c.with_lease_ttl(lease)
            .with_generation_refresh(Duration::from_secs(3600))
            .with_op_timeout(op_timeout)
            .with_connect_timeout(Duration::from_secs(1))
    };
    let a = Runtime::new(config(CacheConfig::redis(&proxy.url()).unwrap()));
    let b = Runtime::new(config(CacheConfig::redis(&server.url()).unwrap()));
    for rt in [&a, &b] {
        timed(rt, "warm").await; // reads the generation once
    }
    server.reset_stats().await;

    // Protected: A's lease request is run, its reply lost with the connection. (The fault is
    // lifted before the cut, so the connection made next is not slowed; the reply held back
    // stays held until the cut.)
    proxy.set(Fault::Latency(SLOW));
    let call = tokio::spawn({
        let a = a.clone();
        async move { timed(&a, "lost").await }
    });
    tokio::time::sleep(SLOW * 3 / 2).await;
    proxy.set(Fault::Pass);
    proxy.cut();
    let (took, hit) = call.await.unwrap();
    assert!(!hit, "A ran its function");
    assert!(took >= SLOW * 3 / 2, "A's call ended with the cut, not before ({took:?})");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let held: bool = redis::cmd("EXISTS")
        .arg(format!("{}:lease", KeyBuilder::new("faults", "fault", "ema").arg("lost").finish().unwrap()))
        .query_async(&mut server.raw(7).await)
        .await
        .unwrap();
    // The request ran (a lease was set) and a release reached the server: the one sent behind
    // the request on its connection never did, that connection being gone.
    let (requests, releases) = (server.calls_of("evalsha").await, server.calls_of("eval").await);
    let (waited, b_hit) = timed(&b, "lost").await;

    // Unprotected: the same request sent by hand through the proxy, its reply lost the same way.
    let key = KeyBuilder::new("faults", "fault", "ema").arg("dropped").finish().unwrap();
    let by_hand = redis::Client::open(format!("{}/7", proxy.url())).unwrap();
    let mut raw = by_hand.get_multiplexed_async_connection().await.unwrap();
    proxy.set(Fault::Latency(SLOW));
    let orphan =
        redis::cmd("SET").arg(format!("{key}:lease")).arg("42").arg("NX").arg("PX").arg(2000).to_owned();
    let sent = tokio::spawn(async move { orphan.query_async::<()>(&mut raw).await });
    tokio::time::sleep(SLOW / 2).await;
    proxy.set(Fault::Pass);
    proxy.cut();
    assert!(sent.await.unwrap().is_err(), "the request's reply was lost with its connection");
    let (stalled, _) = timed(&b, "dropped").await;

    eprintln!(
        "a lease request run, its reply lost with its connection (op timeout {op_timeout:?}): A's call took \
         {took:?}; the other process waited {waited:?} (released on the next connection) vs {stalled:?} (unreleased, lease {lease:?})"
    );
    assert!(
        requests >= 1 && releases >= 1,
        "the lease request ran ({requests}) and was released ({releases})"
    );
    assert!(!b_hit, "A's reply never came, so nothing was filled: B ran its function");
    assert!(!held, "the lease was released");
    assert!(waited < Duration::from_millis(300), "no orphaned lease stalled the other process ({waited:?})");
    assert!(stalled > Duration::from_millis(1000), "the race exists without the release ({stalled:?})");
}

/// 200 concurrent callers in a loop; the server frozen (SIGSTOP) for 3 s, then resumed. With the
/// breaker, only the calls in flight when it froze (and one probe per cool-down) pay a full
/// timeout; without it, every call does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_server_with_and_without_the_breaker() {
    let server = RedisServer::start();
    let with = freeze_under_load(&server, runtime(&server.url(), |c| c)).await;
    let without =
        freeze_under_load(&server, runtime(&server.url(), |c| c.with_breaker(0, Duration::ZERO))).await;
    eprintln!("frozen 3 s, 200 callers, op timeout {OP_TIMEOUT:?}:");
    eprintln!("  breaker on:  {with}");
    eprintln!("  breaker off: {without}");
    assert!(with.full_timeouts * 4 < without.full_timeouts, "the breaker spares most calls the timeout");
    assert!(without.full_timeouts > 1000, "without it, calls keep paying the timeout ({without})");
    let bound = OP_TIMEOUT + Duration::from_millis(150);
    assert!(with.slowest < bound, "no call longer than one timeout plus scheduling ({with})");
    assert!(with.resumed_after < Duration::from_millis(1500), "hits resume soon after the server ({with})");
}

struct Freeze {
    calls: usize,
    full_timeouts: usize,
    slowest: Duration,
    resumed_after: Duration,
}

impl std::fmt::Display for Freeze {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} calls, {} paid a full op timeout, slowest {:?}, first hit {:?} after the server resumed",
            self.calls, self.full_timeouts, self.slowest, self.resumed_after
        )
    }
}

async fn freeze_under_load(server: &RedisServer, rt: Runtime) -> Freeze {
    const CALLERS: usize = 200;
    const SYMBOLS: [&str; 10] = ["A", "BB", "CCC", "DDDD", "EEEEE", "F", "GG", "HHH", "IIII", "JJJJJ"];
    for s in SYMBOLS {
        timed(&rt, s).await;
    }
    rt.flush().await.unwrap();
    let start = Instant::now();
    let (freeze_at, thaw_at, end_at) =
        (Duration::from_millis(500), Duration::from_millis(3500), Duration::from_millis(5000));
    let log = Arc::new(Mutex::new(Vec::<(Duration, Duration, bool)>::new()));
    let mut set = JoinSet::new();
    for i in 0..CALLERS {
        let (rt, log) = (rt.clone(), Arc::clone(&log));
        set.spawn(async move {
            let mut n = i;
            while start.elapsed() < end_at {
                let at = start.elapsed();
                let (took, hit) = timed(&rt, SYMBOLS[n % SYMBOLS.len()]).await;
                log.lock().unwrap().push((at, took, hit));
                n += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
    }
    tokio::time::sleep_until((start + freeze_at).into()).await;
    server.freeze();
    tokio::time::sleep_until((start + thaw_at).into()).await;
    server.thaw();
    while set.join_next().await.is_some() {}
    let log = log.lock().unwrap();
    let full_timeouts = log.iter().filter(|(_, took, _)| *took >= OP_TIMEOUT).count();
    let slowest = log.iter().map(|(_, took, _)| *took).max().unwrap_or_default();
    let resumed =
        log.iter().filter(|(at, _, hit)| *hit && *at >= thaw_at).map(|(at, took, _)| *at + *took).min();
    Freeze {
        calls: log.len(),
        full_timeouts,
        slowest,
        resumed_after: resumed.map_or(Duration::MAX, |r| r - thaw_at),
    }
}

/// A host that accepts connections and never answers (a blackhole, behind the proxy), met while
/// the connection is being re-made: every call is still bounded by `op_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackholed_reconnect_is_bounded() {
    let server = RedisServer::start();
    let proxy = FaultProxy::start(server.port());
    // A long connect timeout, and no breaker: every call meets the blackhole, and only the
    // runtime's own bound can cut it short.
    let rt = runtime(&proxy.url(), |c| {
        c.with_connect_timeout(Duration::from_secs(5)).with_breaker(0, Duration::ZERO)
    });
    assert!(!timed(&rt, "warm").await.1);
    rt.flush().await.unwrap();
    assert!(timed(&rt, "warm").await.1, "a hit through the proxy");
    proxy.set(Fault::Reset);
    tokio::time::sleep(Duration::from_millis(50)).await;
    proxy.set(Fault::Blackhole);
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        slowest = slowest.max(timed(&rt, "warm").await.0);
    }
    proxy.set(Fault::Pass);
    eprintln!("blackholed reconnect: slowest of 10 calls {slowest:?} (op timeout {OP_TIMEOUT:?}, connect timeout 5 s)");
    assert!(slowest < OP_TIMEOUT + Duration::from_millis(150), "bounded by op_timeout ({slowest:?})");
    // And the cache comes back with the host.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !timed(&rt, "warm").await.1 {
        assert!(Instant::now() < deadline, "the cache did not come back after the blackhole");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A connection that goes silent for good (its peer gone without a reset, or a middlebox that
/// forgot the flow; new connections are answered): the OS would report it lost only when TCP
/// gives up, many minutes later. The runtime makes it again after three lookups in a row time out
/// on it, so the cache is back after three slow calls, not minutes of them. Then a server whose
/// every reply comes too late: each connection is made again after three time-outs as well, and
/// the warning is logged once for the whole episode, not once per connection. Then one stall
/// shorter than two timeouts with many lookups in flight: they time out together, and the
/// connection is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_gone_silent_is_made_again() {
    let server = RedisServer::start();
    let proxy = FaultProxy::start(server.port());
    let (logs, _guard) = support::logs::Logs::capture();
    let warned = || logs.count("WARN", "stopped answering");
    let rt = warm_without_breaker(&proxy).await;
    proxy.strand();
    let started = Instant::now();
    let (mut slow, mut slowest, mut slow_at_warning) = (0, Duration::ZERO, None);
    loop {
        let (took, hit) = timed(&rt, "warm").await;
        slowest = slowest.max(took);
        if took >= OP_TIMEOUT {
            slow += 1;
        }
        if slow_at_warning.is_none() && warned() > 0 {
            slow_at_warning = Some(slow);
        }
        if hit {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still no hit 10 s after the connection went silent ({slow} calls timed out)"
        );
    }
    eprintln!(
        "silent connection: made again after {slow_at_warning:?} calls timed out; {slow} timed out in all, hit again after {:?} (slowest call {slowest:?}), {} warning",
        started.elapsed(),
        warned()
    );
    // Made again once three requests went unanswered: each slow call is one (a lookup that also
    // re-reads the function's generation is one pipeline here), so 3 slow calls in every local
    // run. 4 is allowed: CI saw 4 once, before requests the store's own timer gives up on were
    // counted, and the cause was not shown by a run (a doubled threshold gives 6). The calls
    // after it wait for the new connection, within `op_timeout`.
    let at = slow_at_warning.unwrap_or(usize::MAX);
    assert!((2..=4).contains(&at), "made again after three time-outs, not after {at} slow calls");
    assert!(
        slowest < OP_TIMEOUT + Duration::from_millis(150),
        "each call bounded by op_timeout ({slowest:?})"
    );
    assert_eq!(warned(), 1, "one warning:\n{}", logs.text());

    // Every reply 300 ms late, past the 200 ms op timeout: each connection goes silent in turn.
    let connections = || async {
        let mut conn = server.raw(0).await;
        let info: String = redis::cmd("INFO").arg("stats").query_async(&mut conn).await.unwrap();
        let line = info.lines().find(|l| l.starts_with("total_connections_received:")).unwrap();
        line.split(':').nth(1).unwrap().trim().parse::<u64>().unwrap()
    };
    let before = connections().await;
    proxy.set(Fault::Latency(Duration::from_millis(300)));
    let mut late = 0;
    let until = Instant::now() + Duration::from_secs(7);
    while Instant::now() < until {
        let (took, _) = timed(&rt, "warm").await;
        assert!(took < OP_TIMEOUT + Duration::from_millis(150), "bounded by op_timeout ({took:?})");
        late += 1;
    }
    proxy.set(Fault::Pass);
    let made = connections().await - before - 1; // the counting connection
    let deadline = Instant::now() + Duration::from_secs(10);
    while !timed(&rt, "warm").await.1 {
        assert!(Instant::now() < deadline, "the cache did not come back after the slow replies");
    }
    eprintln!("replies 300 ms late for 7 s: {late} calls, {made} connections made, {} warnings", warned());
    // Made again after 3 time-outs, then after 6, then 12 (no reply came in between): 3 at most
    // in 7 s; without the doubling, one every three time-outs and a connect (7 here).
    assert!((1..=3).contains(&made), "connections made again while replies were late: {made}");
    assert_eq!(warned(), 2, "one warning for the second episode, not one per connection:\n{}", logs.text());

    // One stall (every command paused for 300 ms, under two op timeouts) with 20 lookups in
    // flight: all 20 time out together, which is one stall, not silence; the connection is kept,
    // and answers after it.
    let before = connections().await;
    let mut pause = server.raw(0).await;
    let _: () = redis::cmd("CLIENT").arg("PAUSE").arg(300).arg("ALL").query_async(&mut pause).await.unwrap();
    let stalled: Vec<_> = (0..20)
        .map(|i| {
            let rt = rt.clone();
            tokio::spawn(async move { timed(&rt, &format!("stall{i}")).await.0 })
        })
        .collect();
    let mut timed_out = 0;
    for call in stalled {
        timed_out += usize::from(call.await.unwrap() >= OP_TIMEOUT);
    }
    tokio::time::sleep(Duration::from_millis(150)).await; // the pause ends
    assert!(timed(&rt, "warm").await.1, "a hit on the same connection after the stall");
    let made = connections().await - before - 2; // the pausing and the counting connections
    eprintln!("one 300 ms stall: {timed_out} of 20 lookups timed out together, {made} connections made");
    assert!(timed_out >= 3, "the stall timed out the lookups in flight ({timed_out})");
    assert_eq!(made, 0, "one stall does not make the connection again");
    assert_eq!(warned(), 2);
}

/// The same silence, met by callers that stop waiting before `op_timeout` (a service's own
/// deadline, here 180 ms against a 200 ms `op_timeout`): the connection's timer never ends their
/// requests, but a request given up after three quarters of `op_timeout` counts as timed out, so
/// the connection is made again all the same. Without that it never is (no hit in 10 s). The
/// store's own timer, over every call on one server but a lookup, gives up on them the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_gone_silent_is_made_again_when_callers_stop_waiting_first() {
    const DEADLINE: Duration = Duration::from_millis(180);
    let server = RedisServer::start();
    let proxy = FaultProxy::start(server.port());
    let (logs, _guard) = support::logs::Logs::capture();
    let rt = warm_without_breaker(&proxy).await;
    proxy.strand();
    let started = Instant::now();
    let (mut gave_up, mut gave_up_at_warning) = (0, None);
    loop {
        match tokio::time::timeout(DEADLINE, timed(&rt, "warm")).await {
            Err(_) => gave_up += 1,
            Ok((_, true)) => break,
            Ok((_, false)) => {}
        }
        if gave_up_at_warning.is_none() && logs.count("WARN", "stopped answering") > 0 {
            gave_up_at_warning = Some(gave_up);
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still no hit 10 s after the connection went silent ({gave_up} callers gave up)"
        );
    }
    let warned = logs.count("WARN", "stopped answering");
    eprintln!(
        "silent, callers giving up at {DEADLINE:?}: made again after {gave_up_at_warning:?} gave up; {gave_up} in all, hit again after {:?}, {warned} warning",
        started.elapsed()
    );
    // Where the rule acts: the calls given up before the warning. After it, a call may still
    // give up while the new connection is made through the proxy on a loaded machine.
    let at = gave_up_at_warning.unwrap_or(usize::MAX);
    assert!((2..=4).contains(&at), "made again after three given-up requests, not after {at} calls");
    assert_eq!(warned, 1, "one warning:\n{}", logs.text());
}

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    /// What this thread logs at `info` and above, until the guard is dropped.
    fn info() -> (Captured, tracing::subscriber::DefaultGuard) {
        let logs = Captured::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A wrong password, and none where the server asks for one: every call still runs its
/// function, and the log says so a bounded number of times (not once per call), says what to do,
/// and never shows the password. Both open the breaker: with no password the refusal comes as the
/// answer to the new connection's `SELECT` (redis-rs reports it without the `NOAUTH` code), and
/// is still a refusal of the credentials, not of one request.
#[tokio::test]
async fn wrong_or_missing_password_is_logged_once_not_per_call() {
    let server = RedisServer::start_with_args(&["--requirepass", "right-one"]);
    for (given, url, db) in [
        ("wrong password", format!("redis://:wrong-one@127.0.0.1:{}", server.port()), 7),
        ("no password", format!("redis://127.0.0.1:{}", server.port()), 7),
        ("no password, DB 0", format!("redis://127.0.0.1:{}", server.port()), 0),
    ] {
        let (logs, _guard) = Captured::info();
        let rt = runtime(&url, |c| c);
        let ran = AtomicUsize::new(0);
        for i in 0..100 {
            let hit = if db == 0 {
                let body = AtomicBool::new(false);
                rt.scope(ema_in_db0(&format!("S{i}"), &body)).await;
                !body.load(SeqCst)
            } else {
                timed(&rt, &format!("S{i}")).await.1
            };
            ran.fetch_add(usize::from(!hit), SeqCst);
        }
        let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
        let warnings = text.lines().filter(|l| l.contains("WARN")).count();
        let stats = rt.stats().get(db, if db == 0 { "fault0" } else { "fault" }).cloned().unwrap();
        eprintln!(
            "{given}, 100 calls: {warnings} warning lines, {} backend errors, {} bypassed",
            stats.backend_errors, stats.bypassed
        );
        eprintln!("{text}");
        assert_eq!(ran.load(SeqCst), 100, "{given}: every call ran its function");
        assert_eq!(
            warnings, 2,
            "{given}: one warning when it starts failing, one when the breaker opens:\n{text}"
        );
        assert!(stats.bypassed >= 90, "{given}: the open breaker skips the server ({})", stats.bypassed);
        assert_eq!(
            text.matches("REDIS_PASSWORD").count(),
            1,
            "{given}: the failure's warning says where the password goes, once:\n{text}"
        );
        assert!(!text.contains("wrong-one"), "{given}: the password never appears in logs");
    }
}

/// Lookups are reads, generation refresh included: while the server pauses writes (a failover's
/// `CLIENT PAUSE WRITE`), hits are still answered at once, even with the generation re-read on
/// every lookup (`generation_refresh` 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_are_answered_while_writes_are_paused() {
    let server = RedisServer::start();
    let rt = runtime(&server.url(), |c| c.with_generation_refresh(Duration::ZERO));
    timed(&rt, "PAUSED").await;
    rt.flush().await.unwrap();
    server.pause_writes(1500).await;
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        let (took, hit) = timed(&rt, "PAUSED").await;
        assert!(hit, "a hit while writes are paused");
        slowest = slowest.max(took);
    }
    eprintln!("writes paused: 10 hits, slowest {slowest:?}");
    assert!(slowest < OP_TIMEOUT / 2, "no lookup waited for the pause ({slowest:?})");
}

/// A server that fails on and off (reset, then answering again, eight times in a few seconds):
/// the breaker opens and closes with it, and its "opened" warning and "closed" note are logged
/// once in those seconds, not once per cycle.
#[tokio::test]
async fn a_breaker_opening_and_closing_again_and_again_is_logged_once_per_10_s() {
    let server = RedisServer::start();
    let proxy = FaultProxy::start(server.port());
    let (logs, _guard) = Captured::info();
    let rt = runtime(&proxy.url(), |c| c.with_breaker(3, Duration::from_millis(50)));
    let started = Instant::now();
    let mut cycles = 0;
    for cycle in 0..8 {
        proxy.set(Fault::Reset);
        for i in 0..6 {
            timed(&rt, &format!("C{cycle}-{i}")).await;
        }
        assert!(rt.breaker_open(), "cycle {cycle}: the breaker opened");
        proxy.set(Fault::Pass);
        let deadline = Instant::now() + Duration::from_secs(3);
        while rt.breaker_open() {
            assert!(Instant::now() < deadline, "cycle {cycle}: the breaker did not close");
            tokio::time::sleep(Duration::from_millis(60)).await;
            timed(&rt, &format!("C{cycle}-probe")).await;
        }
        cycles += 1;
    }
    let took = started.elapsed();
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let opened = text.lines().filter(|l| l.contains("WARN") && l.contains("breaker opened")).count();
    let closed = text.lines().filter(|l| l.contains("INFO") && l.contains("breaker closed")).count();
    eprintln!("{cycles} cycles in {took:?}: {opened} 'opened' warnings, {closed} 'closed' notes");
    // One per started 10 s of the run.
    let bound = 1 + usize::try_from(took.as_secs() / 10).unwrap();
    assert!((1..=bound).contains(&opened) && (1..=bound).contains(&closed), "{text}");

    // The last line said it closed; it opens again within the quiet time and stays open: that is
    // said once the quiet time is over, not left unsaid.
    proxy.set(Fault::Reset);
    for i in 0..6 {
        timed(&rt, &format!("last-{i}")).await;
    }
    assert!(rt.breaker_open());
    let said = || {
        let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
        text.lines().filter(|l| l.contains("WARN") && l.contains("breaker still open")).count()
    };
    let deadline = started + Duration::from_secs(13);
    while said() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        timed(&rt, "last-probe").await;
    }
    let at = started.elapsed();
    assert_eq!(said(), 1, "the breaker stayed open unsaid for {at:?}");
    assert!(at >= Duration::from_secs(10), "said within the quiet time ({at:?})");
}
