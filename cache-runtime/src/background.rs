//! Work that must outlive the caller and the caller's tokio runtime: queued invalidation retries,
//! lease releases, the release of a lease whose request timed out. It runs on one small runtime
//! of its own, on a thread started on first use, so a test's or a request's runtime ending does
//! not end it.

use std::future::Future;
use std::sync::OnceLock;

fn handle() -> &'static tokio::runtime::Handle {
    static HANDLE: OnceLock<tokio::runtime::Handle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("cache-runtime-background")
            .build()
            .expect("the cache's background runtime starts (a thread and a timer)");
        let handle = runtime.handle().clone();
        std::thread::Builder::new()
            .name("cache-runtime-background".into())
            .spawn(move || runtime.block_on(std::future::pending::<()>()))
            .expect("the cache's background thread starts");
        handle
    })
}

/// Runs `work` in the background until it finishes.
pub(crate) fn spawn(work: impl Future<Output = ()> + Send + 'static) {
    handle().spawn(work);
}
