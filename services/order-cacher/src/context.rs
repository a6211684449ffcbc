//! The Kafka consumer's callbacks: on a revoke, waiting for the Redis write in flight and then
//! committing; rebalance counts; lag from statistics; and librdkafka's errors and logs at the
//! fleet's levels.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, TopicPartitionList};

use fleet::observability::DependencyStatus;

use crate::metrics::PipelineMetrics;
use crate::ownership::Ownership;

/// The longest a revoke waits for the write attempt in flight. An attempt is bounded by the
/// Redis response timeout and the connection's reconnect retries (a few seconds), so this is
/// reached only when Redis hangs.
const REVOKE_WAIT: Duration = Duration::from_secs(30);

/// Callbacks librdkafka runs on the thread that polls the consumer.
pub struct OrderContext {
    metrics: PipelineMetrics,
    /// The `kafka` readiness switch, shared with the background probe.
    kafka: DependencyStatus,
    /// Revokes, so the writer never writes a partition this replica lost.
    ownership: Arc<Ownership>,
}

impl OrderContext {
    /// A context updating `metrics`, and marking `kafka` down when the consumer loses every
    /// broker.
    pub fn new(metrics: PipelineMetrics, kafka: DependencyStatus) -> Self {
        Self {
            metrics,
            kafka,
            ownership: Arc::default(),
        }
    }

    /// What the revokes so far mean for messages already read.
    pub fn ownership(&self) -> &Arc<Ownership> {
        &self.ownership
    }

    /// Marks Kafka down when the consumer has lost every broker. The consumer's own report
    /// comes first: the metadata probe only notices at its next round, and a short broker
    /// restart can fall between two rounds. The probe marks Kafka up again once a broker
    /// answers.
    pub fn note_error(&self, error: &KafkaError) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.kafka.set_up(false);
        }
    }
}

impl ClientContext for OrderContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        fleet::kafka::log_client_message(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        fleet::kafka::log_client_error(&error, reason);
        self.note_error(&error);
    }

    fn stats(&self, statistics: Statistics) {
        let lag = &self.metrics.consumer_lag;
        lag.reset();
        for (topic, stats) in &statistics.topics {
            for (partition, p) in &stats.partitions {
                // Partition -1 is librdkafka's internal "unassigned" queue; -1 lag means unknown.
                if *partition >= 0 && p.consumer_lag >= 0 {
                    lag.with_label_values(&[topic.as_str(), &partition.to_string()])
                        .set(p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for OrderContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            self.metrics.rebalances.with_label_values(&["revoke"]).inc();
            tracing::info!(partitions = %describe(partitions), "Partitions revoked; committing offsets.");
            // No write of these partitions may run once the revoke returns: their next owner
            // starts from the commit. This runs inside the consumer's poll, on a worker of the
            // multi-threaded runtime, so it moves the worker's other tasks (the writer) away
            // while it waits.
            let finished =
                tokio::task::block_in_place(|| self.ownership.revoke(partitions, REVOKE_WAIT));
            if !finished {
                tracing::warn!(
                    wait_secs = REVOKE_WAIT.as_secs(),
                    "A Redis write was still running when the revoke went ahead."
                );
            }
            // Commit what is written so the next owner starts right after it.
            match consumer.commit_consumer_state(CommitMode::Sync) {
                Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
                Err(e) => tracing::warn!(error = %e, "Commit on revoke failed."),
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(partitions) => {
                self.metrics.rebalances.with_label_values(&["assign"]).inc();
                tracing::info!(partitions = %describe(partitions), "Partitions assigned.");
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => {
                self.metrics.rebalances.with_label_values(&["error"]).inc();
                tracing::warn!(error = %e, "Rebalance failed.");
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        match result {
            Ok(()) => self.metrics.commits.with_label_values(&["ok"]).inc(),
            // Nothing new was stored since the last commit.
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                self.metrics.commits.with_label_values(&["error"]).inc();
                tracing::warn!(error = %e, "Offset commit failed.");
            }
        }
    }
}

fn describe(partitions: &TopicPartitionList) -> String {
    partitions
        .elements()
        .iter()
        .map(|e| format!("{}/{}", e.topic(), e.partition()))
        .collect::<Vec<_>>()
        .join(",")
}
