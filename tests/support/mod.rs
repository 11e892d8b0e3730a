//! Test support: a real `redis-server` per test, and a fixture that runs one behaviour test
//! against each backend.
#![allow(dead_code)] // each test binary uses part of it

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cache_runtime::db::CacheDb;
use cache_runtime::{Cache, CacheConfig, Runtime};

pub mod cluster;
pub mod http;
pub mod load;
pub mod logs;
pub mod near;
pub mod proxy;
pub mod sentinel;
pub mod tls;

pub use self::cluster::RedisCluster;

pub const INSTALL_HINT: &str = "redis-server was not found on PATH. The Redis tests need a real server: \
install it (Debian/Ubuntu: `apt-get install redis-server`, macOS: `brew install redis`) and run the tests again.";

/// A `redis-server` on a free loopback port with a temporary directory and no persistence. It is
/// stopped when dropped.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    persistent: bool,
    extra: Vec<String>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(false)
    }

    /// A server that writes every command to an append-only file in its temp dir before
    /// answering, so that a killed server restarts with its data (for tests that restart it).
    pub fn start_persistent() -> RedisServer {
        Self::start_with(true)
    }

    /// A server started with extra arguments (`--requirepass`, ...).
    pub fn start_with_args(extra: &[&str]) -> RedisServer {
        Self::start_full(false, extra.iter().map(|s| s.to_string()).collect())
    }

    fn start_with(persistent: bool) -> RedisServer {
        Self::start_full(persistent, Vec::new())
    }

    fn start_full(persistent: bool, extra: Vec<String>) -> RedisServer {
        let dir = tempfile::tempdir().expect("temp dir for redis-server");
        let mut last_error = String::new();
        // A free port can be taken by someone else between our probe and the server's bind: retry.
        for _ in 0..5 {
            let port = free_port();
            match spawn(port, dir.path(), persistent, &extra) {
                Ok(child) => {
                    return RedisServer { child: Some(child), port, dir, persistent, extra };
                }
                Err(e) => last_error = e,
            }
        }
        panic!("could not start redis-server: {last_error}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server is running").id()
    }

    /// Kills the server (connections are refused from now on).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (empty, unless it is persistent).
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match spawn(self.port, self.dir.path(), self.persistent, &self.extra) {
                Ok(child) => {
                    self.child = Some(child);
                    return;
                }
                Err(e) if Instant::now() > deadline => {
                    panic!("could not restart redis-server: {e}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Whether the server's files (its append-only file, for a persistent server) hold `needle`.
    pub fn data_contains(&self, needle: &str) -> bool {
        fn walk(dir: &Path, needle: &[u8]) -> bool {
            std::fs::read_dir(dir).into_iter().flatten().flatten().any(|entry| {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, needle)
                } else {
                    std::fs::read(&path).is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
                }
            })
        }
        walk(self.dir.path(), needle.as_bytes())
    }

    /// Freezes the server (SIGSTOP): it accepts connections but never answers, like a hung host.
    pub fn freeze(&self) {
        signal(self.pid(), "-STOP");
    }

    pub fn thaw(&self) {
        signal(self.pid(), "-CONT");
    }

    /// `CLIENT PAUSE ms WRITE` from a raw client: writes (and scripts) wait, reads are answered,
    /// as during a failover.
    pub async fn pause_writes(&self, ms: u64) {
        ::redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(ms)
            .arg("WRITE")
            .query_async::<()>(&mut self.raw(0).await)
            .await
            .unwrap();
    }

    /// A plain client on `db`, bypassing the toolkit.
    pub async fn raw(&self, db: u8) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(format!("{}/{db}", self.url())).expect("client");
        client.get_multiplexed_async_connection().await.expect("raw connection")
    }

    /// How many times the server ran `command` (lower case) since it started or since `CONFIG
    /// RESETSTAT`: `calls` of `cmdstat_{command}` in its `INFO commandstats`.
    #[allow(dead_code)] // not every test binary counts commands
    pub async fn calls_of(&self, command: &str) -> u64 {
        let info: String =
            redis::cmd("INFO").arg("commandstats").query_async(&mut self.raw(0).await).await.unwrap();
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .map(|rest| rest.split(',').next().unwrap().parse().unwrap())
            .unwrap_or(0)
    }

    /// `CONFIG RESETSTAT`: the command counts start again from zero.
    #[allow(dead_code)]
    pub async fn reset_stats(&self) {
        redis::cmd("CONFIG").arg("RESETSTAT").query_async::<()>(&mut self.raw(0).await).await.unwrap();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            signal(child.id(), "-CONT");
        }
        self.stop();
    }
}

