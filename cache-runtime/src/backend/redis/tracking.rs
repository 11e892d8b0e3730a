//! The near tier's notifications on one Redis server: a connection of its own, in RESP3, with
//! `CLIENT TRACKING ON BCAST PREFIX ...` over the prefixes of the functions that keep near copies.
//! Redis then pushes the name of every key under those prefixes that anyone writes, deletes,
//! expires or evicts (and a null on `FLUSHALL`/`FLUSHDB`), to this connection alone.
//!
//! Broadcast rather than Redis's default mode: in default mode the server remembers which keys
//! each client *read*, so the reads would have to go through (or redirect to) this connection;
//! ours go through the pool. Broadcast costs a message per write under the prefixes to every
//! process that tracks them, whether or not it holds a copy; it needs no memory on the server.
//!
//! The tier is trusted only while this connection tracks: it is distrusted (every copy dropped)
//! the moment the connection is seen lost (the client library's disconnection push) or a `PING`
//! on it, every 500 ms, goes unanswered for `op_timeout`, and trusted again, flushed, once a new
//! connection tracks. Pushes are handled as they arrive, on the connection's own task. The task
//! ends with its runtime. A server that cannot track (Redis before 6, an ACL without `CLIENT`)
//! is tried again every 2 s, logged once.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Weak};
use std::time::Duration;

use redis::{PushInfo, PushKind, Value};

use crate::config::RedisTarget;
use crate::error::BackendError;
use crate::near::NearTier;

/// How often the tracking connection is checked with a `PING`: the longest a silently dead
/// connection (no close, no reply) goes unnoticed, beyond `op_timeout`.
pub(crate) const PING_EVERY: Duration = Duration::from_millis(500);
/// The first pause before reconnecting; doubled up to `MAX_PAUSE` while it fails.
const FIRST_PAUSE: Duration = Duration::from_millis(100);
const MAX_PAUSE: Duration = Duration::from_secs(2);
/// The name the connection has in `CLIENT LIST`.
pub(crate) const CLIENT_NAME: &str = "cache-runtime-near";

/// A boxed future, as [`Source`] returns them.
pub(crate) type Boxed<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The server a tracking connection is made to.
pub(crate) trait Source: Send + Sync + 'static {
    /// Where it is, for logs (never a password).
    fn address(&self) -> String;

    /// A RESP3 client for each server to track now, and a mark that [`Source::moved`] compares
    /// with (behind Sentinel taken before the primary is looked up, so that a move made meanwhile
    /// counts; on Cluster the fingerprint of the nodes located).
    fn locate(&self) -> Boxed<'_, Result<(Vec<redis::Client>, u64), BackendError>>;

    /// A mark for [`Source::moved`]: how many moves so far.
    fn mark(&self) -> u64 {
        0
    }

    /// Whether the store's connections moved to another server since `mark` was taken.
    fn moved(&self, mark: u64) -> bool {
        self.mark() != mark
    }

    /// Resolves when they may have moved: then [`Source::settle`] finds out, and
    /// [`Source::moved`] tells.
    fn moving(&self) -> Boxed<'_, ()> {
        Box::pin(std::future::pending())
    }

    /// Finds out where the store's connections are, if that is not known now (a move then
    /// counts for [`Source::moved`]). Awaited to the end, never dropped halfway.
    fn settle(&self) -> Boxed<'_, ()> {
        Box::pin(std::future::ready(()))
    }

    /// Told when a connection to the server located at `address` could not start tracking:
    /// if it could not be reached, the next [`Source::locate`] should ask where the server is.
    fn failed(&self, _address: &str, _error: &BackendError) {}
}

/// One server: always the same.
impl Source for RedisTarget {
    fn address(&self) -> String {
        RedisTarget::address(self)
    }

    fn locate(&self) -> Boxed<'_, Result<(Vec<redis::Client>, u64), BackendError>> {
        Box::pin(async move { Ok((vec![self.resp3_client()?], 0)) })
    }
}

pub(crate) struct Tracking {
    pub(crate) source: Box<dyn Source>,
    /// What the keys the servers name start with, before the near tier's.
    pub(crate) strip: Strip,
    /// The prefixes tracked, as the servers store them (`strip`'s start included).
    pub(crate) prefixes: Vec<String>,
    pub(crate) connect_timeout: Duration,
    pub(crate) op_timeout: Duration,
}

impl Tracking {
    /// Runs in the background while the runtime owning `near` lives.
    pub(crate) fn start(self, near: &Arc<NearTier>) {
        let near = Arc::downgrade(near);
        crate::background::spawn(async move { self.run(near).await });
    }

