//! The sentinels' `+switch-master` announcements (`CacheConfig::with_sentinel_announcements`):
//! one subscription per sentinel, each a task of the background runtime (`background.rs`).
//!
//! A sentinel announces `+switch-master <master> <old ip> <old port> <new ip> <new port>` when it
//! takes a new primary for a master, the leader of a failover first. An announcement for this
//! target's master does not move the connections by itself: it starts a round of questions to
//! every sentinel ([`Shared::confirm`]), whose majority's newest answer decides, as before an
//! invalidation's recheck. So a process that only reads, and its near copies, follows a failover
//! moments after the sentinels name the new primary, where it would otherwise wait until a call
//! failed (a demoted primary that is still alive answers reads until the sentinels convert it,
//! many seconds later).
//!
//! A subscription that is lost is made again `RESUBSCRIBE` later, and once it is, a round is
//! asked for too (an announcement may have been missed meanwhile). A sentinel that never answers
//! leaves its subscription silent; the others' announcements still come. Each task ends when the
//! store it serves is dropped.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use redis::ConnectionAddr;

use super::{sentinel_address, Shared};

/// The channel sentinels announce a new primary on.
const SWITCH: &str = "+switch-master";

/// How long after a subscription is lost (or could not be made) it is made again.
const RESUBSCRIBE: Duration = Duration::from_secs(1);

/// Starts one subscription per sentinel of `shared`'s target.
pub(super) fn listen(shared: &Arc<Shared>) {
    for sentinel in &shared.target.sentinels {
        let mut dropped = shared.dropped.subscribe();
        let subscription = subscribe(Arc::downgrade(shared), sentinel_address(sentinel));
        crate::background::spawn(async move {
            tokio::select! {
                // Never sent: this only ends when the store is dropped.
                _ = dropped.changed() => {}
                () = subscription => {}
            }
        });
    }
}

/// Subscribes to `+switch-master` on the sentinel at `address`, again whenever that is lost,
/// and asks every sentinel where the primary is at each announcement for this master.
async fn subscribe(shared: Weak<Shared>, address: ConnectionAddr) {
    let Some(strong) = shared.upgrade() else { return };
    let (master, connect_timeout) = (strong.target.master.clone(), strong.connect_timeout);
    drop(strong);
    let mut subscribed_before = false;
    loop {
        let subscription = async {
            let client = redis::Client::open(address.clone())?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(SWITCH).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        match tokio::time::timeout(connect_timeout, subscription).await {
            Ok(Ok(pubsub)) => {
                if std::mem::replace(&mut subscribed_before, true) {
                    // Made again: an announcement may have come while it was lost.
                    let Some(shared) = shared.upgrade() else { return };
                    shared.confirm(Instant::now()).await;
                }
                let mut messages = pubsub.into_on_message();
                while let Some(message) = messages.next().await {
                    let Ok(text) = message.get_payload::<String>() else { continue };
                    if text.split(' ').next() != Some(master.as_str()) {
                        continue;
                    }
                    let Some(shared) = shared.upgrade() else { return };
                    tracing::debug!(sentinel = %address, announcement = %text, "a sentinel announced a new primary; asking every sentinel");
                    shared.confirm(Instant::now()).await;
                }
                tracing::debug!(sentinel = %address, "the subscription to a sentinel's announcements was lost; made again in 1 s");
            }
            Ok(Err(error)) => {
                tracing::debug!(sentinel = %address, %error, "could not subscribe to a sentinel's announcements; tried again in 1 s");
            }
            Err(_) => {
                tracing::debug!(sentinel = %address, "a sentinel did not take a subscription within connect_timeout; tried again in 1 s");
            }
        }
        if shared.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(RESUBSCRIBE).await;
    }
}
