//! [`Reads`]: one key's reads (`GET`) on one connection, coalesced under load.
//!
//! - A read that finds no other read in flight on the connection is sent at once, a `GET`, as it
//!   would be alone: at one caller, a read costs a `GET` plus a lock taken twice.
//! - One that finds others in flight opens a batch and yields to the scheduler once; the reads
//!   made while it is yielded (by the tasks that were ready to run) join the batch, and it sends
//!   them all together, one `MGET`, and answers each from its reply. A read that finds a batch
//!   open joins it. No read waits for another's reply to be sent.
//!
//! Why: at many concurrent callers, each `GET` costs the client a request of its own (a packed
//! command, a channel message, a reply parsed, a task woken) and the server a command; an `MGET`
//! of n keys costs one of each.
//!
//! Bounds: a read that joins a batch is answered within `op_timeout` of its start: the `MGET` is
//! sent under a timer of what is left of the oldest read's. A read that is dropped while it leads
//! a batch (its caller stopped waiting) hands the batch to one of the reads in it, which sends it
//! (again); one dropped while it waits is left out of the `MGET`, or its answer is dropped.
//!
//! An `MGET` answers nil for a key that holds another type (a `GET` answers `WRONGTYPE`): such an
//! entry reads as a miss, and the fill that follows replaces it.

use std::future::Future;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures_util::future::{Either, FutureExt};
use redis::{Cmd, RedisError, RedisResult, Value};
use tokio::sync::oneshot;

/// Requests in flight on a connection below which a read is sent at once, alone.
const ALONE_BELOW: usize = 8;

/// The reads on one connection.
pub(crate) struct Reads {
    /// Whether reads are coalesced at all (`CacheConfig::with_read_coalescing`).
    coalesce: bool,
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    /// Requests (a `GET` or an `MGET`) in flight, or batches being gathered.
    in_flight: usize,
    /// The batch being gathered, if one is: the reads that joined it.
    open: Option<Vec<Member>>,
}

/// A read that joined another's batch.
struct Member {
    key: String,
    joined: Instant,
    tell: oneshot::Sender<Told>,
}

enum Told {
    Answer(RedisResult<Option<Vec<u8>>>),
    /// The read that led the batch was dropped: send these with yours.
    Lead(Vec<Member>),
}

/// What reads are sent through (a connection), each request bounded by `op_timeout`.
pub(crate) trait Sender: Sync {
    fn send(&self, cmd: Cmd) -> redis::RedisFuture<'_, Value>;
    fn op_timeout(&self) -> Duration;
}

impl Reads {
    pub(crate) fn new(coalesce: bool) -> Self {
        Reads { coalesce, queue: Mutex::new(Queue::default()) }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `key`'s value, read through `sender`. Not an `async fn`: a read sent at once is a small
    /// future (every hit allocates its lookup's); the others are boxed.
    pub(crate) fn get<'a, S: Sender>(
        &'a self,
        key: &'a str,
        sender: &'a S,
    ) -> impl Future<Output = RedisResult<Option<Vec<u8>>>> + 'a {
        if !self.coalesce {
            return Either::Left(Either::Left(one_of(sender.send(get(key)))));
        }
        let role = {
            let mut queue = self.queue();
            if let Some(open) = &mut queue.open {
                let (tell, told) = oneshot::channel();
                let joined = Instant::now();
                open.push(Member { key: key.to_owned(), joined, tell });
                Role::Joins(told, joined)
            } else if queue.in_flight < ALONE_BELOW {
                queue.in_flight += 1;
                Role::Alone
            } else {
                queue.in_flight += 1;
                queue.open = Some(Vec::new());
                Role::Gathers
            }
        };
        match role {
            // Sent at once, bounded by the connection.
            Role::Alone => {
                let flight = Flight { reads: self, gathering: false, carried: Vec::new() };
                let sent = sender.send(get(key));
                Either::Left(Either::Right(async move {
                    let result = one(sent.await);
                    drop(flight);
                    result
                }))
            }
            Role::Gathers => Either::Right(
                async move {
                    let mut flight = Flight { reads: self, gathering: true, carried: Vec::new() };
                    let joined = Instant::now();
                    tokio::task::yield_now().await;
                    flight.gathering = false;
                    flight.carried = self.queue().open.take().unwrap_or_default();
                    lead(flight, key, joined, sender).await
                }
                .boxed(),
            ),
            Role::Joins(told, joined) => Either::Right(
                async move {
                    let mut waiting = Waiting { reads: self, told };
                    match (&mut waiting.told).await {
                        Ok(Told::Answer(result)) => result,
                        Ok(Told::Lead(carried)) => {
                            let flight = Flight { reads: self, gathering: false, carried };
                            lead(flight, key, joined, sender).await
                        }
                        Err(_) => Err(aborted()),
                    }
                }
                .boxed(),
            ),
        }
    }

    /// A read in flight was dropped before it answered the reads `carried` (or, while it
    /// gathered, those that joined its batch): one of them sends them. With none, the flight
    /// ends.
    fn hand_off(&self, mut carried: Vec<Member>, gathering: bool) {
        if gathering {
            let mut queue = self.queue();
            carried.extend(queue.open.take().unwrap_or_default());
        }
        while let Some(next) = carried.pop() {
            match next.tell.send(Told::Lead(carried)) {
                // The flight is its now.
                Ok(()) => return,
                // Its caller stopped waiting: the next one.
                Err(Told::Lead(back)) => carried = back,
                Err(Told::Answer(_)) => carried = Vec::new(),
            }
        }
        self.queue().in_flight -= 1;
    }
}

