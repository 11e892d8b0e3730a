//! Write-behind batching of cache fills on Redis: callers hand their write to a bounded queue and
//! return; one task per DB coalesces queued writes into pipelines, flushed when `batch_max`
//! writes are waiting or `batch_delay` after the first one. A full queue hands the write back so
//! the caller writes it directly: memory stays bounded and no write is dropped.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio::sync::{mpsc, oneshot};

use super::redis::{fill_on, scripts, ttl_millis};
use crate::config::CacheConfig;
use crate::error::BackendError;
use crate::key;

/// Called with the write's result: `Ok(true)` written, `Ok(false)` refused (its lease was
/// revoked), `Err` the backend failed.
pub(crate) type Done = Box<dyn FnOnce(Result<bool, BackendError>) + Send>;

/// One write, as the caller would have sent it.
pub(crate) struct Write {
    pub(crate) key: String,
    pub(crate) value: Arc<[u8]>,
    pub(crate) ttl: Duration,
    /// `Some(token)`: the lease-checked fill script; `None`: a plain `SET ... PX`.
    pub(crate) token: Option<u64>,
    pub(crate) done: Option<Done>,
}

enum Item {
    Write(Write),
    /// Everything queued before this is written when it is acknowledged.
    Flush(oneshot::Sender<()>),
}

pub(crate) struct Batcher {
    max: usize,
    delay: Duration,
    capacity: usize,
    queues: [OnceLock<mpsc::Sender<Item>>; 16],
    closed: AtomicBool,
    /// Writes accepted and not yet answered by the server.
    queued: Arc<AtomicUsize>,
}

impl Batcher {
    pub(crate) fn new(config: &CacheConfig) -> Self {
        Batcher {
            max: config.batch_max.max(1),
            delay: config.batch_delay,
            capacity: config.batch_queue,
            queues: Default::default(),
            closed: AtomicBool::new(false),
            queued: Arc::default(),
        }
    }

    /// Takes `write` for the background, or gives it back (batching off, queue full, shut down)
    /// for the caller to write directly.
    pub(crate) fn offer(
        &self,
        db: u8,
        write: Write,
        conn: impl FnOnce() -> Option<ConnectionManager>,
    ) -> Result<(), Write> {
        if self.capacity == 0 || self.closed.load(SeqCst) {
            return Err(write);
        }
        let cell = &self.queues[usize::from(db & 0x0f)];
        let queue = match cell.get() {
            Some(queue) => queue,
            None => {
                let Some(conn) = conn() else {
                    return Err(write);
                };
                cell.get_or_init(|| {
                    let (tx, rx) = mpsc::channel(self.capacity);
                    tokio::spawn(flush_loop(rx, conn, self.max, self.delay, Arc::clone(&self.queued)));
                    tx
                })
            }
        };
        self.queued.fetch_add(1, SeqCst);
        queue.try_send(Item::Write(write)).map_err(|e| {
            self.queued.fetch_sub(1, SeqCst);
            match e.into_inner() {
                Item::Write(write) => write,
                Item::Flush(_) => unreachable!("only writes are offered"),
            }
        })
    }

    /// Writes accepted and not yet answered.
    pub(crate) fn queued(&self) -> usize {
        self.queued.load(SeqCst)
    }

    /// Waits until every write accepted before this call is answered by the server.
    pub(crate) async fn flush(&self) {
        for cell in &self.queues {
            if let Some(queue) = cell.get() {
                let (ack, done) = oneshot::channel();
                if queue.send(Item::Flush(ack)).await.is_ok() {
                    let _ = done.await;
                }
            }
        }
    }

    /// Flushes, and from now on hands every write back to be written directly.
    pub(crate) async fn shutdown(&self) {
        self.closed.store(true, SeqCst);
        self.flush().await;
    }
}

async fn flush_loop(
    mut rx: mpsc::Receiver<Item>,
    mut conn: ConnectionManager,
    max: usize,
    delay: Duration,
    queued: Arc<AtomicUsize>,
) {
    let mut items = Vec::with_capacity(max);
    let mut writes = Vec::with_capacity(max);
    // Load the fill script up front so that pipelines can use EVALSHA; if this fails (server
    // down), the NOSCRIPT path below loads it later.
    let _ = scripts().fill.load_async(&mut conn).await;
    loop {
        if rx.recv_many(&mut items, max).await == 0 {
            return; // the runtime is gone, and every write it accepted was answered
        }
        if !delay.is_zero() && items.len() < max {
            let deadline = tokio::time::Instant::now() + delay;
            while items.len() < max {
                let room = max - items.len();
                match tokio::time::timeout_at(deadline, rx.recv_many(&mut items, room)).await {
                    Ok(n) if n > 0 => continue,
                    _ => break,
                }
            }
        }
        for item in items.drain(..) {
            match item {
                Item::Write(write) => writes.push(write),
                Item::Flush(ack) => {
                    write_all(&mut conn, &mut writes, &queued).await;
                    let _ = ack.send(());
                }
            }
        }
        write_all(&mut conn, &mut writes, &queued).await;
    }
}

/// One pipeline for all of `writes`, in order; each write's `done` gets its own result.
async fn write_all(conn: &mut ConnectionManager, writes: &mut Vec<Write>, queued: &AtomicUsize) {
    if writes.is_empty() {
        return;
    }
    let fill = &scripts().fill;
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for w in writes.iter() {
        match w.token {
            Some(token) => pipe
                .cmd("EVALSHA")
                .arg(fill.get_hash())
                .arg(2)
                .arg(&w.key)
                .arg(key::lease_key(&w.key))
                .arg(token)
                .arg(&*w.value)
                .arg(ttl_millis(w.ttl)),
            None => pipe.cmd("SET").arg(&w.key).arg(&*w.value).arg("PX").arg(ttl_millis(w.ttl)),
        };
    }
    let replies: redis::RedisResult<Vec<redis::RedisResult<redis::Value>>> = pipe.query_async(conn).await;
    let count = writes.len();
    match replies {
        Ok(replies) => {
            for (w, reply) in writes.drain(..).zip(replies) {
                let result = match written(reply) {
                    Ok(written) => Ok(written),
                    // The script is not loaded yet, or the server lost it (a restart): the
                    // direct fill loads it and runs it. (Only fills run a script.)
                    Err(e) if e.code() == Some("NOSCRIPT") => match w.token {
                        Some(token) => fill_on(conn, &w.key, token, &w.value, w.ttl).await,
                        None => Err(BackendError::from(e)),
                    },
                    Err(e) => Err(BackendError::from(e)),
                };
                if let Some(done) = w.done {
                    done(result);
                }
            }
        }
        Err(e) => {
            let message = e.to_string();
            for w in writes.drain(..) {
                if let Some(done) = w.done {
                    done(Err(BackendError::Batch(message.clone())));
                }
            }
        }
    }
    queued.fetch_sub(count, SeqCst);
}

/// What one pipelined write answered: the fill script's 1 (written) or 0 (lease revoked), or
/// `SET`'s OK. Anything else, an error reply included, is an error: never a silent success.
fn written(reply: redis::RedisResult<redis::Value>) -> redis::RedisResult<bool> {
    match reply? {
        redis::Value::Int(n) => Ok(n == 1),
        redis::Value::Okay => Ok(true),
        redis::Value::SimpleString(s) if s == "OK" => Ok(true),
        redis::Value::ServerError(e) => Err(e.into()),
        other => Err(redis::RedisError::from((
            redis::ErrorKind::Client,
            "unexpected reply to a batched write",
            format!("{other:?}"),
        ))),
    }
}
