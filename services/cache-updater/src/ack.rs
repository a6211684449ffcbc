//! Acks in delivery order, one `multiple` ack per run of finished deliveries.
//!
//! Each channel has its own tracker. When the connection drops, the channel is closed and its
//! tracker's acks fail locally and are dropped: a delivery tag of a closed channel is never sent
//! on a newer one, so the broker never sees a stale tag.

use std::collections::BTreeMap;

use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use lapin::Channel;
use tokio::sync::mpsc;

use crate::metrics::PipelineMetrics;

/// How a delivery is finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Written, skipped, or copied elsewhere (dead letter, retry): remove it from the queue.
    Ack,
    /// Reject without requeue: the broker dead-letters it through the queue's dead-letter
    /// exchange.
    Reject,
    /// Put it back on the queue.
    Requeue,
}

/// What the tracker hears about a channel's deliveries.
#[derive(Debug)]
pub enum AckEvent {
    /// A delivery arrived; sent before any work on it starts.
    Delivered(u64),
    /// A delivery is finished.
    Settled(u64, Settlement),
}

/// Sends a channel's events to its tracker.
pub type AckSender = mpsc::UnboundedSender<AckEvent>;

/// Runs until every sender is gone, acking each run of finished deliveries as it completes.
/// Deliveries still open at the end are left to the broker, which redelivers them.
pub async fn track(
    channel: Channel,
    mut events: mpsc::UnboundedReceiver<AckEvent>,
    metrics: PipelineMetrics,
) {
    let mut open: BTreeMap<u64, Option<Settlement>> = BTreeMap::new();
    let mut buffer = Vec::with_capacity(256);
    while events.recv_many(&mut buffer, 1024).await > 0 {
        for event in buffer.drain(..) {
            match event {
                AckEvent::Delivered(tag) => {
                    open.insert(tag, None);
                }
                AckEvent::Settled(tag, settlement) => {
                    if let Some(slot) = open.get_mut(&tag) {
                        *slot = Some(settlement);
                    }
                }
            }
        }
        settle_finished_prefix(&channel, &mut open, &metrics).await;
    }
    metrics.unacked.sub(open.len() as i64);
}

/// Settles the finished deliveries at the front, in order: acks as one `multiple` ack up to
/// the last of a run, rejects and requeues one by one.
async fn settle_finished_prefix(
    channel: &Channel,
    open: &mut BTreeMap<u64, Option<Settlement>>,
    metrics: &PipelineMetrics,
) {
    let mut ack_up_to = None;
    while let Some(entry) = open.first_entry() {
        let Some(settlement) = *entry.get() else {
            break;
        };
        let tag = *entry.key();
        entry.remove();
        metrics.unacked.dec();
        match settlement {
            Settlement::Ack => ack_up_to = Some(tag),
            other => {
                if let Some(last) = ack_up_to.take() {
                    ack(channel, last, metrics).await;
                }
                let result = if other == Settlement::Reject {
                    channel
                        .basic_reject(tag, BasicRejectOptions { requeue: false })
                        .await
                } else {
                    channel
                        .basic_nack(
                            tag,
                            BasicNackOptions {
                                multiple: false,
                                requeue: true,
                            },
                        )
                        .await
                };
                if let Err(e) = result {
                    metrics.stale_acks_dropped.inc();
                    tracing::debug!(error = %e, tag, "Reject not sent; the channel is closed.");
                }
            }
        }
    }
    if let Some(last) = ack_up_to {
        ack(channel, last, metrics).await;
    }
}

async fn ack(channel: &Channel, tag: u64, metrics: &PipelineMetrics) {
    if let Err(e) = channel
        .basic_ack(tag, BasicAckOptions { multiple: true })
        .await
    {
        // The channel closed: the broker requeues these deliveries and they come back,
        // to be applied as no-ops. Sending the tag on another channel would be an error.
        metrics.stale_acks_dropped.inc();
        tracing::debug!(error = %e, tag, "Ack not sent; the channel is closed.");
    }
}
