//! Dead-letter topics: a bad message is kept, with why it was refused and where it came from.

use std::time::Duration;

use backon::BackoffBuilder;
use fleet::config::KafkaConfig;
use fleet::envelope::PayloadError;
use fleet::kafka::FleetClientContext;
use fleet::Shutdown;
use futures::future::join_all;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// How long the messages of a batch's refused writes are looked for in their partitions, all
/// together, before the dead letters of those not found go out with what the batch kept.
pub const READ_BACK_WAIT: Duration = Duration::from_secs(10);

/// A message that could not be used, copied out of the consumer's buffer.
pub struct DeadLetter {
    /// Where it goes.
    pub topic: String,
    /// Where it came from.
    pub source_topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its key.
    pub key: Option<Vec<u8>>,
    /// Its value.
    pub payload: Option<Vec<u8>>,
    /// Its headers, which the dead letter keeps.
    pub headers: Option<OwnedHeaders>,
    /// Why it was refused.
    pub error: Refusal,
}

/// Why a message went to a dead-letter topic.
#[derive(Debug)]
pub enum Refusal {
    /// The message cannot be used (not JSON, a field missing, too big, ...).
    Payload(PayloadError),
    /// Redis refused its write, again and again, for a reason of the write's own (such as a
    /// corrupt stored version of its key), not an outage.
    Write(String),
}

impl Refusal {
    /// Reasons that are not payload errors.
    pub const WRITE_REASONS: [&'static str; 1] = ["write_refused"];

    /// The low-cardinality reason, for headers and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Payload(e) => e.reason(),
            Refusal::Write(_) => Self::WRITE_REASONS[0],
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Payload(e) => e.fmt(f),
            Refusal::Write(e) => write!(f, "Redis refused the write: {e}"),
        }
    }
}

/// The headers a dead letter adds to its message's own.
const LETTER_HEADERS: [&str; 5] = [
    "x-error",
    "x-error-reason",
    "x-original-topic",
    "x-original-partition",
    "x-original-offset",
];

impl DeadLetter {
    fn headers(&self) -> OwnedHeaders {
        let partition = self.partition.to_string();
        let offset = self.offset.to_string();
        let error = self.error.to_string();
        // A letter replayed to its topic and refused again carries the headers of its first
        // letter: they give way, so each of these names appears once, with the latest value.
        let mut headers = OwnedHeaders::new();
        for kept in self.headers.iter().flat_map(|h| h.iter()) {
            if !LETTER_HEADERS.contains(&kept.key) {
                headers = headers.insert(kept);
            }
        }
        headers
            .insert(header("x-error", &error))
            .insert(header("x-error-reason", self.error.reason()))
            .insert(header("x-original-topic", &self.source_topic))
            .insert(header("x-original-partition", &partition))
            .insert(header("x-original-offset", &offset))
    }
}

fn header<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header {
        key,
        value: Some(value),
    }
}

/// Produces dead letters and waits until the broker has them.
#[derive(Clone)]
pub struct DeadLetterProducer {
    producer: FutureProducer<FleetClientContext>,
    /// For a consumer, made when needed, that reads refused writes' messages back.
    read_back: ClientConfig,
}

impl DeadLetterProducer {
    /// An idempotent producer on the configured cluster.
    pub fn new(config: &KafkaConfig) -> KafkaResult<Self> {
        let mut client = fleet::kafka::client_config(config);
        client
            .set("enable.idempotence", "true")
            .set("linger.ms", "5");
        // Partitions are assigned by hand and nothing is committed, so no group is joined.
        let read_back = fleet::kafka::client_config_with(
            config,
            &[
                ("group.id", "order-cacher-read-back"),
                ("enable.auto.commit", "false"),
                ("enable.auto.offset.store", "false"),
                // A message no longer in its partition is an error, not a jump to its end.
                ("auto.offset.reset", "error"),
            ],
        );
        Ok(Self {
            producer: client.create_with_context(FleetClientContext)?,
            read_back,
        })
    }

