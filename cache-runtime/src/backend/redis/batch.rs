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

use tokio::sync::{mpsc, oneshot, Notify};

use super::connections::Connections;
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
        let was = self.state.swap(ANSWERED, SeqCst);
        self.answered.notify_waiters();
        // Sent and answered: what it waited for was answered before it was sent (one pipeline
        // at a time per DB, and one that got no reply answered only once confirmed); let the
        // chain go, or a key written behind without pause would hold every ticket. Cancelled:
        // whoever cancelled it takes the chain, and may not have yet.
        if was == SENT {
            drop(self.earlier().take());
        }
    }

    fn earlier(&self) -> std::sync::MutexGuard<'_, Option<Arc<Ticket>>> {
        self.earlier.lock().unwrap_or_else(|e| e.into_inner())
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

pub(crate) struct Batcher<C: Connections> {
    links: Arc<C>,
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

impl<C: Connections> Batcher<C> {
    pub(crate) fn new(config: &CacheConfig, breaker: Arc<Breaker>, links: Arc<C>) -> Self {
        Batcher {
            links,
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
    /// same key can cancel or wait for. When it gives the write back (queue full, batching off,
    /// shut down), its ticket stays registered with what it waits for: the caller calls
    /// [`Batcher::supersede`] for the key before writing it directly, so that the direct write
    /// lands after the ones already sent.
    pub(crate) fn offer_handle_write(&self, db: u8, write: Write) -> Result<(), Write> {
        let ticket = Arc::new(Ticket::default());
        // Registered, and linked to the one it replaces, under the map's lock: an operation on
        // the key made meanwhile finds this one with its link, or the one before.
        let mut tickets = self.tickets();
        if let Some(previous) = tickets.insert((db, write.key.clone()), Arc::clone(&ticket)) {
            // The earlier write of this key is superseded by this one: cancelled if still queued
            // (what it waited for, this one waits for), remembered if already sent.
            let earlier = if previous.state.compare_exchange(QUEUED, CANCELLED, SeqCst, SeqCst).is_ok() {
                previous.earlier().take()
            } else {
                Some(previous)
            };
            *ticket.earlier() = earlier;
        }
        drop(tickets);
        self.enqueue(db, Queued { write, ticket: Some(ticket) })
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
                next = ticket.earlier().take();
            }
        };
        let _ = tokio::time::timeout(limit, wait).await;
    }

    /// Takes `write` for the background, or gives it back (batching off, queue full, shut down)
    /// for the caller to write directly.
    pub(crate) fn offer(&self, db: u8, write: Write) -> Result<(), Write> {
        self.enqueue(db, Queued { write, ticket: None })
    }

