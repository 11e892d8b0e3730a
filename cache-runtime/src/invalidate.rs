//! Invalidation: dropping one entry (`quote(symbol)`) or every entry of a function (`quote(..)`),
//! and retrying the ones the backend failed until they succeed or can no longer matter.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::__private::Spec;
use crate::error::BackendError;
use crate::key;
use crate::runtime::{Inner, Runtime};

/// What one entry of `#[invalidates(...)]` drops.
#[derive(Debug, Clone)]
pub enum Target {
    /// One entry: the key of a call (`None` if an argument failed to serialize: nothing to drop,
    /// since such a call was never cached).
    Key(&'static Spec, Option<String>),
    /// Every entry of a function.
    All(&'static Spec),
}

impl Target {
    fn spec(&self) -> &'static Spec {
        match self {
            Target::Key(spec, _) | Target::All(spec) => spec,
        }
    }

    fn same(&self, other: &Target) -> bool {
        match (self, other) {
            (Target::Key(a, ka), Target::Key(b, kb)) => a.db == b.db && ka == kb,
            (Target::All(a), Target::All(b)) => same_function(a, b),
            _ => false,
        }
    }
}

fn same_function(a: &Spec, b: &Spec) -> bool {
    (a.db, a.prefix, a.function, a.version) == (b.db, b.prefix, b.function, b.version)
}

/// Applies `targets` on the current runtime. Failures are queued and retried in the background;
/// nothing is returned because nothing may fail the caller.
pub async fn invalidate(targets: &[Target]) {
    let runtime = Runtime::current();
    for target in targets {
        let spec = target.spec();
        let counters = runtime.inner().stats.counters(spec.db, spec.prefix);
        match apply(runtime.inner(), target).await {
            Ok(()) => counters.invalidation(),
            Err(error) => {
                counters.backend_error();
                counters.invalidation_retry();
                tracing::warn!(db = spec.db, prefix = spec.prefix, function = spec.function, %error, "invalidation failed; retrying in the background");
                runtime.inner().pending.push(&runtime, target.clone());
            }
        }
    }
}

/// One invalidation, against this process's flights and the backend.
async fn apply(rt: &Inner, target: &Target) -> Result<(), BackendError> {
    match target {
        Target::Key(_, None) => Ok(()),
        Target::Key(spec, Some(key)) => {
            rt.flights.revoke(spec.db, key);
            rt.backend.invalidate(rt.op_timeout, spec.db, key).await
        }
        Target::All(spec) => {
            let base = key::function_base(spec);
            rt.flights.revoke_prefix(spec.db, &format!("{base}:"));
            match rt
                .backend
                .bump_generation(rt.op_timeout, spec.db, &key::generation_key(spec), spec.ttl)
                .await?
            {
                Some(generation) => rt.functions.observe(&rt.functions.get(spec, &rt.stats), generation),
                None => rt.functions.bump_local(&rt.functions.get(spec, &rt.stats)),
            };
            Ok(())
        }
    }
}

struct Queued {
    target: Target,
    /// After this, every entry the target covers has expired: the invalidation cannot matter.
    give_up_at: Instant,
}

/// Invalidations the backend failed, retried with backoff by one background task per runtime.
#[derive(Default)]
pub(crate) struct Pending {
    count: AtomicUsize,
    queue: Mutex<Vec<Queued>>,
    worker: AtomicBool,
}

const FIRST_RETRY: Duration = Duration::from_millis(50);
const MAX_RETRY: Duration = Duration::from_secs(1);

impl Pending {
    fn queue(&self) -> std::sync::MutexGuard<'_, Vec<Queued>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, runtime: &Runtime, target: Target) {
        {
            let mut queue = self.queue();
            if !queue.iter().any(|q| q.target.same(&target)) {
                let give_up_at = Instant::now() + target.spec().ttl;
                queue.push(Queued { target, give_up_at });
                self.count.store(queue.len(), SeqCst);
            }
        }
        self.start_worker(runtime);
    }

    fn start_worker(&self, runtime: &Runtime) {
        if self.worker.swap(true, SeqCst) {
            return;
        }
        let runtime = runtime.clone();
        tokio::spawn(async move { retry_until_done(runtime).await });
    }

    /// Whether a lookup of `key` must not trust the cache: an invalidation covering it has not
    /// reached the backend yet. Costs one atomic load when nothing is pending.
    pub(crate) fn covers(&self, spec: &Spec, key: &str) -> bool {
        if self.count.load(SeqCst) == 0 {
            return false;
        }
        self.queue().iter().any(|q| match &q.target {
            Target::Key(s, Some(k)) => s.db == spec.db && k == key,
            Target::Key(_, None) => false,
            Target::All(s) => same_function(s, spec),
        })
    }
}

async fn retry_until_done(runtime: Runtime) {
    let rt = runtime.inner();
    let mut pause = FIRST_RETRY;
    loop {
        tokio::time::sleep(pause).await;
        let batch: Vec<(Target, Instant)> =
            rt.pending.queue().iter().map(|q| (q.target.clone(), q.give_up_at)).collect();
        let mut settled = Vec::new();
        for (target, give_up_at) in batch {
            let spec = target.spec();
            let counters = rt.stats.counters(spec.db, spec.prefix);
            match apply(rt, &target).await {
                Ok(()) => {
                    counters.invalidation();
                    tracing::info!(
                        db = spec.db,
                        prefix = spec.prefix,
                        function = spec.function,
                        "queued invalidation applied"
                    );
                    settled.push(target);
                }
                Err(_) if Instant::now() >= give_up_at => {
                    counters.invalidation_expired();
                    tracing::warn!(
                        db = spec.db,
                        prefix = spec.prefix,
                        function = spec.function,
                        "queued invalidation dropped: every entry it covered has expired"
                    );
                    settled.push(target);
                }
                Err(error) => {
                    counters.backend_error();
                    counters.invalidation_retry();
                    tracing::debug!(db = spec.db, prefix = spec.prefix, %error, "invalidation retry failed");
                }
            }
        }
        {
            let mut queue = rt.pending.queue();
            queue.retain(|q| !settled.iter().any(|t| t.same(&q.target)));
            rt.pending.count.store(queue.len(), SeqCst);
            if queue.is_empty() {
                rt.pending.worker.store(false, SeqCst);
                return;
            }
        }
        pause = if settled.is_empty() { (pause * 2).min(MAX_RETRY) } else { FIRST_RETRY };
    }
}
