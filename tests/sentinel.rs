//! A primary behind Sentinel (`redis+sentinel://`): caching follows the primary when the
//! sentinels fail it over to its replica under load, with no wrong answer and no error reaching a
//! caller. `cargo test --test sentinel -- --nocapture` prints README's figures. The near tier's
//! copies follow the primary too: its tracking connection goes where the store's connections go.

mod support;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use cache_runtime::db::MarketData;
use cache_runtime::{cached, invalidate, CacheConfig, KeyBuilder, Runtime};
use support::cluster::{cli, until_replicated};
use support::load::Load;
use support::near::{tracking_connections, until_distrusted};
use support::proxy::FaultProxy;
use support::sentinel::{OneSentinel, SentinelSet};
use support::tls::{tls_cli, Certificates, TlsServer};
use support::{read_all, RedisServer};

#[cached(db = MarketData, prefix = "sn", ttl = 300, skip(calls))]
async fn level(n: u32, calls: &AtomicUsize) -> u64 {
    calls.fetch_add(1, SeqCst);
    u64::from(n) + 1
}

/// Whether `level(n)` is answered from the cache now: two calls, no execution.
async fn is_hit(rt: &Runtime, n: u32, calls: &AtomicUsize) -> bool {
    let before = calls.load(SeqCst);
    assert_eq!(rt.scope(level(n, calls)).await, u64::from(n) + 1);
    assert_eq!(rt.scope(level(n, calls)).await, u64::from(n) + 1);
    calls.load(SeqCst) == before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_fails_over_under_load() {
    static EXECUTIONS: AtomicUsize = AtomicUsize::new(0);
    let mut set = SentinelSet::start();
    let config = CacheConfig::redis(&set.url()).unwrap().with_op_timeout(Duration::from_millis(250));
    let rt = Runtime::new(config);
    for n in 0..100 {
        rt.scope(level(n, &EXECUTIONS)).await;
    }
    rt.flush().await.unwrap();
    assert!(is_hit(&rt, 7, &EXECUTIONS).await, "cached through the sentinels' primary");
    let old_primary = set.primary.port();
    assert_eq!(set.primary_port(), old_primary);

    // 64 callers: enough lookups in flight at once that some go in coalesced `MGET`s, which the
    // failover then meets as it meets `GET`s (asserted: some `MGET`s before the kill; caching
    // resumes, with no wrong answer).
    set.primary.reset_stats().await;
    let load = Load::start(64, {
        let rt = rt.clone();
        move |i| {
            let (rt, n) = (rt.clone(), i % 100);
            async move { rt.scope(level(n, &EXECUTIONS)).await == u64::from(n) + 1 }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mgets = set.primary.calls_of("mget").await;
    let killed = Instant::now();
    set.primary.stop();
    let resumed = loop {
        if set.primary_port() == set.replica.port() && is_hit(&rt, 7, &EXECUTIONS).await {
            break killed.elapsed();
        }
        assert!(killed.elapsed() < Duration::from_secs(60), "caching never resumed on the new primary");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let promoted = set.primary_port();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (calls, wrong) = load.stop().await;
    // A new entry is written to the new primary and read back from it.
    let before = EXECUTIONS.load(SeqCst);
    rt.scope(level(1000, &EXECUTIONS)).await;
    rt.flush().await.unwrap();
    assert!(is_hit(&rt, 1000, &EXECUTIONS).await);
    assert_eq!(EXECUTIONS.load(SeqCst), before + 1);
    let s = rt.stats().get(5, "sn").cloned().unwrap();
    println!(
        "sentinel failover: caching resumed on the promoted replica :{promoted} {:.2} s after the primary :{old_primary} \
         was killed (down-after-milliseconds 1000); {calls} calls under load ({mgets} MGETs before the kill), \
         {wrong} wrong answers, {} backend errors and {} bypassed calls counted",
        resumed.as_secs_f64(),
        s.backend_errors,
        s.bypassed
    );
    assert_eq!(wrong, 0, "every caller got its function's value");
    assert!(calls > 100, "the load ran ({calls} calls)");
    assert!(mgets > 0, "some lookups went as MGETs before the kill");
    assert_eq!(promoted, set.replica.port());
}

static PAGE_CALLS: AtomicUsize = AtomicUsize::new(0);

#[cached(db = MarketData, prefix = "sn_reads", ttl = 300)]
async fn page(id: u32) -> String {
    PAGE_CALLS.fetch_add(1, SeqCst);
    format!("page {id}")
}

/// Lookups on the primary behind Sentinel are coalesced as on one server: 512 concurrent lookups
/// of warm keys, five times over, reach the primary as fewer commands than lookups, some of them
/// `MGET`s, and each caller gets its own value; with coalescing off, a `GET` each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_lookups_on_the_primary_share_mgets() {
    const IDS: u32 = 512;
    const ROUNDS: usize = 5;
    let set = SentinelSet::start();
    let mut seen = Vec::new();
    for coalesce in [true, false] {
        let config = CacheConfig::redis(&set.url()).unwrap().with_read_coalescing(coalesce);
        let rt = Runtime::new(config.with_generation_refresh(Duration::from_secs(60)));
        read_all(&rt, page, IDS, 1).await;
        rt.flush().await.unwrap();
        let filled = PAGE_CALLS.load(SeqCst);
        set.primary.reset_stats().await;
        read_all(&rt, page, IDS, ROUNDS).await;
        assert_eq!(PAGE_CALLS.load(SeqCst), filled, "every lookup a hit");
        let (gets, mgets) = (set.primary.calls_of("get").await, set.primary.calls_of("mget").await);
        eprintln!(
            "sentinel, coalescing {coalesce}: {} lookups as {gets} GETs and {mgets} MGETs",
            IDS as usize * ROUNDS
        );
        seen.push((gets, mgets));
    }
    let lookups = u64::from(IDS) * ROUNDS as u64;
    let (gets, mgets) = seen[0];
    assert!(mgets > 0 && gets + mgets < lookups, "coalesced: {seen:?}");
    let (gets, mgets) = seen[1];
    assert!(mgets == 0 && gets >= lookups, "one GET per lookup: {seen:?}");
}

support::near::near_function!("sn_near");

/// Never cached: it fails.
#[cached(db = MarketData, prefix = "sn_fails", ttl = 300)]
async fn unavailable(n: u32) -> Result<u64, u32> {
    Err(n)
}

fn sentinel_runtime(set: &SentinelSet) -> Runtime {
    Runtime::new(CacheConfig::redis(&set.url()).unwrap().with_op_timeout(Duration::from_millis(250)))
}

/// Near copies behind Sentinel: another process's invalidation drops them through the primary's
/// tracking; when the primary is killed every copy is dropped; once the replica is promoted, the
/// tracking connection is there and another process's invalidation on it drops the copy again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_copies_follow_the_primary_through_a_failover() {
    static SOURCE: AtomicU64 = AtomicU64::new(1);
    let mut set = SentinelSet::start();
    let (a, b) = (sentinel_runtime(&set), sentinel_runtime(&set));
    assert_eq!(until_near(&a, 7, &SOURCE, Duration::from_secs(5)).await, 1007);
    assert_eq!(tracking_connections(set.primary.port()), 1);
    SOURCE.store(2, SeqCst);
    b.scope(invalidate!(near_level(7))).await;
    let took = until_value(&a, 7, &SOURCE, 2007).await;
    assert!(took < Duration::from_secs(1), "another process's invalidation reached the copy after {took:?}");
    assert_eq!(until_near(&a, 7, &SOURCE, Duration::from_secs(5)).await, 2007);

    set.primary.stop();
    let killed = Instant::now();
    let distrusted = until_distrusted(&a, killed).await;
    let before = near_hits(&a);
    assert_eq!(a.scope(near_level(7, &SOURCE)).await, 2007);
    assert_eq!(near_hits(&a), before, "a copy answered while nothing tracked");
    while set.primary_port() != set.replica.port() {
        assert!(killed.elapsed() < Duration::from_secs(60), "the sentinels never promoted the replica");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // B writes on the new primary: a second call of a fresh key is a hit.
    loop {
        let other = AtomicU64::new(0);
        b.scope(near_level(500, &other)).await;
        other.store(1, SeqCst);
        if b.scope(near_level(500, &other)).await == 500 {
            break;
        }
        assert!(killed.elapsed() < Duration::from_secs(60), "B never cached on the new primary");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let value = until_near(&a, 7, &SOURCE, Duration::from_secs(30)).await;
    let resumed = killed.elapsed();
    assert_eq!(value, 2007);
    // A and B track the promoted replica (B from its first call there, after a pause of at most
    // 2 s between its tries).
    while tracking_connections(set.replica.port()) != 2 {
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "A and B never both tracked the promoted replica"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    SOURCE.store(3, SeqCst);
    b.scope(invalidate!(near_level(7))).await;
    let took = until_value(&a, 7, &SOURCE, 3007).await;
    println!(
        "sentinel near tier: copies dropped {:.0} ms after the primary was killed, near hits again {:.2} s after; \
         an invalidation on the promoted replica reached the other process's copy after {took:?}",
        distrusted.as_secs_f64() * 1000.0,
        resumed.as_secs_f64()
    );
    assert!(took < Duration::from_secs(1), "the copy outlived an invalidation on the new primary: {took:?}");
}

/// The store's connections are handed a primary at another address while the tracking connection
/// to the old one is alive and nothing kills it (the sentinels now name another server; the old
/// one still answers reads and `PING`s, its writes paused). The copies read from the old primary
/// are dropped at that moment, the tracking connection moves to the new one, and an invalidation
/// made there drops the copies read from it. Without the move, the old server would tell nothing
/// of the new one's changes: the copy would answer for its whole `near` life (60 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_copies_move_with_the_connections_when_the_sentinels_name_another_server() {
    static SOURCE: AtomicU64 = AtomicU64::new(1);
    let set = SentinelSet::start();
    let elsewhere = RedisServer::start();
    let a = sentinel_runtime(&set);
    assert_eq!(until_near(&a, 7, &SOURCE, Duration::from_secs(5)).await, 1007);
    let old = set.primary.port();
    assert_eq!(tracking_connections(old), 1);

    for &port in &set.ports {
        assert!(cli(port, &["SENTINEL", "REMOVE", &set.master]).contains("OK"));
        let monitor =
            cli(port, &["SENTINEL", "MONITOR", &set.master, "127.0.0.1", &elsewhere.port().to_string(), "2"]);
        assert!(monitor.contains("OK"), "{monitor}");
    }
    assert_eq!(set.primary_port(), elsewhere.port());
    SOURCE.store(2, SeqCst);
    set.primary.pause_writes(3000).await;
    assert_eq!(tracking_connections(old), 1, "the old primary's tracking connection is alive");
    // A miss in A (of a function that fails, so that nothing is written after it): its lease
    // request to the old primary times out, so A's tracking connection asks the sentinels again,
    // with no other call made.
    let started = Instant::now();
    assert_eq!(a.scope(unavailable(8)).await, Err(8));
    // The copy read from the old primary is dropped as soon as the sentinels have named the new
    // one: A reads that (no entry there: computed), and keeps a copy of it once it tracks there.
    let dropped = until_value(&a, 7, &SOURCE, 2007).await;
    assert!(
        dropped < Duration::from_secs(1),
        "the old primary's copy answered for {dropped:?} after the connections moved"
    );
    assert_eq!(until_near(&a, 7, &SOURCE, Duration::from_secs(10)).await, 2007);
    let tracked = started.elapsed();
    assert_eq!(tracking_connections(elsewhere.port()), 1, "the tracking connection moved");
    assert_eq!(tracking_connections(old), 0, "the old primary's tracking connection is closed");
    println!(
        "sentinel near tier: after a call found the old primary's writes paused, its copy answered for \
         {dropped:?} more; near hits again {tracked:?} after the call started"
    );
    let b = sentinel_runtime(&set);
    SOURCE.store(3, SeqCst);
    b.scope(invalidate!(near_level(7))).await;
    let took = until_value(&a, 7, &SOURCE, 3007).await;
    assert!(took < Duration::from_secs(1), "the copy outlived an invalidation on the new primary: {took:?}");
}

/// A runtime that asks only the sentinel that led the failover (`demote` asks the first, which
/// names the new primary already), announcements off: a writer on the new primary.
fn leader_writer(set: &SentinelSet) -> Runtime {
    let led = format!("redis+sentinel://127.0.0.1:{}/{}", set.ports[0], set.master);
    Runtime::new(
        CacheConfig::redis(&led)
            .unwrap()
            .with_op_timeout(Duration::from_millis(250))
            .with_sentinel_announcements(false),
    )
}

/// `near_level(n)` in `rt`: what it answered, and how many near hits that was (1: a copy kept
/// in the process answered).
async fn answered_near(rt: &Runtime, n: u32, source: &AtomicU64) -> (u64, u64) {
    let before = near_hits(rt);
    (rt.scope(near_level(n, source)).await, near_hits(rt) - before)
}

/// A process that only reads, behind Sentinel, with near copies: the sentinels demote its primary
/// while it is alive (`SENTINEL FAILOVER`), and another process invalidates on the new one. The
/// process that listens to the sentinels' announcements (the default) moves to the new primary
/// as they announce it and answers the new value; in the same run, one that does not listen
/// (`with_sentinel_announcements(false)`) keeps answering its copy of the old one, tracked on the
/// demoted primary, which still says it is a primary: no call of its own failed, so nothing told
/// it of the failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_only_reads_follows_a_failover_the_sentinels_announce() {
    static SOURCE: AtomicU64 = AtomicU64::new(1);
    let set = SentinelSet::start();
    let config = CacheConfig::redis(&set.url()).unwrap().with_op_timeout(Duration::from_millis(250));
    let heard = Runtime::new(config.clone());
    let deaf = Runtime::new(config.with_sentinel_announcements(false));
    for rt in [&heard, &deaf] {
        assert_eq!(until_near(rt, 7, &SOURCE, Duration::from_secs(5)).await, 1007);
    }
    let (old, new) = (set.primary.port(), set.replica.port());
    assert_eq!(tracking_connections(old), 2);
    until_replicated(old, new).await;
    // The listening process's subscriptions, one per sentinel, are made.
    for &port in &set.ports {
        let subscribed = Instant::now();
        // Sentinel has no `PUBSUB`: its clients list shows each connection's subscriptions.
        while !cli(port, &["CLIENT", "LIST"]).lines().any(|client| client.contains(" sub=1 ")) {
            assert!(subscribed.elapsed() < Duration::from_secs(10), "no subscription on sentinel :{port}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    let started = Instant::now();
    let (named, invalidated) = demote_and_invalidate(&set, &deaf, 7, &SOURCE).await;
    let invalidated = invalidated - started;
    let primary = |port: u16| cli(port, &["ROLE"]).starts_with("master");

    let took = until_value(&heard, 7, &SOURCE, 2007).await;
    let followed = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "the listening process answered the new value {took:?} after the invalidation on the new primary"
    );
    assert_eq!(
        answered_near(&deaf, 7, &SOURCE).await,
        (1007, 1),
        "the process that does not listen moved too"
    );
    assert!(primary(old), "the sentinels converted the old primary before the test could look");
    println!(
        "sentinel announcements: SENTINEL FAILOVER named the replica after {named:?}; another process invalidated \
         on it at {invalidated:?}; the process that listens answered the new value at {followed:?}; the one that \
         does not still answered its copy from the demoted primary"
    );
}

/// A user not allowed `ROLE` (an `@admin` command) behind Sentinel: the runtime asks
/// `INFO replication`, as that user, whether the server the sentinels name is a primary, and
/// caches. The server's ACL log counts each `ROLE` refused: one, the runtime's own question. Had
/// that question failed, the `redis` crate's `SentinelClient` would have been asked too, and
/// would have been refused up to three more (four in all, checked by hand).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_not_allowed_role_finds_the_primary_behind_sentinel() {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let set = SentinelSet::start();
    let user = ["ACL", "SETUSER", "cacheuser", "on", ">secret", "~*", "&*", "+@all", "-role"];
    for port in [set.primary.port(), set.replica.port()] {
        let reply = cli(port, &user);
        assert!(reply.contains("OK"), "{reply}");
    }
    let primary = set.primary.port();
    let as_user = |args: &[&str]| {
        let mut all = vec!["--user", "cacheuser", "--pass", "secret", "--no-auth-warning"];
        all.extend_from_slice(args);
        cli(primary, &all)
    };
    assert!(as_user(&["ROLE"]).contains("NOPERM"), "the user may run ROLE: this test shows nothing");
    assert_eq!(cli(primary, &["ACL", "LOG", "RESET"]).trim(), "OK");

    let hosts: Vec<String> = set.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let url = format!("redis+sentinel://cacheuser:secret@{}/{}", hosts.join(","), set.master);
    // No call times out on a loaded machine (a time-out would ask the sentinels again).
    let rt = Runtime::new(CacheConfig::redis(&url).unwrap().with_op_timeout(Duration::from_secs(2)));
    rt.scope(level(60, &CALLS)).await;
    rt.flush().await.unwrap();
    assert!(is_hit(&rt, 60, &CALLS).await, "nothing cached as a user not allowed ROLE");
    let stored = KeyBuilder::new(module_path!(), "sn", "level").arg(&60u32).finish().unwrap();
    assert!(!as_user(&["-n", "5", "GET", &stored]).trim().is_empty(), "the entry is not on the primary");

    // `ACL LOG`: entries of `count`, `reason`, `context`, `object`... one field or value per line.
    let log = cli(primary, &["ACL", "LOG"]);
    let (mut count, mut refused) = (0, 0);
    let mut lines = log.lines().map(str::trim);
    while let Some(line) = lines.next() {
        match line {
            "count" => count = lines.next().and_then(|c| c.parse().ok()).unwrap_or(0),
            "object" if lines.next() == Some("role") => refused += count,
            _ => {}
        }
    }
    assert_eq!(refused, 1, "ROLE was refused {refused} times, not once (ACL LOG:\n{log})");
}

/// A primary the sentinels demote while it is alive (`SENTINEL FAILOVER`): they promote the
/// replica at once, but convert the old primary to a replica only seconds later, and until then
/// it still takes the writes of a process that has seen no call fail (and does not listen to
/// the sentinels' announcements). An invalidation it
/// acknowledges in that window is lost when it is converted (it resyncs from the new primary,
/// which still holds the old entry). The invalidation's recheck asks the sentinels first, finds
/// the new primary and applies it there. In the same run, the same kind of invalidation from a
/// runtime with the recheck turned off stays lost (the race this guards against happened): the
/// new primary serves its old entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_taken_by_a_primary_demoted_alive_is_applied_on_the_new_one() {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    // Three sentinels asked at once on a loaded machine: more time than the default 250 ms.
    demoted_alive(&CALLS, Duration::from_secs(2), false).await;
}

/// The same with one of the three sentinels frozen (`SIGSTOP`: it takes connections and never
/// answers) and a `connect_timeout` of 30 s: the two others answer, and the recheck is not held
/// for the frozen one (it would be cut at its own 2 s delay and run on the old primary).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_sentinel_does_not_hold_the_recheck_of_an_invalidation() {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    demoted_alive(&CALLS, Duration::from_secs(30), true).await;
}

/// `SENTINEL FAILOVER`, the primary alive: how long until the sentinels name the replica.
/// Demotes the live primary ([`demote`]: how long the sentinels took to name the new one),
/// then, with `source` at 2, invalidates `near_level(n)` on the new primary (when that returned),
/// and checks that `deaf` (announcements off) still answers its copy (`1000 + n`) from the
/// demoted primary: the race the announcement tests are about did happen.
async fn demote_and_invalidate(
    set: &SentinelSet,
    deaf: &Runtime,
    n: u32,
    source: &'static AtomicU64,
) -> (Duration, Instant) {
    let named = demote(set).await;
    source.store(2, SeqCst);
    leader_writer(set).scope(invalidate!(near_level(n))).await;
    let invalidated = Instant::now();
    assert_eq!(
        answered_near(deaf, n, source).await,
        (1000 + u64::from(n), 1),
        "the process that does not listen answered something else than its copy from the demoted primary: \
         the failover this test is about did not happen as it expects"
    );
    (named, invalidated)
}

async fn demote(set: &SentinelSet) -> Duration {
    let started = Instant::now();
    assert!(cli(set.ports[0], &["SENTINEL", "FAILOVER", &set.master]).contains("OK"));
    while set.primary_port() != set.replica.port() {
        assert!(started.elapsed() < Duration::from_secs(30), "the sentinels never promoted the replica");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

/// Whether a server on `port` answers `PING` within `within`.
async fn answers(port: u16, within: Duration) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ask = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        stream.write_all(b"PING\r\n").await.ok()?;
        let mut reply = [0u8; 7];
        stream.read_exact(&mut reply).await.ok()
    };
    matches!(tokio::time::timeout(within, ask).await, Ok(Some(_)))
}

async fn demoted_alive(calls: &'static AtomicUsize, connect_timeout: Duration, freeze_one: bool) {
    let set = SentinelSet::start();
    // The sentinels' announcements could move both runtimes to the new primary before or after
    // they invalidate, so the race would not reliably happen: this is about the question asked
    // before a recheck, which also covers an announcement missed (a subscription lost then).
    let config = CacheConfig::redis(&set.url())
        .unwrap()
        .with_op_timeout(Duration::from_millis(250))
        .with_sentinel_announcements(false);
    let checked = Runtime::new(config.clone().with_connect_timeout(connect_timeout));
    let unchecked = Runtime::new(config.with_invalidation_recheck(Duration::ZERO));
    for (rt, n) in [(&checked, 7), (&unchecked, 8)] {
        rt.scope(level(n, calls)).await;
        rt.flush().await.unwrap();
        assert!(is_hit(rt, n, calls).await, "{n} cached on the primary");
    }
    let (old, new) = (set.primary.port(), set.replica.port());
    until_replicated(old, new).await;
    let stored = |port: u16, n: u32| {
        let key = KeyBuilder::new(module_path!(), "sn", "level").arg(&n).finish().unwrap();
        !cli(port, &["-n", "5", "GET", &key]).trim().is_empty()
    };
    let primary = |port: u16| cli(port, &["ROLE"]).starts_with("master");
    assert!(stored(new, 7) && stored(new, 8), "the replica holds both entries");

    if freeze_one {
        set.freeze_sentinel(2);
        assert!(
            !answers(set.ports[2], Duration::from_secs(3)).await,
            "the frozen sentinel answered: a round of questions would not have waited for it"
        );
    }
    let started = Instant::now();
    let promoted = demote(&set).await;
    assert!(primary(old), "the old primary was converted before the test wrote to it");
    checked.scope(invalidate!(level(7))).await;
    unchecked.scope(invalidate!(level(8))).await;
    let invalidated = started.elapsed();
    // Acknowledged by the old primary (its entries are gone there), not by the new one.
    assert!(!stored(old, 7) && !stored(old, 8), "the old primary took both invalidations");
    assert!(stored(new, 7) && stored(new, 8), "the new primary never heard of them");
    assert!(primary(old), "the old primary was converted while the test wrote to it");

    // The recheck (2 s after the invalidation) applies it on the new primary, before the
    // sentinels convert the old one.
    while stored(new, 7) {
        assert!(
            started.elapsed() < invalidated + Duration::from_secs(6),
            "the recheck never applied the invalidation on the new primary"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let applied = started.elapsed();
    assert!(primary(old), "the sentinels converted the old primary before the recheck");

    // The sentinels convert the old primary; it resyncs from the new one.
    while primary(old) || !cli(old, &["INFO", "replication"]).contains("master_link_status:up") {
        assert!(started.elapsed() < Duration::from_secs(60), "the sentinels never converted the old primary");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let converted = started.elapsed();
    let fresh = sentinel_runtime(&set);
    let before = calls.load(SeqCst);
    assert_eq!(fresh.scope(level(7, calls)).await, 8);
    assert_eq!(calls.load(SeqCst), before + 1, "the entry invalidated on the demoted primary was served");
    let before = calls.load(SeqCst);
    assert_eq!(fresh.scope(level(8, calls)).await, 9);
    assert_eq!(
        calls.load(SeqCst),
        before,
        "without the recheck the invalidation was not lost: the race this test is about did not happen"
    );
    println!(
        "sentinel (one sentinel frozen: {freeze_one}): SENTINEL FAILOVER named the replica after {promoted:?}; the old primary took an invalidation at \
         {invalidated:?}, the recheck applied it on the new primary at {applied:?}, the sentinels converted the old one at {converted:?}"
    );
}

/// A cached function whose executions are counted in `ran`.
#[cached(db = MarketData, prefix = "sn_lease", ttl = 300, skip(ran))]
async fn leased(symbol: &str, ran: &AtomicUsize) -> u64 {
    ran.fetch_add(1, SeqCst);
    symbol.len() as u64
}

/// `leased(symbol)` in `rt`: how long it took.
async fn timed_lease(rt: &Runtime, symbol: &str) -> Duration {
    let ran = AtomicUsize::new(0);
    let started = Instant::now();
    assert_eq!(rt.scope(leased(symbol, &ran)).await, symbol.len() as u64);
    started.elapsed()
}

/// A lease request that times out during `CLIENT PAUSE WRITE` behind Sentinel leaves no lease
/// that would make another process wait for a value nobody computes. On one server
/// (`tests/faults.rs`) the request runs when the pause ends and its release follows it on the same
/// connection. Behind Sentinel the time-out also makes the runtime ask the sentinels and give the
/// primary new connections, and the old one is closed once its release gives up: the server drops
/// the paused commands of a closed connection, so the request never runs (seen in every local run:
/// no lease request and no release run). Shown against the same paused primary with a lease set by
/// a request nobody releases on a connection kept open, which costs the other process the lease's
/// whole life.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_lease_request_does_not_stall_other_processes() {
    const OP_TIMEOUT: Duration = Duration::from_millis(200);
    let set = SentinelSet::start();
    let lease = Duration::from_secs(2);
    // Generations trusted for an hour: lookups are a plain GET, answered during CLIENT PAUSE
    // WRITE, so the pause meets the lease request.
    let runtime = || {
        Runtime::new(
            CacheConfig::redis(&set.url())
                .unwrap()
                .with_op_timeout(OP_TIMEOUT)
                .with_lease_ttl(lease)
                .with_generation_refresh(Duration::from_secs(3600)),
        )
    };
    let (a, b) = (runtime(), runtime());
    for rt in [&a, &b] {
        timed_lease(rt, "warm").await; // reads the generation once
    }

    // Protected: A's lease request times out during a 600 ms pause; the primary runs it on resume.
    set.primary.reset_stats().await;
    set.primary.pause_writes(600).await;
    let took = timed_lease(&a, "orphan").await;
    assert!(
        took >= OP_TIMEOUT && took < OP_TIMEOUT * 2,
        "A paid one timeout for the lease request ({took:?})"
    );
    tokio::time::sleep(Duration::from_millis(700)).await; // the pause is over
                                                          // Nothing of the request is left: either it never ran (the time-out gave the primary new
                                                          // connections and closed the old one, and the server drops what a closed connection had not
                                                          // run yet), or it ran and the release that followed it gave the lease back.
    let key =
        cache_runtime::KeyBuilder::new("sentinel", "sn_lease", "leased").arg("orphan").finish().unwrap();
    let left: bool = redis::cmd("EXISTS")
        .arg(format!("{key}:lease"))
        .query_async(&mut set.primary.raw(5).await)
        .await
        .unwrap();
    let (requests, releases) = (set.primary.calls_of("evalsha").await, set.primary.calls_of("eval").await);
    let waited = timed_lease(&b, "orphan").await;

    // Unprotected: the same request, sent by hand and abandoned after the same timeout.
    let key = cache_runtime::KeyBuilder::new("sentinel", "sn_lease", "leased").arg("naked").finish().unwrap();
    set.primary.pause_writes(600).await;
    let mut raw = set.primary.raw(5).await;
    let orphan =
        redis::cmd("SET").arg(format!("{key}:lease")).arg("42").arg("NX").arg("PX").arg(2000).to_owned();
    let _ = tokio::time::timeout(OP_TIMEOUT, orphan.query_async::<()>(&mut raw)).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let stalled = timed_lease(&b, "naked").await;

    eprintln!(
        "sentinel, after a 600 ms CLIENT PAUSE WRITE: the other process waited {waited:?} (after the timed-out request) \
         vs {stalled:?} (unreleased orphan, lease {lease:?}); the lease request took {took:?}; after the pause \
         the primary had run {requests} lease requests and {releases} releases"
    );
    assert!(!left, "no lease was left behind by the timed-out request");
    assert!(waited < Duration::from_millis(300), "no orphaned lease stalled the other process ({waited:?})");
    assert!(stalled > Duration::from_millis(1000), "the race exists without the release ({stalled:?})");
}

/// The primary frozen (`SIGSTOP`) for 700 ms, shorter than the sentinels' `down-after-milliseconds`,
/// under 64 callers: no failover, and every call is bounded by one `op_timeout` (plus
/// scheduling), lookups on the connections made again after the first time-out included; hits
/// resume soon after the primary does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_primary_bounds_every_call_by_the_op_timeout() {
    const OP_TIMEOUT: Duration = Duration::from_millis(200);
    const CALLERS: u32 = 64;
    static RAN: AtomicUsize = AtomicUsize::new(0);
    let set = SentinelSet::start();
    let rt = Runtime::new(CacheConfig::redis(&set.url()).unwrap().with_op_timeout(OP_TIMEOUT));
    for n in 0..CALLERS {
        rt.scope(level(n, &RAN)).await;
    }
    rt.flush().await.unwrap();
    assert!(is_hit(&rt, 3, &RAN).await, "cached through the sentinels' primary");
    let start = Instant::now();
    let (freeze_at, thaw_at, end_at) =
        (Duration::from_millis(500), Duration::from_millis(1200), Duration::from_millis(3000));
    let mut callers = tokio::task::JoinSet::new();
    for i in 0..CALLERS {
        let rt = rt.clone();
        callers.spawn(async move {
            // (started at, took, hit)
            let mut log = Vec::new();
            let mut n = i;
            while start.elapsed() < end_at {
                let (at, before) = (start.elapsed(), RAN.load(SeqCst));
                assert_eq!(rt.scope(level(n % CALLERS, &RAN)).await, u64::from(n % CALLERS) + 1);
                log.push((at, start.elapsed() - at, RAN.load(SeqCst) == before));
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            log
        });
    }
    tokio::time::sleep_until((start + freeze_at).into()).await;
    set.primary.freeze();
    tokio::time::sleep_until((start + thaw_at).into()).await;
    set.primary.thaw();
    let mut log = Vec::new();
    while let Some(joined) = callers.join_next().await {
        log.extend(joined.expect("no caller panicked"));
    }
    let slowest = log.iter().map(|(_, took, _)| *took).max().unwrap_or_default();
    let paid = log.iter().filter(|(_, took, _)| *took >= OP_TIMEOUT).count();
    let resumed =
        log.iter().filter(|(at, _, hit)| *hit && *at >= thaw_at).map(|(at, took, _)| *at + *took).min();
    let resumed = resumed.map_or(Duration::MAX, |r| r - thaw_at);
    eprintln!(
        "sentinel, primary frozen 700 ms under {CALLERS} callers, op timeout {OP_TIMEOUT:?}: {} calls, {paid} paid a \
         full op timeout, slowest {slowest:?}, first hit {resumed:?} after the primary resumed",
        log.len()
    );
    assert_eq!(set.primary_port(), set.primary.port(), "no failover: the freeze was shorter than down-after");
    assert!(paid > 0, "the freeze met calls in flight");
    assert!(
        slowest < OP_TIMEOUT + Duration::from_millis(150),
        "every call bounded by one op timeout ({slowest:?})"
    );
    assert!(resumed < Duration::from_millis(1500), "hits resume soon after the primary ({resumed:?})");
}

/// A caller-supplied `op_timeout` of `Duration::MAX` behind Sentinel: no overflow anywhere in
/// the timers of lookups (alone and coalesced), lease requests, fills and the sentinels'
/// queries; values are cached and each caller gets its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_longest_op_timeout_caches_behind_sentinel() {
    let set = SentinelSet::start();
    let rt = Runtime::new(CacheConfig::redis(&set.url()).unwrap().with_op_timeout(Duration::MAX));
    static RAN: AtomicUsize = AtomicUsize::new(0);
    for n in 0..16 {
        rt.scope(level(n, &RAN)).await;
    }
    rt.flush().await.unwrap();
    assert_eq!(RAN.load(SeqCst), 16, "one execution per key");
    // `page`'s own counter is shared with another test of this binary: this runtime's counts.
    read_all(&rt, page, 256, 1).await;
    rt.flush().await.unwrap();
    set.primary.reset_stats().await;
    read_all(&rt, page, 256, 3).await;
    let reads = rt.stats().get(5, "sn_reads").cloned().expect("counted under DB 5 / sn_reads");
    assert_eq!(
        (reads.misses, reads.fills, reads.hits),
        (256, 256, 768),
        "filled once, then every lookup a hit"
    );
    let mgets = set.primary.calls_of("mget").await;
    eprintln!("sentinel, op timeout Duration::MAX: 768 concurrent lookups with {mgets} MGETs");
    assert!(mgets > 0, "lookups coalesced at the longest op timeout");
    for n in 0..16 {
        assert!(is_hit(&rt, n, &RAN).await, "level({n}) cached");
    }
}

/// The first of the three sentinels frozen (`SIGSTOP`: it takes connections and never answers):
/// the runtime asks the three at once and takes the two others' answer, on first use and again
/// after the primary is killed and they promote the replica. In the same run the `redis` crate's
/// `SentinelClient` (which the runtime asked alone, inside the call, until this release) does not
/// answer within the call's `op_timeout` (all this asserts): it takes the sentinels' answers in
/// the order given, and the frozen one's only ends at the crate's own 1 s connection timeout (a
/// frozen sentinel never answers the connection's `CLIENT SETINFO`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_sentinel_does_not_stop_caching() {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let mut set = SentinelSet::start();
    set.freeze_sentinel(0);
    let rt = sentinel_runtime(&set);
    let first = Instant::now();
    rt.scope(level(40, &CALLS)).await;
    rt.flush().await.unwrap();
    assert!(is_hit(&rt, 40, &CALLS).await, "no hit with one sentinel of three frozen");
    let first = first.elapsed();

    let addrs: Vec<String> = set.ports.iter().map(|p| format!("redis://127.0.0.1:{p}")).collect();
    let mut alone = redis::sentinel::SentinelClient::build(
        addrs,
        set.master.clone(),
        None,
        redis::sentinel::SentinelServerType::Master,
    )
    .unwrap();
    let op_timeout = Duration::from_millis(250); // `sentinel_runtime`'s
    assert!(
        tokio::time::timeout(op_timeout, alone.async_get_client()).await.is_err(),
        "SentinelClient answered within {op_timeout:?} with its first sentinel frozen: this test shows nothing"
    );

    let new = set.replica.port();
    set.primary.stop();
    let killed = Instant::now();
    loop {
        rt.scope(level(41, &CALLS)).await;
        let _ = rt.flush().await;
        if is_hit(&rt, 41, &CALLS).await {
            break;
        }
        assert!(killed.elapsed() < Duration::from_secs(30), "never cached on the promoted replica");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let followed = killed.elapsed();
    let named = cli(set.ports[1], &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", &set.master]);
    assert!(named.contains(&new.to_string()), "the sentinels name {named:?}, not the replica :{new}");
    println!(
        "sentinel (first sentinel frozen): first use cached (two calls) in {first:?}; cached on the promoted replica {followed:?} after the primary was killed"
    );
}

/// The connections the kernel holds for the server on loopback `port` (IPv4), each as its two
/// addresses, in the states a connection made to a frozen server stays in: established (never
/// taken from the kernel) or closed by the client only (`CLOSE_WAIT`). A frozen sentinel never
/// takes them nor closes them, so each connection made to it after it froze is one of these
/// from then on.
fn connections_to(port: u16) -> std::collections::HashSet<String> {
    let local = format!("0100007F:{port:04X}");
    tcp_table()
        .into_iter()
        .filter(|(from, _, state)| *from == local && matches!(state.as_str(), "01" | "08"))
        .map(|(from, to, _)| format!("{from} {to}"))
        .collect()
}

/// The kernel's IPv4 TCP connections (`/proc/net/tcp`, every process's), each as its local
/// address, its remote address and its state, as that table writes them (hex).
fn tcp_table() -> Vec<(String, String, String)> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp (Linux)");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            Some((fields.get(1)?.to_string(), fields.get(2)?.to_string(), fields.get(3)?.to_string()))
        })
        .collect()
}

/// Every sentinel frozen (`SIGSTOP`) on first use, with a `connect_timeout` of 30 s, so that the
/// question to them hangs far longer than any call. Of 20 calls, two are cut by their caller at
/// 50 ms mid-question (a timer above the cache); the others are answered by their function
/// within their `op_timeout` (250 ms), the first five by time-out and the rest at once once
/// those five opened the breaker. The calls share one question: one connection to each
/// sentinel, where a question inside each call made seven (checked by hand). Once the sentinels
/// run again, caching resumes at the breaker's next probe (its 500 ms cool-down), not at the
/// question's 30 s timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sentinel_frozen_bounds_each_call_and_caching_resumes_when_they_answer() {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let set = SentinelSet::start();
    for i in 0..set.ports.len() {
        set.freeze_sentinel(i);
    }
    for &port in &set.ports {
        assert!(!answers(port, Duration::from_millis(200)).await, "sentinel :{port} answers while frozen");
    }
    let before: Vec<_> = set.ports.iter().map(|&port| connections_to(port)).collect();
    let op_timeout = Duration::from_millis(250);
    let rt = Runtime::new(
        CacheConfig::redis(&set.url())
            .unwrap()
            .with_op_timeout(op_timeout)
            .with_connect_timeout(Duration::from_secs(30)),
    );
    let (mut timed, mut cut) = (Vec::new(), 0);
    for n in 0..20u32 {
        let call = rt.scope(level(100 + n, &CALLS));
        if n % 4 == 1 {
            // Cut by its caller while it waits for the sentinels (once the breaker has opened,
            // after five time-outs, calls no longer wait, and none is cut).
            match tokio::time::timeout(Duration::from_millis(50), call).await {
                Ok(value) => assert_eq!(value, u64::from(100 + n) + 1, "each call gets its function's value"),
                Err(_) => cut += 1,
            }
            continue;
        }
        let started = Instant::now();
        assert_eq!(call.await, u64::from(100 + n) + 1, "each call gets its function's value");
        timed.push(started.elapsed());
    }
    let asked: Vec<usize> = set
        .ports
        .iter()
        .zip(&before)
        .map(|(&port, before)| connections_to(port).difference(before).count())
        .collect();
    let slowest = timed.iter().max().copied().unwrap_or_default();
    let waited = timed.iter().filter(|took| **took >= Duration::from_millis(50)).count();
    let bypassed = rt.stats().get(5, "sn").map_or(0, |stats| stats.bypassed);
    println!(
        "sentinel (every sentinel frozen): 20 calls, {cut} cut at 50 ms, {waited} waited (the slowest {slowest:?}), \
         {bypassed} skipped the cache at once; connections made to each sentinel: {asked:?}"
    );
    assert!(
        slowest < op_timeout + Duration::from_millis(200),
        "a call took {slowest:?}, past its op_timeout"
    );
    assert_eq!(cut, 2, "the calls cut at 50 ms while waiting for the sentinels");
    assert_eq!((waited, bypassed), (5, 13), "five calls timed out, then the breaker skipped the cache");
    assert!(
        asked.iter().all(|&n| n == 1),
        "the calls did not share one question to the sentinels: connections made {asked:?}"
    );

    for i in 0..set.ports.len() {
        set.thaw_sentinel(i);
    }
    let thawed = Instant::now();
    while !is_hit(&rt, 120, &CALLS).await {
        let _ = rt.flush().await;
        assert!(thawed.elapsed() < Duration::from_secs(10), "never cached after the sentinels ran again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resumed = thawed.elapsed();
    println!("sentinel (every sentinel frozen): cached {resumed:?} after the sentinels ran again");
    // The breaker's cool-down (500 ms) and a probe: twice as long fails.
    assert!(
        resumed < Duration::from_millis(1000),
        "caching resumed only {resumed:?} after the sentinels ran again"
    );
}

/// How many connections subscribed to something the sentinel on `port` lists now (Sentinel has no
/// `PUBSUB`: its clients list shows each connection's subscriptions), asked with `auth`
/// (`redis-cli` options: a password, a user) if it asks for them.
fn subscribers(port: u16, auth: &[&str]) -> usize {
    subscribed(&cli(port, &[auth, &["CLIENT", "LIST"]].concat()))
}

/// Connections subscribed to something, in a `CLIENT LIST` reply.
fn subscribed(client_list: &str) -> usize {
    client_list.lines().filter(|client| client.contains(" sub=1 ")).count()
}

/// The plain sentinels' subscribed connections.
fn plain(port: u16) -> usize {
    subscribers(port, &[])
}

/// Waits until the sentinel on `port` lists `want` subscribed connections, within `within`;
/// how long that took. `subscribers` counts them.
async fn until_subscribers(
    port: u16,
    want: usize,
    within: Duration,
    subscribers: impl Fn(u16) -> usize,
) -> Duration {
    let started = Instant::now();
    while subscribers(port) != want {
        assert!(
            started.elapsed() < within,
            "sentinel :{port} lists {} subscribed connections after {within:?}, not {want}",
            subscribers(port)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

/// The subscriptions to the sentinels' announcements go silent for good, as behind a middlebox
/// that forgot the flow (each sentinel reached through a proxy that strands them: their server
/// side is closed, their client side stays open and never answers or ends). Each subscription's
/// `PING` (every 10 s, unanswered within 1 s) finds it out, and the subscription is made again
/// (1 s later); then a failover (`SENTINEL FAILOVER`, the old primary alive) is followed by the
/// process, which only reads, as announced on the new subscriptions, while in the same run one
/// that does not listen keeps answering its copy from the demoted primary. Without the `PING`,
/// nothing ever ends such a subscription: no sentinel lists it again (checked by hand).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_gone_silent_is_made_again() {
    static SOURCE: AtomicU64 = AtomicU64::new(1);
    let set = SentinelSet::start();
    let proxies: Vec<FaultProxy> = set.ports.iter().map(|&port| FaultProxy::start(port)).collect();
    let hosts: Vec<String> = proxies.iter().map(|proxy| format!("127.0.0.1:{}", proxy.port())).collect();
    let url = format!("redis+sentinel://{}/{}", hosts.join(","), set.master);
    let rt = Runtime::new(CacheConfig::redis(&url).unwrap().with_op_timeout(Duration::from_millis(250)));
    let deaf = Runtime::new(
        CacheConfig::redis(&set.url())
            .unwrap()
            .with_op_timeout(Duration::from_millis(250))
            .with_sentinel_announcements(false),
    );
    for rt in [&rt, &deaf] {
        assert_eq!(until_near(rt, 9, &SOURCE, Duration::from_secs(5)).await, 1009);
    }
    for &port in &set.ports {
        until_subscribers(port, 1, Duration::from_secs(10), plain).await;
    }

    for proxy in &proxies {
        proxy.strand();
    }
    let stranded = Instant::now();
    // The sentinels see the subscriptions go; the runtime's side of them stays open and silent.
    for &port in &set.ports {
        until_subscribers(port, 0, Duration::from_secs(2), plain).await;
    }
    // A `PING` within 10 s, unanswered for 1 s, and the subscription made 1 s later.
    let mut again = Duration::ZERO;
    for &port in &set.ports {
        until_subscribers(port, 1, Duration::from_secs(16).saturating_sub(stranded.elapsed()), plain).await;
        again = again.max(stranded.elapsed());
    }
    println!("sentinel announcements: every subscription made again {again:?} after it went silent");

    let (old, new) = (set.primary.port(), set.replica.port());
    until_replicated(old, new).await;
    let started = Instant::now();
    demote_and_invalidate(&set, &deaf, 9, &SOURCE).await;
    let took = until_value(&rt, 9, &SOURCE, 2009).await;
    assert!(
        took < Duration::from_secs(2),
        "the process answered the new value {took:?} after the invalidation"
    );
    assert!(
        cli(old, &["ROLE"]).starts_with("master"),
        "the sentinels converted the old primary before the test could look"
    );
    println!(
        "sentinel announcements: after the subscriptions were made again, the process followed a failover {:?} after it began",
        started.elapsed()
    );
}

/// A runtime that could not reach the sentinels: `calls` of `level(n)` all ran the function, and
/// the stats count them as backend failures (errors or calls the open breaker skipped).
async fn never_cached(rt: &Runtime, n: u32, calls: &AtomicUsize) -> u64 {
    let before = calls.load(SeqCst);
    for _ in 0..3 {
        assert_eq!(rt.scope(level(n, calls)).await, u64::from(n) + 1);
    }
    assert_eq!(calls.load(SeqCst), before + 3, "a call was answered from the cache");
    let s = rt.stats().get(5, "sn").cloned().expect("level's stats");
    s.backend_errors + s.bypassed
}

/// Sentinels that ask for a password of their own (`requirepass`), in front of a primary that
/// asks for another: given both (`with_sentinel_credentials`, and the primary's in the URL), a
/// runtime finds the primary, caches, and subscribes to the sentinel's announcements. In the same
/// run, a runtime given only the primary's password, and one given a wrong sentinel password,
/// never cache: the sentinel refuses them, and each says so once in its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_that_ask_for_a_password_are_given_theirs() {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let primary = RedisServer::start_with_args(&["--requirepass", "primary-pw"]);
    let auth = format!("requirepass sentinel-pw\nsentinel auth-pass cache-{} primary-pw", primary.port());
    let sentinel = OneSentinel::configured(primary.port(), &auth, None);
    let url = format!("redis+sentinel://:primary-pw@127.0.0.1:{}/{}", sentinel.port, sentinel.master);
    // An `op_timeout` far above the question's few milliseconds: each refused call gets the
    // sentinel's refusal, not a time-out.
    let config = || CacheConfig::redis(&url).unwrap().with_op_timeout(Duration::from_secs(5));
    assert!(
        cli(sentinel.port, &["SENTINEL", "MASTERS"]).contains("NOAUTH"),
        "the sentinel answers without its password"
    );

    // Not given the sentinel's password, then given a wrong one: each refusal is logged once,
    // saying what to do.
    let mut failures = 0;
    for refused in [config(), config().with_sentinel_credentials(None, "wrong")] {
        let refused = Runtime::new(refused);
        let (logs, guard) = support::logs::Logs::capture();
        let counted = never_cached(&refused, 1, &CALLS).await;
        drop(guard);
        assert_eq!(counted, 3, "each refused call is counted as a backend failure");
        failures += counted;
        assert_eq!(
            logs.count("WARN", "REDIS_SENTINEL_PASSWORD"),
            1,
            "the refusal was not logged once, saying what to do: {}",
            logs.text()
        );
        // Shared by the calls that waited for one question, the error keeps its own text, and
        // is not taken for the primary's refusal.
        assert!(!logs.text().contains("redis: redis:"), "an error's prefix doubled: {}", logs.text());
        assert!(
            !logs.text().contains("REDIS_PASSWORD ("),
            "the primary's hint on a sentinel's refusal: {}",
            logs.text()
        );
    }

    let rt = Runtime::new(config().with_sentinel_credentials(None, "sentinel-pw"));
    rt.scope(level(2, &CALLS)).await;
    rt.flush().await.unwrap();
    assert!(is_hit(&rt, 2, &CALLS).await, "cached through the primary the sentinel named");
    let with_password = |port| subscribers(port, &["--no-auth-warning", "-a", "sentinel-pw"]);
    until_subscribers(sentinel.port, 1, Duration::from_secs(10), with_password).await;
    println!("sentinel password: cached with it; without it or with a wrong one, {failures} failures counted in 6 calls");
}

/// Sentinels and a primary that speak TLS only: configured from the environment
/// (`REDIS_SENTINEL_TLS`, `REDIS_TLS`, and the test's CA in `REDIS_CA_CERT`), a runtime finds the
/// primary, caches, and subscribes to the sentinel's announcements over TLS. In the same run, one
/// without `REDIS_SENTINEL_TLS` never caches: the sentinel does not answer plain TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_over_tls_are_reached_over_tls() {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let certs = Certificates::generate();
    let primary = TlsServer::start(&certs);
    let sentinel = OneSentinel::configured(primary.port, "", Some(&certs));
    let config = |sentinel_tls: &str| {
        let vars = std::collections::HashMap::from([
            ("REDIS_SENTINELS", format!("127.0.0.1:{}", sentinel.port)),
            ("REDIS_SENTINEL_MASTER", sentinel.master.clone()),
            ("REDIS_TLS", "true".to_owned()),
            ("REDIS_SENTINEL_TLS", sentinel_tls.to_owned()),
            ("REDIS_CA_CERT", certs.ca().to_str().unwrap().to_owned()),
        ]);
        CacheConfig::from_lookup(|name| vars.get(name).cloned())
            .unwrap()
            .with_op_timeout(Duration::from_secs(5))
    };
    let named =
        tls_cli(&certs.ca(), sentinel.port, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", &sentinel.master]);
    assert!(named.contains(&primary.port.to_string()), "the sentinel over TLS names the primary: {named}");

    let plain = Runtime::new(config("false"));
    let failures = never_cached(&plain, 1, &CALLS).await;
    assert_eq!(failures, 3, "each call counted as a backend failure with the sentinel asked over plain TCP");

    let rt = Runtime::new(config("true"));
    rt.scope(level(2, &CALLS)).await;
    rt.flush().await.unwrap();
    assert!(is_hit(&rt, 2, &CALLS).await, "cached through the primary the sentinel named, over TLS");
    let over_tls = |port| subscribed(&tls_cli(&certs.ca(), port, &["CLIENT", "LIST"]));
    until_subscribers(sentinel.port, 1, Duration::from_secs(10), over_tls).await;
    println!("sentinel TLS: cached over TLS; over plain TCP, {failures} failures counted in 3 calls");
}

/// Every sentinel frozen when an invalidation is checked again: the round of questions before
/// the check is waited for only as long as the recheck delay (500 ms; the `connect_timeout` is
/// 30 s), then the check runs on the primary in use. The invalidation is made to look lost there
/// (its entry put back, its stamp deleted, as a primary that failed before replicating it would
/// leave them): the check applies it again about two delays after it was acknowledged (the test
/// fails past 1.5 s), with no sentinel answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sentinel_frozen_at_a_recheck_leaves_it_to_run_on_the_primary_in_use() {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    const DELAY: Duration = Duration::from_millis(500);
    let primary = RedisServer::start();
    let sentinel = OneSentinel::watching(&primary);
    let config = CacheConfig::redis(&sentinel.url())
        .unwrap()
        .with_op_timeout(Duration::from_secs(1))
        .with_connect_timeout(Duration::from_secs(30))
        .with_invalidation_recheck(DELAY);
    let rt = Runtime::new(config);
    rt.scope(level(21, &CALLS)).await;
    rt.flush().await.unwrap();
    assert!(is_hit(&rt, 21, &CALLS).await, "cached on the primary");
    let key = KeyBuilder::new(module_path!(), "sn", "level").arg(&21u32).finish().unwrap();
    let mut conn = redis::Client::open(format!("redis://127.0.0.1:{}/5", primary.port()))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let dumped: Vec<u8> = redis::cmd("DUMP").arg(&key).query_async(&mut conn).await.unwrap();

    sentinel.freeze();
    rt.scope(invalidate!(level(21))).await;
    let acknowledged = Instant::now();
    let stamp = format!("{key}:inv");
    let had_stamp: bool = redis::cmd("EXISTS").arg(&stamp).query_async(&mut conn).await.unwrap();
    assert!(had_stamp, "the invalidation left its stamp on the primary");
    // What a primary that failed before replicating it would leave: the entry, and no stamp.
    let () = redis::pipe()
        .cmd("RESTORE")
        .arg(&key)
        .arg(300_000)
        .arg(dumped)
        .arg("REPLACE")
        .ignore()
        .cmd("DEL")
        .arg(&stamp)
        .ignore()
        .query_async(&mut conn)
        .await
        .unwrap();
    let exists = |conn: &mut redis::aio::MultiplexedConnection| {
        let mut conn = conn.clone();
        let key = key.clone();
        async move { redis::cmd("EXISTS").arg(&key).query_async::<bool>(&mut conn).await.unwrap() }
    };
    assert!(exists(&mut conn).await, "the entry was put back");
    while exists(&mut conn).await {
        assert!(
            acknowledged.elapsed() < Duration::from_millis(1500),
            "the recheck did not apply the invalidation again within 1.5 s, every sentinel frozen"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let applied = acknowledged.elapsed();
    assert!(applied >= DELAY, "removed {applied:?} after the invalidation, before its recheck was due");
    sentinel.thaw();
    println!(
        "sentinel frozen at a recheck (delay {DELAY:?}, connect_timeout 30 s): applied again {applied:?} after the invalidation"
    );
}

/// An answer older than the one taken is never taken: of three sentinels, each configured alone,
/// one names primary B at config epoch 5 and two name primary A at epoch 3. All answering, the
/// runtime takes B (the newest answer). With B's sentinel frozen and B forgotten (its connections
/// killed, a call failed on them), the majority that answers names A at the older epoch: the
/// runtime keeps B, which still says it is a primary, and writes there. In the same run, a
/// runtime that never saw epoch 5 takes A from the same sentinels: what the rule prevents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_older_than_the_one_taken_is_not_taken() {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let (a, b) = (RedisServer::start(), RedisServer::start());
    let master = format!("older-{}", a.port());
    let epoch = |n: u64| format!("sentinel current-epoch {n}\nsentinel config-epoch {master} {n}\n");
    let newest = OneSentinel::named(&master, b.port(), &epoch(5), None);
    let older = [
        OneSentinel::named(&master, a.port(), &epoch(3), None),
        OneSentinel::named(&master, a.port(), &epoch(3), None),
    ];
    for (sentinel, want) in [(&newest, "5"), (&older[0], "3"), (&older[1], "3")] {
        let fields = cli(sentinel.port, &["SENTINEL", "MASTER", &master]);
        let mut lines = fields.lines().map(str::trim);
        let said = lines.by_ref().skip_while(|line| *line != "config-epoch").nth(1);
        assert_eq!(said, Some(want), "sentinel :{} at config epoch {want}: {fields}", sentinel.port);
    }
    let ports = [&newest, &older[0], &older[1]].map(|s| format!("127.0.0.1:{}", s.port)).join(",");
    let vars = std::collections::HashMap::from([
        ("REDIS_SENTINELS", ports),
        ("REDIS_SENTINEL_MASTER", master.clone()),
    ]);
    let config = || {
        CacheConfig::from_lookup(|name| vars.get(name).cloned())
            .unwrap()
            .with_op_timeout(Duration::from_secs(3))
            .with_connect_timeout(Duration::from_secs(1))
    };
    let stored = |server: &RedisServer, n: u32| {
        let key = KeyBuilder::new(module_path!(), "sn", "level").arg(&n).finish().unwrap();
        !cli(server.port(), &["-n", "5", "GET", &key]).trim().is_empty()
    };

    let rt = Runtime::new(config());
    rt.scope(level(11, &CALLS)).await;
    rt.flush().await.unwrap();
    assert!(stored(&b, 11) && !stored(&a, 11), "all answering, the newest answer (B, epoch 5) is taken");

    newest.freeze();
    cli(b.port(), &["CLIENT", "KILL", "TYPE", "normal"]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = rt.stats().get(5, "sn").map_or(0, |s| s.backend_errors);
    // Its lookup finds the connection gone: B is forgotten, and asked for again.
    rt.scope(level(12, &CALLS)).await;
    let failed = rt.stats().get(5, "sn").map_or(0, |s| s.backend_errors) - before;
    assert_eq!(failed, 1, "the lookup on the killed connection failed");
    rt.scope(level(13, &CALLS)).await;
    rt.flush().await.unwrap();
    assert!(
        stored(&b, 13) && !stored(&a, 13),
        "the majority's older answer (A, epoch 3) was taken over B (epoch 5)"
    );

    let fresh = Runtime::new(config());
    fresh.scope(level(14, &CALLS)).await;
    fresh.flush().await.unwrap();
    assert!(
        stored(&a, 14) && !stored(&b, 14),
        "a runtime that never saw epoch 5 takes the majority's answer, A"
    );
    newest.thaw();
    println!("sentinel epochs: kept B (epoch 5) over the majority's A (epoch 3); a fresh runtime took A");
}

/// A runtime dropped ends its subscriptions to the sentinels' announcements: the sentinel lists
/// them until the drop and none within 2 s of it (a bound for a loaded machine). Without the
/// drop signal they would last until their next `PING` (every 10 s) found the store gone, or for
/// as long as anything else held it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_runtime_ends_its_subscriptions_to_the_sentinels() {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let primary = RedisServer::start();
    let sentinel = OneSentinel::watching(&primary);
    let rt = Runtime::new(CacheConfig::redis(&sentinel.url()).unwrap());
    rt.scope(level(5, &CALLS)).await;
    until_subscribers(sentinel.port, 1, Duration::from_secs(10), plain).await;
    // Still there a moment later: only the drop ends it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(plain(sentinel.port), 1, "the subscription lasts while the runtime lives");
    drop(rt);
    let ended = until_subscribers(sentinel.port, 0, Duration::from_secs(2), plain).await;
    println!("sentinel subscriptions: ended {ended:?} after the runtime was dropped");
}

/// Sentinels over TLS in front of a primary over plain TCP (`REDIS_SENTINEL_TLS` and the CA in
/// `REDIS_CA_CERT`, no `REDIS_TLS`): the CA is for the TLS connections only, so the primary is
/// reached over plain TCP and the runtime caches, and subscribes to the sentinel over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_for_tls_sentinels_leaves_a_plain_primary_plain() {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let certs = Certificates::generate();
    let primary = RedisServer::start();
    // The sentinel itself reaches the primary over plain TCP too.
    let sentinel = OneSentinel::configured(primary.port(), "tls-replication no", Some(&certs));
    let vars = std::collections::HashMap::from([
        ("REDIS_SENTINELS", format!("127.0.0.1:{}", sentinel.port)),
        ("REDIS_SENTINEL_MASTER", sentinel.master.clone()),
        ("REDIS_SENTINEL_TLS", "true".to_owned()),
        ("REDIS_CA_CERT", certs.ca().to_str().unwrap().to_owned()),
    ]);
    let config = CacheConfig::from_lookup(|name| vars.get(name).cloned())
        .unwrap()
        .with_op_timeout(Duration::from_secs(5));
    let rt = Runtime::new(config);
    rt.scope(level(3, &CALLS)).await;
    rt.flush().await.unwrap();
    assert!(is_hit(&rt, 3, &CALLS).await, "cached on the plain primary the TLS sentinel named");
    let key = KeyBuilder::new(module_path!(), "sn", "level").arg(&3u32).finish().unwrap();
    assert!(
        !cli(primary.port(), &["-n", "5", "GET", &key]).trim().is_empty(),
        "the entry is on the plain primary"
    );
    let over_tls = |port| subscribed(&tls_cli(&certs.ca(), port, &["CLIENT", "LIST"]));
    until_subscribers(sentinel.port, 1, Duration::from_secs(10), over_tls).await;
    let s = rt.stats().get(5, "sn").cloned().expect("level's stats");
    assert_eq!(s.backend_errors + s.bypassed, 0, "no call failed");
}

/// A `connect_timeout` of `Duration::MAX` (bounded to a day by the configuration) behind a
/// frozen sentinel: the question to it waits, but each call still ends within its `op_timeout`
/// (300 ms; the test fails above 450 ms), running its function; once the sentinel is thawed, the
/// question it was sent is answered and calls hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_timeout_of_duration_max_behind_a_frozen_sentinel_bounds_no_call_beyond_op_timeout() {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    const OP_TIMEOUT: Duration = Duration::from_millis(300);
    let primary = RedisServer::start();
    let sentinel = OneSentinel::watching(&primary);
    sentinel.freeze();
    let config = CacheConfig::redis(&sentinel.url())
        .unwrap()
        .with_connect_timeout(Duration::MAX)
        .with_op_timeout(OP_TIMEOUT);
    let rt = Runtime::new(config);
    let mut slowest = Duration::ZERO;
    for _ in 0..5 {
        let before = CALLS.load(SeqCst);
        let started = Instant::now();
        assert_eq!(rt.scope(level(4, &CALLS)).await, 5);
        slowest = slowest.max(started.elapsed());
        assert_eq!(CALLS.load(SeqCst), before + 1, "the function ran while the sentinel is frozen");
    }
    assert!(
        slowest < OP_TIMEOUT * 3 / 2,
        "a call waited {slowest:?} for a question bounded by a day, against an op_timeout of {OP_TIMEOUT:?}"
    );
    sentinel.thaw();
    let thawed = Instant::now();
    let mut cached = false;
    while !cached && thawed.elapsed() < Duration::from_secs(10) {
        rt.scope(level(4, &CALLS)).await;
        let _ = rt.flush().await;
        cached = is_hit(&rt, 4, &CALLS).await;
        if !cached {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert!(cached, "never cached within 10 s of the thaw");
    println!(
        "connect_timeout Duration::MAX, sentinel frozen: slowest of 5 calls {slowest:?} (op_timeout {OP_TIMEOUT:?}); cached {:?} after the thaw",
        thawed.elapsed()
    );
}

/// The established connections to loopback `port` (IPv4), seen from the client's side (only the
/// test's runtime connects to its sentinel's port): a connection its client closes leaves that
/// state at once, even to a frozen server (the kernel acknowledges the close).
fn connected_to(port: u16) -> usize {
    let remote = format!("0100007F:{port:04X}");
    tcp_table().iter().filter(|(_, to, state)| *to == remote && state == "01").count()
}

/// A runtime dropped while its question to the sentinels hangs (the sentinel frozen, a
/// `connect_timeout` of 30 s) ends the question at once: its connection to the sentinel is
/// closed within 5 s of the drop (a bound for a loaded machine; 3-38 ms here). In the same run,
/// while the runtime lives, the question holds that connection 1.5 s after the call that asked
/// it returned: only the drop ends it sooner than its `connect_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_runtime_ends_its_question_to_the_sentinels() {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let primary = RedisServer::start();
    let sentinel = OneSentinel::watching(&primary);
    sentinel.freeze();
    let config = CacheConfig::redis(&sentinel.url())
        .unwrap()
        .with_connect_timeout(Duration::from_secs(30))
        .with_op_timeout(Duration::from_millis(100));
    let rt = Runtime::new(config);
    assert_eq!(rt.scope(level(1, &CALLS)).await, 2);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(connected_to(sentinel.port), 1, "the question's connection to the frozen sentinel");
    let dropped = Instant::now();
    drop(rt);
    while connected_to(sentinel.port) != 0 {
        assert!(
            dropped.elapsed() < Duration::from_secs(5),
            "the question still holds its connection to the sentinel {:?} after its runtime was dropped",
            dropped.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "sentinel question: its connection closed {:?} after its runtime was dropped",
        dropped.elapsed()
    );
}

/// The fallback (the `redis` crate's `SentinelClient`, asked when fewer than a majority of the
/// sentinels answer the question to all of them) gives the sentinels their password too: of
/// three sentinels that ask for one, two frozen, the one listed first answers the fallback, and
/// the runtime caches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fallback_gives_the_sentinels_their_password() {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let primary = RedisServer::start();
    let sentinels: Vec<OneSentinel> =
        (0..3).map(|_| OneSentinel::configured(primary.port(), "requirepass sentinel-pw", None)).collect();
    for frozen in &sentinels[1..] {
        frozen.freeze();
        assert!(
            !answers(frozen.port, Duration::from_millis(200)).await,
            "sentinel :{} answers while frozen",
            frozen.port
        );
    }
    let hosts: Vec<String> = sentinels.iter().map(|s| format!("127.0.0.1:{}", s.port)).collect();
    let url = format!("redis+sentinel://{}/{}", hosts.join(","), sentinels[0].master);
    // The question to all of them waits `connect_timeout` (2 s) for the frozen two before the
    // fallback is asked; the call waits for both.
    let config = CacheConfig::redis(&url)
        .unwrap()
        .with_sentinel_credentials(None, "sentinel-pw")
        .with_connect_timeout(Duration::from_secs(2))
        .with_op_timeout(Duration::from_secs(10));
    let rt = Runtime::new(config);
    let started = Instant::now();
    rt.scope(level(3, &CALLS)).await;
    let first = started.elapsed();
    rt.flush().await.unwrap();
    assert!(is_hit(&rt, 3, &CALLS).await, "cached through the primary the fallback found");
    println!("sentinel fallback with a password: the first call took {first:?} (the question's 2 s, then the fallback)");
}

/// A sentinel whose clients sign in as an ACL user of its own (the `default` user off) is given
/// that user's name with its password (`with_sentinel_credentials(Some(..), ..)`): the runtime
/// caches and subscribes to the announcements; in the same run, given the password alone (no
/// user: `default`), it never caches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_acl_user_is_given_its_name() {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let primary = RedisServer::start();
    let acl = "user default off\nuser watcher on >watcher-pw ~* &* +@all";
    let sentinel = OneSentinel::configured(primary.port(), acl, None);
    let config = || CacheConfig::redis(&sentinel.url()).unwrap().with_op_timeout(Duration::from_secs(5));

    let nameless = Runtime::new(config().with_sentinel_credentials(None, "watcher-pw"));
    assert_eq!(never_cached(&nameless, 1, &CALLS).await, 3, "each call counted as a backend failure");

    let rt = Runtime::new(config().with_sentinel_credentials(Some("watcher"), "watcher-pw"));
    rt.scope(level(4, &CALLS)).await;
    rt.flush().await.unwrap();
    assert!(is_hit(&rt, 4, &CALLS).await, "cached through the primary the sentinel named to its ACL user");
    // The subscription signs in as the user too (as the question does; the fallback alone would
    // have found the primary).
    let as_user =
        |port| subscribers(port, &["--no-auth-warning", "--user", "watcher", "--pass", "watcher-pw"]);
    until_subscribers(sentinel.port, 1, Duration::from_secs(10), as_user).await;
}

/// Writes still queued when the runtime is dropped are written, behind Sentinel too, even when
/// the primary must be asked for first: the question the batcher's write starts after the drop
/// is not ended by it (the store's connections, still writing, keep its tasks going). With the
/// sentinel frozen, the primary is forgotten (its connections killed, a call then failing), a
/// handle's `set_behind` waits behind a 2 s batching delay, the runtime is dropped, and the
/// sentinel thawed 500 ms later: the write reaches the primary. (A fill's queued write keeps its
/// runtime alive until answered, through its lease: a handle's write does not.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_queued_when_the_runtime_is_dropped_reach_a_primary_asked_for_after() {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let primary = RedisServer::start();
    let sentinel = OneSentinel::watching(&primary);
    let written = || cli(primary.port(), &["-n", "5", "KEYS", "sn_behind:*"]).lines().count();
    let config = CacheConfig::redis(&sentinel.url())
        .unwrap()
        .with_op_timeout(Duration::from_secs(3))
        .with_connect_timeout(Duration::from_secs(2))
        .with_batching(64, Duration::from_secs(2), 1000);
    let rt = Runtime::new(config);
    let handle: cache_runtime::Cache<MarketData, u64> =
        cache_runtime::Cache::new("sn_behind", Duration::from_secs(300)).unwrap().with_runtime(rt.clone());
    handle.set("first", &1).await.unwrap();
    assert_eq!(written(), 1);
    handle.set_behind("queued", &2).await.unwrap();
    sentinel.freeze();
    cli(primary.port(), &["CLIENT", "KILL", "TYPE", "normal"]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Its lookup finds the connection gone: the primary is forgotten.
    rt.scope(level(3, &CALLS)).await;
    assert_eq!(
        rt.stats().get(5, "sn").map(|s| s.backend_errors),
        Some(1),
        "the lookup on the killed connection failed"
    );
    assert_eq!(written(), 1, "the queued write was made before the runtime was dropped");
    drop((handle, rt));
    tokio::time::sleep(Duration::from_millis(500)).await;
    sentinel.thaw();
    let thawed = Instant::now();
    while written() != 2 {
        assert!(
            thawed.elapsed() < Duration::from_secs(5),
            "the write queued when the runtime was dropped never reached the primary"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "sentinel: a write queued at the drop reached the primary {:?} after the sentinel answered again",
        thawed.elapsed()
    );
}