enum Role {
    /// No other read in flight: a `GET` of its own.
    Alone,
    /// Others in flight, no batch open: it opens one and sends it.
    Gathers,
    /// A batch is open: it joins.
    Joins(oneshot::Receiver<Told>, Instant),
}

/// Sends the read of `key` with the reads `flight` carries: one `MGET` (a `GET` if it carries
/// none, bounded by the connection), under a timer of what is left of the oldest one's
/// `op_timeout`. Each is answered from its reply.
async fn lead(
    mut flight: Flight<'_>,
    key: &str,
    joined: Instant,
    sender: &impl Sender,
) -> RedisResult<Option<Vec<u8>>> {
    flight.carried.retain(|member| !member.tell.is_closed());
    if flight.carried.is_empty() {
        return one(sender.send(get(key)).await);
    }
    let oldest = flight.carried.iter().map(|member| member.joined).fold(joined, std::cmp::min);
    let left = sender.op_timeout().saturating_sub(oldest.elapsed());
    let mut mget = redis::cmd("MGET");
    mget.arg(key);
    for member in &flight.carried {
        mget.arg(&member.key);
    }
    let reply = match tokio::time::timeout(left, sender.send(mget)).await {
        Ok(reply) => reply,
        Err(_) => Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into()),
    };
    let values = reply.and_then(|reply| match reply {
        Value::Array(values) if values.len() == flight.carried.len() + 1 => Ok(values),
        other => Err(unexpected(&other)),
    });
    match values {
        Ok(values) => {
            let mut values = values.into_iter();
            let own = one(values.next().ok_or_else(|| unexpected(&Value::Nil)));
            for (member, value) in flight.carried.drain(..).zip(values) {
                let _ = member.tell.send(Told::Answer(one(Ok(value))));
            }
            own
        }
        Err(error) => {
            for member in flight.carried.drain(..) {
                let _ = member.tell.send(Told::Answer(Err(error.clone())));
            }
            Err(error)
        }
    }
}

/// A request in flight (or a batch being gathered), counted in `Queue::in_flight` until it is
/// dropped. Dropped before it answered the reads it carries, it hands them on.
struct Flight<'a> {
    reads: &'a Reads,
    gathering: bool,
    carried: Vec<Member>,
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        if self.gathering || !self.carried.is_empty() {
            self.reads.hand_off(std::mem::take(&mut self.carried), self.gathering);
        } else {
            self.reads.queue().in_flight -= 1;
        }
    }
}

/// A read waiting in a batch. Dropped, it takes no more messages; if it was told to lead before
/// that, it hands the batch on, so that a batch never goes to a read that is gone.
struct Waiting<'a> {
    reads: &'a Reads,
    told: oneshot::Receiver<Told>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.told.close();
        if let Ok(Told::Lead(carried)) = self.told.try_recv() {
            self.reads.hand_off(carried, false);
        }
    }
}

fn get(key: &str) -> Cmd {
    let mut get = redis::cmd("GET");
    get.arg(key);
    get
}

async fn one_of(sent: redis::RedisFuture<'_, Value>) -> RedisResult<Option<Vec<u8>>> {
    one(sent.await)
}

/// One key's reply: its bytes, or none.
fn one(reply: RedisResult<Value>) -> RedisResult<Option<Vec<u8>>> {
    match reply? {
        Value::Nil => Ok(None),
        Value::BulkString(bytes) => Ok(Some(bytes)),
        other => Ok(redis::from_redis_value(other)?),
    }
}

fn unexpected(reply: &Value) -> RedisError {
    (redis::ErrorKind::Parse, "an MGET answered with other than one reply per key", format!("{reply:?}"))
        .into()
}

