//! One delivery from a queue, and the ways it can end: acked, dead-lettered with its reason,
//! or put back on its queue for another try.

use std::collections::BTreeMap;
use std::sync::Arc;

use fleet::envelope::PayloadError;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, ChannelStatus};

use crate::ack::{AckEvent, AckSender, Settlement};
use crate::metrics::PipelineMetrics;

/// Header counting deliveries of a message this service put back on its queue.
pub const DELIVERIES_HEADER: &str = "x-cache-updater-deliveries";
/// Where a quorum queue counts earlier deliveries.
const BROKER_DELIVERIES_HEADER: &str = "x-delivery-count";

/// Why a message is dead-lettered or retried.
#[derive(Debug)]
pub enum Failure {
    /// The message cannot be read.
    Poison(PayloadError),
    /// It was delivered too many times.
    MaxDeliveries(u32),
    /// Redis kept refusing its write.
    WriteFailed(String),
}

impl Failure {
    /// Every [`Failure::reason`].
    pub fn reasons() -> impl Iterator<Item = &'static str> {
        PayloadError::REASONS
            .into_iter()
            .chain(["max_deliveries", "write_failed"])
    }

    /// A fixed, low-cardinality reason for metrics and the `x-error-reason` header.
    pub fn reason(&self) -> &'static str {
        match self {
            Failure::Poison(e) => e.reason(),
            Failure::MaxDeliveries(_) => "max_deliveries",
            Failure::WriteFailed(_) => "write_failed",
        }
    }

    fn describe(&self) -> String {
        match self {
            Failure::Poison(e) => e.to_string(),
            Failure::MaxDeliveries(n) => format!("delivered {n} times without being written"),
            Failure::WriteFailed(e) => e.clone(),
        }
    }
}

/// What one consumer channel shares with every delivery it hands out.
pub struct Link {
    /// The queue consumed.
    pub queue: String,
    /// The consuming channel's status: once it is closed, the broker has taken back every
    /// delivery not yet acked on it.
    pub channel: ChannelStatus,
    /// Where this channel's deliveries are settled.
    pub acks: AckSender,
    /// A channel in confirm mode on the same connection, for dead letters and retries.
    pub publisher: Channel,
    /// The dead-letter exchange.
    pub dead_letter_exchange: String,
    /// Whether the queue dead-letters a rejected message itself: it does when this service
    /// declared it, with the dead-letter exchange as its `x-dead-letter-exchange`.
    pub queue_dead_letters: bool,
    /// The pipeline's metrics.
    pub metrics: PipelineMetrics,
}

/// A message taken from a queue and not yet settled.
pub struct Delivery {
    tag: u64,
    data: Vec<u8>,
    properties: BasicProperties,
    routing_key: ShortString,
    deliveries: u32,
    link: Arc<Link>,
}

impl Delivery {
    /// Registers a delivery with its channel's ack tracker.
    pub fn new(delivery: lapin::message::Delivery, link: Arc<Link>) -> Self {
        let deliveries = count_deliveries(&delivery.properties, delivery.redelivered);
        let _ = link.acks.send(AckEvent::Delivered(delivery.delivery_tag));
        link.metrics.unacked.inc();
        if delivery.redelivered {
            link.metrics.redeliveries.inc();
        }
        Self {
            tag: delivery.delivery_tag,
            data: delivery.data,
            properties: delivery.properties,
            routing_key: delivery.routing_key,
            deliveries,
            link,
        }
    }

