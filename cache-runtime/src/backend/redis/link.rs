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
//! `ConnectionManager`, and starts the next attempt; so does one that finds the last attempt
//! failed (refused, timed out, a wrong password). Attempts go on in the background, so a caller
//! that stops waiting does not stop them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client, Cmd, Pipeline, RedisFuture, RedisResult, Value};

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
    state: State,
}

struct Inner {
    client: Client,
    config: AsyncConnectionConfig,
    op_timeout: Duration,
    attempts: AtomicU64,
    current: ArcSwap<Current>,
}

/// A connection to one server (one DB of it): cheap to clone, clones share it.
#[derive(Clone)]
pub(crate) struct Link {
    inner: Arc<Inner>,
    db: i64,
}

impl Link {
    /// Starts connecting to `client` (in the background when called inside a tokio runtime, by
    /// the first command otherwise). Each attempt is bounded by `connect_timeout`, each command
    /// by `op_timeout`.
    pub(crate) fn new(client: Client, db: u8, connect_timeout: Duration, op_timeout: Duration) -> Link {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(op_timeout));
        let attempt = connect(&client, &config);
        let inner = Arc::new(Inner {
            client,
            config,
            op_timeout,
            attempts: AtomicU64::new(0),
            current: ArcSwap::from_pointee(Current { attempt: 0, state: State::Connecting(attempt.clone()) }),
        });
        drive(Arc::downgrade(&inner), 0, attempt);
        Link { inner, db: i64::from(db) }
    }

    /// Sends through the connection (`send` is given a clone of it), or through the attempt under
    /// way, and starts a new attempt if the connection turns out lost.
    async fn send<T, F>(&self, send: impl FnOnce(MultiplexedConnection) -> F) -> RedisResult<T>
    where
        F: std::future::Future<Output = RedisResult<T>>,
    {
        let (attempt, state) = {
            let current = self.inner.current.load();
            let state = match &current.state {
                State::Connected(conn) => Ok(conn.clone()),
                State::Connecting(attempt) => Err(attempt.clone()),
            };
            (current.attempt, state)
        };
        match state {
            Ok(conn) => {
                let result = send(conn).await;
                self.lost_if_dropped(attempt, &result);
                result
            }
            // Boxed: the timer and the attempt are only paid for while connecting.
            Err(connecting) => Box::pin(self.send_when_connected(attempt, connecting, send)).await,
        }
    }

    async fn send_when_connected<T, F>(
        &self,
        attempt: u64,
        connecting: Attempt,
        send: impl FnOnce(MultiplexedConnection) -> F,
    ) -> RedisResult<T>
    where
        F: std::future::Future<Output = RedisResult<T>>,
    {
        let bounded = tokio::time::timeout(self.inner.op_timeout, async {
            match connecting.await {
                Ok(conn) => {
                    connected(&self.inner, attempt, &conn);
                    let result = send(conn).await;
                    self.lost_if_dropped(attempt, &result);
                    result
                }
                Err(error) => {
                    // The attempt failed: the next one starts now, for the commands after this.
                    lost(&self.inner, attempt);
                    Err(error)
                }
            }
        });
        match bounded.await {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into()),
        }
    }

    fn lost_if_dropped<T>(&self, attempt: u64, result: &RedisResult<T>) {
        if let Err(error) = result {
            if error.is_unrecoverable_error() {
                lost(&self.inner, attempt);
            }
        }
    }
}

fn connect(client: &Client, config: &AsyncConnectionConfig) -> Attempt {
    let (client, config) = (client.clone(), config.clone());
    async move { client.get_multiplexed_async_connection_with_config(&config).await }.boxed().shared()
}

/// Runs `attempt` to its end even if no command waits for it (inside a tokio runtime: the
/// runtime the link's commands are sent from, where the connection's own task then runs, as
/// with `ConnectionManager`), and makes the link connected when it succeeds.
fn drive(inner: Weak<Inner>, number: u64, attempt: Attempt) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    runtime.spawn(async move {
        if let Ok(conn) = attempt.await {
            if let Some(inner) = inner.upgrade() {
                connected(&inner, number, &conn);
            }
        }
    });
}

/// Attempt `number` gave `conn`: the link uses it, if it was still waiting for that attempt.
fn connected(inner: &Inner, number: u64, conn: &MultiplexedConnection) {
    let current = inner.current.load();
    if current.attempt == number && matches!(current.state, State::Connecting(_)) {
        inner.current.compare_and_swap(
            &*current,
            Arc::new(Current { attempt: number, state: State::Connected(conn.clone()) }),
        );
    }
}

/// The connection (or the attempt) `number` failed: a new attempt starts, unless one already
/// replaced it.
fn lost(inner: &Arc<Inner>, number: u64) {
    let current = inner.current.load();
    if current.attempt != number {
        return;
    }
    let next = inner.attempts.fetch_add(1, Relaxed) + 1;
    let attempt = connect(&inner.client, &inner.config);
    let previous = inner.current.compare_and_swap(
        &*current,
        Arc::new(Current { attempt: next, state: State::Connecting(attempt.clone()) }),
    );
    if Arc::ptr_eq(&*previous, &*current) {
        drive(Arc::downgrade(inner), next, attempt);
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
