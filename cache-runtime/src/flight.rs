//! Single flight: concurrent misses on one key in one process run the function once; the others
//! wait for that caller's value.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// How a flight ended, as its followers see it.
#[derive(Clone)]
pub(crate) enum Outcome {
    /// The value to return (JSON of the cached part, as stored), checked by the lease protocol:
    /// no invalidation of the key came between the lease's grant and the fill.
    Value(Arc<[u8]>),
    /// A value the lease protocol could not check (the backend failed: no lease, or the fill
    /// failed), computed from this moment on. A follower that joined before it takes it; one that
    /// joined later starts over, since a write acknowledged in between may be newer.
    Unverified(Arc<[u8]>, std::time::Instant),
    /// The leader's fill was refused: an invalidation happened while it computed, so its value
    /// may predate a write that some followers must see. They start over.
    Refused,
    /// The function returned something that is not cached (an `Err`, a `None`): each follower
    /// gets its own result.
    Uncached,
    /// The leader went away (its caller was cancelled, or the function panicked). They start
    /// over; one of them leads.
    Abandoned,
}

type Running = HashMap<String, (u64, watch::Receiver<Option<Outcome>>), foldhash::fast::RandomState>;

#[derive(Default)]
pub(crate) struct Flights {
    next_id: AtomicU64,
    /// How many flights are running: lets a hit skip the locks when there are none.
    count: AtomicUsize,
    /// Per DB, so that a probe by `&str` needs no key built and DBs do not contend.
    running: [Mutex<Running>; 16],
}

pub(crate) enum Join {
    Leader(Leader),
    Follower(watch::Receiver<Option<Outcome>>),
}

/// The caller that computes for a key. Dropping it unfinished releases the followers. It owns a
/// handle on its flights so that a write-behind fill can finish the flight after the caller has
/// returned.
pub(crate) struct Leader {
    flights: Arc<Flights>,
    db: u8,
    key: String,
    id: u64,
    tx: watch::Sender<Option<Outcome>>,
}

impl Flights {
    fn running(&self, db: u8) -> std::sync::MutexGuard<'_, Running> {
        self.running[usize::from(db & 0x0f)].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Joins the flight for `key`, or starts one.
    pub(crate) fn join(this: &Arc<Flights>, db: u8, key: &str) -> Join {
        let mut running = this.running(db);
        if let Some((_, rx)) = running.get(key) {
            return Join::Follower(rx.clone());
        }
        let id = this.next_id.fetch_add(1, Relaxed);
        let (tx, rx) = watch::channel(None);
        running.insert(key.to_owned(), (id, rx));
        this.count.fetch_add(1, Relaxed);
        Join::Leader(Leader { flights: Arc::clone(this), db, key: key.to_owned(), id, tx })
    }

    /// A leader that no caller can follow (an eager refresh: callers keep reading the entry).
    pub(crate) fn detached(this: &Arc<Flights>, db: u8, key: &str) -> Leader {
        let id = this.next_id.fetch_add(1, Relaxed);
        let (tx, _) = watch::channel(None);
        Leader { flights: Arc::clone(this), db, key: key.to_owned(), id, tx }
    }

    pub(crate) fn any_running(&self) -> bool {
        self.count.load(Relaxed) > 0
    }

    pub(crate) fn is_running(&self, db: u8, key: &str) -> bool {
        self.running(db).contains_key(key)
    }

    /// Callers arriving from now on start a new flight (an invalidation of `key` returned).
    pub(crate) fn revoke(&self, db: u8, key: &str) {
        if self.running(db).remove(key).is_some() {
            self.count.fetch_sub(1, Relaxed);
        }
    }

    /// Same, for every key starting with `prefix` (a `function(..)` invalidation).
    pub(crate) fn revoke_prefix(&self, db: u8, prefix: &str) {
        let mut running = self.running(db);
        let before = running.len();
        running.retain(|key, _| !key.starts_with(prefix));
        self.count.fetch_sub(before - running.len(), Relaxed);
    }
}

impl Leader {
    /// A receiver of this flight's outcome (for a detached leader's own caller).
    pub(crate) fn subscribe(&self) -> watch::Receiver<Option<Outcome>> {
        self.tx.subscribe()
    }

    pub(crate) fn finish(self, outcome: Outcome) {
        self.tx.send_replace(Some(outcome));
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        let flights = &self.flights;
        let mut running = flights.running(self.db);
        if running.get(&self.key).is_some_and(|(id, _)| *id == self.id) {
            running.remove(&self.key);
            flights.count.fetch_sub(1, Relaxed);
        }
        drop(running);
        // An unfinished flight (cancelled or panicking leader) tells its followers so.
        if self.tx.borrow().is_none() {
            self.tx.send_replace(Some(Outcome::Abandoned));
        }
    }
}

/// Waits for the leader's outcome.
pub(crate) async fn wait(mut rx: watch::Receiver<Option<Outcome>>) -> Outcome {
    match rx.wait_for(Option::is_some).await {
        Ok(outcome) => outcome.clone().unwrap_or(Outcome::Abandoned),
        Err(_) => Outcome::Abandoned,
    }
}