    /// Reads the messages of `letters` back from their partitions, so that each letter keeps
    /// its message whole: key, value and headers. A batch keeps only what its writes need, so
    /// a write Redis refused knows its message only in part. A message not read back within
    /// [`READ_BACK_WAIT`] of the start (or before shutdown), or no longer in its partition,
    /// leaves its letter as it was, with a warning.
    pub async fn read_back_messages(&self, letters: &mut [DeadLetter], shutdown: &Shutdown) {
        if letters.is_empty() {
            return;
        }
        let consumer: StreamConsumer<FleetClientContext> = match self
            .read_back
            .create_with_context(FleetClientContext)
        {
            Ok(consumer) => consumer,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot read refused writes' messages back; their dead letters keep what the batch held.");
                return;
            }
        };
        let deadline = tokio::time::Instant::now() + READ_BACK_WAIT;
        for letter in letters {
            let read = tokio::select! {
                biased;
                _ = shutdown.triggered() => return,
                read = tokio::time::timeout_at(deadline, read_one(&consumer, letter)) => read,
            };
            match read {
                Ok(Ok(message)) => {
                    letter.key = message.key().map(<[u8]>::to_vec);
                    letter.payload = message.payload().map(<[u8]>::to_vec);
                    letter.headers = message.headers().cloned();
                }
                failed => {
                    let error = match failed {
                        Ok(Err(e)) => e,
                        _ => format!("not read within {READ_BACK_WAIT:?}"),
                    };
                    tracing::warn!(
                        topic = %letter.source_topic,
                        partition = letter.partition,
                        offset = letter.offset,
                        %error,
                        "Cannot read a refused write's message back; its dead letter keeps what the batch held."
                    );
                }
            }
        }
    }

    /// Sends every letter, retrying failures with backoff. `false` means shutdown came first
    /// and some letters may be unsent, so their offsets must not be stored.
    pub async fn send_all(&self, letters: &[DeadLetter], shutdown: &Shutdown) -> bool {
        let mut pending: Vec<&DeadLetter> = letters.iter().collect();
        let mut delays = fleet::retry::reconnect_backoff().build();
        while !pending.is_empty() {
            let results = join_all(pending.iter().map(|letter| self.send(letter))).await;
            let mut failed = Vec::new();
            for (letter, result) in pending.into_iter().zip(results) {
                if let Err(e) = result {
                    tracing::warn!(topic = %letter.topic, error = %e, "Dead-letter produce failed; retrying.");
                    failed.push(letter);
                }
            }
            pending = failed;
            if !pending.is_empty() {
                let delay = delays.next().unwrap_or(Duration::from_secs(10));
                tokio::select! {
                    biased;
                    _ = shutdown.triggered() => return false,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
        true
    }

    async fn send(&self, letter: &DeadLetter) -> Result<(), rdkafka::error::KafkaError> {
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&letter.topic).headers(letter.headers());
        if let Some(key) = &letter.key {
            record = record.key(key.as_slice());
        }
        if let Some(payload) = &letter.payload {
            record = record.payload(payload.as_slice());
        }
        self.producer
            .send(record, Duration::from_secs(30))
            .await
            .map(|_| ())
            .map_err(|(e, _)| e)
    }
}

/// The message at `letter`'s source offset.
async fn read_one(
    consumer: &StreamConsumer<FleetClientContext>,
    letter: &DeadLetter,
) -> Result<OwnedMessage, String> {
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(
            &letter.source_topic,
            letter.partition,
            Offset::Offset(letter.offset),
        )
        .map_err(|e| e.to_string())?;
    consumer.assign(&assignment).map_err(|e| e.to_string())?;
    loop {
        let message = match consumer.recv().await {
            Ok(message) => message,
            Err(e) if is_gone(&e) => {
                return Err("the message is no longer in its partition".into());
            }
            // The broker's other errors (a lost connection, say) librdkafka retries: the read
            // goes on until the caller's wait runs out.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if message.topic() != letter.source_topic || message.partition() != letter.partition {
            continue;
        }
        if message.offset() == letter.offset {
            return Ok(message.detach());
        }
        if message.offset() > letter.offset {
            return Err("the message is no longer in its partition".into());
        }
    }
}

/// Whether a read failed because the offset is before the partition's first message (deleted
/// by retention, say), which no retry finds again.
fn is_gone(error: &rdkafka::error::KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::OffsetOutOfRange | RDKafkaErrorCode::AutoOffsetReset)
    )
}

/// Creates the dead-letter topics that do not exist yet, with the cluster's default partition
/// count and replication factor, so the first poison message has somewhere to go where brokers
/// do not create topics on first use. Runs in the background and retries while the cluster
/// does not answer; a topic the service may not create is reported and left to the operator
/// (dead letters for it wait, with backoff, until it exists).
pub fn ensure_topics(
    config: &KafkaConfig,
    mut topics: Vec<String>,
    shutdown: &Shutdown,
) -> KafkaResult<()> {
    topics.sort();
    topics.dedup();
    let admin: AdminClient<FleetClientContext> =
        fleet::kafka::client_config(config).create_with_context(FleetClientContext)?;
    let task_shutdown = shutdown.clone();
    shutdown.spawn("dead-letter-topics", async move {
        let options = AdminOptions::new()
            .request_timeout(Some(Duration::from_secs(10)))
            .operation_timeout(Some(Duration::from_secs(10)));
        // -1: the cluster's `num.partitions` and `default.replication.factor`.
        let new: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|topic| NewTopic::new(topic, -1, TopicReplication::Fixed(-1)))
            .collect();
        // Every try asks for every topic: one that exists by then answers TopicAlreadyExists.
        let create = || async {
            let results = admin
                .create_topics(&new, &options)
                .await
                .map_err(|e| e.to_string())?;
            let mut not_yet = Vec::new();
            for result in results {
                match result {
                    Ok(topic) => tracing::info!(%topic, "Dead-letter topic created."),
                    Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((topic, code)) if is_transient(code) => not_yet.push(topic),
                    Err((topic, code)) => tracing::warn!(
                        %topic,
                        error = %code,
                        "Dead-letter topic does not exist and cannot be created; dead letters \
                         for it wait until it exists."
                    ),
                }
            }
            if not_yet.is_empty() {
                Ok(())
            } else {
                Err(format!("not created yet: {}", not_yet.join(", ")))
            }
        };
        fleet::retry::until_ok("create dead-letter topics", &task_shutdown, create).await;
    });
    Ok(())
}

/// Errors of a topic creation that a later try may not meet.
fn is_transient(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::RequestTimedOut
            | RDKafkaErrorCode::OperationTimedOut
            | RDKafkaErrorCode::NotController
            | RDKafkaErrorCode::BrokerNotAvailable
            | RDKafkaErrorCode::LeaderNotAvailable
            | RDKafkaErrorCode::NetworkException
            | RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::CoordinatorLoadInProgress
            | RDKafkaErrorCode::ThrottlingQuotaExceeded
    )
}