    fn enqueue(&self, db: u8, queued: Queued) -> Result<(), Write> {
        if self.capacity == 0 || self.closed.load(SeqCst) {
            return Err(queued.write);
        }
        let cell = &self.queues[usize::from(db & 0x0f)];
        let queue = match cell.get() {
            Some(queue) => queue,
            None => {
                let Ok(conn) = self.links.conn(db) else {
                    return Err(queued.write);
                };
                cell.get_or_init(|| {
                    let (tx, rx) = mpsc::channel(self.capacity);
                    let writer = Writer {
                        conn,
                        cross_slots: self.links.pipelines_cross_slots(),
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
    /// `limit` has passed: 0 when each queue acknowledged its marker (the writes ahead of it are
    /// answered; writes accepted meanwhile, behind it, are not waited for), else how many
    /// accepted writes were still unanswered then.
    pub(crate) async fn flush(&self, limit: Duration) -> usize {
        let all = async {
            let mut acknowledged = true;
            for cell in &self.queues {
                if let Some(queue) = cell.get() {
                    let (ack, done) = oneshot::channel();
                    acknowledged &= queue.send(Item::Flush(ack)).await.is_ok() && done.await.is_ok();
                }
            }
            acknowledged
        };
        match tokio::time::timeout(limit, all).await {
            Ok(true) => 0,
            _ => self.queued(),
        }
    }

    /// Flushes (within `limit`), and from now on hands every write back to be written directly.
    pub(crate) async fn shutdown(&self, limit: Duration) -> usize {
        self.closed.store(true, SeqCst);
        self.flush(limit).await
    }
}

/// What the flush loop writes with.
struct Writer<Conn> {
    conn: Conn,
    /// Whether one pipeline may cross slots (not on Cluster).
    cross_slots: bool,
    op_timeout: Duration,
    breaker: Arc<Breaker>,
    queued: Arc<AtomicUsize>,
    tickets: Arc<Tickets>,
    db: u8,
}

async fn flush_loop<Conn>(mut rx: mpsc::Receiver<Item>, mut writer: Writer<Conn>, max: usize, delay: Duration)
where
    Conn: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
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

impl<Conn: redis::aio::ConnectionLike + Clone + Send + Sync + 'static> Writer<Conn> {
    /// One pipeline for all of `writes`, in order (on Cluster, one per slot, all sent at once);
    /// each write's `done` gets its own result.
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
        let pipes = by_slot(self.cross_slots, writes, |pipe, q| {
            let w = &q.write;
            match w.lease {
                Some((token, grant)) => scripts::pipe_fill(pipe, &w.key, token, grant, &w.value, w.ttl),
                None => {
                    pipe.cmd("SET").arg(&w.key).arg(&*w.value).arg("PX").arg(millis(w.ttl));
                }
            }
        });
        let replies = match self.breaker.admit() {
            Ok(permit) => {
                // Each pipeline's own result: one slot's node failing fails its writes only.
                let replies: Result<
                    Vec<redis::RedisResult<Vec<redis::RedisResult<redis::Value>>>>,
                    BackendError,
                > = send_each(&self.conn, &pipes, self.op_timeout).await;
                let first_failure = match &replies {
                    Ok(per_pipe) => per_pipe.iter().find_map(|r| r.as_ref().err()).cloned(),
                    Err(_) => None,
                };
                match (&replies, first_failure) {
                    (Ok(_), Some(e)) => permit.record(&Err::<(), _>(BackendError::from(e))),
                    _ => permit.record(&replies),
                }
                // Back in the order of `writes`.
                replies.map(|replies| {
                    let mut ordered: Vec<Option<redis::RedisResult<redis::Value>>> =
                        (0..writes.len()).map(|_| None).collect();
                    for ((_, indices), replies) in pipes.iter().zip(replies) {
                        match replies {
                            Ok(replies) => {
                                for (&i, reply) in indices.iter().zip(replies) {
                                    ordered[i] = Some(reply);
                                }
                            }
                            Err(e) => {
                                for &i in indices {
                                    ordered[i] = Some(Err(e.clone()));
                                }
                            }
                        }
                    }
                    ordered
                        .into_iter()
                        .map(|r| {
                            r.unwrap_or_else(|| {
                                Err(redis::RedisError::from((
                                    redis::ErrorKind::Client,
                                    "no reply in the batch",
                                )))
                            })
                        })
                        .collect::<Vec<_>>()
                })
            }
            Err(bypassed) => Err(bypassed),
        };
        let count = writes.len();
        // Handle writes whose fate is unknown: no reply came (timed out, connection lost), so
        // the server may still run them. Their tickets are answered once it cannot.
        let mut unsure: Vec<(String, Arc<Ticket>)> = Vec::new();
        match replies {
            Ok(replies) => {
                for (mut q, reply) in writes.drain(..).zip(replies) {
                    let w = &q.write;
                    let unanswered = matches!(&reply, Err(e) if e.is_timeout() || e.is_io_error() || e.is_connection_dropped());
                    if let Some(ticket) = q.ticket.take_if(|_| unanswered) {
                        unsure.push((w.key.clone(), ticket));
                    }
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
                        // Skipped by the open breaker (never sent): counted as bypassed, not as
                        // an error.
                        BackendError::Bypassed => BackendError::Bypassed,
                        _ => {
                            if let Some(ticket) = q.ticket.take() {
                                unsure.push((q.write.key.clone(), ticket));
                            }
                            BackendError::Batch(message.clone())
                        }
                    };
                    self.finish(&mut q, Err(error));
                }
            }
        }
        self.queued.fetch_sub(count, SeqCst);
        if !unsure.is_empty() {
            self.confirm(unsure);
        }
    }

    /// Answers the tickets of writes sent without a reply once a read of their keys, sent after
    /// them on the same connection (per node on Cluster), is answered or has failed within
    /// `op_timeout`: the server ran them by then, or never will if the connection is gone. A
    /// later operation on their keys waits for that (within its own bound), so that it does not
    /// land before a write the server ran late. In the background: the next pipeline goes on.
    fn confirm(&self, unsure: Vec<(String, Arc<Ticket>)>) {
        let pipes = by_slot(self.cross_slots, &unsure, |pipe, (key, _)| {
            pipe.cmd("EXISTS").arg(key);
        });
        let (conn, limit, tickets, db) =
            (self.conn.clone(), self.op_timeout, Arc::clone(&self.tickets), self.db);
        crate::background::spawn(async move {
            let _ = send_each::<_, redis::Value>(&conn, &pipes, limit).await;
            for (key, ticket) in unsure {
                release(&tickets, db, key, &ticket);
            }
        });
    }

    fn finish(&self, q: &mut Queued, result: Result<FillOutcome, BackendError>) {
        if let Some(done) = q.write.done.take() {
            done(result);
        }
        if let Some(ticket) = &q.ticket {
            release(&self.tickets, self.db, std::mem::take(&mut q.write.key), ticket);
        }
    }
}

/// Sends every pipeline at once (one per slot on Cluster), all under one timer of `limit`; each
/// pipeline's own reply.
async fn send_each<Conn, T>(
    conn: &Conn,
    pipes: &[(redis::Pipeline, Vec<usize>)],
    limit: Duration,
) -> Result<Vec<redis::RedisResult<T>>, BackendError>
where
    Conn: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
    T: redis::FromRedisValue,
{
    let sends = pipes.iter().map(|(pipe, _)| {
        let mut conn = conn.clone();
        async move { pipe.query_async::<T>(&mut conn).await }
    });
    bounded(limit, async { Ok(futures_util::future::join_all(sends).await) }).await
}

/// Answers `ticket` (its write has landed, failed, or will never run), and forgets it unless a
/// later write of its key took its place.
fn release(tickets: &Tickets, db: u8, key: String, ticket: &Arc<Ticket>) {
    ticket.answer();
    let mut tickets = lock(tickets);
    let key = (db, key);
    if tickets.get(&key).is_some_and(|t| Arc::ptr_eq(t, ticket)) {
        tickets.remove(&key);
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

/// Pipelines for `items`, built by `add`: one for all on one server, one per slot on Cluster
/// (a pipeline may not cross slots there); each with the indices of the items it carries, in
/// order.
pub(crate) fn by_slot<T: Keyed>(
    cross_slots: bool,
    items: &[T],
    mut add: impl FnMut(&mut redis::Pipeline, &T),
) -> Vec<(redis::Pipeline, Vec<usize>)> {
    let new_pipe = || {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        pipe
    };
    if cross_slots {
        let mut pipe = new_pipe();
        items.iter().for_each(|item| add(&mut pipe, item));
        return vec![(pipe, (0..items.len()).collect())];
    }
    let mut slots: HashMap<redis::cluster_routing::Slot, usize> = HashMap::new();
    let mut pipes: Vec<(redis::Pipeline, Vec<usize>)> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let slot = redis::cluster_routing::Slot::for_key(item.key());
        let at = *slots.entry(slot).or_insert_with(|| {
            pipes.push((new_pipe(), Vec::new()));
            pipes.len() - 1
        });
        add(&mut pipes[at].0, item);
        pipes[at].1.push(i);
    }
    pipes
}

/// What [`by_slot`] groups by.
pub(crate) trait Keyed {
    fn key(&self) -> &str;
}

impl Keyed for Queued {
    fn key(&self) -> &str {
        &self.write.key
    }
}

impl<K: AsRef<str>, V> Keyed for (K, V) {
    fn key(&self) -> &str {
        self.0.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::cluster_routing::Slot;

    fn keys() -> Vec<(String, ())> {
        // Entries of one hash tag share a slot; the rest spread.
        let mut keys: Vec<(String, ())> =
            (0..200).map(|i| (format!("db5:px:price:{{{i:032x}}}"), ())).collect();
        keys.insert(50, ("db5:px:price:{00000000000000000000000000000007}:lease".into(), ()));
        keys
    }

    #[test]
    fn one_pipeline_per_slot_each_write_once_in_order() {
        let keys = keys();
        let pipes = by_slot(false, &keys, |pipe, (key, _)| {
            pipe.cmd("GET").arg(key);
        });
        let mut seen = vec![0; keys.len()];
        for (pipe, indices) in &pipes {
            assert_eq!(pipe.cmd_iter().count(), indices.len());
            let slot = Slot::for_key(&keys[indices[0]].0);
            assert!(indices.iter().all(|&i| Slot::for_key(&keys[i].0) == slot), "one slot per pipeline");
            assert!(indices.windows(2).all(|w| w[0] < w[1]), "in the order written");
            indices.iter().for_each(|&i| seen[i] += 1);
        }
        assert!(seen.iter().all(|&n| n == 1), "every write in exactly one pipeline");
        // The entry and its lease (index 7 and 50) went together.
        assert!(pipes.iter().any(|(_, ix)| ix.contains(&7) && ix.contains(&50)));
        assert!(pipes.len() > 100, "200 random tags spread over many slots ({})", pipes.len());
    }

    /// A key written behind without pause: each ticket is sent while the one before is still
    /// in flight, so each remembers the one before. Once answered, it lets it go; else the
    /// latest ticket would hold every earlier one.
    #[test]
    fn an_answered_ticket_lets_go_of_the_one_before() {
        let first = Arc::new(Ticket::default());
        assert!(first.send());
        let second = Arc::new(Ticket::default());
        *second.earlier() = Some(Arc::clone(&first));
        assert!(second.send());
        first.answer();
        assert_eq!(Arc::strong_count(&first), 2, "held while the second is in flight");
        second.answer();
        assert_eq!(Arc::strong_count(&first), 1, "let go once the second is answered");
        // Cancelled (by a later write, or an operation on the key, which then takes the chain),
        // and answered unsent by the flush loop before the canceller took it: the chain stays.
        let third = Arc::new(Ticket::default());
        *third.earlier() = Some(Arc::clone(&first));
        assert!(third.state.compare_exchange(QUEUED, CANCELLED, SeqCst, SeqCst).is_ok());
        third.answer();
        assert!(third.earlier().take().is_some(), "the canceller still finds what it waits for");
    }

    #[test]
    fn one_server_takes_one_pipeline() {
        let keys = keys();
        let pipes = by_slot(true, &keys, |pipe, (key, _)| {
            pipe.cmd("GET").arg(key);
        });
        assert_eq!(pipes.len(), 1);
        assert_eq!(pipes[0].1, (0..keys.len()).collect::<Vec<_>>());
    }
}
