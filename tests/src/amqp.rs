//! RabbitMQ helpers for tests: publishing with confirms, reading a queue back, queue depth.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use crate::amqp_url;

/// A connection to the test broker.
pub async fn connect() -> Result<Connection> {
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .context("connect to RabbitMQ")?;
    Ok(conn)
}

/// One message to publish.
#[derive(Debug, Clone, Default)]
pub struct Message {
    /// The body.
    pub body: Vec<u8>,
    /// String headers.
    pub headers: Vec<(String, String)>,
}

impl Message {
    /// A message with this body.
    pub fn body(body: impl Into<Vec<u8>>) -> Self {
        Self {
            body: body.into(),
            headers: Vec::new(),
        }
    }

    /// Adds a string header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// A channel in confirm mode.
pub struct Publisher {
    _conn: Connection,
    channel: Channel,
}

impl Publisher {
    /// Opens a confirming channel on a fresh connection.
    pub async fn new() -> Result<Self> {
        let conn = connect().await?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self {
            _conn: conn,
            channel,
        })
    }

    /// Publishes persistent messages and waits until the broker confirmed every one.
    /// `mandatory` makes an unroutable message an error rather than silently dropped.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        messages: &[Message],
    ) -> Result<()> {
        let routed: Vec<(&str, &Message)> = messages.iter().map(|m| (routing_key, m)).collect();
        self.publish_routed(exchange, &routed).await
    }

    /// [`Publisher::publish`] with a routing key per message.
    pub async fn publish_routed(
        &self,
        exchange: &str,
        messages: &[(&str, &Message)],
    ) -> Result<()> {
        for chunk in messages.chunks(1000) {
            let mut confirms = Vec::with_capacity(chunk.len());
            for (routing_key, message) in chunk {
                let mut headers = FieldTable::default();
                for (name, value) in &message.headers {
                    headers.insert(
                        name.as_str().into(),
                        AMQPValue::LongString(LongString::from(value.as_str())),
                    );
                }
                let properties = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_headers(headers);
                confirms.push(
                    self.channel
                        .basic_publish(
                            ShortString::from(exchange),
                            ShortString::from(*routing_key),
                            BasicPublishOptions {
                                mandatory: true,
                                ..BasicPublishOptions::default()
                            },
                            &message.body,
                            properties,
                        )
                        .await?,
                );
            }
            for confirm in confirms {
                let confirmation = confirm.await?;
                anyhow::ensure!(confirmation.is_ack(), "the broker nacked a message");
            }
            let returned = self.channel.wait_for_confirms().await?;
            anyhow::ensure!(
                returned.is_empty(),
                "{} messages were unroutable",
                returned.len()
            );
        }
        Ok(())
    }
}

/// A message read back from a queue.
#[derive(Debug, Clone)]
pub struct Received {
    /// The body.
    pub body: Vec<u8>,
    /// Headers whose values are strings or integers, integers in decimal.
    pub headers: Vec<(String, String)>,
}

impl Received {
    /// A string header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads and acks `count` messages from `queue`, failing after `timeout`.
pub async fn read(queue: &str, count: usize, timeout: Duration) -> Result<Vec<Received>> {
    let conn = connect().await?;
    let channel = conn.create_channel().await?;
    let deadline = Instant::now() + timeout;
    let mut received = Vec::new();
    while received.len() < count {
        match channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await?
        {
            Some(message) => {
                let delivery = message.delivery;
                let headers = delivery
                    .properties
                    .headers()
                    .as_ref()
                    .map(|table| {
                        table
                            .inner()
                            .iter()
                            .filter_map(|(k, v)| Some((k.to_string(), header_text(v)?)))
                            .collect()
                    })
                    .unwrap_or_default();
                channel
                    .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
                    .await?;
                received.push(Received {
                    body: delivery.data,
                    headers,
                });
            }
            None if Instant::now() > deadline => {
                bail!(
                    "read {} of {count} messages from {queue} in {timeout:?}",
                    received.len()
                )
            }
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(received)
}

fn header_text(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        _ => return None,
    })
}

/// Moves every message of `from` to the end of queue `to`, body and properties (headers
/// included) as they are, with confirms, as an operator's shovel or "move messages" does.
/// Returns how many it moved.
pub async fn move_all(from: &str, to: &str) -> Result<usize> {
    let conn = connect().await?;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut moved = 0;
    while let Some(message) = channel
        .basic_get(from.into(), BasicGetOptions::default())
        .await?
    {
        let delivery = message.delivery;
        let confirmation = channel
            .basic_publish(
                ShortString::from(""),
                ShortString::from(to),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &delivery.data,
                delivery.properties.clone(),
            )
            .await?
            .await?;
        anyhow::ensure!(confirmation.is_ack(), "the broker nacked a moved message");
        channel
            .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
            .await?;
        moved += 1;
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(moved)
}

/// Messages ready in a queue (not counting unacked ones).
pub async fn depth(queue: &str) -> Result<u32> {
    let conn = connect().await?;
    let channel = conn.create_channel().await?;
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let _ = conn.close(200, "done".into()).await;
    Ok(declared.message_count())
}

/// Declares a queue the way a producer written from the tutorials does: not durable, and no
/// arguments (so no dead-letter exchange).
pub async fn declare_plain_queue(queue: &str) -> Result<()> {
    let conn = connect().await?;
    let channel = conn.create_channel().await?;
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

/// Deletes queues and exchanges a test declared, ignoring ones that are gone.
pub async fn delete(queues: &[&str], exchanges: &[&str]) -> Result<()> {
    let conn = connect().await?;
    for queue in queues {
        let channel = conn.create_channel().await?;
        let _ = channel
            .queue_delete((*queue).into(), QueueDeleteOptions::default())
            .await;
    }
    for exchange in exchanges {
        let channel = conn.create_channel().await?;
        let _ = channel
            .exchange_delete(
                (*exchange).into(),
                lapin::options::ExchangeDeleteOptions::default(),
            )
            .await;
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}
