//! Kafka helpers for tests: topics, producing, reading back, committed offsets.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use crate::kafka_brokers;

fn client() -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", kafka_brokers());
    config
}

/// Creates a topic with `partitions` partitions and waits until its metadata shows them.
pub async fn create_topic(name: &str, partitions: i32) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = client().create()?;
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let results = admin.create_topics(&[topic], &AdminOptions::new()).await?;
    for result in results {
        result.map_err(|(topic, code)| anyhow::anyhow!("create topic {topic}: {code}"))?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = partitions_of(name).ok().flatten() == usize::try_from(partitions).ok();
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("topic {name} has no metadata after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Deletes a partition's messages before `offset`, as retention would.
pub async fn delete_records_before(topic: &str, partition: i32, offset: i64) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = client().create()?;
    let mut before = rdkafka::TopicPartitionList::new();
    before.add_partition_offset(topic, partition, rdkafka::Offset::Offset(offset))?;
    let deleted = admin.delete_records(&before, &AdminOptions::new()).await?;
    for element in deleted.elements() {
        element.error()?;
    }
    Ok(())
}

/// The partition count of `name`, or `None` while the cluster does not know the topic. The
/// lookup never creates the topic (consumers do not ask for auto-creation).
pub fn partitions_of(name: &str) -> Result<Option<usize>> {
    let probe: BaseConsumer = client().create()?;
    let metadata = probe.fetch_metadata(Some(name), Duration::from_secs(5))?;
    Ok(metadata
        .topics()
        .first()
        .filter(|t| t.error().is_none() && !t.partitions().is_empty())
        .map(|t| t.partitions().len()))
}

/// An idempotent producer that acks from the leader quickly.
pub fn producer() -> Result<FutureProducer> {
    Ok(client()
        .set("enable.idempotence", "true")
        .set("linger.ms", "2")
        .create()?)
}

/// One message to produce.
#[derive(Debug, Clone, Default)]
pub struct Record {
    /// Partition; `None` lets the partitioner choose from the key.
    pub partition: Option<i32>,
    /// Key.
    pub key: Option<Vec<u8>>,
    /// Value; `None` makes a tombstone.
    pub payload: Option<Vec<u8>>,
    /// Headers.
    pub headers: Vec<(String, String)>,
}

impl Record {
    /// A record with a value only.
    pub fn value(payload: impl Into<Vec<u8>>) -> Self {
        Self {
            payload: Some(payload.into()),
            ..Self::default()
        }
    }

    /// Sets the partition.
    pub fn partition(mut self, partition: i32) -> Self {
        self.partition = Some(partition);
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// Produces records in order and waits until the broker acknowledged all of them.
pub async fn produce(producer: &FutureProducer, topic: &str, records: &[Record]) -> Result<()> {
    let sends = records.iter().map(|record| {
        let mut future: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic);
        if let Some(partition) = record.partition {
            future = future.partition(partition);
        }
        if let Some(key) = &record.key {
            future = future.key(key.as_slice());
        }
        if let Some(payload) = &record.payload {
            future = future.payload(payload.as_slice());
        }
        if !record.headers.is_empty() {
            let mut headers = OwnedHeaders::new();
            for (key, value) in &record.headers {
                headers = headers.insert(Header {
                    key: key.as_str(),
                    value: Some(value.as_str()),
                });
            }
            future = future.headers(headers);
        }
        producer.send(future, Duration::from_secs(30))
    });
    for result in futures::future::join_all(sends).await {
        result.map_err(|(e, _)| anyhow::anyhow!("produce to {topic}: {e}"))?;
    }
    producer.flush(Duration::from_secs(30))?;
    Ok(())
}

/// Reads a topic from the start until `count` messages arrived.
pub async fn read(topic: &str, count: usize, timeout: Duration) -> Result<Vec<OwnedMessage>> {
    let consumer: BaseConsumer = client()
        .set("group.id", crate::unique_name("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[topic])?;
    let deadline = Instant::now() + timeout;
    let mut messages = Vec::new();
    while messages.len() < count {
        if Instant::now() > deadline {
            bail!(
                "read {} of {count} messages from {topic} in {timeout:?}",
                messages.len()
            );
        }
        let polled = tokio::task::block_in_place(|| consumer.poll(Duration::from_millis(200)));
        if let Some(message) = polled {
            messages.push(message.context("read")?.detach());
        }
    }
    Ok(messages)
}

/// The header of a message as text.
pub fn header(message: &OwnedMessage, name: &str) -> Option<String> {
    use rdkafka::message::Headers;
    message.headers().and_then(|headers| {
        headers
            .iter()
            .find(|h| h.key == name)
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    })
}

/// Every value of a header name a message carries, in order, as text.
pub fn headers_named(message: &OwnedMessage, name: &str) -> Vec<String> {
    use rdkafka::message::Headers;
    message.headers().map_or_else(Vec::new, |headers| {
        headers
            .iter()
            .filter(|h| h.key == name)
            .map(|h| String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())
            .collect()
    })
}

/// The sum over a topic's partitions of a group's committed offsets.
pub async fn committed_total(group: &str, topic: &str, partitions: i32) -> Result<i64> {
    let group = group.to_string();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = client().set("group.id", &group).create()?;
        let mut tpl = TopicPartitionList::new();
        for partition in 0..partitions {
            tpl.add_partition(&topic, partition);
        }
        let committed = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
        Ok(committed
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(n) => n,
                _ => 0,
            })
            .sum())
    })
    .await?
}

/// Whether a message's value is absent (a tombstone).
pub fn is_tombstone(message: &OwnedMessage) -> bool {
    message.payload().is_none()
}
