//! cache-updater's own metrics, registered once where the pipeline is built.

use fleet::cache_writer::CacheWriterMetrics;
use fleet::observability::{MetricError, Metrics};
use fleet::version_guard::WriteOutcome;
use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge};

use crate::decode::Op;
use crate::delivery::Failure;

/// How a message ended, a fixed metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// At least one of its writes took effect.
    Applied,
    /// Every write was older than what Redis holds.
    Stale,
    /// Redis already held it (a redelivery, or a duplicate).
    Duplicate,
    /// It came from Redis and was skipped.
    SkippedOrigin,
    /// It was dead-lettered.
    DeadLettered,
    /// Its write failed; it was put back on its queue for another delivery.
    Retried,
}

impl Outcome {
    /// The metric label.
    pub fn as_label(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Stale => "stale",
            Outcome::Duplicate => "duplicate",
            Outcome::SkippedOrigin => "skipped_origin",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::Retried => "retried",
        }
    }
}

/// Handles for every metric the pipeline updates. Labels come from fixed vocabularies.
#[derive(Clone)]
pub struct PipelineMetrics {
    messages: IntCounterVec,
    entries: IntCounterVec,
    /// Dead letters by reason (`PayloadError::reason`, `max_deliveries` or `write_failed`).
    pub dead_letters: IntCounterVec,
    /// Deliveries the broker flagged as redelivered.
    pub redeliveries: IntCounter,
    /// Delivered and not yet acked, rejected or requeued.
    pub unacked: IntGauge,
    /// Connections to RabbitMQ made after the first.
    pub reconnects: IntCounter,
    /// Acks dropped because their delivery came on a connection that has since closed.
    pub stale_acks_dropped: IntCounter,
    /// From the message's event time to its write being done.
    pub event_to_cache_lag: Histogram,
    /// Cache writes per Redis pipeline.
    pub batch_size: Histogram,
    /// Redis write latency and failures.
    pub writer: CacheWriterMetrics,
}

impl PipelineMetrics {
    /// Registers the metrics in `metrics`' registry.
    pub fn register(metrics: &Metrics) -> Result<Self, MetricError> {
        let messages = metrics.counter_vec(
            "messages_total",
            "Messages handled, by op and outcome: applied, stale, duplicate, skipped_origin, dead_lettered, retried.",
            &["op", "outcome"],
        )?;
        let dead_letters = metrics.counter_vec(
            "dead_letters_total",
            "Messages sent to the dead-letter queue, by reason.",
            &["reason"],
        )?;
        // Present from the start, so a dashboard sees zeros rather than gaps, and `rate()` and
        // alerts see the first dead letter (a counter that first appears at 1 hides it).
        for op in Op::ALL {
            messages.with_label_values(&[op.as_label(), "applied"]);
        }
        for reason in Failure::reasons() {
            dead_letters.with_label_values(&[reason]);
        }
        Ok(Self {
            messages,
            entries: metrics.counter_vec(
                "entries_total",
                "Cache writes (one per message, one per warm entry), by outcome: applied, stale, duplicate.",
                &["outcome"],
            )?,
            dead_letters,
            redeliveries: metrics.counter(
                "redeliveries_total",
                "Deliveries the broker flagged as redelivered.",
            )?,
            unacked: metrics.gauge(
                "unacked_messages",
                "Messages delivered and not yet acked, rejected or requeued.",
            )?,
            reconnects: metrics.counter(
                "amqp_reconnects_total",
                "Connections to RabbitMQ made after the first.",
            )?,
            stale_acks_dropped: metrics.counter(
                "stale_acks_dropped_total",
                "Acks not sent because their delivery came on a connection that has closed since.",
            )?,
            event_to_cache_lag: metrics.histogram(
                "event_to_cache_lag_seconds",
                "Time from a message's event time (envelope ts, else AMQP timestamp) until its cache write finished.",
                vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0, 60.0, 300.0,
                ],
            )?,
            batch_size: metrics.histogram(
                "batch_size_writes",
                "Cache writes per Redis pipeline.",
                vec![1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0],
            )?,
            writer: CacheWriterMetrics::register(metrics)?,
        })
    }

    /// Counts one message's outcome.
    pub fn count(&self, op: Op, outcome: Outcome) {
        self.messages
            .with_label_values(&[op.as_label(), outcome.as_label()])
            .inc();
    }

    /// Counts one cache write's outcome.
    pub fn count_entry(&self, outcome: WriteOutcome) {
        self.entries.with_label_values(&[outcome.as_label()]).inc();
    }
}