    /// The body.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// A header's value as bytes, if it is a string.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        match header(&self.properties, name)? {
            AMQPValue::LongString(s) => Some(s.as_bytes()),
            AMQPValue::ShortString(s) => Some(s.as_str().as_bytes()),
            _ => None,
        }
    }

    /// The AMQP timestamp property, in Unix milliseconds.
    pub fn timestamp_ms(&self) -> Option<i64> {
        self.properties
            .timestamp()
            .map(|secs| (secs as i64).saturating_mul(1000))
    }

    /// Whether the broker took the delivery back: its channel closed before it was acked,
    /// so the broker requeued it, maybe for another consumer. Writing it after that could
    /// overwrite newer writes of that consumer.
    pub fn taken_back(&self) -> bool {
        !self.link.channel.connected()
    }

    /// Which delivery of the message this is, counting this one.
    pub fn deliveries(&self) -> u32 {
        self.deliveries
    }

    /// Finishes the delivery.
    pub fn settle(&self, settlement: Settlement) {
        let _ = self.link.acks.send(AckEvent::Settled(self.tag, settlement));
    }

    /// Publishes the message to the dead-letter exchange with why it was refused, then acks
    /// it. If the broker refuses the copy, the message is rejected instead, and the queue's
    /// own dead-lettering takes it to the same place; a queue consumed as it is may have none,
    /// so there it is requeued. If the copy could not be sent at all (the channel closed, as
    /// it does on a publish to a missing exchange), the message is requeued, and dead-lettered
    /// on a later delivery, after the reconnect that follows.
    pub async fn dead_letter(&self, failure: &Failure) {
        let link = &self.link;
        self.warn(failure, "Message dead-lettered.");
        link.metrics
            .dead_letters
            .with_label_values(&[failure.reason()])
            .inc();
        let mut headers = letter_headers(self.properties.headers().as_ref(), self.deliveries);
        headers.insert("x-error-reason".into(), long(failure.reason()));
        headers.insert("x-error".into(), long(&failure.describe()));
        headers.insert("x-original-queue".into(), long(&link.queue));
        headers.insert(
            "x-original-routing-key".into(),
            long(self.routing_key.as_str()),
        );
        let refused = if link.queue_dead_letters {
            Settlement::Reject
        } else {
            Settlement::Requeue
        };
        self.copy_then_ack(&link.dead_letter_exchange, headers, refused)
            .await;
    }

    /// Puts the message back at the end of its queue with its delivery count, then acks it.
    /// Falls back to a requeue when the broker does not confirm the copy.
    pub async fn retry(&self, failure: &Failure) {
        self.warn(
            failure,
            "Message write failed; putting it back on its queue.",
        );
        let headers = retry_headers(self.properties.headers().as_ref(), self.deliveries);
        self.copy_then_ack("", headers, Settlement::Requeue).await;
    }

    fn warn(&self, failure: &Failure, message: &str) {
        tracing::warn!(
            queue = %self.link.queue,
            reason = failure.reason(),
            error = %failure.describe(),
            deliveries = self.deliveries,
            "{message}"
        );
    }

    /// Publishes a copy with `headers` (routed by the queue's name), and acks the original
    /// once the broker confirmed the copy. Settles it with `refused` if the broker refused the
    /// copy, and requeues it if the copy could not be published.
    async fn copy_then_ack(&self, exchange: &str, headers: FieldTable, refused: Settlement) {
        let settlement = match self.publish(exchange, &self.link.queue, headers).await {
            Copy::Confirmed => Settlement::Ack,
            Copy::Refused => refused,
            Copy::Failed => Settlement::Requeue,
        };
        self.settle(settlement);
    }

    async fn publish(&self, exchange: &str, routing_key: &str, headers: FieldTable) -> Copy {
        let properties = self
            .properties
            .clone()
            .with_headers(headers)
            .with_delivery_mode(2);
        let published = self
            .link
            .publisher
            .basic_publish(
                ShortString::from(exchange),
                ShortString::from(routing_key),
                BasicPublishOptions::default(),
                &self.data,
                properties,
            )
            .await;
        let confirmed = match published {
            Ok(confirm) => confirm.await.map(|c| c.is_ack()),
            Err(e) => Err(e),
        };
        match confirmed {
            Ok(true) => Copy::Confirmed,
            Ok(false) => {
                tracing::warn!(exchange, "Broker refused a republished message.");
                Copy::Refused
            }
            Err(e) => {
                tracing::warn!(exchange, error = %e, "Republishing a message failed.");
                Copy::Failed
            }
        }
    }
}

/// How publishing a copy of a delivery ended.
enum Copy {
    /// The broker confirmed it.
    Confirmed,
    /// The broker nacked it.
    Refused,
    /// It was not published: the channel or connection failed.
    Failed,
}

fn long(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text))
}

fn header<'a>(properties: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    properties
        .headers()
        .as_ref()?
        .inner()
        .iter()
        .find(|(key, _)| key.as_str() == name)
        .map(|(_, value)| value)
}

fn as_count(value: &AMQPValue) -> Option<u32> {
    let n = match value {
        AMQPValue::LongLongInt(n) => *n,
        AMQPValue::LongInt(n) => i64::from(*n),
        AMQPValue::LongUInt(n) => i64::from(*n),
        AMQPValue::ShortInt(n) => i64::from(*n),
        AMQPValue::ShortUInt(n) => i64::from(*n),
        AMQPValue::ShortShortInt(n) => i64::from(*n),
        AMQPValue::ShortShortUInt(n) => i64::from(*n),
        AMQPValue::Timestamp(n) => i64::try_from(*n).unwrap_or(i64::MAX),
        _ => return None,
    };
    u32::try_from(n.max(0)).ok()
}

