//! The disk backend shared by several real processes of one service: this binary runs each test
//! by starting copies of itself as workers (`DISK_WORKER=<role>`) against one directory, with
//! `CACHE_BACKEND=disk` and `CACHE_DIR` as a service would, and reads what they report.
//!
//! - stampede: 4 processes × 8 callers of one slow key run its function once in all (single
//!   flight in each process, the fill lease across them); the same workload on the in-process
//!   backend runs it once per process, in the same run: the race the lease prevents.
//! - stale set: a fill computed before a write in another process, landing after that process's
//!   invalidation, is refused; with a plain delete in its place, the stale value stays: the race.
//! - a process killed (SIGKILL) while it holds a key's lease: another one computes the key after
//!   the lease's life, not never.
//! - function-wide invalidation from another process.
//! - restart: a new process reads what an exited one filled.
//! - a corrupt, a truncated and a partly overwritten file: moved aside and rebuilt, no panic, the
//!   function runs, the next call is cached again.
//! - a full disk (the kernel's file-size limit, `ulimit -f`, refusing writes as a full disk
//!   does): every call answers with its function's value, the failed writes are counted, the
//!   entries written before are still read.
//!
//! `harness = false` (Cargo.toml): workers are this binary's `main` too, not tests of their own.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cache_runtime::db::MarketData;
use cache_runtime::{cached, invalidate, Cache, CacheConfig, Runtime};

static RUNS: AtomicUsize = AtomicUsize::new(0);

/// Sleeps long enough for every process to pile onto the key.
#[cached(db = MarketData, prefix = "disk", ttl = 300)]
async fn slow_value(id: u32) -> u64 {
    RUNS.fetch_add(1, SeqCst);
    tokio::time::sleep(Duration::from_millis(400)).await;
    u64::from(id) * 1000 + u64::from(std::process::id() % 1000)
}

/// Reads the "database" (a file), then takes its time, as a slow query does.
#[cached(db = MarketData, prefix = "disk", ttl = 300)]
async fn price(dir: &str) -> String {
    RUNS.fetch_add(1, SeqCst);
    let read = std::fs::read_to_string(Path::new(dir).join("db.txt")).unwrap_or_default();
    std::fs::write(Path::new(dir).join("read.flag"), "1").unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    read
}

/// The first process to run it never finishes (it is killed while it holds the lease).
#[cached(db = MarketData, prefix = "disk", ttl = 300)]
async fn held(id: u32) -> String {
    RUNS.fetch_add(1, SeqCst);
    if std::env::var("HANG").is_ok() {
        println!("HOLDING");
        tokio::time::sleep(Duration::from_secs(600)).await;
    }
    format!("held {id}")
}

#[cached(db = MarketData, prefix = "disk", ttl = 300)]
async fn blob(id: u32) -> String {
    RUNS.fetch_add(1, SeqCst);
    format!("{id}:").repeat(2000)
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

// ---------------------------------------------------------------- workers

fn worker(role: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    // What the cache logs (at `RUST_LOG`, `warn`), on stderr, which the parent reads.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    rt.block_on(async {
        let runtime = Runtime::new(CacheConfig::from_env().expect("the test's environment"));
        let dir = std::env::var("CACHE_DIR").unwrap_or_default();
        let report = runtime.scope(run_role(role, &dir)).await;
        runtime.flush().await.expect("nothing left unwritten");
        let stats = runtime.stats();
        let errors: u64 = stats.entries.iter().map(|p| p.backend_errors).sum();
        println!("REPORT runs={} errors={errors} {report}", RUNS.load(SeqCst));
    });
}

