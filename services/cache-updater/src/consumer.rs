//! The RabbitMQ side: connect, declare the topology, consume every queue, and start over with
//! backoff whenever the connection or a channel fails.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use futures::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ExchangeKind};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::ack::{self, Settlement};
use crate::config::{CacheUpdaterConfig, TopologyConfig, CONSISTENT_HASH_EXCHANGE};
use crate::decode::{Decoded, QueueRules};
use crate::delivery::{Delivery, Failure, Link};
use crate::metrics::{Outcome, PipelineMetrics};
use crate::shard::Shards;
use fleet::observability::DependencyStatus;
use fleet::Shutdown;

/// Why a connection's consumers stopped.
#[derive(Debug, thiserror::Error)]
enum EpochError {
    /// The broker or the connection failed.
    #[error("{0}")]
    Amqp(#[from] lapin::Error),
    /// The broker ended a consumer (the queue was deleted, or the channel closed).
    #[error("the consumer of queue `{0}` was closed")]
    Closed(String),
    /// The channel for dead letters and retries closed (the broker closes a channel on an
    /// error, such as a missing exchange); without it nothing could be dead-lettered.
    #[error("the publishing channel closed")]
    PublisherClosed,
    /// A consumer task died.
    #[error("a queue consumer task failed: {0}")]
    Task(String),
    /// The broker refused to declare a queue, or a queue consumed as it is does not exist.
    #[error("queue `{queue}`: {source}")]
    Queue { queue: String, source: lapin::Error },
}

impl EpochError {
    /// What an operator should do about an error that retrying alone does not fix.
    fn hint(&self) -> Option<&'static str> {
        let EpochError::Queue { source, .. } = self else {
            return None;
        };
        let lapin::ErrorKind::ProtocolError(error) = source.kind() else {
            return None;
        };
        match error.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => Some(
                "A queue exists with other arguments than cache-updater declares. Delete it so \
                 that it is declared as configured, or set `declare = false` on that queue to \
                 consume it as it is. Retrying.",
            ),
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => Some(
                "A queue set to be consumed as it is (`declare = false`) does not exist. Create \
                 it, or let cache-updater declare it. Retrying.",
            ),
            _ => None,
        }
    }
}

/// How often an idle consumer checks that its publishing channel is open.
const PUBLISHER_CHECK: Duration = Duration::from_secs(1);

/// How long deliveries already sent are taken after the consumer is cancelled at shutdown.
const DRAIN_ON_SHUTDOWN: Duration = Duration::from_secs(5);

/// How long closing the connection may take. A close can wait forever for the broker's reply
/// when the connection failed as it was closing (a frame arrived for a channel being closed).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// An epoch that ran at least this long resets the reconnect backoff.
const HEALTHY_EPOCH: Duration = Duration::from_secs(30);

