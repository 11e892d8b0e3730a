//! Write-behind batching of cache fills on Redis: callers hand their write to a bounded queue and
//! return; one task per DB coalesces queued writes into pipelines, flushed when `batch_max`
//! writes are waiting or `batch_delay` after the first one. A full queue hands the write back so
//! the caller writes it directly: memory stays bounded and no write is dropped. Each pipeline
//! goes through the circuit breaker and is bounded by `op_timeout`; `flush` and `shutdown` by the
//! deadline their caller gives.
//!
//! A handle's `set_behind` carries a [`Ticket`]: a later `set` or `delete` of the same key
//! cancels it if it is still queued, or waits for its answer if it was already sent, so the
//! later operation wins.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio::sync::{mpsc, oneshot, Notify};

use super::scripts::{self, millis, scripts};
use crate::backend::breaker::Breaker;
use crate::backend::protocol::{bounded, FillOutcome, Write};
use crate::config::CacheConfig;
use crate::error::BackendError;

const QUEUED: u8 = 0;
const CANCELLED: u8 = 1;
const SENT: u8 = 2;
const ANSWERED: u8 = 3;

/// The state of one queued handle write: queued, cancelled, sent, answered; and the earlier
/// write of the same key that was already sent when this one was queued (so a later operation
/// waits for both).
#[derive(Default)]
pub(crate) struct Ticket {
    state: AtomicU8,
    answered: Notify,
    earlier: Mutex<Option<Arc<Ticket>>>,
}

impl Ticket {
    /// Marks it sent; `false` if it was cancelled first (then it must not be sent).
    fn send(&self) -> bool {
        self.state.compare_exchange(QUEUED, SENT, SeqCst, SeqCst).is_ok()
    }

    fn answer(&self) {
        self.state.store(ANSWERED, SeqCst);
        self.answered.notify_waiters();
    }
}

/// A write in the queue, with the ticket of a handle's `set_behind`.
struct Queued {
    write: Write,
    ticket: Option<Arc<Ticket>>,
}

enum Item {
    Write(Queued),
    /// Everything queued before this is written when it is acknowledged.
    Flush(oneshot::Sender<()>),
}

pub(crate) struct Batcher {
    max: usize,
    delay: Duration,
    capacity: usize,
    op_timeout: Duration,
    breaker: Arc<Breaker>,
    queues: [OnceLock<mpsc::Sender<Item>>; 16],
    closed: AtomicBool,
    /// Writes accepted and not yet answered by the server.
    queued: Arc<AtomicUsize>,
    /// The latest `set_behind` of each key not yet answered.
    tickets: Arc<Tickets>,
}

type Tickets = Mutex<HashMap<(u8, String), Arc<Ticket>>>;

fn lock(tickets: &Tickets) -> std::sync::MutexGuard<'_, HashMap<(u8, String), Arc<Ticket>>> {
    tickets.lock().unwrap_or_else(|e| e.into_inner())
}

impl Batcher {
    pub(crate) fn new(config: &CacheConfig, breaker: Arc<Breaker>) -> Self {
        Batcher {
            max: config.batch_max.max(1),
            delay: config.batch_delay,
            capacity: config.batch_queue,
            op_timeout: config.op_timeout,
            breaker,
            queues: Default::default(),
            closed: AtomicBool::new(false),
            queued: Arc::default(),
            tickets: Arc::default(),
        }
    }