async fn run_role(role: &str, dir: &str) -> String {
    match role {
        "stampede" => {
            let start: u64 = std::env::var("START_AT").unwrap().parse().unwrap();
            tokio::time::sleep(Duration::from_millis(start.saturating_sub(now_ms()))).await;
            let started = now_ms();
            let calls = (0..8).map(|_| {
                let runtime = Runtime::current();
                tokio::spawn(async move { runtime.scope(slow_value(7)).await })
            });
            let values: Vec<u64> = futures_join(calls).await;
            assert!(values.windows(2).all(|w| w[0] == w[1]), "one value per process: {values:?}");
            format!("value={} started={started} returned={}", values[0], now_ms())
        }
        "read" => {
            // The racing reader starts once the writer is ready to write: a writer still starting
            // (a loaded machine) would otherwise write after the reader's fill, and no race runs.
            if let Ok(ready) = std::env::var("WAIT_FOR") {
                while !Path::new(dir).join(&ready).exists() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            format!("value={}", price(dir).await)
        }
        "invalidate" | "delete" => {
            // The store opened and used once, so that what follows the reader's read is only
            // the write; then wait until the reader has read the old row, write and drop the entry.
            let handle = Cache::<MarketData, String>::new("disk", Duration::from_secs(60)).unwrap();
            let _ = handle.get("warm-up").await;
            std::fs::write(Path::new(dir).join("writer.ready"), "1").unwrap();
            let flag = Path::new(dir).join("read.flag");
            while !flag.exists() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            std::fs::write(Path::new(dir).join("db.txt"), "new").unwrap();
            if role == "invalidate" {
                invalidate!(price(dir)).await;
            } else {
                // What a cache without stamps does: delete the key.
                let key = cache_runtime::KeyBuilder::new("disk", "disk", "price").arg(dir).finish().unwrap();
                handle.delete(key.strip_prefix("disk:").unwrap()).await.unwrap();
            }
            "written".to_owned()
        }
        "held" => format!("value={}", held(1).await.replace(' ', "_")),
        "invalidate_all" => {
            invalidate!(blob(..)).await;
            "invalidated".to_owned()
        }
        "blobs" => {
            let n: u32 = std::env::var("BLOBS").unwrap().parse().unwrap();
            let mut wrong = 0;
            for id in 0..n {
                if blob(id).await != format!("{id}:").repeat(2000) {
                    wrong += 1;
                }
            }
            format!("wrong={wrong}")
        }
        other => panic!("unknown role {other}"),
    }
}

async fn futures_join<T: Send + 'static>(
    handles: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<T> {
    let mut out = Vec::new();
    for h in handles.collect::<Vec<_>>() {
        out.push(h.await.unwrap());
    }
    out
}

// ---------------------------------------------------------------- the parent's side

struct Report {
    runs: u64,
    errors: u64,
    rest: String,
    /// What the worker logged (stderr).
    log: String,
}

impl Report {
    fn field(&self, name: &str) -> String {
        self.rest
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")).map(str::to_owned))
            .unwrap_or_else(|| panic!("no {name} in {}", self.rest))
    }
}

fn worker_command(role: &str, dir: &Path, backend: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.env("DISK_WORKER", role)
        .env("CACHE_BACKEND", backend)
        .env("CACHE_DIR", dir)
        .env("RUST_LOG", "warn")
        .env_remove("REDIS_URL")
        .env_remove("REDIS_HOST")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn wait_report(child: std::process::Child) -> Report {
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "worker failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.lines().find_map(|l| l.strip_prefix("REPORT ")).expect("a report");
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    let mut report = Report { runs: 0, errors: 0, rest: String::new(), log };
    for kv in line.split_whitespace() {
        match kv.split_once('=') {
            Some(("runs", v)) => report.runs = v.parse().unwrap(),
            Some(("errors", v)) => report.errors = v.parse().unwrap(),
            _ => {
                report.rest.push_str(kv);
                report.rest.push(' ');
            }
        }
    }
    report
}

fn run(role: &str, dir: &Path, envs: &[(&str, String)]) -> Report {
    let mut cmd = worker_command(role, dir, "disk");
    cmd.envs(envs.iter().map(|(k, v)| (k, v)));
    wait_report(cmd.spawn().unwrap())
}

fn stampede_across_processes() {
    for (backend, expected) in [("disk", 1), ("memory", 4)] {
        let dir = tempfile::tempdir().unwrap();
        let start = (now_ms() + 1500).to_string();
        let children: Vec<_> = (0..4)
            .map(|_| worker_command("stampede", dir.path(), backend).env("START_AT", &start).spawn().unwrap())
            .collect();
        let reports: Vec<Report> = children.into_iter().map(wait_report).collect();
        let runs: u64 = reports.iter().map(|r| r.runs).sum();
        let values: Vec<String> = reports.iter().map(|r| r.field("value")).collect();
        println!("  {backend}: 4 processes x 8 callers ran the function {runs} time(s); values {values:?}");
        // They overlapped: every process had called before any got its answer (so a process
        // that came late and found the value does not pass for one that waited on the lease).
        let last_start = reports.iter().map(|r| r.field("started").parse::<u64>().unwrap()).max().unwrap();
        let first_answer = reports.iter().map(|r| r.field("returned").parse::<u64>().unwrap()).min().unwrap();
        assert!(
            last_start < first_answer,
            "{backend}: the processes did not overlap; run again on a quieter machine"
        );
        assert_eq!(runs, expected, "{backend}");
        if backend == "disk" {
            assert!(
                values.windows(2).all(|w| w[0] == w[1]),
                "every process got the one filled value: {values:?}"
            );
            assert_eq!(reports.iter().map(|r| r.errors).sum::<u64>(), 0);
        }
    }
}

fn stale_set_across_processes() {
    for round in 0..3 {
        for (writer, expect_fresh) in [("invalidate", true), ("delete", false)] {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("db.txt"), "old").unwrap();
            let reader =
                worker_command("read", dir.path(), "disk").env("WAIT_FOR", "writer.ready").spawn().unwrap();
            let writer_proc = worker_command(writer, dir.path(), "disk").spawn().unwrap();
            let read = wait_report(reader);
            wait_report(writer_proc);
            assert_eq!(read.field("value"), "old", "the reader computed from the row before the write");
            let after = run("read", dir.path(), &[]);
            println!(
                "  round {round}, writer {writer}: a third process then reads {:?} (ran its function {} time(s))",
                after.field("value"),
                after.runs
            );
            if expect_fresh {
                assert_eq!(after.field("value"), "new", "the late fill was refused");
                assert_eq!(after.runs, 1);
            } else {
                assert_eq!(after.field("value"), "old", "without the stamp, the stale fill stays: the race");
                assert_eq!(after.runs, 0);
            }
        }
    }
}

fn function_wide_invalidation_restart_and_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = [("BLOBS", "20".to_owned())];
    let first = run("blobs", dir.path(), &blobs);
    assert_eq!((first.runs, first.field("wrong").as_str()), (20, "0"));
    // Restart: a new process reads what the last one filled.
    let second = run("blobs", dir.path(), &blobs);
    assert_eq!(second.runs, 0, "a restarted process finds the entries");
    // Function-wide, from another process.
    run("invalidate_all", dir.path(), &[]);
    let third = run("blobs", dir.path(), &blobs);
    assert_eq!(third.runs, 20, "every entry of blob(..) was dropped");
    println!("  restart: 0 runs of 20; after blob(..) from another process: {} runs", third.runs);

    let file = dir.path().join("cache.sqlite3");
    type Damage = fn(&Path);
    let damages: [(&str, Damage); 3] = [
        ("header overwritten", |f| overwrite(f, 0, 100)),
        ("truncated", |f| std::fs::OpenOptions::new().write(true).open(f).unwrap().set_len(3000).unwrap()),
        ("pages overwritten", |f| {
            let len = std::fs::metadata(f).unwrap().len();
            overwrite(f, 4096, (len - 4096) as usize)
        }),
    ];
    for (what, damage) in damages {
        run("blobs", dir.path(), &blobs);
        damage(&file);
        let asides_before = corrupt_copies(dir.path());
        let after = run("blobs", dir.path(), &blobs);
        assert_eq!(after.field("wrong"), "0", "{what}: every call answered right");
        let again = run("blobs", dir.path(), &blobs);
        println!(
            "  {what}: next process ran {} of 20 ({} backend errors, counted), the one after {} (rebuilt)",
            after.runs, after.errors, again.runs
        );
        assert!(after.runs > 0, "{what}: the damaged entries were not served");
        // Only the calls that met the damage (counted as backend errors) ran uncached; every
        // other value was filled into the new file and is read again.
        assert!(
            again.runs <= after.errors,
            "{what}: the rebuilt file caches again ({} runs, {} errors)",
            again.runs,
            after.errors
        );
        assert!(again.runs < 20, "{what}: the rebuilt file caches again");
        assert_eq!(corrupt_copies(dir.path()), asides_before + 1, "{what}: the damaged file was moved aside");
    }
}

