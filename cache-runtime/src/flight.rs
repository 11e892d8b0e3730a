//! Single flight: concurrent misses on one key in one process run the function once; the others
//! wait for that caller's value.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// How a flight ended, as its followers see it.
#[derive(Clone)]
pub(crate) enum Outcome {
    /// The value to return (JSON of the cached part, as stored).
    Value(Arc<[u8]>),
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

type Slot = (u8, String);
type Running = HashMap<Slot, (u64, watch::Receiver<Option<Outcome>>)>;

#[derive(Default)]
pub(crate) struct Flights {
    next_id: AtomicU64,
    running: Mutex<Running>,
}

pub(crate) enum Join<'a> {
    Leader(Leader<'a>),
    Follower(watch::Receiver<Option<Outcome>>),
}

/// The caller that computes for a key. Dropping it unfinished releases the followers.
pub(crate) struct Leader<'a> {
    flights: &'a Flights,
    slot: Slot,
    id: u64,
    tx: watch::Sender<Option<Outcome>>,
}

impl Flights {
    fn running(&self) -> std::sync::MutexGuard<'_, Running> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Joins the flight for `key`, or starts one.
    pub(crate) fn join(&self, db: u8, key: &str) -> Join<'_> {
        let mut running = self.running();
        let slot = (db, key.to_owned());
        if let Some((_, rx)) = running.get(&slot) {
            return Join::Follower(rx.clone());
        }
        let id = self.next_id.fetch_add(1, Relaxed);
        let (tx, rx) = watch::channel(None);
        running.insert(slot.clone(), (id, rx));
        Join::Leader(Leader {
            flights: self,
            slot,
            id,
            tx,
        })
    }

    /// Callers arriving from now on start a new flight (an invalidation of `key` returned).
    pub(crate) fn revoke(&self, db: u8, key: &str) {
        self.running().remove(&(db, key.to_owned()));
    }

    /// Same, for every key starting with `prefix` (a `function(..)` invalidation).
    pub(crate) fn revoke_prefix(&self, db: u8, prefix: &str) {
        self.running()
            .retain(|(d, key), _| !(*d == db && key.starts_with(prefix)));
    }
}

impl Leader<'_> {
    pub(crate) fn finish(self, outcome: Outcome) {
        self.tx.send_replace(Some(outcome));
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        let mut running = self.flights.running();
        if running
            .get(&self.slot)
            .is_some_and(|(id, _)| *id == self.id)
        {
            running.remove(&self.slot);
        }
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
