//! [`Link`]: one multiplexed connection to one server, made again in the background when it is
//! lost.
//!
//! redis-rs's `ConnectionManager` does the same, but a command sent while it reconnects waits for
//! the reconnection (its connect timeout, once per retry), which its response timeout does not
//! bound; so every command needed a timer of the store's own on top of the connection's. A `Link`
//! knows which state it is in:
//! - connected: a command is bounded by the connection's response timeout (`op_timeout`) alone,
//!   and never waits for a connection;
//! - connecting: a command waits for the attempt and is answered on its connection, all of it
//!   under a timer of `op_timeout` from its start.
//!
//! A command that finds the connection lost (dropped, reset) fails at once, as with
//! `ConnectionManager`, and starts the next attempt. One that finds the last attempt failed
//! (refused, timed out, a wrong password) starts the next and waits for it, within its
//! `op_timeout`, unless the failed one started less than `RETRY_GAP` ago: then it fails at once,
//! so that a server that refuses is not asked again on every command. Each attempt runs as a task
//! of its own, so a caller that stops waiting does not stop it, and a runtime that ends under it
//! only fails it.
//!
//! A connection that goes silent (its peer gone without a reset, a middlebox that forgot the
//! flow) is never reported lost by the OS until TCP gives up, many minutes later: every command
//! on it would time out until then. So a connection on which `SILENT_TIMEOUTS` commands in a row
//! time out, with no reply of any kind in between and the first and last at least half of
//! `op_timeout` apart, counts as lost too and is made again; each connection made again so,
//! with no reply since, gives the next twice the time-outs (`SILENT_DOUBLINGS`). A command
//! given up by whoever waited for it after three quarters of `op_timeout` or more (a timer above
//! the link's: the store's own, over every call but a lookup, or a caller's deadline) counts as
//! timed out too ([`Request`]). Commands in flight together when the server stalls once time out
//! together, within a moment: that is one stall, not silence, and the commands sent after it are
//! answered, which starts the count again.
//!
//! One key's reads on a link ([`Link::get`]) are coalesced under load (`reads.rs`).
//!
//! A lease request's release must follow the request on its connection (`OrphanGuard`), so a
//! request that may need one is sent on a [`Link::pinned`] clone: it keeps the connection it
//! finds even if the link makes a new one meanwhile.

use std::cmp::Ordering;
use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client, Cmd, Pipeline, RedisFuture, RedisResult, Value};

use super::reads::{Reads, Sender};

/// The least time between the start of an attempt that failed and the next.
const RETRY_GAP: Duration = Duration::from_millis(50);

/// Commands in a row that time out on one connection, none answered in between, after which it
/// is made again.
const SILENT_TIMEOUTS: u64 = 3;

/// Each connection made again for silence, with no reply since, doubles the time-outs the next
/// one is given (3, 6, 12, then 24 at most): a server slower than every timeout is not
/// reconnected to every three requests for as long as it stays slow.
const SILENT_DOUBLINGS: u32 = 3;

/// `Inner::silence` holds the attempt its count is of above these bits; in them, `WARNED` (said
/// so since the last reply) and the count.
const COUNT_BITS: u32 = 16;
const WARNED: u64 = 1 << (COUNT_BITS - 1);
const COUNT: u64 = WARNED - 1;

/// An attempt to connect, shared by the commands that wait for it.
type Attempt = Shared<BoxFuture<'static, RedisResult<MultiplexedConnection>>>;

enum State {
    Connected(MultiplexedConnection),
    Connecting(Attempt),
}

/// The state and the attempt it comes from: a failure seen on a connection starts a new attempt
/// only if the link is still on that connection's attempt.
struct Current {
    attempt: u64,
    started: Instant,
    state: State,
}

struct Inner {
    client: Client,
    config: AsyncConnectionConfig,
    op_timeout: Duration,
    attempts: AtomicU64,
    current: ArcSwap<Current>,
    /// Commands in a row that timed out on a connection, and which attempt made it (see
    /// `COUNT_BITS`).
    silence: AtomicU64,
    /// When the first of those timed out, in ns since `born`.
    silence_began: AtomicU64,
    /// Connections made again for silence since the last reply (see `SILENT_DOUBLINGS`).
    silent_remakes: AtomicU32,
    born: Instant,
    reads: Reads,
}