/// Consumes until shutdown, reconnecting as often as it takes. Returns once shutdown came and
/// every in-flight message was written and acked (or left unacked for redelivery).
pub async fn run(
    config: &CacheUpdaterConfig,
    shards: Shards,
    metrics: PipelineMetrics,
    status: DependencyStatus,
    shutdown: Shutdown,
) {
    let rules: Vec<QueueRules> = config
        .queues
        .iter()
        .map(|q| QueueRules::new(q, &config.origin, config.consumer.max_message_bytes))
        .collect();
    let mut delays = fleet::retry::reconnect_backoff().build();
    let mut connections = 0u64;
    loop {
        tracing::info!(url = %config.amqp.url, "Connecting to RabbitMQ.");
        let Some(conn) = fleet::retry::until_ok("amqp connect", &shutdown, || {
            fleet::amqp::connect(&config.amqp, crate::SPEC.name)
        })
        .await
        else {
            break;
        };
        connections += 1;
        if connections > 1 {
            metrics.reconnects.inc();
        }
        let started = Instant::now();
        let epoch = Epoch {
            config,
            rules: &rules,
            shards: &shards,
            metrics: &metrics,
            status: &status,
            shutdown: &shutdown,
        };
        let ended = epoch.run(&conn).await;
        status.set_up(false);
        match ended {
            Ok(draining) => {
                // Shutdown: let the writers finish what they hold, then ack it.
                drop(shards);
                let acked = futures::future::join_all(draining.trackers);
                let all_acked = tokio::time::timeout(DRAIN_ON_SHUTDOWN, acked).await.is_ok();
                for channel in &draining.channels {
                    let _ =
                        tokio::time::timeout(CLOSE_TIMEOUT, channel.close(200, "shutdown".into()))
                            .await;
                }
                close(&conn, 200, "shutdown").await;
                if all_acked {
                    tracing::info!("Consumers stopped; in-flight messages written and acked.");
                } else {
                    tracing::warn!("Consumers stopped; acks not all sent in time, so the broker redelivers the rest.");
                }
                return;
            }
            Err(e) => {
                // Closing makes every ack of this connection's deliveries fail locally.
                close(&conn, 320, "reconnecting").await;
                if started.elapsed() > HEALTHY_EPOCH {
                    delays = fleet::retry::reconnect_backoff().build();
                }
                let delay = delays.next().unwrap_or(Duration::from_secs(10));
                let retry_in_ms = delay.as_millis() as u64;
                match e.hint() {
                    Some(hint) => tracing::error!(error = %e, retry_in_ms, "{hint}"),
                    None => {
                        tracing::warn!(error = %e, retry_in_ms, "RabbitMQ connection lost; reconnecting.")
                    }
                }
                tokio::select! {
                    biased;
                    _ = shutdown.triggered() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

async fn close(conn: &Connection, code: u16, reason: &str) {
    if tokio::time::timeout(CLOSE_TIMEOUT, conn.close(code, reason.into()))
        .await
        .is_err()
    {
        tracing::warn!(
            timeout_ms = CLOSE_TIMEOUT.as_millis() as u64,
            "RabbitMQ did not confirm the connection close; dropping it."
        );
    }
}

/// One connection's lifetime.
struct Epoch<'a> {
    config: &'a CacheUpdaterConfig,
    rules: &'a [QueueRules],
    shards: &'a Shards,
    metrics: &'a PipelineMetrics,
    status: &'a DependencyStatus,
    shutdown: &'a Shutdown,
}

/// What is left to finish after the consumers stopped for shutdown.
struct Draining {
    /// The ack trackers, done once every finished delivery is acked.
    trackers: Vec<tokio::task::JoinHandle<()>>,
    /// Every channel of the connection, closed one by one before the connection: a channel
    /// whose last handle is dropped while the connection closes makes lapin log an error.
    channels: Vec<Channel>,
}

impl Epoch<'_> {
    /// Runs until shutdown (`Ok` with what is left to finish) or a failure.
    async fn run(&self, conn: &Connection) -> Result<Draining, EpochError> {
        let setup = conn.create_channel().await?;
        declare(&setup, &self.config.topology, self.config).await?;
        let publisher = conn.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;

        let mut consumers = JoinSet::new();
        let mut trackers = Vec::new();
        let mut channels = vec![publisher.clone()];
        for (queue, rules) in self.config.queues.iter().zip(self.rules) {
            let channel = conn.create_channel().await?;
            channel
                .basic_qos(self.config.consumer.prefetch, BasicQosOptions::default())
                .await?;
            let consumer = channel
                .basic_consume(
                    queue.name.as_str().into(),
                    ShortString::from(""),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            channels.push(channel.clone());
            let (acks, events) = mpsc::unbounded_channel();
            trackers.push(tokio::spawn(ack::track(
                channel.clone(),
                events,
                usize::from(self.config.consumer.prefetch / 4).max(1),
                self.metrics.clone(),
            )));
            let link = Arc::new(Link {
                queue: queue.name.clone(),
                channel: channel.status().clone(),
                acks,
                publisher: publisher.clone(),
                dead_letter_exchange: self.config.topology.dead_letter_exchange.clone(),
                queue_dead_letters: queue.declare,
                metrics: self.metrics.clone(),
            });
            let worker = QueueConsumer {
                channel,
                consumer,
                link,
                rules: rules.clone(),
                shards: self.shards.clone(),
                metrics: self.metrics.clone(),
                max_deliveries: self.config.consumer.max_deliveries,
            };
            consumers.spawn(worker.run(self.shutdown.clone()));
        }
        self.status.set_up(true);
        tracing::info!(
            queues = self.config.queues.len(),
            prefetch = self.config.consumer.prefetch,
            "Consuming."
        );

        let mut failure = None;
        while let Some(ended) = consumers.join_next().await {
            match ended {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    failure = Some(e);
                    break;
                }
                Err(e) => {
                    failure = Some(EpochError::Task(e.to_string()));
                    break;
                }
            }
        }
        match failure {
            None => Ok(Draining { trackers, channels }),
            Some(e) => {
                consumers.abort_all();
                Err(e)
            }
        }
    }
}

/// Declares the exchanges and queues. Declaring what exists with the same arguments is a no-op.
async fn declare(
    channel: &Channel,
    topology: &TopologyConfig,
    config: &CacheUpdaterConfig,
) -> Result<(), EpochError> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    if !topology.exchange.is_empty() {
        let kind = match topology.exchange_type.as_str() {
            "topic" => ExchangeKind::Topic,
            "fanout" => ExchangeKind::Fanout,
            "headers" => ExchangeKind::Headers,
            CONSISTENT_HASH_EXCHANGE => ExchangeKind::Custom(CONSISTENT_HASH_EXCHANGE.into()),
            _ => ExchangeKind::Direct,
        };
        channel
            .exchange_declare(
                topology.exchange.as_str().into(),
                kind,
                durable,
                FieldTable::default(),
            )
            .await?;
    }
    channel
        .exchange_declare(
            topology.dead_letter_exchange.as_str().into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await?;
    let queue_options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let mut dlq_args = FieldTable::default();
    if topology.quorum_queues {
        dlq_args.insert("x-queue-type".into(), string("quorum"));
    }
    channel
        .queue_declare(
            topology.dead_letter_queue.as_str().into(),
            queue_options,
            dlq_args,
        )
        .await?;
    channel
        .queue_bind(
            topology.dead_letter_queue.as_str().into(),
            topology.dead_letter_exchange.as_str().into(),
            ShortString::from(""),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    for queue in &config.queues {
        let refused = |source| EpochError::Queue {
            queue: queue.name.clone(),
            source,
        };
        if !queue.declare {
            // Consumed as it is: only check that it exists.
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            channel
                .queue_declare(queue.name.as_str().into(), passive, FieldTable::default())
                .await
                .map_err(refused)?;
            continue;
        }
        let mut args = FieldTable::default();
        args.insert(
            "x-dead-letter-exchange".into(),
            string(&topology.dead_letter_exchange),
        );
        if topology.quorum_queues {
            args.insert("x-queue-type".into(), string("quorum"));
            // The broker's own cap, for a message that crashes the consumer every time.
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(i64::from(config.consumer.max_deliveries)),
            );
        }
        channel
            .queue_declare(queue.name.as_str().into(), queue_options, args)
            .await
            .map_err(refused)?;
        if topology.exchange.is_empty() {
            continue;
        }
        for routing_key in queue.routing_keys(&topology.exchange_type) {
            channel
                .queue_bind(
                    queue.name.as_str().into(),
                    topology.exchange.as_str().into(),
                    routing_key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
    }
    let _ = channel.close(200, "declared".into()).await;
    Ok(())
}

fn string(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text))
}

/// Takes one queue's deliveries and hands their writes to the shards.
struct QueueConsumer {
    channel: Channel,
    consumer: lapin::Consumer,
    link: Arc<Link>,
    rules: QueueRules,
    shards: Shards,
    metrics: PipelineMetrics,
    max_deliveries: u32,
}

impl QueueConsumer {
    async fn run(mut self, shutdown: Shutdown) -> Result<(), EpochError> {
        // An idle consumer still notices a closed publishing channel.
        let mut check = tokio::time::interval(PUBLISHER_CHECK);
        loop {
            let next = tokio::select! {
                biased;
                _ = shutdown.triggered() => break,
                next = self.consumer.next() => Some(next),
                _ = check.tick() => None,
            };
            if !self.link.publisher.status().connected() {
                return Err(EpochError::PublisherClosed);
            }
            let Some(next) = next else {
                continue;
            };
            match next {
                Some(Ok(delivery)) => self.handle(delivery).await,
                Some(Err(e)) => return Err(e.into()),
                None => return Err(EpochError::Closed(self.link.queue.clone())),
            }
        }
        // Stop the broker sending more, then finish what it already sent: the stream ends
        // after the cancel is confirmed and the deliveries before it are taken.
        let _ = self
            .channel
            .basic_cancel(self.consumer.tag(), BasicCancelOptions::default())
            .await;
        let finish = async {
            while let Some(Ok(delivery)) = self.consumer.next().await {
                self.handle(delivery).await;
            }
        };
        if tokio::time::timeout(DRAIN_ON_SHUTDOWN, finish)
            .await
            .is_err()
        {
            tracing::warn!(queue = %self.link.queue, "Deliveries left unfinished at shutdown; the broker redelivers them.");
        }
        Ok(())
    }

    async fn handle(&mut self, message: lapin::message::Delivery) {
        let delivery = Delivery::new(message, Arc::clone(&self.link));
        if delivery.deliveries() > self.max_deliveries {
            delivery
                .dead_letter(&Failure::MaxDeliveries(delivery.deliveries() - 1))
                .await;
            self.metrics
                .count(crate::decode::Op::Unknown, Outcome::DeadLettered);
            return;
        }
        let origin = self.rules.origin_field();
        match self.rules.decode(delivery.data(), delivery.header(origin)) {
            Decoded::Write {
                op,
                writes,
                event_ms,
            } => {
                let event_ms = event_ms.or_else(|| delivery.timestamp_ms());
                // Fails only when the writers are gone at shutdown: the message stays unacked.
                let _ = self.shards.submit(delivery, op, writes, event_ms).await;
            }
            Decoded::SkippedOrigin(op) => {
                delivery.settle(Settlement::Ack);
                self.metrics.count(op, Outcome::SkippedOrigin);
            }
            Decoded::Poison(error) => {
                delivery.dead_letter(&Failure::Poison(error)).await;
                self.metrics
                    .count(crate::decode::Op::Unknown, Outcome::DeadLettered);
            }
        }
    }
}