pub fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill").args([sig, &pid.to_string()]).status().expect("kill(1)");
    assert!(status.success(), "kill {sig} {pid} failed");
}

pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

/// `redis-server` on loopback, without snapshots, working in `dir`, quiet, with `args`. A
/// missing binary is a panic with the install hint.
pub fn spawn_server(dir: &Path, args: &[String]) -> std::io::Result<Child> {
    Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--save", ""])
        .args(args)
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .inspect_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                panic!("{INSTALL_HINT}");
            }
        })
}

fn spawn(port: u16, dir: &Path, persistent: bool, extra: &[String]) -> Result<Child, String> {
    let aof: &[&str] = if persistent {
        &["--appendonly", "yes", "--appendfsync", "always"]
    } else {
        &["--appendonly", "no"]
    };
    let mut args: Vec<String> = vec!["--port".into(), port.to_string()];
    args.extend(aof.iter().map(|s| s.to_string()));
    args.extend_from_slice(extra);
    let child = spawn_server(dir, &args).map_err(|e| format!("spawn redis-server: {e}"))?;
    answering("redis-server", port, child)
}

/// `child` (a `program` started on `port`) once it answers there as itself, within 10 s; an
/// error if it exits first (the port may be taken) or another process answers there.
pub fn answering(program: &str, port: u16, child: Child) -> Result<Child, String> {
    // A server with a password answers PING with NOAUTH: it is up all the same.
    up(program, port, child, "answer PING", ping)
}

/// `child` once `probe(port)` says it is up (`what` it must do, for the error), within 10 s,
/// and as long as what answers there is not another process (`ours`).
pub fn up(
    program: &str,
    port: u16,
    mut child: Child,
    what: &str,
    probe: impl Fn(u16) -> bool,
) -> Result<Child, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("{program} exited at start ({status}); port {port} may be taken"));
        }
        if probe(port) {
            return ours(port, child);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    Err(format!("{program} on port {port} did not {what} within 10 s"))
}

/// `child` if it is what answers on `port`: the port may have been taken by another test's
/// server between our probe and its bind (it then answers PING before `child` fails to bind and
/// exits). A server that asks for a password is taken as ours.
fn ours(port: u16, mut child: Child) -> Result<Child, String> {
    match process_id(port) {
        Some(pid) if pid != child.id() => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!("port {port} answers as process {pid}, another test's"))
        }
        _ => Ok(child),
    }
}

/// The process id of what answers on `port` (`INFO server`'s `process_id`), if it answers
/// without a password.
pub fn process_id(port: u16) -> Option<u32> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    stream.write_all(b"INFO server\r\n").ok()?;
    let mut reply = Vec::new();
    let mut chunk = [0u8; 4096];
    while reply.len() < 64 * 1024 {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&reply);
        if let Some(rest) = text.split("process_id:").nth(1) {
            if let Some((pid, _)) = rest.split_once("\r\n") {
                return pid.trim().parse().ok();
            }
        }
    }
    None
}

pub fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && (&reply == b"+PONG\r\n" || reply.starts_with(b"-NOAUTH"))
}

