//! What leaves the process for an operator: metrics through the [`metrics`](::metrics) facade, a
//! Prometheus text exposition (feature `prometheus`), and a `tracing` span per cached call.
//!
//! **Metrics.** Labelled `db`, `prefix` and `function` (the function's name; `""` for the
//! [`Cache`](crate::Cache) handles of a prefix):
//! - counters `cache_{name}_total` for every counter of [`PrefixStats::counters`] (`cache_hits_total`,
//!   `cache_misses_total`, `cache_fills_total`, `cache_refused_fills_total`,
//!   `cache_decode_failures_total`, `cache_backend_errors_total`, `cache_bypassed_total`,
//!   `cache_invalidations_total`, `cache_invalidation_retries_total`, ...). The runtime counts
//!   with its own atomics; [`publish`] hands their values to the recorder (`Counter::absolute`),
//!   so the hit path pays nothing for them. [`Prometheus::render`] publishes before it renders; a
//!   push-based recorder needs [`publish`] called on an interval.
//! - histograms, recorded on each call: `cache_lookup_seconds` (one backend lookup, hit or
//!   miss), `cache_compute_seconds` (the function's run on a miss), `cache_fill_seconds` (from
//!   handing a fill to the backend to its answer, write-behind queueing included). They are
//!   registered with the recorder installed when the function is first called: install the
//!   recorder before the first cached call.
//! - gauges, labelled `backend`: `cache_write_queue_depth` (accepted writes not yet answered),
//!   `cache_pending_invalidations` (queued for retry), `cache_breaker_open` (1 while the circuit
//!   breaker skips the backend).
//!
//! **Spans.** Each cached call runs in a `debug`-level span named `cache.call` with the fields
//! `cache.db`, `cache.prefix`, `cache.function` and `cache.outcome` (`hit`, `miss`, `refresh`
//! (an eager refresh), `stale` (a fail-safe answer), `bypassed`, `unavailable` or `uncached`);
//! the function's own spans are its children, so `tracing-opentelemetry` exports it as the parent of whatever the function does. Enable it with
//! a filter such as `cache_runtime=debug` (which also shows the hit and miss events).

use crate::runtime::Runtime;
use crate::stats::PrefixStats;

pub(crate) const LOOKUP_SECONDS: &str = "cache_lookup_seconds";
pub(crate) const FILL_SECONDS: &str = "cache_fill_seconds";
pub(crate) const COMPUTE_SECONDS: &str = "cache_compute_seconds";
const QUEUE_DEPTH: &str = "cache_write_queue_depth";
const PENDING_INVALIDATIONS: &str = "cache_pending_invalidations";
const BREAKER_OPEN: &str = "cache_breaker_open";

/// The labels of one function's metrics.
pub(crate) fn labels(db: u8, prefix: &str, function: &str) -> [::metrics::Label; 3] {
    [
        ::metrics::Label::new("db", db.to_string()),
        ::metrics::Label::new("prefix", prefix.to_owned()),
        ::metrics::Label::new("function", function.to_owned()),
    ]
}

/// Hands `runtime`'s counters and gauges to the installed `metrics` recorder (each counter's
/// value as an absolute). [`Prometheus::render`] calls it; call it on an interval for a
/// push-based recorder.
pub fn publish(runtime: &Runtime) {
    describe();
    for f in runtime.stats().functions {
        let labels = labels(f.db, &f.prefix, f.function.as_deref().unwrap_or(""));
        for (name, value) in PrefixStats::counters(&f) {
            ::metrics::counter!(format!("cache_{name}_total"), labels.iter()).absolute(value);
        }
    }
    let backend = [::metrics::Label::new("backend", runtime.backend_kind())];
    ::metrics::gauge!(QUEUE_DEPTH, backend.iter()).set(runtime.queued_writes() as f64);
    ::metrics::gauge!(PENDING_INVALIDATIONS, backend.iter()).set(runtime.pending_invalidations() as f64);
    ::metrics::gauge!(BREAKER_OPEN, backend.iter()).set(if runtime.breaker_open() { 1.0 } else { 0.0 });
}

fn describe() {
    use ::metrics::{describe_gauge, describe_histogram, Unit};
    describe_histogram!(LOOKUP_SECONDS, Unit::Seconds, "One cache lookup on the backend, hit or miss.");
    describe_histogram!(COMPUTE_SECONDS, Unit::Seconds, "A cached function's run on a miss.");
    describe_histogram!(FILL_SECONDS, Unit::Seconds, "A fill, from its hand-off to the backend's answer.");
    describe_gauge!(QUEUE_DEPTH, "Cache writes accepted and not yet answered by the backend.");
    describe_gauge!(PENDING_INVALIDATIONS, "Invalidations that failed and are queued for retry.");
    describe_gauge!(BREAKER_OPEN, "1 while the circuit breaker makes cached calls skip the backend.");
}

/// Records the outcome of the cached call whose span is current (`cache.outcome`). That span is
/// a debug one: where no subscriber takes debug, none was made, and the current span (a lookup
/// through the subscriber, on every hit) is not asked for.
pub(crate) fn outcome(outcome: &'static str) {
    if tracing::level_enabled!(tracing::Level::DEBUG) {
        tracing::Span::current().record("cache.outcome", outcome);
    }
}

#[cfg(feature = "prometheus")]
pub use self::prometheus::{BuildError, Prometheus};

#[cfg(feature = "prometheus")]
mod prometheus {
    pub use metrics_exporter_prometheus::BuildError;
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

    use crate::runtime::Runtime;

    /// Latency buckets, in seconds: 50 µs to 10 s.
    const BUCKETS: &[f64] = &[
        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
        2.5, 10.0,
    ];

    /// A Prometheus recorder for the process and its text exposition (feature `prometheus`).
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let prometheus = cache_runtime::telemetry::Prometheus::install().expect("no other recorder yet");
    /// let runtime = cache_runtime::Runtime::new(cache_runtime::CacheConfig::memory());
    /// let text = prometheus.render_for(&runtime);
    /// assert!(text.contains("cache_breaker_open{backend=\"memory\"} 0"));
    /// # });
    /// ```
    #[derive(Clone)]
    pub struct Prometheus {
        handle: PrometheusHandle,
    }

    impl Prometheus {
        /// Installs a Prometheus recorder as the process's `metrics` recorder, with the cache's
        /// latencies as histograms (buckets from 50 µs to 10 s). Call it before the first cached
        /// call. Fails if a recorder is installed already: then use [`Prometheus::from_handle`].
        pub fn install() -> Result<Prometheus, BuildError> {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Prefix("cache_".to_owned()), BUCKETS)?
                .install_recorder()?;
            Ok(Prometheus { handle })
        }

        /// The service's own Prometheus recorder, installed by it.
        pub fn from_handle(handle: PrometheusHandle) -> Prometheus {
            Prometheus { handle }
        }

        /// The text exposition, after publishing the process-wide runtime's counters
        /// ([`crate::global`], or the one of an enclosing [`Runtime::scope`]).
        pub fn render(&self) -> String {
            self.render_for(&Runtime::current())
        }

        /// The text exposition, after publishing `runtime`'s counters.
        pub fn render_for(&self, runtime: &Runtime) -> String {
            super::publish(runtime);
            self.handle.render()
        }
    }
}