/// A process killed (SIGKILL) while it computes a key, holding the key's lease: another process
/// waits at most the lease's life (5 s by default) and computes it; the file is intact.
fn killed_lease_holder() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let mut holder = worker_command("held", dir.path(), "disk").env("HANG", "1").spawn().unwrap();
    let mut lines = BufReader::new(holder.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "HOLDING", "the holder computes");
    holder.kill().unwrap();
    holder.wait().unwrap();
    let started = Instant::now();
    let other = run("held", dir.path(), &[]);
    let waited = started.elapsed();
    println!("  a process killed holding the lease: the next one computed after {waited:.2?}");
    assert_eq!((other.field("value").as_str(), other.runs, other.errors), ("held_1", 1, 0));
    assert!(
        waited < Duration::from_secs(9),
        "bounded by the lease's life (5 s), not the holder ({waited:?})"
    );
    assert!(
        waited > Duration::from_secs(2),
        "it did wait for the lease the killed process held ({waited:?})"
    );
    let again = run("held", dir.path(), &[]);
    assert_eq!(again.runs, 0, "its fill was stored");
}

fn overwrite(file: &Path, at: u64, len: usize) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&vec![0xA5; len]).unwrap();
}

fn corrupt_copies(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().contains(".corrupt-"))
        .count()
}

