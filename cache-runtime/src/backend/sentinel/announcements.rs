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
//! Each subscription, once made, asks for a round too (an announcement may have come before it;
//! one round serves every subscription made after it began). A subscription that is lost, or
//! whose `PING` (every `PING_EVERY`) goes unanswered within `connect_timeout` (at least 1 s), is
//! made again `RESUBSCRIBE` later. One that cannot be made (a sentinel down, or refusing the
//! credentials or TLS it was given: `CacheConfig::with_sentinel_credentials`, `with_sentinel_tls`)
//! is logged once until it is.
//! Each task ends when the store it serves is dropped.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use super::Shared;

/// The channel sentinels announce a new primary on.
const SWITCH: &str = "+switch-master";

/// How long after a subscription is lost (or could not be made) it is made again.
const RESUBSCRIBE: Duration = Duration::from_secs(1);

/// How often a subscription's connection is asked `PING`; unanswered within `connect_timeout`
/// (at least 1 s), it is made again.
const PING_EVERY: Duration = Duration::from_secs(10);

/// Starts one subscription per sentinel of `shared`'s target.
pub(super) fn listen(shared: &Arc<Shared>) {
    for sentinel in &shared.target.sentinels {
        let mut dropped = shared.dropped.clone();
        let subscription = subscribe(Arc::downgrade(shared), sentinel.clone());
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
/// and asks every sentinel where the primary is at each announcement for this master, and once
/// each subscription is made (an announcement may have come before it).
async fn subscribe(shared: Weak<Shared>, address: String) {
    let Some(strong) = shared.upgrade() else { return };
    let (master, connect_timeout) = (strong.target.master.clone(), strong.connect_timeout);
    // Made once: what can fail here (a CA that does not parse) fails every question to the
    // sentinels as well, which the calls count and log.
    let client = match strong.sentinel_client(&address) {
        Ok(client) => client,
        Err(error) => {
            tracing::warn!(sentinel = %address, %error, "cannot subscribe to the sentinel's announcements");
            return;
        }
    };
    drop(strong);
    let answer_within = connect_timeout.max(Duration::from_secs(1));
    // Since when announcements may have been missed: one round of questions serves every
    // subscription made after it (`Shared::confirm`).
    let mut since = Instant::now();
    let mut warned = false;
    loop {
        let subscription = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(SWITCH).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        match tokio::time::timeout(connect_timeout, subscription).await {
            Ok(Ok(pubsub)) => {
                if std::mem::take(&mut warned) {
                    tracing::warn!(sentinel = %address, "subscribed to the sentinel's announcements again");
                }
                let Some(strong) = shared.upgrade() else { return };
                strong.confirm(since).await;
                drop(strong);
                let (mut sink, mut messages) = pubsub.split();
                let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
                loop {
                    tokio::select! {
                        message = messages.next() => {
                            let Some(message) = message else { break };
                            let Ok(text) = message.get_payload::<String>() else { continue };
                            if text.split(' ').next() != Some(master.as_str()) {
                                continue;
                            }
                            let Some(strong) = shared.upgrade() else { return };
                            tracing::debug!(sentinel = %address, announcement = %text, "a sentinel announced a new primary; asking every sentinel");
                            strong.confirm(Instant::now()).await;
                        }
                        _ = ping.tick() => {
                            // A connection whose peer is gone without a reset never ends the
                            // stream: a `PING` unanswered tells.
                            let answered = tokio::time::timeout(answer_within, sink.ping::<redis::Value>()).await;
                            if !matches!(answered, Ok(Ok(_))) {
                                break;
                            }
                        }
                    }
                }
                since = Instant::now();
                tracing::debug!(sentinel = %address, "the subscription to a sentinel's announcements was lost; made again in 1 s");
            }
            failed => {
                let error = match failed {
                    Ok(Err(error)) => super::sentinel_error(&address, error).to_string(),
                    _ => format!("no answer within connect_timeout ({connect_timeout:?})"),
                };
                if std::mem::replace(&mut warned, true) {
                    tracing::debug!(sentinel = %address, %error, "could not subscribe to a sentinel's announcements; tried again in 1 s");
                } else {
                    tracing::warn!(sentinel = %address, %error, "could not subscribe to the sentinel's announcements; tried again every second (logged once until it succeeds)");
                }
            }
        }
        if shared.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(RESUBSCRIBE).await;
    }
}
