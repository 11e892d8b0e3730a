//! [`Reads`]: one key's reads (`GET`) on one connection, coalesced under load.
//!
//! - A read that finds fewer than `ALONE_BELOW` of the connection's reads in flight (the reads
//!   made here; other commands on the connection are not counted) is sent at once, a `GET`, as
//!   it would be alone: it costs a `GET` plus a lock taken twice.
//! - One that finds more opens a batch and starts a task that sends it, on the caller's
//!   runtime: the task yields to the scheduler once, so that the reads made meanwhile (by the
//!   tasks that were ready to run) join the batch, then sends them all as one `MGET` (a `GET` if
//!   none joined) and answers each from its reply. A read that finds a batch open joins it,
//!   unless the batch holds `MAX_BATCH` reads already, or was opened on another, current-thread
//!   runtime (which runs tasks only inside `block_on`, so the read could wait for its next
//!   call): then it is sent alone. No read waits for another read's reply
//!   before its own is sent, and none depends on another caller's future: a caller that stops
//!   waiting takes nothing with it.
//!
//! Why: at many concurrent callers, each `GET` costs the client a request of its own (a packed
//! command, a channel message, a reply parsed, a task woken) and the server a command; an `MGET`
//! of n keys costs one of each.
//!
//! Bounds: a batch is sent under a timer of what is left of its oldest read's `op_timeout`, and
//! not at all if nothing is left, so each read in it is answered within `op_timeout` of its start
//! (a younger read may be timed out with the oldest, sooner than its own bound).
//!
//! Differences from a `GET`: an `MGET` reads a key that holds another type as nil where a `GET`
//! answers `WRONGTYPE`. Either way the call runs its function uncached: the nil is a miss, whose
//! lease request then meets the same `WRONGTYPE`. One failed `MGET` is a failure for each read in
//! it, as the `GET`s it replaced would each have failed.

use std::future::Future;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures_util::future::{Either, FutureExt};
use redis::{Cmd, RedisError, RedisResult, Value};
use tokio::sync::oneshot;

/// The connection's reads in flight (batches included) below which a read is sent at once.
const ALONE_BELOW: usize = 8;

/// The most reads in one batch: a read that finds the open batch this full is sent alone.
const MAX_BATCH: usize = 256;

/// The reads on one connection.
pub(crate) struct Reads {
    /// Whether reads are coalesced at all (`CacheConfig::with_read_coalescing`).
    coalesce: bool,
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    /// Reads sent alone and not answered yet, and batches being gathered or sent.
    in_flight: usize,
    /// The batch being gathered, if one is.
    open: Option<Open>,
}

/// A batch being gathered.
struct Open {
    members: Vec<Member>,
    /// The current-thread runtime that opened it, if one did: joined from that runtime alone.
    on: Option<tokio::runtime::Id>,
}

impl Open {
    /// Whether a read made here may join: the batch has room, and its task runs without
    /// waiting for another runtime's next `block_on`.
    fn joinable(&self) -> bool {
        self.members.len() < MAX_BATCH
            && self.on.is_none_or(|id| tokio::runtime::Handle::try_current().is_ok_and(|rt| rt.id() == id))
    }
}

/// A read in a batch.
struct Member {
    key: String,
    joined: Instant,
    tell: oneshot::Sender<RedisResult<Option<Vec<u8>>>>,
}

type Answer = oneshot::Receiver<RedisResult<Option<Vec<u8>>>>;

/// What reads are sent through (a connection), each request bounded by `op_timeout`; a clone
/// sends a batch from a task of its own.
pub(crate) trait Sender: Clone + Send + Sync + 'static {
    fn send(&self, cmd: Cmd) -> redis::RedisFuture<'_, Value>;
    fn op_timeout(&self) -> Duration;
    /// The connection's reads.
    fn reads(&self) -> &Reads;
}