fn aborted() -> RedisError {
    std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "the read that was to send this one was lost")
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll, Waker};

    /// A connection whose replies the test gives: it records each command sent (its words) and
    /// the means to answer it.
    struct Fake {
        op_timeout: Duration,
        sent: Mutex<Vec<(Vec<String>, Reply)>>,
    }

    type Reply = Option<oneshot::Sender<RedisResult<Value>>>;

    impl Fake {
        fn new(op_timeout: Duration) -> Arc<Self> {
            Arc::new(Fake { op_timeout, sent: Mutex::new(Vec::new()) })
        }

        /// The words of every command sent so far.
        fn commands(&self) -> Vec<Vec<String>> {
            self.sent.lock().unwrap().iter().map(|(words, _)| words.clone()).collect()
        }

        /// Answers command `i` with one value per key: the key's name, upper-cased.
        fn answer(&self, i: usize) {
            let (words, tell) = &mut self.sent.lock().unwrap()[i];
            let value = |key: &String| Value::BulkString(key.to_uppercase().into_bytes());
            let reply = match words[0].as_str() {
                "GET" => value(&words[1]),
                _ => Value::Array(words[1..].iter().map(value).collect()),
            };
            let _ = tell.take().expect("answered once").send(Ok(reply));
        }
    }

    impl Sender for Fake {
        fn send(&self, cmd: Cmd) -> redis::RedisFuture<'_, Value> {
            let words = cmd
                .args_iter()
                .map(|arg| match arg {
                    redis::Arg::Simple(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                    _ => "<cursor>".into(),
                })
                .collect();
            let (tell, told) = oneshot::channel();
            self.sent.lock().unwrap().push((words, Some(tell)));
            Box::pin(async move { told.await.unwrap_or_else(|_| Err(aborted())) })
        }

        fn op_timeout(&self) -> Duration {
            self.op_timeout
        }
    }

    type Read<'a> = Pin<Box<dyn Future<Output = RedisResult<Option<Vec<u8>>>> + 'a>>;

    fn read<'a>(reads: &'a Reads, key: &'a str, fake: &'a Fake) -> Read<'a> {
        Box::pin(reads.get(key, fake))
    }

    fn poll(read: &mut Read<'_>) -> Poll<RedisResult<Option<Vec<u8>>>> {
        read.as_mut().poll(&mut Context::from_waker(Waker::noop()))
    }

    fn value(poll: Poll<RedisResult<Option<Vec<u8>>>>) -> String {
        match poll {
            Poll::Ready(Ok(Some(bytes))) => String::from_utf8(bytes).unwrap(),
            other => panic!("not answered with a value: {other:?}"),
        }
    }

    fn words(list: &[&str]) -> Vec<String> {
        list.iter().map(|w| w.to_string()).collect()
    }

    fn settled(reads: &Reads) -> bool {
        let queue = reads.queue();
        queue.in_flight == 0 && queue.open.is_none()
    }

    /// Below `ALONE_BELOW` requests in flight each read is a `GET` sent at once; from there, a
    /// read gathers the reads made while it yields and sends one `MGET`, and every read gets its
    /// own key's value, whatever order the replies come in.
    #[tokio::test]
    async fn reads_go_alone_below_the_threshold_and_together_above_it_each_answered_with_its_own() {
        let (reads, fake) = (Reads::new(true), Fake::new(Duration::from_secs(5)));
        let keys: Vec<String> = (0..12).map(|i| format!("k{i}")).collect();
        let mut alone: Vec<Read> = keys[..ALONE_BELOW].iter().map(|k| read(&reads, k, &fake)).collect();
        for r in &mut alone {
            assert!(poll(r).is_pending());
        }
        assert_eq!(fake.commands().len(), ALONE_BELOW, "each sent at once, alone");
        // The ninth opens a batch and yields; three more join it.
        let mut gatherer = read(&reads, &keys[8], &fake);
        assert!(poll(&mut gatherer).is_pending());
        let mut joined: Vec<Read> = keys[9..].iter().map(|k| read(&reads, k, &fake)).collect();
        for r in &mut joined {
            assert!(poll(r).is_pending());
        }
        assert_eq!(fake.commands().len(), ALONE_BELOW, "nothing more sent while it gathers");
        assert!(poll(&mut gatherer).is_pending());
        assert_eq!(fake.commands()[ALONE_BELOW], words(&["MGET", "k8", "k9", "k10", "k11"]));
        // Answered backwards: each still gets its own.
        fake.answer(ALONE_BELOW);
        for i in (0..ALONE_BELOW).rev() {
            fake.answer(i);
        }
        // The gatherer reads the reply and answers the others.
        assert_eq!(value(poll(&mut gatherer)), "K8");
        for (r, key) in joined.iter_mut().zip(&keys[9..]) {
            assert_eq!(value(poll(r)), key.to_uppercase());
        }
        for (r, key) in alone.iter_mut().zip(&keys) {
            assert_eq!(value(poll(r)), key.to_uppercase());
        }
        drop((alone, gatherer, joined));
        assert!(settled(&reads), "every flight counted out");
    }

    /// A read's future dropped at each of its `.await`s: while it gathers, while its `MGET` is
    /// in flight, while it waits in a batch, and after it was told to lead but before it ran.
    /// Each time, the reads it carried are sent by another and answered; none is left waiting.
    #[tokio::test]
    async fn a_read_dropped_at_each_await_hands_its_batch_on() {
        let (reads, fake) = (Reads::new(true), Fake::new(Duration::from_secs(5)));
        let keys: Vec<String> = (0..ALONE_BELOW).map(|i| format!("busy{i}")).collect();
        let mut busy: Vec<Read> = keys.iter().map(|k| read(&reads, k, &fake)).collect();
        for r in &mut busy {
            assert!(poll(r).is_pending());
        }
        let sent = ALONE_BELOW;

        // 1. The gatherer dropped while it yields: the last read that joined leads.
        let mut gatherer = read(&reads, "g", &fake);
        assert!(poll(&mut gatherer).is_pending());
        let mut joined: Vec<Read> =
            ["a", "b", "c", "d"].into_iter().map(|k| read(&reads, k, &fake)).collect();
        for r in &mut joined {
            assert!(poll(r).is_pending());
        }
        drop(gatherer);
        let [mut a, mut b, c, mut d] = <[Read; 4]>::try_from(joined).ok().unwrap();
        assert!(poll(&mut a).is_pending() && poll(&mut b).is_pending());
        assert_eq!(fake.commands().len(), sent, "told to lead, not run yet");
        assert!(poll(&mut d).is_pending());
        assert_eq!(fake.commands()[sent], words(&["MGET", "d", "a", "b", "c"]));

        // 2. The leader dropped while its MGET is in flight: `c` is told to lead the rest.
        drop(d);
        // 3. `c` dropped before it ran: the batch goes on to `b`, which sends it again.
        drop(c);
        assert!(poll(&mut a).is_pending());
        assert_eq!(fake.commands().len(), sent + 1);
        assert!(poll(&mut b).is_pending());
        assert_eq!(fake.commands()[sent + 1], words(&["MGET", "b", "a"]));
        fake.answer(sent + 1);
        assert_eq!(value(poll(&mut b)), "B");
        assert_eq!(value(poll(&mut a)), "A");
        // The dropped reads' request answers late into nothing.
        fake.answer(sent);

        // 5. A read dropped while it waits in a batch is left out of the MGET.
        let mut gatherer = read(&reads, "h", &fake);
        assert!(poll(&mut gatherer).is_pending());
        let (mut d, mut e) = (read(&reads, "d", &fake), read(&reads, "e", &fake));
        assert!(poll(&mut d).is_pending());
        assert!(poll(&mut e).is_pending());
        drop(e);
        assert!(poll(&mut gatherer).is_pending());
        assert_eq!(fake.commands()[sent + 2], words(&["MGET", "h", "d"]));
        fake.answer(sent + 2);
        assert_eq!(value(poll(&mut gatherer)), "H");
        assert_eq!(value(poll(&mut d)), "D");

        for i in 0..ALONE_BELOW {
            fake.answer(i);
        }
        for r in &mut busy {
            assert!(poll(r).is_ready());
        }
        drop(busy);
        assert!(settled(&reads), "every flight counted out");
    }

    /// An `MGET` is bounded by what is left of its oldest read's `op_timeout`, and every read in
    /// it gets the time-out; a read made after them is served.
    #[tokio::test]
    async fn a_batch_times_out_at_its_oldest_reads_bound() {
        let op_timeout = Duration::from_millis(200);
        let fake = Fake::new(op_timeout);
        let keys: Vec<String> = (0..ALONE_BELOW).map(|i| format!("busy{i}")).collect();
        let reads = Reads::new(true);
        let mut busy: Vec<Read> = Vec::new();
        for k in &keys {
            busy.push(read(&reads, k, &fake));
            assert!(poll(busy.last_mut().unwrap()).is_pending());
        }
        let start = Instant::now();
        let mut gatherer = read(&reads, "g", &fake);
        assert!(poll(&mut gatherer).is_pending());
        let mut joined = read(&reads, "j", &fake);
        assert!(poll(&mut joined).is_pending());
        // The joined read has waited 100 ms before its batch is sent.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (led, waited) = tokio::join!(gatherer, joined);
        let took = start.elapsed();
        for result in [led, waited] {
            assert!(result.as_ref().is_err_and(|e| e.is_timeout()), "{result:?}");
        }
        assert!(took >= op_timeout && took < op_timeout * 3 / 2, "{took:?}, bound {op_timeout:?}");
        drop(busy);
        assert!(settled(&reads));
    }
}