/// Behaviour tests measure behaviour, not timeouts: on a loaded CI machine a thousand commands
/// queued on one connection must not time out and take another code path. Tests of timeouts set
/// their own.
pub fn relaxed(config: CacheConfig) -> CacheConfig {
    config.with_op_timeout(Duration::from_secs(10)).with_connect_timeout(Duration::from_secs(5))
}

/// A Redis runtime for `url` with [`relaxed`] timeouts.
pub fn redis_runtime(url: &str, adjust: impl FnOnce(CacheConfig) -> CacheConfig) -> Runtime {
    Runtime::new(adjust(relaxed(CacheConfig::redis(url).expect("loopback URL parses"))))
}

/// `rounds` rounds of one concurrent call of `function` for each of `ids`, each checked to
/// return its own id's value, `page {id}`.
#[allow(dead_code)] // not every test binary reads in bursts
pub async fn read_all<F: std::future::Future<Output = String> + Send + 'static>(
    runtime: &Runtime,
    function: fn(u32) -> F,
    ids: u32,
    rounds: usize,
) {
    for _ in 0..rounds {
        let mut set = tokio::task::JoinSet::new();
        for id in 0..ids {
            let rt = runtime.clone();
            set.spawn(async move { (id, rt.scope(function(id)).await) });
        }
        while let Some(joined) = set.join_next().await {
            let (id, value) = joined.unwrap();
            assert_eq!(value, format!("page {id}"), "a caller got another key's value");
        }
    }
}

/// One backend under test: its runtime, and (for Redis) the server behind it, or (for Cluster)
/// a raw connection to the shared cluster and the test's key namespace on it.
pub struct Fixture {
    pub runtime: Runtime,
    pub server: Option<RedisServer>,
    pub cluster: Option<ClusterView>,
    pub tls: Option<TlsView>,
    /// The disk backend's directory, removed with the fixture.
    pub disk: Option<tempfile::TempDir>,
    /// The sentinel that names `server` as the primary, for a runtime behind Sentinel.
    pub sentinel: Option<sentinel::OneSentinel>,
}

/// A TLS-only server of the test's own, with the certificates it trusts.
pub struct TlsView {
    pub server: tls::TlsServer,
    pub certs: tls::Certificates,
}

impl TlsView {
    /// A plain client over TLS on `db`, bypassing the toolkit.
    pub async fn raw(&self, db: u8) -> redis::aio::MultiplexedConnection {
        let ca = std::fs::read(self.certs.ca()).unwrap();
        let certs = redis::TlsCertificates { client_tls: None, root_cert: Some(ca) };
        let client = redis::Client::build_with_tls(format!("{}/{db}", self.server.url()), certs).unwrap();
        client.get_multiplexed_async_connection().await.expect("raw TLS connection")
    }
}

/// A test's view of the shared cluster: keys are stored as `{namespace}:db{N}:{key}`.
pub struct ClusterView {
    pub conn: redis::cluster_async::ClusterConnection,
    pub namespace: String,
}

/// A key namespace no other test of any binary uses.
pub fn unique_namespace() -> String {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    format!("t{}-{n}", std::process::id())
}

/// A runtime on the shared cluster of this binary, in a key namespace of its own.
pub fn cluster_config() -> (CacheConfig, String) {
    let namespace = unique_namespace();
    let config =
        relaxed(CacheConfig::cluster(&RedisCluster::shared().addresses()).expect("loopback nodes parse"))
            .with_key_namespace(&namespace)
            .expect("a valid namespace");
    (config, namespace)
}

impl Fixture {
    /// `runtime` alone: no server, cluster, TLS server, directory or sentinel of its own (the
    /// other constructors fill in theirs).
    pub fn bare(runtime: Runtime) -> Fixture {
        Fixture { runtime, server: None, cluster: None, tls: None, disk: None, sentinel: None }
    }

    /// The disk backend in a directory of its own, removed with the fixture.
    pub fn disk() -> Fixture {
        let dir = tempfile::tempdir().expect("a temp dir");
        let runtime = Runtime::new(CacheConfig::disk(dir.path()));
        Fixture { disk: Some(dir), ..Fixture::bare(runtime) }
    }

