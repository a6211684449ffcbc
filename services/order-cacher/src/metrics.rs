//! order-cacher's own metrics, registered once where the pipeline is built.

use crate::dead_letter::Refusal;
use fleet::cache_writer::CacheWriterMetrics;
use fleet::envelope::PayloadError;
use fleet::observability::{MetricError, Metrics};
use fleet::version_guard::WriteOutcome;
use prometheus::{Histogram, IntCounter, IntCounterVec, IntGaugeVec};

/// Handles for every metric the pipeline updates. Labels come from fixed vocabularies.
#[derive(Clone)]
pub struct PipelineMetrics {
    applied: IntCounter,
    stale: IntCounter,
    duplicate: IntCounter,
    skipped_origin: IntCounter,
    dead_lettered: IntCounter,
    /// Dead letters by reason (`Refusal::reason`).
    pub dead_letters: IntCounterVec,
    /// Messages per Redis pipeline.
    pub batch_size: Histogram,
    /// From the message's Kafka timestamp to its write being done.
    pub event_to_cache_lag: Histogram,
    /// Consumer lag per assigned partition, from librdkafka statistics.
    pub consumer_lag: IntGaugeVec,
    /// Rebalance events by kind: assign, revoke, error.
    pub rebalances: IntCounterVec,
    /// Offset commits by result: ok, error.
    pub commits: IntCounterVec,
    /// Redis write latency and failures.
    pub writer: CacheWriterMetrics,
}

impl PipelineMetrics {
    /// Registers the metrics in `metrics`' registry.
    pub fn register(metrics: &Metrics) -> Result<Self, MetricError> {
        let messages = metrics.counter_vec(
            "messages_total",
            "Messages handled, by outcome: applied, stale, duplicate, skipped_origin, dead_lettered.",
            &["outcome"],
        )?;
        let dead_letters = metrics.counter_vec(
            "dead_letters_total",
            "Messages sent to a dead-letter topic, by reason.",
            &["reason"],
        )?;
        let commits = metrics.counter_vec(
            "offset_commits_total",
            "Offset commits, by result: ok, error.",
            &["result"],
        )?;
        // Present from the start at zero, so that `rate()` and alerts see the first one.
        for reason in PayloadError::REASONS.iter().chain(&Refusal::WRITE_REASONS) {
            dead_letters.with_label_values(&[reason]);
        }
        for result in ["ok", "error"] {
            commits.with_label_values(&[result]);
        }
        Ok(Self {
            applied: messages.with_label_values(&["applied"]),
            stale: messages.with_label_values(&["stale"]),
            duplicate: messages.with_label_values(&["duplicate"]),
            skipped_origin: messages.with_label_values(&["skipped_origin"]),
            dead_lettered: messages.with_label_values(&["dead_lettered"]),
            dead_letters,
            batch_size: metrics.histogram(
                "batch_size_messages",
                "Messages written per Redis pipeline.",
                vec![
                    1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
                ],
            )?,
            event_to_cache_lag: metrics.histogram(
                "event_to_cache_lag_seconds",
                "Time from a message's Kafka timestamp until its cache write finished.",
                vec![
                    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5,
                    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                ],
            )?,
            consumer_lag: metrics.gauge_vec(
                "consumer_lag_messages",
                "Messages between the committed offset and the end of each assigned partition.",
                &["topic", "partition"],
            )?,
            rebalances: metrics.counter_vec(
                "rebalances_total",
                "Consumer group rebalance events, by kind: assign, revoke, error.",
                &["kind"],
            )?,
            commits,
            writer: CacheWriterMetrics::register(metrics)?,
        })
    }

    /// Counts a batch's write outcomes, and observes each write's event-to-cache lag (its
    /// Kafka timestamp, in Unix milliseconds, against `now_ms`). Tallied locally, then added
    /// once per batch rather than once per message.
    pub fn count_written(
        &self,
        written: impl Iterator<Item = (WriteOutcome, Option<i64>)>,
        now_ms: i64,
    ) {
        let (mut applied, mut stale, mut duplicate) = (0, 0, 0);
        let lag = self.event_to_cache_lag.local();
        for (outcome, timestamp_ms) in written {
            match outcome {
                WriteOutcome::Applied => applied += 1,
                WriteOutcome::Stale => stale += 1,
                WriteOutcome::Duplicate => duplicate += 1,
            }
            if let Some(ms) = timestamp_ms {
                lag.observe((now_ms - ms).max(0) as f64 / 1000.0);
            }
        }
        lag.flush();
        self.applied.inc_by(applied);
        self.stale.inc_by(stale);
        self.duplicate.inc_by(duplicate);
    }

    /// Counts skipped messages.
    pub fn count_skipped(&self, n: u64) {
        self.skipped_origin.inc_by(n);
    }

    /// Counts one dead letter.
    pub fn count_dead_letter(&self, reason: &str) {
        self.dead_lettered.inc();
        self.dead_letters.with_label_values(&[reason]).inc();
    }
}