impl Reads {
    pub(crate) fn new(coalesce: bool) -> Self {
        Reads { coalesce, queue: Mutex::new(Queue::default()) }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `key`'s value, read through `sender` (whose `reads()` is `self`). Not an `async fn`: a
    /// read sent at once is a small future (every hit allocates its lookup's); one in a batch
    /// waits for its answer.
    pub(crate) fn get<'a, S: Sender>(
        &'a self,
        key: &'a str,
        sender: &'a S,
    ) -> impl Future<Output = RedisResult<Option<Vec<u8>>>> + 'a {
        if !self.coalesce {
            return Either::Left(Either::Left(one_of(sender.send(get(key)))));
        }
        let mut queue = self.queue();
        let member = |tell| Member { key: key.to_owned(), joined: Instant::now(), tell };
        let full = match &mut queue.open {
            Some(open) if open.joinable() => {
                let (tell, answer) = oneshot::channel();
                open.members.push(member(tell));
                return Either::Right(wait(answer));
            }
            Some(_) => true,
            None => false,
        };
        if full || queue.in_flight < ALONE_BELOW {
            queue.in_flight += 1;
            drop(queue);
            // Counted out when the read ends or is dropped, polled or not.
            let flight = Flight { reads: self };
            let sent = sender.send(get(key));
            return Either::Left(Either::Right(async move {
                let result = one(sent.await);
                drop(flight);
                result
            }));
        }
        let (tell, answer) = oneshot::channel();
        queue.in_flight += 1;
        let runtime = tokio::runtime::Handle::try_current();
        // A current-thread runtime runs its tasks only inside a `block_on`: a lookup from
        // another runtime that joined the batch would wait for the next call. Those are sent
        // alone; lookups of its own still join (they wait with the batch's task).
        let on = match &runtime {
            Ok(runtime) if runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread => {
                Some(runtime.id())
            }
            _ => None,
        };
        queue.open = Some(Open { members: vec![member(tell)], on });
        drop(queue);
        // Counted out (and the batch closed) when the task ends or is dropped, run or not.
        let batch = send_batch(Batch { sender: sender.clone(), gathering: true });
        match runtime {
            Ok(runtime) => drop(runtime.spawn(batch)),
            Err(_) => crate::background::spawn(batch),
        }
        Either::Right(wait(answer))
    }
}

fn wait(answer: Answer) -> impl Future<Output = RedisResult<Option<Vec<u8>>>> {
    answer.map(|told| told.unwrap_or_else(|_| Err(aborted())))
}

/// The batch a read opened: after one yield, it takes the reads that joined, sends them as one
/// `MGET` (or a `GET`) under a timer of what is left of the oldest one's `op_timeout`, and
/// answers each.
async fn send_batch<S: Sender>(mut batch: Batch<S>) {
    tokio::task::yield_now().await;
    let mut members = batch.sender.reads().queue().open.take().map(|open| open.members).unwrap_or_default();
    batch.gathering = false;
    let sender = &batch.sender;
    // Callers that stopped waiting are left out.
    members.retain(|member| !member.tell.is_closed());
    let Some(oldest) = members.iter().map(|member| member.joined).min() else { return };
    let left = sender.op_timeout().saturating_sub(oldest.elapsed());
    let timed_out = || RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
    let values = if left.is_zero() {
        Err(timed_out())
    } else if let [alone] = &members[..] {
        match tokio::time::timeout(left, sender.send(get(&alone.key))).await {
            Ok(reply) => reply.map(|value| vec![value]),
            Err(_) => Err(timed_out()),
        }
    } else {
        let bytes = members.iter().map(|member| member.key.len()).sum::<usize>();
        let mut mget = Cmd::with_capacity(1 + members.len(), "MGET".len() + bytes);
        mget.arg("MGET");
        for member in &members {
            mget.arg(&member.key);
        }
        match tokio::time::timeout(left, sender.send(mget)).await {
            Ok(reply) => reply.and_then(Value::extract_error).and_then(|reply| match reply {
                Value::Array(values) if values.len() == members.len() => Ok(values),
                other => Err(unexpected(&other)),
            }),
            Err(_) => Err(timed_out()),
        }
    };
    match values {
        Ok(values) => {
            for (member, value) in members.into_iter().zip(values) {
                let _ = member.tell.send(one(Ok(value)));
            }
        }
        Err(error) => {
            for member in members {
                let _ = member.tell.send(Err(error.clone()));
            }
        }
    }
    drop(batch);
}

/// A read sent alone, counted in `Queue::in_flight` until it is dropped.
struct Flight<'a> {
    reads: &'a Reads,
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        self.reads.queue().in_flight -= 1;
    }
}