    pub fn memory() -> Fixture {
        Fixture::bare(Runtime::new(CacheConfig::memory()))
    }

    pub fn redis() -> Fixture {
        Self::redis_with(|c| c)
    }

    pub fn redis_with(adjust: impl FnOnce(CacheConfig) -> CacheConfig) -> Fixture {
        let server = RedisServer::start();
        let config = adjust(relaxed(CacheConfig::redis(&server.url()).expect("loopback URL parses")));
        Fixture { server: Some(server), ..Fixture::bare(Runtime::new(config)) }
    }

    /// A runtime behind Sentinel (`redis+sentinel://`): one sentinel of its own naming a server
    /// of its own as the primary. Raw access (`raw`, `server`) goes to that server.
    pub fn sentinel() -> Fixture {
        let server = RedisServer::start();
        let sentinel = sentinel::OneSentinel::watching(&server);
        let config = relaxed(CacheConfig::redis(&sentinel.url()).expect("a sentinel URL parses"));
        Fixture { server: Some(server), sentinel: Some(sentinel), ..Fixture::bare(Runtime::new(config)) }
    }

    /// A runtime on this binary's shared cluster, in a key namespace of its own.
    pub async fn cluster() -> Fixture {
        Self::cluster_with(|c| c).await
    }

    pub async fn cluster_with(adjust: impl FnOnce(CacheConfig) -> CacheConfig) -> Fixture {
        let (config, namespace) = cluster_config();
        let client = redis::cluster::ClusterClient::new(
            RedisCluster::shared().addresses().iter().map(|a| format!("redis://{a}")).collect::<Vec<_>>(),
        )
        .unwrap();
        let conn = client.get_async_connection().await.expect("a raw cluster connection");
        Fixture {
            cluster: Some(ClusterView { conn, namespace }),
            ..Fixture::bare(Runtime::new(adjust(config)))
        }
    }

    /// A runtime on a TLS-only server of its own (`rediss://`, trusting the test's CA).
    pub fn tls() -> Fixture {
        let certs = tls::Certificates::generate();
        let server = tls::TlsServer::start(&certs);
        let config = relaxed(CacheConfig::redis(&server.url()).expect("loopback URL parses"))
            .with_ca_cert(certs.ca().to_str().unwrap())
            .expect("the generated CA");
        Fixture { tls: Some(TlsView { server, certs }), ..Fixture::bare(Runtime::new(config)) }
    }

    pub fn server(&mut self) -> &mut RedisServer {
        self.server.as_mut().expect("a Redis fixture")
    }

    /// Whether entries live in a Redis deployment (one server, Cluster or behind Sentinel).
    pub fn is_remote(&self) -> bool {
        self.server.is_some() || self.cluster.is_some() || self.tls.is_some()
    }

    /// `command key args...` on DB `db`, bypassing the toolkit, with `key` as the runtime names it
    /// (on Cluster, the stored name is used); `None` on the embedded backend.
    pub async fn raw<T: redis::FromRedisValue>(
        &self,
        db: u8,
        command: &str,
        key: &str,
        args: &[&[u8]],
    ) -> Option<T> {
        self.runtime.flush().await.expect("every accepted write answered");
        if let Some(server) = &self.server {
            let mut cmd = redis::cmd(command);
            cmd.arg(key).arg(args);
            return Some(cmd.query_async(&mut server.raw(db).await).await.unwrap());
        }
        if let Some(tls) = &self.tls {
            let mut cmd = redis::cmd(command);
            cmd.arg(key).arg(args);
            return Some(cmd.query_async(&mut tls.raw(db).await).await.unwrap());
        }
        let view = self.cluster.as_ref()?;
        let mut cmd = redis::cmd(command);
        cmd.arg(format!("{}:db{db}:{key}", view.namespace)).arg(args);
        Some(cmd.query_async(&mut view.conn.clone()).await.unwrap())
    }

