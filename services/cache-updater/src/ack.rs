//! Acks in delivery order, one `multiple` ack per run of finished deliveries.
//!
//! Each channel has its own tracker. When the connection drops, the channel is closed and its
//! tracker's acks fail locally and are dropped: a delivery tag of a closed channel is never sent
//! on a newer one, so the broker never sees a stale tag.

use std::collections::BTreeMap;

use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use lapin::Channel;
use tokio::sync::mpsc;
use tokio::time::{Duration, Instant};

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

/// How long a finished delivery may wait for more to share its ack. Fewer ack frames leave
/// the broker more time for deliveries.
const ACK_DELAY: Duration = Duration::from_millis(5);

/// Runs until every sender is gone, acking runs of finished deliveries as they complete: at
/// once when `ack_batch` are waiting, otherwise after [`ACK_DELAY`]. Deliveries still open
/// at the end are left to the broker, which redelivers them.
pub async fn track(
    channel: Channel,
    mut events: mpsc::UnboundedReceiver<AckEvent>,
    ack_batch: usize,
    metrics: PipelineMetrics,
) {
    let mut tracker = Tracker {
        channel,
        open: BTreeMap::new(),
        ack_up_to: None,
        waiting: 0,
        metrics,
    };
    let mut buffer = Vec::with_capacity(256);
    let mut deadline: Option<Instant> = None;
    loop {
        tokio::select! {
            received = events.recv_many(&mut buffer, 1024) => {
                if received == 0 {
                    break;
                }
                tracker.apply(buffer.drain(..));
                tracker.settle_finished_prefix().await;
                if tracker.waiting >= ack_batch {
                    tracker.flush().await;
                    deadline = None;
                } else if tracker.waiting > 0 {
                    deadline.get_or_insert_with(|| Instant::now() + ACK_DELAY);
                }
            }
            _ = sleep_until(deadline), if deadline.is_some() => {
                tracker.flush().await;
                deadline = None;
            }
        }
    }
    tracker.flush().await;
    tracker.metrics.unacked.sub(tracker.open.len() as i64);
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

struct Tracker {
    channel: Channel,
    open: BTreeMap<u64, Option<Settlement>>,
    /// The last of the finished deliveries at the front that are not acked yet.
    ack_up_to: Option<u64>,
    waiting: usize,
    metrics: PipelineMetrics,
}

impl Tracker {
    fn apply(&mut self, events: impl Iterator<Item = AckEvent>) {
        for event in events {
            match event {
                AckEvent::Delivered(tag) => {
                    self.open.insert(tag, None);
                }
                AckEvent::Settled(tag, settlement) => {
                    if let Some(slot) = self.open.get_mut(&tag) {
                        *slot = Some(settlement);
                    }
                }
            }
        }
    }

    /// Takes the finished deliveries at the front, in order: acks are gathered into one
    /// `multiple` ack, rejects and requeues are sent one by one (after the acks before them).
    async fn settle_finished_prefix(&mut self) {
        while let Some(entry) = self.open.first_entry() {
            let Some(settlement) = *entry.get() else {
                break;
            };
            let tag = *entry.key();
            entry.remove();
            if settlement == Settlement::Ack {
                self.ack_up_to = Some(tag);
                self.waiting += 1;
                continue;
            }
            self.flush().await;
            self.metrics.unacked.dec();
            let result = if settlement == Settlement::Reject {
                self.channel
                    .basic_reject(tag, BasicRejectOptions { requeue: false })
                    .await
            } else {
                self.channel
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
                self.metrics.stale_acks_dropped.inc();
                tracing::debug!(error = %e, tag, "Reject not sent; the channel is closed.");
            }
        }
    }

    async fn flush(&mut self) {
        if let Some(tag) = self.ack_up_to.take() {
            self.metrics.unacked.sub(self.waiting as i64);
            self.waiting = 0;
            ack(&self.channel, tag, &self.metrics).await;
        }
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