    async fn run(self, near: Weak<NearTier>) {
        let mut pause = FIRST_PAUSE;
        // Whether this outage was logged (once per outage, not per attempt).
        let mut failing = false;
        loop {
            if near.strong_count() == 0 {
                return;
            }
            let ended = self.session(&near).await;
            let Some(tier) = near.upgrade() else { return };
            tier.distrust();
            drop(tier);
            match ended {
                Ok(true) => {
                    pause = FIRST_PAUSE;
                    failing = false;
                }
                Ok(false) => return,
                Err(error) => {
                    if !failing {
                        tracing::warn!(address = %self.source.address(), %error, "near tier: the tracking connection failed; hits read Redis until it is back (logged once per outage)");
                        failing = true;
                    }
                    pause = (pause * 2).min(MAX_PAUSE);
                }
            }
            // A move ends the pause: the server to track is known again (a primary forgotten,
            // by this task's own failure too, does not).
            let mark = self.source.mark();
            let sleep = tokio::time::sleep(pause);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    _ = self.source.moving() => {
                        if self.source.moved(mark) {
                            break;
                        }
                    }
                }
            }
        }
    }

    /// One session's life (a tracking connection to each server located): `Ok(true)` when one
    /// was lost after tracking, or the servers moved; `Ok(false)` when the runtime is gone;
    /// `Err` when one could not start tracking.
    async fn session(&self, near: &Weak<NearTier>) -> Result<bool, BackendError> {
        // Pushes are handled on each connection's own task, in the order the server sent them,
        // as they arrive: nothing queues them, and a slow `PING` below delays none.
        let alive = Arc::new(AtomicBool::new(true));
        let lost = Arc::new(tokio::sync::Notify::new());
        let (clients, mark) = self.source.locate().await?;
        let mut conns = Vec::with_capacity(clients.len());
        for client in &clients {
            let address = client.get_connection_info().addr().to_string();
            match self.connect(client, near, &alive, &lost).await {
                Ok(conn) => conns.push((address, conn)),
                Err(error) => {
                    self.source.failed(&address, &error);
                    return Err(error);
                }
            }
        }
        let addresses: Vec<String> = conns.iter().map(|(address, _)| address.clone()).collect();
        match near.upgrade() {
            Some(tier) => {
                tier.trust();
                // Lost, or the store's connections moved to another server, before it was
                // trusted: the `distrust` that told of it came first, so undo the trust.
                if !alive.load(SeqCst) || self.source.moved(mark) {
                    tier.distrust();
                    return Ok(true);
                }
            }
            None => return Ok(false),
        }
        tracing::info!(?addresses, prefixes = ?self.prefixes, "near tier: tracking");
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = lost.notified() => return Ok(true),
                _ = self.source.moving() => {
                    // Within `op_timeout`, as below: the `PING`s wait meanwhile.
                    let _ = tokio::time::timeout(self.op_timeout, self.source.settle()).await;
                    if self.source.moved(mark) {
                        tracing::info!(?addresses, "near tier: the store's connections moved to other servers; tracking there");
                        return Ok(true);
                    }
                }
                _ = ping.tick() => {
                    if near.strong_count() == 0 {
                        return Ok(false);
                    }
                    // Every connection at once, each within `op_timeout`.
                    let pings = conns.iter_mut().map(|(address, conn)| async move {
                        let answered = tokio::time::timeout(
                            self.op_timeout,
                            redis::cmd("PING").query_async::<()>(conn),
                        ).await;
                        (address, answered)
                    });
                    for (address, answered) in futures_util::future::join_all(pings).await {
                        if !answers(&answered) {
                            tracing::debug!(%address, "near tier: a tracking connection did not answer a PING; dropping every copy");
                            return Ok(true);
                        }
                    }
                    // Where the servers are is checked again (Cluster: its nodes), and a
                    // question to the sentinels that a move began but did not finish is asked
                    // again; within `op_timeout` (the last answer stands past it).
                    let _ = tokio::time::timeout(self.op_timeout, self.source.settle()).await;
                    if self.source.moved(mark) {
                        tracing::info!(?addresses, "near tier: the servers to track changed; tracking them");
                        return Ok(true);
                    }
                }
            }
        }
    }

    /// A connection to `client`'s server that tracks the prefixes, its pushes handled as they
    /// arrive; its loss clears `alive` and distrusts the tier at once.
    async fn connect(
        &self,
        client: &redis::Client,
        near: &Weak<NearTier>,
        alive: &Arc<AtomicBool>,
        lost: &Arc<tokio::sync::Notify>,
    ) -> Result<redis::aio::MultiplexedConnection, BackendError> {
        let (tier, strip, alive, lost) =
            (near.clone(), self.strip.clone(), Arc::clone(alive), Arc::clone(lost));
        let on_push = move |push: PushInfo| -> Result<(), ()> {
            match push.kind {
                PushKind::Invalidate => {
                    if let Some(tier) = tier.upgrade() {
                        invalidated(&tier, &strip, &push.data);
                    }
                }
                PushKind::Disconnection => {
                    alive.store(false, SeqCst);
                    if let Some(tier) = tier.upgrade() {
                        tier.distrust();
                    }
                    lost.notify_one();
                }
                _ => {}
            }
            Ok(())
        };
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.op_timeout))
            .set_push_sender(on_push);
        let mut conn = client.get_multiplexed_async_connection_with_config(&config).await?;
        redis::cmd("CLIENT").arg("SETNAME").arg(CLIENT_NAME).query_async::<()>(&mut conn).await?;
        let mut track = redis::cmd("CLIENT");
        track.arg("TRACKING").arg("ON").arg("BCAST");
        for prefix in &self.prefixes {
            track.arg("PREFIX").arg(prefix);
        }
        track.query_async::<()>(&mut conn).await?;
        Ok(conn)
    }
}