    fn tickets(&self) -> std::sync::MutexGuard<'_, HashMap<(u8, String), Arc<Ticket>>> {
        lock(&self.tickets)
    }

    /// Takes a handle's write for the background, with a ticket that a later operation on the
    /// same key can cancel or wait for.
    pub(crate) fn offer_handle_write(
        &self,
        db: u8,
        write: Write,
        conn: impl FnOnce() -> Option<ConnectionManager>,
    ) -> Result<(), Write> {
        let ticket = Arc::new(Ticket::default());
        let key = (db, write.key.clone());
        // Registered first: a cancellation racing with the offer finds it.
        let previous = self.tickets().insert(key.clone(), Arc::clone(&ticket));
        if let Some(previous) = previous {
            // The earlier write of this key is superseded by this one: cancelled if still queued,
            // remembered if already sent.
            if previous.state.compare_exchange(QUEUED, CANCELLED, SeqCst, SeqCst).is_err() {
                *ticket.earlier.lock().unwrap_or_else(|e| e.into_inner()) = Some(previous);
            }
        }
        self.enqueue(db, Queued { write, ticket: Some(Arc::clone(&ticket)) }, conn).inspect_err(|_| {
            let mut tickets = self.tickets();
            if tickets.get(&key).is_some_and(|t| Arc::ptr_eq(t, &ticket)) {
                tickets.remove(&key);
            }
        })
    }

    /// Cancels the queued handle write of `key`, or waits (within `limit`) for its answer if it
    /// was already sent, so that an operation on `key` made next lands after it.
    pub(crate) async fn supersede(&self, limit: Duration, db: u8, key: &str) {
        let mut next = self.tickets().remove(&(db, key.to_owned()));
        let wait = async {
            while let Some(ticket) = next {
                if ticket.state.compare_exchange(QUEUED, CANCELLED, SeqCst, SeqCst).is_err() {
                    let answered = ticket.answered.notified();
                    if ticket.state.load(SeqCst) == SENT {
                        answered.await;
                    }
                }
                next = ticket.earlier.lock().unwrap_or_else(|e| e.into_inner()).take();
            }
        };
        let _ = tokio::time::timeout(limit, wait).await;
    }

    /// Takes `write` for the background, or gives it back (batching off, queue full, shut down)
    /// for the caller to write directly.
    pub(crate) fn offer(
        &self,
        db: u8,
        write: Write,
        conn: impl FnOnce() -> Option<ConnectionManager>,
    ) -> Result<(), Write> {
        self.enqueue(db, Queued { write, ticket: None }, conn)
    }

    fn enqueue(
        &self,
        db: u8,
        queued: Queued,
        conn: impl FnOnce() -> Option<ConnectionManager>,
    ) -> Result<(), Write> {
        if self.capacity == 0 || self.closed.load(SeqCst) {
            return Err(queued.write);
        }
        let cell = &self.queues[usize::from(db & 0x0f)];
        let queue = match cell.get() {
            Some(queue) => queue,
            None => {
                let Some(conn) = conn() else {
                    return Err(queued.write);
                };
                cell.get_or_init(|| {
                    let (tx, rx) = mpsc::channel(self.capacity);
                    let writer = Writer {
                        conn,
                        op_timeout: self.op_timeout,
                        breaker: Arc::clone(&self.breaker),
                        queued: Arc::clone(&self.queued),
                        tickets: Arc::clone(&self.tickets),
                        db,
                    };
                    // On the background runtime: queued writes outlive the caller's runtime.
                    crate::background::spawn(flush_loop(rx, writer, self.max, self.delay));
                    tx
                })
            }
        };
        self.queued.fetch_add(1, SeqCst);
        queue.try_send(Item::Write(queued)).map_err(|e| {
            self.queued.fetch_sub(1, SeqCst);
            match e.into_inner() {
                Item::Write(queued) => queued.write,
                Item::Flush(_) => unreachable!("only writes are offered"),
            }
        })
    }

    /// Writes accepted and not yet answered.
    pub(crate) fn queued(&self) -> usize {
        self.queued.load(SeqCst)
    }

    /// Waits until every write accepted before this call is answered by the server, or until
    /// `limit` has passed; how many accepted writes were still unanswered then.
    pub(crate) async fn flush(&self, limit: Duration) -> usize {
        let all = async {
            for cell in &self.queues {
                if let Some(queue) = cell.get() {
                    let (ack, done) = oneshot::channel();
                    if queue.send(Item::Flush(ack)).await.is_ok() {
                        let _ = done.await;
                    }
                }
            }
        };
        let _ = tokio::time::timeout(limit, all).await;
        self.queued()
    }

    /// Flushes (within `limit`), and from now on hands every write back to be written directly.
    pub(crate) async fn shutdown(&self, limit: Duration) -> usize {
        self.closed.store(true, SeqCst);
        self.flush(limit).await
    }
}

/// What the flush loop writes with.
struct Writer {
    conn: ConnectionManager,
    op_timeout: Duration,
    breaker: Arc<Breaker>,
    queued: Arc<AtomicUsize>,
    tickets: Arc<Tickets>,
    db: u8,
}