    /// The keys matching `pattern` in DB `db`, as the runtime names them (`KEYS`; on Cluster on
    /// every primary, within this test's namespace); `None` on the embedded backend.
    pub async fn raw_keys(&self, db: u8, pattern: &str) -> Option<Vec<String>> {
        let mut keys: Vec<String> = self.raw(db, "KEYS", pattern, &[]).await?;
        if let Some(view) = &self.cluster {
            let stored = format!("{}:db{db}:", view.namespace);
            keys = keys
                .into_iter()
                .map(|k| k.strip_prefix(&stored).expect("a key of this test").to_owned())
                .collect();
        }
        keys.sort();
        Some(keys)
    }

    /// Runs `fut` with this fixture's runtime serving the cached calls in it.
    pub async fn run<F: std::future::Future>(&self, fut: F) -> F::Output {
        self.runtime.scope(fut).await
    }

    /// The counters, once every write the runtime accepted has been answered.
    pub async fn stats(&self) -> cache_runtime::StatsSnapshot {
        self.runtime.flush().await.expect("every accepted write answered");
        self.runtime.stats()
    }

    /// Time left on a full key in DB `D`: `PTTL` through a raw client on Redis (after the
    /// runtime's queued writes are flushed), the backend's own answer on the embedded backend.
    pub async fn ttl<D: CacheDb>(&self, full_key: &str) -> Option<Duration> {
        match self.raw::<i64>(D::INDEX, "PTTL", full_key, &[]).await {
            Some(ms) => {
                assert_ne!(ms, -1, "{full_key} exists without an expiry");
                u64::try_from(ms).ok().map(Duration::from_millis)
            }
            None => {
                let (prefix, rest) = full_key.split_once(':').expect("a namespaced key");
                let handle = Cache::<D, serde_json::Value>::new(prefix, Duration::from_secs(1)).unwrap();
                handle.with_runtime(self.runtime.clone()).ttl(rest).await.unwrap()
            }
        }
    }

    /// Overwrites a full key in DB `D` with raw bytes (to plant a corrupt value).
    pub async fn plant<D: CacheDb>(&self, full_key: &str, bytes: &[u8]) {
        if self.raw::<()>(D::INDEX, "SET", full_key, &[bytes, b"EX", b"60"]).await.is_none() {
            // The embedded backend stores bytes as given; a handle of raw JSON values cannot
            // write invalid JSON, so plant a value of the wrong shape instead.
            let (prefix, rest) = full_key.split_once(':').expect("a namespaced key");
            let handle = Cache::<D, serde_json::Value>::new(prefix, Duration::from_secs(60)).unwrap();
            let wrong: serde_json::Value =
                serde_json::from_slice(bytes).unwrap_or_else(|_| serde_json::json!({"corrupt": true}));
            handle.with_runtime(self.runtime.clone()).set(rest, &wrong).await.unwrap();
        }
    }
}

/// Writes `mod memory`, `mod disk`, `mod redis`, `mod tls` (one server over TLS), `mod cluster` and `mod sentinel` (a server behind one sentinel), each with one `#[tokio::test]` per listed
/// behaviour, calling `behaviour(&mut Fixture)`.
#[macro_export]
macro_rules! on_every_backend {
    ($($test:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(&mut $crate::support::Fixture::memory()).await
                }
            )*
        }
        mod disk {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(&mut $crate::support::Fixture::disk()).await
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(&mut $crate::support::Fixture::redis()).await
                }
            )*
        }
        mod tls {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(&mut $crate::support::Fixture::tls()).await
                }
            )*
        }
        mod cluster {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(&mut $crate::support::Fixture::cluster().await).await
                }
            )*
        }
        mod sentinel {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(&mut $crate::support::Fixture::sentinel()).await
                }
            )*
        }
    };
}