/// Whether a `PING`'s outcome shows the connection alive: `PONG`, or a server that is loading
/// a dataset or has lost its primary (`LOADING`, `MASTERDOWN`: it answers, and still pushes).
fn answers(answered: &Result<redis::RedisResult<()>, tokio::time::error::Elapsed>) -> bool {
    match answered {
        Ok(Ok(())) => true,
        Ok(Err(error)) => matches!(error.code(), Some("LOADING" | "MASTERDOWN")),
        Err(_) => false,
    }
}

/// What the keys a server names start with, before the key the near tier knows
/// (`{prefix}:{function}:...`): the key namespace (`{namespace}:`, or empty), and on Cluster
/// the DB's (`db{N}:`).
#[derive(Clone)]
pub(crate) struct Strip {
    pub(crate) namespace: String,
    pub(crate) dbs: bool,
}

impl Strip {
    /// `key` as the near tier knows it.
    fn key<'k>(&self, key: &'k str) -> &'k str {
        let key = key.strip_prefix(self.namespace.as_str()).unwrap_or(key);
        if !self.dbs {
            return key;
        }
        key.strip_prefix("db")
            .and_then(|rest| rest.split_once(':'))
            .filter(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .map_or(key, |(_, rest)| rest)
    }
}

/// An `invalidate` push: the keys that changed, or a null after `FLUSHALL`/`FLUSHDB`.
fn invalidated(tier: &NearTier, strip: &Strip, data: &[Value]) {
    match data.first() {
        Some(Value::Array(keys)) => {
            for key in keys {
                let name = match key {
                    Value::BulkString(bytes) => String::from_utf8_lossy(bytes),
                    Value::SimpleString(s) => s.as_str().into(),
                    _ => continue,
                };
                tier.changed(strip.key(&name));
            }
        }
        // `FLUSHALL` / `FLUSHDB`, or a message this code does not know: drop everything.
        _ => tier.flush(),
    }
}

#[cfg(test)]
mod tests {
    use super::{answers, Strip};
    use std::time::Duration;

    /// A `PING`'s outcome as `query_async::<()>` gives it for `wire`, the server's reply.
    fn pinged(wire: &[u8]) -> Result<redis::RedisResult<()>, tokio::time::error::Elapsed> {
        let reply = redis::parse_redis_value(wire).and_then(redis::Value::extract_error);
        Ok(reply.and_then(|value| Ok(redis::from_redis_value(value)?)))
    }

    /// A server loading its dataset, or a replica that lost its primary with
    /// `replica-serve-stale-data no` (it answers `PING` so: checked by hand on Redis 7.0), still
    /// answers, and still pushes: its copies are kept. Any other error, or no answer in time, ends
    /// the session.
    #[tokio::test]
    async fn a_loading_server_or_a_replica_without_its_primary_answers_a_ping() {
        assert!(answers(&pinged(b"+PONG\r\n")));
        assert!(answers(&pinged(b"-LOADING Redis is loading the dataset in memory\r\n")));
        assert!(answers(&pinged(
            b"-MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.\r\n"
        )));
        assert!(!answers(&pinged(b"-NOPERM User tracker has no permissions to run the 'ping' command\r\n")));
        assert!(!answers(&pinged(b"-ERR unknown command\r\n")));
        let dropped = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(!answers(&Ok(Err(dropped.into()))));
        let silent =
            tokio::time::timeout(Duration::ZERO, std::future::pending::<redis::RedisResult<()>>()).await;
        assert!(!answers(&silent));
    }

    #[test]
    fn a_pushed_key_is_read_back_without_the_namespace_or_the_clusters_db() {
        let plain = Strip { namespace: "ns:".into(), dbs: false };
        assert_eq!(plain.key("ns:market:quote:{ab}"), "market:quote:{ab}");
        assert_eq!(plain.key("market:quote:{ab}"), "market:quote:{ab}");
        let cluster = Strip { namespace: "ns:".into(), dbs: true };
        assert_eq!(cluster.key("ns:db5:market:quote:{ab}"), "market:quote:{ab}");
        assert_eq!(cluster.key("ns:db14:market:quote:gen"), "market:quote:gen");
        // A prefix that only looks like a DB's is left as it is.
        assert_eq!(cluster.key("ns:dbx:market:quote:{ab}"), "dbx:market:quote:{ab}");
        assert_eq!(cluster.key("ns:db:market"), "db:market");
        let bare = Strip { namespace: String::new(), dbs: true };
        assert_eq!(bare.key("db0:p:f:{00}"), "p:f:{00}");
    }
}