async fn flush_loop(mut rx: mpsc::Receiver<Item>, mut writer: Writer, max: usize, delay: Duration) {
    let mut items = Vec::with_capacity(max);
    let mut writes = Vec::with_capacity(max);
    // Load the fill script up front so that pipelines can use EVALSHA; if this fails (server
    // down), the NOSCRIPT path below loads it later.
    let _ =
        bounded(writer.op_timeout, async { Ok(scripts().fill.load_async(&mut writer.conn).await?) }).await;
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
                    writer.write_all(&mut writes).await;
                    let _ = ack.send(());
                }
            }
        }
        writer.write_all(&mut writes).await;
    }
}

impl Writer {
    /// One pipeline for all of `writes`, in order; each write's `done` gets its own result.
    async fn write_all(&mut self, writes: &mut Vec<Queued>) {
        // Cancelled handle writes are answered as superseded, unsent.
        writes.retain_mut(|q| match &q.ticket {
            Some(ticket) if !ticket.send() => {
                self.finish(q, Ok(FillOutcome::Superseded));
                self.queued.fetch_sub(1, SeqCst);
                false
            }
            _ => true,
        });
        if writes.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for Queued { write: w, .. } in writes.iter() {
            match w.lease {
                Some((token, grant)) => scripts::pipe_fill(&mut pipe, &w.key, token, grant, &w.value, w.ttl),
                None => {
                    pipe.cmd("SET").arg(&w.key).arg(&*w.value).arg("PX").arg(millis(w.ttl));
                }
            }
        }
        let replies = match self.breaker.admit() {
            Ok(permit) => {
                let conn = &mut self.conn;
                let replies: Result<Vec<redis::RedisResult<redis::Value>>, BackendError> =
                    bounded(self.op_timeout, async { Ok(pipe.query_async(conn).await?) }).await;
                permit.record(&replies);
                replies
            }
            Err(bypassed) => Err(bypassed),
        };
        let count = writes.len();
        match replies {
            Ok(replies) => {
                for (mut q, reply) in writes.drain(..).zip(replies) {
                    let w = &q.write;
                    let result = match written(reply) {
                        Ok(outcome) => Ok(outcome),
                        // The script is not loaded yet, or the server lost it (a restart): the
                        // direct fill loads it and runs it. (Only fills run a script.)
                        Err(e) if e.code() == Some("NOSCRIPT") => match w.lease {
                            Some((token, grant)) => {
                                let fill =
                                    scripts::fill(&mut self.conn, &w.key, token, grant, &w.value, w.ttl);
                                bounded(self.op_timeout, fill).await
                            }
                            None => Err(BackendError::from(e)),
                        },
                        Err(e) => Err(BackendError::from(e)),
                    };
                    self.finish(&mut q, result);
                }
            }
            Err(e) => {
                let message = e.to_string();
                for mut q in writes.drain(..) {
                    let error = match e {
                        // Skipped by the open breaker: counted as bypassed, not as an error.
                        BackendError::Bypassed => BackendError::Bypassed,
                        _ => BackendError::Batch(message.clone()),
                    };
                    self.finish(&mut q, Err(error));
                }
            }
        }
        self.queued.fetch_sub(count, SeqCst);
    }

    fn finish(&self, q: &mut Queued, result: Result<FillOutcome, BackendError>) {
        if let Some(done) = q.write.done.take() {
            done(result);
        }
        if let Some(ticket) = &q.ticket {
            ticket.answer();
            let mut tickets = lock(&self.tickets);
            let key = (self.db, std::mem::take(&mut q.write.key));
            if tickets.get(&key).is_some_and(|t| Arc::ptr_eq(t, ticket)) {
                tickets.remove(&key);
            }
        }
    }
}

/// What one pipelined write answered: the fill script's code (see `scripts.rs`), or `SET`'s OK.
/// Anything else, an error reply included, is an error: never a silent success.
fn written(reply: redis::RedisResult<redis::Value>) -> redis::RedisResult<FillOutcome> {
    match reply? {
        redis::Value::Int(n) => Ok(FillOutcome::from_code(u8::try_from(n).unwrap_or(0))),
        redis::Value::Okay => Ok(FillOutcome::Written),
        redis::Value::SimpleString(s) if s == "OK" => Ok(FillOutcome::Written),
        redis::Value::ServerError(e) => Err(e.into()),
        other => Err(redis::RedisError::from((
            redis::ErrorKind::Client,
            "unexpected reply to a batched write",
            format!("{other:?}"),
        ))),
    }
}