/// A connection to one server (one DB of it): cheap to clone, clones share it.
#[derive(Clone)]
pub(crate) struct Link {
    inner: Arc<Inner>,
    db: i64,
    /// For a pinned clone: the connection it keeps, and the attempt that made it.
    pinned: Option<(u64, MultiplexedConnection)>,
}

impl Link {
    /// Starts connecting to `client`. Each attempt is bounded by `connect_timeout`, each command
    /// by `op_timeout`; reads are coalesced under load if `coalesce_reads` (`reads.rs`).
    pub(crate) fn new(
        client: Client,
        db: u8,
        connect_timeout: Duration,
        op_timeout: Duration,
        coalesce_reads: bool,
    ) -> Link {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(op_timeout));
        let mut first = None;
        let inner = Arc::new_cyclic(|weak| {
            let (attempt, work) = prepare(weak.clone(), client.clone(), config.clone(), 0);
            first = Some(work);
            Inner {
                client,
                config,
                op_timeout,
                attempts: AtomicU64::new(0),
                silence: AtomicU64::new(0),
                silence_began: AtomicU64::new(0),
                silent_remakes: AtomicU32::new(0),
                born: Instant::now(),
                reads: Reads::new(coalesce_reads),
                current: ArcSwap::from_pointee(Current {
                    attempt: 0,
                    started: Instant::now(),
                    state: State::Connecting(attempt),
                }),
            }
        });
        launch(first.expect("made with the link"));
        Link { inner, db: i64::from(db), pinned: None }
    }

    /// The time a request is timed on (see [`Request`]), in ns.
    fn now(&self) -> u64 {
        if self.inner.op_timeout >= COARSE_FROM {
            crate::clock::coarse()
        } else {
            crate::clock::precise()
        }
    }

    /// A clone that sends every command on the connection the link has now (or, while it
    /// connects, as the link does), even if the link makes a new one meanwhile: for a request
    /// whose follow-up must reach the server after it (see the module's documentation).
    pub(crate) fn pinned(&self) -> Link {
        let pinned = match self.state() {
            (attempt, Ok(conn)) => Some((attempt, conn)),
            (_, Err(_)) => None,
        };
        Link { pinned, ..self.clone() }
    }

    /// `key`'s value: a `GET`, or under load a share of an `MGET` (`reads.rs`). Bounded by
    /// `op_timeout`.
    pub(crate) fn get<'a>(&'a self, key: &'a str) -> impl Future<Output = RedisResult<Option<Vec<u8>>>> + 'a {
        self.inner.reads.get(key, self)
    }

    /// The attempt the link is on, and its connection or the attempt itself.
    fn state(&self) -> (u64, Result<MultiplexedConnection, Attempt>) {
        let current = self.inner.current.load();
        let state = match &current.state {
            State::Connected(conn) => Ok(conn.clone()),
            State::Connecting(attempt) => Err(attempt.clone()),
        };
        (current.attempt, state)
    }

    /// Sends through the connection (`send` is given a clone of it), or through the attempt under
    /// way, and starts a new attempt if the connection turns out lost.
    async fn send<T, F>(&self, send: impl FnOnce(MultiplexedConnection) -> F) -> RedisResult<T>
    where
        F: std::future::Future<Output = RedisResult<T>>,
    {
        if let Some((number, conn)) = &self.pinned {
            let request = Request::sent(self, *number);
            let result = send(conn.clone()).await;
            request.answered(&result);
            return result;
        }
        match self.state() {
            (number, Ok(conn)) => {
                let request = Request::sent(self, number);
                let result = send(conn).await;
                request.answered(&result);
                result
            }
            // Boxed: the timer and the attempt are only paid for while connecting.
            (number, Err(connecting)) => Box::pin(self.send_when_connected(number, connecting, send)).await,
        }
    }

    async fn send_when_connected<T, F>(
        &self,
        mut number: u64,
        mut connecting: Attempt,
        send: impl FnOnce(MultiplexedConnection) -> F,
    ) -> RedisResult<T>
    where
        F: std::future::Future<Output = RedisResult<T>>,
    {
        let bounded = tokio::time::timeout(self.inner.op_timeout, async {
            let conn = loop {
                let error = match connecting.await {
                    Ok(conn) => {
                        connected(&self.inner, number, &conn);
                        break conn;
                    }
                    Err(error) => error,
                };
                // The attempt failed: the next one starts (unless this one started a moment
                // ago), and this command waits for it, within its time.
                lost(&self.inner, number);
                match self.state() {
                    (now, Ok(conn)) if now != number => {
                        number = now;
                        break conn;
                    }
                    (now, Err(attempt)) if now != number => (number, connecting) = (now, attempt),
                    _ => return Err(error),
                }
            };
            let request = Request::sent(self, number);
            let result = send(conn).await;
            request.answered(&result);
            result
        });
        match bounded.await {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into()),
        }
    }

    /// What a command sent on attempt `attempt`'s connection tells of it: lost if the connection
    /// dropped, or if this is the `SILENT_TIMEOUTS`th time-out in a row on it; alive if anything
    /// came back (a value or an error reply), which starts the count of time-outs again.
    fn answered<T>(&self, attempt: u64, result: &RedisResult<T>) {
        let inner = &*self.inner;
        let silence = &inner.silence;
        match result {
            Err(error) if error.is_unrecoverable_error() => {
                lost(&self.inner, attempt);
            }
            Err(error) if error.is_timeout() => {
                let counted = silence.fetch_update(Relaxed, Relaxed, |was| {
                    match (was >> COUNT_BITS).cmp(&attempt) {
                        Ordering::Equal => Some(was + u64::from(was & COUNT < COUNT)),
                        Ordering::Less => Some((attempt << COUNT_BITS) | (was & WARNED) | 1),
                        // A late time-out of an older connection says nothing of this one.
                        Ordering::Greater => None,
                    }
                });
                let Ok(was) = counted else { return };
                let count = if was >> COUNT_BITS == attempt { (was & COUNT) + 1 } else { 1 };
                let now = u64::try_from(inner.born.elapsed().as_nanos()).unwrap_or(u64::MAX);
                if count == 1 {
                    inner.silence_began.store(now, Relaxed);
                    return;
                }
                // Time-outs of commands that were in flight together at one stall come within a
                // moment (a timer tick) of each other: silence is time-outs spread over at least
                // half a timeout.
                let spread = now.saturating_sub(inner.silence_began.load(Relaxed));
                let needed = SILENT_TIMEOUTS << inner.silent_remakes.load(Relaxed).min(SILENT_DOUBLINGS);
                if count >= needed && u128::from(spread) >= inner.op_timeout.as_nanos() / 2 {
                    // Said once until something answers again, not once per connection made.
                    if silence.fetch_or(WARNED, Relaxed) & WARNED == 0 {
                        tracing::warn!(
                            timeouts = count,
                            "cache backend: a connection stopped answering; making it again (logged once until a reply comes)"
                        );
                    }
                    if lost(&self.inner, attempt) {
                        inner.silent_remakes.fetch_add(1, Relaxed);
                    }
                }
            }
            // Only read in the common case: the word is written only while commands time out.
            _ => {
                if silence.load(Relaxed) & (COUNT | WARNED) != 0 {
                    let reset = silence.fetch_update(Relaxed, Relaxed, |was| {
                        (was & (COUNT | WARNED) != 0 && was >> COUNT_BITS <= attempt)
                            .then_some(attempt << COUNT_BITS)
                    });
                    if reset.is_ok() {
                        inner.silent_remakes.store(0, Relaxed);
                    }
                }
            }
        }
    }
}