/// A batch's task, counted in `Queue::in_flight` until it is dropped. Dropped while it gathers
/// (its runtime ended, run or not), it closes the batch: the reads in it are answered with an
/// error.
struct Batch<S: Sender> {
    sender: S,
    gathering: bool,
}

impl<S: Sender> Drop for Batch<S> {
    fn drop(&mut self) {
        let mut queue = self.sender.reads().queue();
        if self.gathering {
            queue.open = None;
        }
        queue.in_flight -= 1;
    }
}

/// Sized for its words up front: `redis::cmd` grows the command's buffer when the key is added,
/// a reallocation on every lookup.
fn get(key: &str) -> Cmd {
    let mut get = Cmd::with_capacity(2, "GET".len() + key.len());
    get.arg("GET").arg(key);
    get
}

async fn one_of(sent: redis::RedisFuture<'_, Value>) -> RedisResult<Option<Vec<u8>>> {
    one(sent.await)
}

/// One key's reply: its bytes, none, or the error the server answered.
fn one(reply: RedisResult<Value>) -> RedisResult<Option<Vec<u8>>> {
    match reply?.extract_error()? {
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
    std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        "the task sending this read's batch ended with its tokio runtime",
    )
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
    #[derive(Clone)]
    struct Fake(Arc<Inner>);

    struct Inner {
        op_timeout: Duration,
        reads: Reads,
        sent: Mutex<Vec<(Vec<String>, Reply)>>,
    }

    type Reply = Option<oneshot::Sender<RedisResult<Value>>>;

    impl Fake {
        fn new(coalesce: bool, op_timeout: Duration) -> Self {
            Fake(Arc::new(Inner { op_timeout, reads: Reads::new(coalesce), sent: Mutex::new(Vec::new()) }))
        }

        fn commands(&self) -> Vec<Vec<String>> {
            self.0.sent.lock().unwrap().iter().map(|(words, _)| words.clone()).collect()
        }

        fn reply(&self, i: usize, reply: Value) {
            let tell = self.0.sent.lock().unwrap()[i].1.take().expect("answered once");
            let _ = tell.send(Ok(reply));
        }

        /// Answers command `i` with one value per key: the key's name, upper-cased.
        fn answer(&self, i: usize) {
            let words = self.commands()[i].clone();
            let value = |key: &String| Value::BulkString(key.to_uppercase().into_bytes());
            let reply = match words[0].as_str() {
                "GET" => value(&words[1]),
                _ => Value::Array(words[1..].iter().map(value).collect()),
            };
            self.reply(i, reply);
        }

        fn read<'a>(&'a self, key: &'a str) -> Read<'a> {
            Box::pin(self.0.reads.get(key, self))
        }

        fn settled(&self) -> bool {
            let queue = self.0.reads.queue();
            queue.in_flight == 0 && queue.open.is_none()
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
            // Sent when first polled, as a connection's request is.
            Box::pin(async move {
                let (tell, told) = oneshot::channel();
                self.0.sent.lock().unwrap().push((words, Some(tell)));
                told.await.unwrap_or_else(|_| Err(aborted()))
            })
        }

        fn op_timeout(&self) -> Duration {
            self.0.op_timeout
        }

        fn reads(&self) -> &Reads {
            &self.0.reads
        }
    }

    type Read<'a> = Pin<Box<dyn Future<Output = RedisResult<Option<Vec<u8>>>> + 'a>>;

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

    /// Lets the batch tasks spawned on this (current-thread) runtime run until they wait.
    async fn run_tasks() {
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
    }

    /// `ALONE_BELOW` reads each sent at once, alone, and left in flight.
    fn busy<'a>(fake: &'a Fake, keys: &'a [String]) -> Vec<Read<'a>> {
        let mut reads: Vec<Read> = keys.iter().map(|k| fake.read(k)).collect();
        for r in &mut reads {
            assert!(poll(r).is_pending());
        }
        assert_eq!(fake.commands().len(), ALONE_BELOW, "each sent at once, alone");
        reads
    }

    fn busy_keys() -> Vec<String> {
        (0..ALONE_BELOW).map(|i| format!("busy{i}")).collect()
    }

    /// Answers the reads `busy` left in flight; each is then done.
    fn answer_busy(fake: &Fake, busy: &mut [Read<'_>]) {
        for i in 0..ALONE_BELOW {
            fake.answer(i);
        }
        for r in busy {
            assert!(poll(r).is_ready());
        }
    }

    /// A read of `key` made now (its batch the only one open) is sent as a `GET` of its own and
    /// served.
    async fn served_alone(fake: &Fake, key: &str) {
        let mut read = fake.read(key);
        assert!(poll(&mut read).is_pending());
        run_tasks().await;
        assert_eq!(fake.commands().last().unwrap(), &words(&["GET", key]));
        fake.answer(fake.commands().len() - 1);
        run_tasks().await;
        assert_eq!(value(poll(&mut read)), key.to_uppercase());
    }

    /// Below `ALONE_BELOW` reads in flight each read is a `GET` sent at once; from there, reads
    /// made together go as one `MGET`, and every read gets its own key's value, whatever order
    /// the replies come in.
    #[tokio::test]
    async fn reads_go_alone_below_the_threshold_and_together_above_it_each_answered_with_its_own() {
        let fake = Fake::new(true, Duration::from_secs(5));
        let keys = busy_keys();
        let mut alone = busy(&fake, &keys);
        let batch_keys = ["k8", "k9", "k10", "k11"];
        let mut batched: Vec<Read> = batch_keys.iter().map(|k| fake.read(k)).collect();
        for r in &mut batched {
            assert!(poll(r).is_pending());
        }
        assert_eq!(fake.commands().len(), ALONE_BELOW, "nothing more sent before the batch's task runs");
        run_tasks().await;
        assert_eq!(fake.commands()[ALONE_BELOW], words(&["MGET", "k8", "k9", "k10", "k11"]));
        // Answered backwards: each still gets its own.
        fake.answer(ALONE_BELOW);
        for i in (0..ALONE_BELOW).rev() {
            fake.answer(i);
        }
        run_tasks().await;
        for (r, key) in batched.iter_mut().zip(batch_keys) {
            assert_eq!(value(poll(r)), key.to_uppercase());
        }
        for (r, key) in alone.iter_mut().zip(&keys) {
            assert_eq!(value(poll(r)), key.to_uppercase());
        }
        assert!(fake.settled(), "every flight counted out");
    }

    /// A batch holds at most `MAX_BATCH` reads; the read after them is sent alone, at once.
    #[tokio::test]
    async fn a_full_batch_takes_no_more() {
        let fake = Fake::new(true, Duration::from_secs(5));
        let keys = busy_keys();
        let _alone = busy(&fake, &keys);
        let batched: Vec<String> = (0..MAX_BATCH).map(|i| format!("b{i}")).collect();
        let mut reads: Vec<Read> = batched.iter().map(|k| fake.read(k)).collect();
        let mut over = fake.read("over");
        for r in reads.iter_mut().chain([&mut over]) {
            assert!(poll(r).is_pending());
        }
        run_tasks().await;
        let commands = fake.commands();
        assert_eq!(commands[ALONE_BELOW], words(&["GET", "over"]), "sent alone, at once");
        assert_eq!(commands[ALONE_BELOW + 1].len(), MAX_BATCH + 1, "one MGET of the batch");
        fake.answer(ALONE_BELOW);
        fake.answer(ALONE_BELOW + 1);
        run_tasks().await;
        assert_eq!(value(poll(&mut over)), "OVER");
        assert_eq!(value(poll(&mut reads[MAX_BATCH - 1])), format!("B{}", MAX_BATCH - 1));
    }

    /// A caller that stops waiting takes nothing with it, wherever it stops: a read dropped
    /// before it was ever polled (alone, opening a batch, joining one), the read that opened a
    /// batch dropped before the batch is sent, one in a batch dropped while the `MGET` is in
    /// flight, and one kept but never polled again. The others are answered each time.
    #[tokio::test]
    async fn a_caller_that_stops_waiting_takes_nothing_with_it() {
        let fake = Fake::new(true, Duration::from_secs(5));
        // Made and dropped unpolled while nothing is in flight: counted out at once.
        drop(fake.read("never"));
        assert!(fake.settled());
        let keys = busy_keys();
        let mut alone = busy(&fake, &keys);
        let sent = ALONE_BELOW;
        // An unpolled opener and joiner, dropped; then a batch whose opener is dropped, one
        // joiner dropped, one kept unpolled, one awaited.
        drop((fake.read("x"), fake.read("y")));
        run_tasks().await;
        assert_eq!(fake.commands().len(), sent, "a batch of no one is not sent");
        let (mut opener, mut dropped, mut kept, mut awaited) =
            (fake.read("a"), fake.read("b"), fake.read("c"), fake.read("d"));
        for r in [&mut opener, &mut dropped, &mut kept, &mut awaited] {
            assert!(poll(r).is_pending());
        }
        drop(opener);
        run_tasks().await;
        assert_eq!(fake.commands()[sent], words(&["MGET", "b", "c", "d"]), "the opener left out");
        drop(dropped);
        fake.answer(sent);
        run_tasks().await;
        assert_eq!(value(poll(&mut awaited)), "D");
        // `kept` was answered without being polled, and reads its answer when it is.
        assert_eq!(value(poll(&mut kept)), "C");
        answer_busy(&fake, &mut alone);
        assert!(fake.settled(), "every flight counted out");
    }

    /// A batch whose task ends with its runtime before it is sent answers its reads with an
    /// error and closes: the next read opens a batch of its own and is served.
    #[test]
    fn a_batch_whose_runtime_ends_closes() {
        let fake = Fake::new(true, Duration::from_secs(5));
        let keys = busy_keys();
        let mut alone = busy(&fake, &keys);
        let ended = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let entered = ended.enter();
        let mut orphan = fake.read("a");
        assert!(poll(&mut orphan).is_pending());
        drop(entered);
        drop(ended);
        assert!(matches!(poll(&mut orphan), Poll::Ready(Err(_))));
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            served_alone(&fake, "b").await;
        });
        answer_busy(&fake, &mut alone);
        drop((alone, orphan));
        assert!(fake.settled(), "every flight counted out");
    }

    /// A batch is bounded by what is left of its oldest read's `op_timeout`, and every read in it
    /// gets the time-out; a batch made after it is served.
    #[tokio::test]
    async fn a_batch_times_out_at_its_oldest_reads_bound() {
        let op_timeout = Duration::from_millis(200);
        let fake = Fake::new(true, op_timeout);
        let keys = busy_keys();
        let _alone = busy(&fake, &keys);
        let start = Instant::now();
        let (first, second) = (fake.read("a"), fake.read("b"));
        let (first, second) = tokio::join!(first, second);
        let took = start.elapsed();
        for result in [first, second] {
            assert!(result.as_ref().is_err_and(|e| e.is_timeout()), "{result:?}");
        }
        assert!(took >= op_timeout && took < op_timeout * 3 / 2, "{took:?}, bound {op_timeout:?}");
        served_alone(&fake, "c").await;
    }

    /// An error the server answers reaches each read as the server's error (not a reply that
    /// failed to parse): for a `GET` sent alone, and for an `MGET` refused as a whole.
    #[tokio::test]
    async fn a_servers_error_reaches_each_read_as_it_was_answered() {
        let refused =
            || redis::parse_redis_value(b"-NOPERM this user has no permissions to run it\r\n").unwrap();
        let fake = Fake::new(true, Duration::from_secs(5));
        let keys = busy_keys();
        let mut alone = busy(&fake, &keys);
        let (mut a, mut b) = (fake.read("a"), fake.read("b"));
        assert!(poll(&mut a).is_pending() && poll(&mut b).is_pending());
        run_tasks().await;
        fake.reply(ALONE_BELOW, refused());
        fake.reply(0, refused());
        run_tasks().await;
        for result in [poll(&mut a), poll(&mut b), poll(&mut alone[0])] {
            let Poll::Ready(Err(error)) = result else { panic!("{result:?}") };
            assert_eq!(error.code(), Some("NOPERM"), "{error:?}");
        }
    }

    /// Off, every read is its own `GET`, however many are in flight.
    #[tokio::test]
    async fn off_every_read_is_its_own_get() {
        let fake = Fake::new(false, Duration::from_secs(5));
        let keys: Vec<String> = (0..3 * ALONE_BELOW).map(|i| format!("k{i}")).collect();
        let mut reads: Vec<Read> = keys.iter().map(|k| fake.read(k)).collect();
        for r in &mut reads {
            assert!(poll(r).is_pending());
        }
        run_tasks().await;
        let commands = fake.commands();
        assert_eq!(commands.len(), keys.len());
        assert!(commands.iter().zip(&keys).all(|(c, k)| c == &words(&["GET", k])), "{commands:?}");
    }
}
