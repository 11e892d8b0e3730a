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

    /// A RESP3 client for the server to track now, and a mark that [`Source::moved`] compares
    /// with: taken before the server is looked up, so that a move made meanwhile counts.
    fn locate(&self) -> Boxed<'_, Result<(redis::Client, u64), BackendError>>;

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

    fn locate(&self) -> Boxed<'_, Result<(redis::Client, u64), BackendError>> {
        Box::pin(async move { Ok((self.resp3_client()?, 0)) })
    }
}

pub(crate) struct Tracking {
    pub(crate) source: Box<dyn Source>,
    /// What every key on the server starts with (`{namespace}:`), or empty.
    pub(crate) namespace: String,
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

    /// One connection's life: `Ok(true)` when it was lost after tracking, `Ok(false)` when the
    /// runtime is gone, `Err` when it could not start tracking.
    async fn session(&self, near: &Weak<NearTier>) -> Result<bool, BackendError> {
        // Pushes are handled on the connection's own task, in the order the server sent them,
        // as they arrive: nothing queues them, and a slow `PING` below delays none.
        let alive = Arc::new(AtomicBool::new(true));
        let lost = Arc::new(tokio::sync::Notify::new());
        let (tier, namespace, on_push_alive, on_push_lost) =
            (near.clone(), self.namespace.clone(), Arc::clone(&alive), Arc::clone(&lost));
        let on_push = move |push: PushInfo| -> Result<(), ()> {
            match push.kind {
                PushKind::Invalidate => {
                    if let Some(tier) = tier.upgrade() {
                        invalidated(&tier, &namespace, &push.data);
                    }
                }
                PushKind::Disconnection => {
                    on_push_alive.store(false, SeqCst);
                    if let Some(tier) = tier.upgrade() {
                        tier.distrust();
                    }
                    on_push_lost.notify_one();
                }
                _ => {}
            }
            Ok(())
        };
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.op_timeout))
            .set_push_sender(on_push);
        let (client, mark) = self.source.locate().await?;
        let address = client.get_connection_info().addr().to_string();
        let tracking = async {
            let mut conn = client.get_multiplexed_async_connection_with_config(&config).await?;
            redis::cmd("CLIENT").arg("SETNAME").arg(CLIENT_NAME).query_async::<()>(&mut conn).await?;
            let mut track = redis::cmd("CLIENT");
            track.arg("TRACKING").arg("ON").arg("BCAST");
            for prefix in &self.prefixes {
                track.arg("PREFIX").arg(format!("{}{prefix}", self.namespace));
            }
            track.query_async::<()>(&mut conn).await?;
            Ok::<_, BackendError>(conn)
        };
        let mut conn = match tracking.await {
            Ok(conn) => conn,
            Err(error) => {
                self.source.failed(&address, &error);
                return Err(error);
            }
        };
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
        tracing::info!(%address, prefixes = ?self.prefixes, "near tier: tracking");
        let mut ping = tokio::time::interval(PING_EVERY);
        loop {
            tokio::select! {
                _ = lost.notified() => return Ok(true),
                _ = self.source.moving() => {
                    self.source.settle().await;
                    if self.source.moved(mark) {
                        tracing::info!(%address, "near tier: the store's connections moved to another server; tracking there");
                        return Ok(true);
                    }
                }
                _ = ping.tick() => {
                    if near.strong_count() == 0 {
                        return Ok(false);
                    }
                    let answered = tokio::time::timeout(
                        self.op_timeout,
                        redis::cmd("PING").query_async::<()>(&mut conn),
                    ).await;
                    if !matches!(answered, Ok(Ok(()))) {
                        tracing::debug!("near tier: the tracking connection did not answer a PING; dropping every copy");
                        return Ok(true);
                    }
                    // A question to the sentinels that a move began but did not finish is
                    // asked again here.
                    self.source.settle().await;
                    if self.source.moved(mark) {
                        return Ok(true);
                    }
                }
            }
        }
    }
}

/// An `invalidate` push: the keys that changed, or a null after `FLUSHALL`/`FLUSHDB`.
fn invalidated(tier: &NearTier, namespace: &str, data: &[Value]) {
    match data.first() {
        Some(Value::Array(keys)) => {
            for key in keys {
                let name = match key {
                    Value::BulkString(bytes) => String::from_utf8_lossy(bytes),
                    Value::SimpleString(s) => s.as_str().into(),
                    _ => continue,
                };
                let name = name.strip_prefix(namespace).unwrap_or(&name);
                tier.changed(name);
            }
        }
        // `FLUSHALL` / `FLUSHDB`, or a message this code does not know: drop everything.
        _ => tier.flush(),
    }
}