/// A request on attempt `attempt`'s connection, until its result is told to the link. Dropped
/// before that (a timer above the link's, the store's own or the caller's, gave up on it) after
/// waiting `DROPPED_AS_TIMEOUT` of `op_timeout` for a reply, it counts as a time-out: the
/// connection did not answer it in that time. So the silence rule sees every request that went
/// unanswered that long, not only those the connection's own timer ended. The cost: a reply
/// to a dropped request is thrown away unseen by redis-rs, so it never starts the count again;
/// callers that always give up between this share and `op_timeout` on a server slower than them
/// see their connection made again every three requests, as for a server slower than
/// `op_timeout` (README, "Failure model").
struct Request<'a> {
    link: &'a Link,
    attempt: u64,
    /// When it was sent, on the coarse clock (a few ns to read; behind by a tick or two).
    sent: u64,
    told: bool,
}

/// The share of `op_timeout` (in quarters) a dropped request must have waited to count as a
/// time-out: a store's timer of `op_timeout` started before the request fires about
/// `op_timeout` after it, which the coarse clock measures a few ms short.
const DROPPED_AS_TIMEOUT: u32 = 3;

/// The least `op_timeout` whose requests are timed on the coarse clock: it lags by a tick or two
/// (under 6 ms measured), a small share of this; shorter timeouts are timed precisely.
const COARSE_FROM: Duration = Duration::from_millis(100);