/// A message's headers without its delivery counts.
fn without_counts(headers: Option<&FieldTable>) -> FieldTable {
    headers
        .map(|table| {
            table
                .inner()
                .iter()
                .filter(|(name, _)| {
                    ![DELIVERIES_HEADER, BROKER_DELIVERIES_HEADER].contains(&name.as_str())
                })
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect::<BTreeMap<_, _>>()
                .into()
        })
        .unwrap_or_default()
}

/// The headers of a message put back on its queue after its `deliveries`-th delivery: the
/// whole count in this service's header. A quorum queue's `x-delivery-count` of the old
/// message must not come along, or the copy's deliveries would be counted twice.
fn retry_headers(headers: Option<&FieldTable>, deliveries: u32) -> FieldTable {
    let mut headers = without_counts(headers);
    headers.insert(
        DELIVERIES_HEADER.into(),
        AMQPValue::LongLongInt(i64::from(deliveries)),
    );
    headers
}

/// The headers of a dead letter, before its reason and origin. A letter starts afresh: moved
/// back to its queue once its cause is fixed, it gets `max_deliveries` new tries rather than
/// the count it was dead-lettered with. How many it had is kept for people, in a header no
/// consumer counts.
fn letter_headers(headers: Option<&FieldTable>, deliveries: u32) -> FieldTable {
    let mut headers = without_counts(headers);
    headers.insert(
        "x-deliveries".into(),
        AMQPValue::LongLongInt(i64::from(deliveries)),
    );
    headers
}

/// This delivery's number: earlier deliveries are counted by this service's retry header and
/// by a quorum queue's `x-delivery-count`; a redelivery without either counts as the second.
fn count_deliveries(properties: &BasicProperties, redelivered: bool) -> u32 {
    let ours = header(properties, DELIVERIES_HEADER).and_then(as_count);
    let broker = header(properties, BROKER_DELIVERIES_HEADER).and_then(as_count);
    let earlier = match (ours, broker) {
        (None, None) => u32::from(redelivered),
        (a, b) => a.unwrap_or(0).saturating_add(b.unwrap_or(0)),
    };
    earlier.saturating_add(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn properties(headers: &[(&str, AMQPValue)]) -> BasicProperties {
        let mut table = FieldTable::default();
        for (name, value) in headers {
            table.insert((*name).into(), value.clone());
        }
        BasicProperties::default().with_headers(table)
    }

    #[test]
    fn every_reason_is_listed() {
        let reasons: Vec<&str> = Failure::reasons().collect();
        for failure in [
            Failure::Poison(PayloadError::NotObject),
            Failure::MaxDeliveries(3),
            Failure::WriteFailed("refused".into()),
        ] {
            assert!(reasons.contains(&failure.reason()), "{}", failure.reason());
        }
    }

    #[test]
    fn deliveries_count_retries_and_broker_redeliveries() {
        assert_eq!(count_deliveries(&BasicProperties::default(), false), 1);
        assert_eq!(count_deliveries(&BasicProperties::default(), true), 2);
        let retried = properties(&[(DELIVERIES_HEADER, AMQPValue::LongLongInt(3))]);
        assert_eq!(count_deliveries(&retried, false), 4);
        let quorum = properties(&[
            (DELIVERIES_HEADER, AMQPValue::LongLongInt(2)),
            ("x-delivery-count", AMQPValue::LongInt(1)),
        ]);
        assert_eq!(count_deliveries(&quorum, true), 4);
    }

    /// A third delivery: retried once by the service, then redelivered once by a quorum queue.
    fn third_delivery() -> BasicProperties {
        properties(&[
            (DELIVERIES_HEADER, AMQPValue::LongLongInt(1)),
            ("x-delivery-count", AMQPValue::LongInt(1)),
            ("trace-id", long("t")),
        ])
    }

    #[test]
    fn a_retried_copy_carries_its_whole_count_once() {
        let third = third_delivery();
        let deliveries = count_deliveries(&third, true);
        assert_eq!(deliveries, 3);
        let copy = BasicProperties::default()
            .with_headers(retry_headers(third.headers().as_ref(), deliveries));
        assert_eq!(count_deliveries(&copy, false), 4, "{copy:?}");
        assert_eq!(header(&copy, "trace-id"), Some(&long("t")));
    }

    #[test]
    fn a_letter_counts_nothing_and_says_how_many_deliveries_it_had() {
        let third = third_delivery();
        let letter =
            BasicProperties::default().with_headers(letter_headers(third.headers().as_ref(), 3));
        assert_eq!(count_deliveries(&letter, false), 1, "{letter:?}");
        assert_eq!(
            header(&letter, "x-deliveries"),
            Some(&AMQPValue::LongLongInt(3))
        );
        assert_eq!(header(&letter, "trace-id"), Some(&long("t")));
    }
}