fn full_disk() {
    let dir = tempfile::tempdir().unwrap();
    // 2,000 blocks: 1 MB under dash's 512-byte blocks. SIGXFSZ ignored, so a write past the
    // limit fails with EFBIG, as one on a full disk fails with ENOSPC.
    let script =
        format!("ulimit -f 2000 && trap '' XFSZ && exec {}", shell_quote(&std::env::current_exe().unwrap()));
    let worker = worker_command("blobs", dir.path(), "disk");
    let mut sh = Command::new("sh");
    sh.arg("-c").arg(&script);
    for (k, v) in worker.get_envs() {
        match v {
            Some(v) => sh.env(k, v),
            None => sh.env_remove(k),
        };
    }
    sh.env("BLOBS", "400").stdout(Stdio::piped()).stderr(Stdio::piped());
    let started = Instant::now();
    let report = wait_report(sh.spawn().unwrap());
    let took = started.elapsed();
    let warned =
        report.log.lines().filter(|l| l.contains("WARN") && l.contains("cache backend failing")).count();
    println!(
        "  full: 400 calls of 8 KB values under a 1 MB file limit: {} wrong, {} backend errors counted, {warned} warning in {took:.1?}",
        report.field("wrong"),
        report.errors
    );
    assert_eq!(report.field("wrong"), "0", "every call answered with its function's value");
    assert!(report.errors > 0, "the refused writes were counted");
    // Logged when the writes start failing, then at most once per 10 s while reads succeed in
    // between: not once per failed write.
    let most = 1 + took.as_secs() as usize / 10;
    assert!(
        (1..=most).contains(&warned),
        "{warned} warnings of the failing file in {took:?} (1 to {most} expected):\n{}",
        report.log
    );
    // The entries written before the disk filled are still read.
    let later = run("blobs", dir.path(), &[("BLOBS", "5".to_owned())]);
    assert_eq!(later.runs, 0, "the first entries were kept and are read");
}

fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', "'\\''"))
}

const TESTS: [(&str, fn()); 5] = [
    ("stampede_across_processes", stampede_across_processes),
    ("killed_lease_holder", killed_lease_holder),
    ("stale_set_across_processes", stale_set_across_processes),
    ("function_wide_invalidation_restart_and_corruption", function_wide_invalidation_restart_and_corruption),
    ("full_disk", full_disk),
];

fn main() {
    if let Ok(role) = std::env::var("DISK_WORKER") {
        worker(&role);
        return;
    }
    // `--list` (cargo-nextest asks): the tests, one per line.
    if std::env::args().any(|a| a == "--list") {
        for name in TESTS.iter().map(|(name, _)| name) {
            println!("{name}: test");
        }
        return;
    }
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    for (name, test) in TESTS {
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        let started = Instant::now();
        println!("test {name} ...");
        test();
        println!("test {name} ... ok ({:.1?})", started.elapsed());
    }
}