impl<'a> Request<'a> {
    fn sent(link: &'a Link, attempt: u64) -> Self {
        Request { link, attempt, sent: link.now(), told: false }
    }

    fn answered<T>(mut self, result: &RedisResult<T>) {
        self.told = true;
        self.link.answered(self.attempt, result);
    }
}

impl Drop for Request<'_> {
    fn drop(&mut self) {
        if self.told {
            return;
        }
        let waited = u128::from(self.link.now().saturating_sub(self.sent));
        if waited * 4 >= self.link.inner.op_timeout.as_nanos() * u128::from(DROPPED_AS_TIMEOUT) {
            let timed_out: RedisResult<()> = Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into());
            self.link.answered(self.attempt, &timed_out);
        }
    }
}

/// The work of attempt `number`, and the attempt as commands wait for it. Apart, so that an
/// attempt that does not become the link's is never started. The work makes the link connected
/// when it succeeds, whether or not a command waits.
fn prepare(
    inner: Weak<Inner>,
    client: Client,
    config: AsyncConnectionConfig,
    number: u64,
) -> (Attempt, BoxFuture<'static, ()>) {
    let (done, outcome) = tokio::sync::oneshot::channel();
    let work = async move {
        let result = client.get_multiplexed_async_connection_with_config(&config).await;
        if let (Ok(conn), Some(inner)) = (&result, inner.upgrade()) {
            connected(&inner, number, conn);
        }
        let _ = done.send(result);
    };
    let attempt = async move {
        outcome.await.unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the connection attempt ended with the tokio runtime that ran it",
            )
            .into())
        })
    };
    (attempt.boxed().shared(), work.boxed())
}

/// Runs an attempt's work as a task: on the runtime the command that needs it runs on (where the
/// connection's own task then runs, as with `ConnectionManager`), or on the cache's background
/// runtime outside of one.
fn launch(work: BoxFuture<'static, ()>) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn(work)),
        Err(_) => crate::background::spawn(work),
    }
}

/// Attempt `number` gave `conn`: the link uses it, if it was still waiting for that attempt.
fn connected(inner: &Inner, number: u64, conn: &MultiplexedConnection) {
    let current = inner.current.load();
    if current.attempt == number && matches!(current.state, State::Connecting(_)) {
        let now =
            Current { attempt: number, started: current.started, state: State::Connected(conn.clone()) };
        inner.current.compare_and_swap(&*current, Arc::new(now));
    }
}

/// The connection (or the attempt) `number` failed: a new attempt starts, unless one already
/// replaced it, or the failed attempt started less than `RETRY_GAP` ago. Whether this call
/// started it.
fn lost(inner: &Arc<Inner>, number: u64) -> bool {
    let current = inner.current.load();
    if current.attempt != number
        || (matches!(current.state, State::Connecting(_)) && current.started.elapsed() < RETRY_GAP)
    {
        return false;
    }
    let next = inner.attempts.fetch_add(1, Relaxed) + 1;
    let (attempt, work) = prepare(Arc::downgrade(inner), inner.client.clone(), inner.config.clone(), next);
    let now = Current { attempt: next, started: Instant::now(), state: State::Connecting(attempt) };
    let previous = inner.current.compare_and_swap(&*current, Arc::new(now));
    let replaced = Arc::ptr_eq(&*previous, &*current);
    if replaced {
        launch(work);
    }
    replaced
}

impl Sender for Link {
    fn send(&self, cmd: Cmd) -> RedisFuture<'_, Value> {
        Box::pin(Link::send(self, move |mut conn| async move { conn.send_packed_command(&cmd).await }))
    }

    fn op_timeout(&self) -> Duration {
        self.inner.op_timeout
    }

    fn reads(&self) -> &Reads {
        &self.inner.reads
    }
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(self.send(move |mut conn| async move { conn.send_packed_command(cmd).await }))
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(
            self.send(move |mut conn| async move { conn.send_packed_commands(cmd, offset, count).await }),
        )
    }

    fn get_db(&self) -> i64 {
        self.db
    }
}
