//! The Kafka consumer's callbacks: commits on revoke, rebalance counts, lag from statistics,
//! and librdkafka's errors and logs at the fleet's levels.

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, TopicPartitionList};

use crate::metrics::PipelineMetrics;

/// Callbacks librdkafka runs on the thread that polls the consumer.
pub struct OrderContext {
    metrics: PipelineMetrics,
}

impl OrderContext {
    /// A context updating `metrics`.
    pub fn new(metrics: PipelineMetrics) -> Self {
        Self { metrics }
    }
}

impl ClientContext for OrderContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        fleet::kafka::log_client_message(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        fleet::kafka::log_client_error(&error, reason);
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
