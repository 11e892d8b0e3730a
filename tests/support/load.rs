//! Load for the failover tests: tasks calling a cached function in a loop, each checking its
//! answer, until stopped.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

pub struct Load {
    stop: Arc<AtomicBool>,
    calls: Arc<AtomicU64>,
    wrong: Arc<AtomicU64>,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// `tasks` tasks, each calling `call(i)` for i = its index, then i + 7, ..., 1 ms apart;
    /// `call` says whether the answer was right.
    pub fn start<F, Fut>(tasks: usize, call: F) -> Load
    where
        F: Fn(u32) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = bool> + Send,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let (calls, wrong): (Arc<AtomicU64>, Arc<AtomicU64>) = (Arc::default(), Arc::default());
        let handles = (0..tasks)
            .map(|t| {
                let (call, stop, calls, wrong) =
                    (call.clone(), Arc::clone(&stop), Arc::clone(&calls), Arc::clone(&wrong));
                tokio::spawn(async move {
                    let mut i = t as u32;
                    while !stop.load(SeqCst) {
                        if !call(i).await {
                            wrong.fetch_add(1, SeqCst);
                        }
                        calls.fetch_add(1, SeqCst);
                        i = i.wrapping_add(7);
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                })
            })
            .collect();
        Load { stop, calls, wrong, handles }
    }

    /// Stops the tasks; (calls, wrong answers).
    pub async fn stop(self) -> (u64, u64) {
        self.stop.store(true, SeqCst);
        for h in self.handles {
            h.await.expect("no caller panicked");
        }
        (self.calls.load(SeqCst), self.wrong.load(SeqCst))
    }
}
