//! Consume → batch → write → store offsets.
//!
//! One task reads the consumer and decodes messages into batches; a writer task writes them
//! and stores their offsets in order, and the next batch fills while the current one is
//! written. Batches whose order cannot matter (every write versioned, so the guard keeps the
//! newest) are written up to three at a time by default, which keeps Redis busy while the
//! service waits for a reply; others are written alone. A batch goes out at once when the writer is
//! idle, so a quiet stream is written message by message without waiting for the linger;
//! under load the writer is always busy and batches fill. An offset is stored only after its
//! message and every earlier one in its batch (and every earlier batch) is written; librdkafka
//! commits stored offsets periodically, on revoke and on shutdown. When the writer falls
//! behind (Redis down), the partitions are paused instead of buffering without bound. Messages
//! of a partition revoked after they were read are dropped, never written (see
//! [`crate::ownership`]).

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fleet::cache_writer::{AttemptGate, CacheWriter, Stopped};
use fleet::observability::DependencyStatus;
use fleet::version_guard::{Change, WriteOutcome};
use fleet::Shutdown;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

use crate::config::OrderCacherConfig;
use crate::context::OrderContext;
use crate::dead_letter::{DeadLetter, DeadLetterProducer, Refusal};
use crate::decode::{BatchArena, Decoded, Incoming, IndexEntry, TopicRules};
use crate::metrics::PipelineMetrics;
use crate::ownership::{Attempt, Ownership, TaggedPartition};

type OrderConsumer = StreamConsumer<OrderContext>;

/// How long the writer may be stuck on a batch before the partitions are paused.
const STALL_BEFORE_PAUSE: Duration = Duration::from_secs(1);

/// Builds the consumer with the fleet's at-least-once settings; configured properties win.
pub fn consumer(
    config: &OrderCacherConfig,
    metrics: &PipelineMetrics,
    kafka: DependencyStatus,
) -> KafkaResult<OrderConsumer> {
    let commit_interval = config.consumer.commit_interval_ms.to_string();
    let defaults = [
        ("group.id", config.consumer.group_id.as_str()),
        // Offsets are stored by hand after the write, and committed from the store.
        ("enable.auto.commit", "true"),
        ("enable.auto.offset.store", "false"),
        ("auto.commit.interval.ms", commit_interval.as_str()),
        ("auto.offset.reset", "earliest"),
        ("partition.assignment.strategy", "cooperative-sticky"),
        ("session.timeout.ms", "10000"),
        ("statistics.interval.ms", "5000"),
        // Bounds what librdkafka prefetches, and so the service's memory. With a full queue
        // the next fetch waits `fetch.queue.backoff.ms` (1 s by default), longer than the
        // service needs to drain it, so keep that wait short.
        ("queued.max.messages.kbytes", "8192"),
        ("fetch.queue.backoff.ms", "20"),
        ("enable.partition.eof", "false"),
    ];
    fleet::kafka::client_config_with(&config.kafka, &defaults)
        .create_with_context(OrderContext::new(metrics.clone(), kafka))
}

/// Messages decoded and waiting to be written together.
pub struct Batch {
    writes: Vec<fleet::version_guard::CacheWrite>,
    /// The slot of each write's message.
    write_slots: Vec<usize>,
    /// The offset of each write's message, for its dead letter should Redis refuse it.
    write_offsets: Vec<i64>,
    /// A delete's Kafka key (which names what it deletes), for the same; `None` for upserts,
    /// whose value says it all.
    delete_keys: Vec<Option<Bytes>>,
    /// Writes Redis refused, whose messages were dead-lettered instead.
    rejected: Vec<usize>,
    /// Kafka timestamp of each write, for the event-to-cache lag.
    timestamps_ms: Vec<Option<i64>>,
    /// Index entries and the write each belongs to.
    indexes: Vec<(usize, usize, IndexEntry)>,
    /// Deletes (write, topic) of topics with indexes: their members leave the indexes.
    index_deletes: Vec<(usize, usize)>,
    dead_letters: Vec<DeadLetter>,
    skipped: u64,
    /// The partitions the messages came from.
    slots: Vec<Slot>,
    messages: usize,
}

/// One partition's messages in a batch, all read between the same two revokes.
struct Slot {
    topic: usize,
    topic_name: Arc<str>,
    partition: i32,
    /// The revoke count when they were read (see [`Ownership`]).
    tag: u64,
    /// The offset after the last of them.
    next: i64,
    messages: usize,
}

impl TaggedPartition for Slot {
    fn tagged(&self) -> (&str, i32, u64) {
        (&self.topic_name, self.partition, self.tag)
    }
}

impl Batch {
    fn new(capacity: usize) -> Self {
        Self {
            writes: Vec::with_capacity(capacity),
            write_slots: Vec::with_capacity(capacity),
            write_offsets: Vec::with_capacity(capacity),
            delete_keys: Vec::with_capacity(capacity),
            rejected: Vec::new(),
            timestamps_ms: Vec::with_capacity(capacity),
            indexes: Vec::new(),
            index_deletes: Vec::new(),
            dead_letters: Vec::new(),
            skipped: 0,
            slots: Vec::new(),
            messages: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.messages == 0
    }

    /// Whether the batch may be written at the same time as others: every write carries a
    /// version, so the guard keeps the newest whatever order Redis applies them in, and no
    /// delete reads the stored value to take it out of the indexes (that read must see every
    /// earlier write).
    fn commutes(&self) -> bool {
        self.index_deletes.is_empty() && self.writes.iter().all(|w| w.version.is_some())
    }

    /// The slot of a message of `partition` read under `tag`.
    fn slot(&mut self, topic: usize, topic_name: &Arc<str>, partition: i32, tag: u64) -> usize {
        if let Some(at) = self
            .slots
            .iter()
            .position(|s| s.topic == topic && s.partition == partition && s.tag == tag)
        {
            return at;
        }
        self.slots.push(Slot {
            topic,
            topic_name: Arc::clone(topic_name),
            partition,
            tag,
            next: 0,
            messages: 0,
        });
        self.slots.len() - 1
    }

    /// Removes the messages of the slots marked in `lost`; returns how many.
    fn drop_slots(&mut self, lost: &[bool]) -> usize {
        if !lost.contains(&true) {
            return 0;
        }
        let mut renumbered = Vec::with_capacity(self.slots.len());
        let mut kept_slots = Vec::with_capacity(self.slots.len());
        let mut dropped = 0;
        for (slot, &lost) in std::mem::take(&mut self.slots).into_iter().zip(lost) {
            if lost {
                dropped += slot.messages;
                renumbered.push(None);
            } else {
                renumbered.push(Some(kept_slots.len()));
                kept_slots.push(slot);
            }
        }
        self.slots = kept_slots;
        let mut new_position = Vec::with_capacity(self.writes.len());
        let (writes, slots, offsets, delete_keys, timestamps) = (
            std::mem::take(&mut self.writes),
            std::mem::take(&mut self.write_slots),
            std::mem::take(&mut self.write_offsets),
            std::mem::take(&mut self.delete_keys),
            std::mem::take(&mut self.timestamps_ms),
        );
        for ((((write, slot), offset), delete_key), timestamp) in writes
            .into_iter()
            .zip(slots)
            .zip(offsets)
            .zip(delete_keys)
            .zip(timestamps)
        {
            match renumbered[slot] {
                Some(slot) => {
                    new_position.push(Some(self.writes.len()));
                    self.writes.push(write);
                    self.write_slots.push(slot);
                    self.write_offsets.push(offset);
                    self.delete_keys.push(delete_key);
                    self.timestamps_ms.push(timestamp);
                }
                None => new_position.push(None),
            }
        }
        let moved = |write: &mut usize| match new_position[*write] {
            Some(at) => {
                *write = at;
                true
            }
            None => false,
        };
        self.indexes.retain_mut(|(write, _, _)| moved(write));
        self.index_deletes.retain_mut(|(write, _)| moved(write));
        self.messages -= dropped;
        dropped
    }
}

/// Reads the consumer into batches and hands them to the writer until shutdown, then drains,
/// commits and leaves the group.
pub async fn run(
    config: &OrderCacherConfig,
    consumer: Arc<OrderConsumer>,
    cache: CacheWriter,
    dead_letters: DeadLetterProducer,
    metrics: PipelineMetrics,
    shutdown: Shutdown,
) -> KafkaResult<()> {
    let rules: Arc<[TopicRules]> = config
        .topics
        .iter()
        .map(|t| TopicRules::new(t, &config.origin, config.consumer.max_message_bytes))
        .collect();
    let topics: Vec<&str> = rules.iter().map(|r| r.topic.as_str()).collect();
    consumer.subscribe(&topics)?;
    tracing::info!(topics = %topics.join(","), group = %config.consumer.group_id, "Consuming.");
    if config.consumer.batches_in_flight > 1 {
        for topic in config.topics.iter().filter(|t| t.version_field.is_none()) {
            tracing::info!(
                topic = %topic.name,
                "Topic has no version_field: its writes are last-writer-wins, so batches holding them are written one at a time."
            );
        }
    }

    let (tx, rx) = mpsc::channel::<Batch>(1);
    let load = Arc::new(WriterLoad::default());
    let writer = BatchWriter {
        load: Arc::clone(&load),
        cache,
        dead_letters,
        consumer: Arc::clone(&consumer),
        rules: Arc::clone(&rules),
        metrics,
        batches_in_flight: config.consumer.batches_in_flight,
    };
    let writer_task = shutdown.spawn("order-writer", writer.run(rx, shutdown.clone()));

    let batch_size = config.consumer.batch_size;
    let linger = config.consumer.linger();
    let mut reader = Reader {
        consumer: &consumer,
        rules: &rules,
        topic_names: rules.iter().map(|r| Arc::from(r.topic.as_str())).collect(),
        arena: BatchArena::default(),
        batch: Batch::new(batch_size),
        paused: false,
    };
    // A full batch the writer has no room for yet. While it waits, nothing more is read:
    // librdkafka's bounded prefetch queue is the buffer. Only a writer stuck for longer
    // (Redis down) pauses the partitions, so the consumer can keep polling and stay in the
    // group without buffering; pausing drops the prefetch, so it is not done on every batch.
    let mut held: Option<Batch> = None;
    let mut stalled_until: Option<Instant> = None;
    let mut linger_until: Option<Instant> = None;
    // Through a Kafka outage the consumer hands back the same error on every poll.
    let consumer_errors = fleet::telemetry::Repeats::default();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.triggered() => break,
            permit = tx.reserve(), if held.is_some() => {
                let Ok(permit) = permit else { break };
                if let Some(batch) = held.take() {
                    load.handed_over();
                    permit.send(batch);
                }
                stalled_until = None;
                reader.resume();
            }
            _ = sleep_until(stalled_until), if stalled_until.is_some() && !reader.paused => {
                reader.pause(batch_size);
            }
            _ = sleep_until(linger_until), if linger_until.is_some() && held.is_none() => {
                linger_until = None;
                held = Some(reader.take(batch_size));
            }
            _ = load.finished.notified(), if linger_until.is_some() && held.is_none() => {
                if load.is_idle() {
                    linger_until = None;
                    held = Some(reader.take(batch_size));
                }
            }
            message = consumer.recv(), if held.is_none() || reader.paused => {
                // Messages librdkafka already holds are taken in the same turn, without
                // another pass through this select (its timers and wakers cost more per
                // message than the message itself), until a batch is ready.
                let mut next = Some(message);
                while let Some(message) = next.take() {
                    match message {
                        Ok(message) => {
                            reader.add(&message);
                            linger_until.get_or_insert_with(|| Instant::now() + linger);
                            if held.is_none() && load.is_idle() {
                                linger_until = None;
                                held = Some(reader.take(batch_size));
                            } else if reader.batch.messages >= batch_size {
                                if held.is_none() {
                                    linger_until = None;
                                    held = Some(reader.take(batch_size));
                                } else {
                                    reader.pause(batch_size);
                                }
                            }
                        }
                        Err(e) => {
                            consumer.context().note_error(&e);
                            if let Some(left_out) =
                                consumer_errors.admit(&e.to_string(), std::time::Instant::now())
                            {
                                tracing::warn!(
                                    error = %e,
                                    repeats_left_out = left_out,
                                    "Kafka consumer error."
                                );
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            break;
                        }
                    }
                    if held.is_none() {
                        next = consumer.recv().now_or_never();
                    }
                }
            }
        }
        // Hand a ready batch over at once when the writer has room.
        if let Some(batch) = held.take() {
            load.handed_over();
            match tx.try_send(batch) {
                Ok(()) => {
                    stalled_until = None;
                    reader.resume();
                }
                Err(mpsc::error::TrySendError::Full(batch)) => {
                    load.finish();
                    held = Some(batch);
                    stalled_until.get_or_insert_with(|| Instant::now() + STALL_BEFORE_PAUSE);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => break,
            }
        }
    }

    // Drain: what was read is written (if Redis lets it) before offsets are committed.
    for batch in [held.take(), Some(reader.take(batch_size))]
        .into_iter()
        .flatten()
    {
        if batch.is_empty() {
            continue;
        }
        load.handed_over();
        if tx.send(batch).await.is_err() {
            break;
        }
    }
    drop(tx);
    let handled = writer_task.await.unwrap_or(0);
    let consumer = Arc::clone(&consumer);
    let committed = tokio::task::spawn_blocking(move || {
        let result = consumer.commit_consumer_state(CommitMode::Sync);
        consumer.unsubscribe();
        result
    })
    .await;
    match committed {
        Ok(Ok(())) => tracing::info!(
            handled,
            new_offsets = true,
            "Offsets committed on shutdown."
        ),
        // The periodic commit already covered every stored offset.
        Ok(Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset))) => {
            tracing::info!(
                handled,
                new_offsets = false,
                "Offsets committed on shutdown."
            );
        }
        Ok(Err(e)) => tracing::warn!(
            handled,
            error = %e,
            "Offsets not committed on shutdown; the next start re-reads from the last commit."
        ),
        Err(e) => tracing::warn!(error = %e, "Commit on shutdown did not run."),
    }
    Ok(())
}

/// What each delete of the batch takes out of the indexes: the index keys of the value it
/// deletes, so that value is read first. A delete that will apply (unversioned, or newer than
/// the stored value) takes its entry out of those indexes here, before the write: once the
/// value is gone nothing says which indexes held the entry, so a crash between the write and
/// a later removal would leave it there for good. [`BatchWriter::finish`] removes it again
/// after a delete that applied, which also covers a stored value without a readable version.
/// `None` if shutdown came first.
async fn index_removals(
    cache: &mut CacheWriter,
    rules: &[TopicRules],
    batch: &Batch,
    shutdown: &Shutdown,
) -> Option<Vec<(usize, Vec<String>)>> {
    if batch.index_deletes.is_empty() {
        return Some(Vec::new());
    }
    let keys: Vec<&str> = batch
        .index_deletes
        .iter()
        .map(|&(write, _)| &*batch.writes[write].key)
        .collect();
    let stored = cache.read_values(&keys, shutdown).await?;
    let mut before_write = redis::pipe();
    let removals = batch
        .index_deletes
        .iter()
        .zip(stored)
        .map(|(&(write, topic), value)| {
            let Some(value) = value else {
                return (write, Vec::new());
            };
            let (index_keys, stored_version) = rules[topic].stored_entry(&value);
            let delete = &batch.writes[write];
            let applies = match (delete.version, stored_version) {
                (None, _) => true,
                (Some(deleted), Some(stored)) => deleted > stored,
                (Some(_), None) => false,
            };
            if applies {
                for index_key in &index_keys {
                    before_write
                        .cmd("ZREM")
                        .arg(index_key)
                        .arg(&*delete.key)
                        .ignore();
                }
            }
            (write, index_keys)
        })
        .collect();
    if !before_write.is_empty() {
        cache.run_pipeline(&before_write, shutdown).await?;
    }
    Some(removals)
}

/// Index updates in the order of the batch's writes. An upsert that is now current
/// (applied, or applied before: a duplicate after a crash) adds its entries, unless its
/// slot is marked in `lost`; ZADD is idempotent, so a replay is harmless. A delete that
/// applied takes its key out of the indexes the deleted value was in (those whose members
/// are entry keys): the value stored before the batch (`removals`: write and index keys)
/// and any written earlier in the same batch. Removals are kept for lost slots too: once
/// the value is gone, nobody else knows which indexes held the entry.
fn index_pipeline(
    rules: &[TopicRules],
    batch: &Batch,
    outcomes: &[WriteOutcome],
    removals: &[(usize, Vec<String>)],
    lost: &[bool],
) -> redis::Pipeline {
    let mut removals = removals.iter().peekable();
    let mut entries = batch.indexes.iter().peekable();
    let mut pipe = redis::pipe();
    for (at, write) in batch.writes.iter().enumerate() {
        let owned = !lost.get(batch.write_slots[at]).copied().unwrap_or(false);
        while let Some((_, topic, entry)) = entries.next_if(|(w, _, _)| *w == at) {
            if owned && outcomes.get(at) != Some(&WriteOutcome::Stale) {
                add_to_index(rules, &mut pipe, *topic, entry);
            }
        }
        let Some((_, stored)) = removals.next_if(|(w, _)| *w == at) else {
            continue;
        };
        if outcomes.get(at) != Some(&WriteOutcome::Applied) {
            continue;
        }
        let earlier = batch
            .indexes
            .iter()
            .take_while(|(w, _, _)| *w < at)
            .filter(|(w, topic, entry)| {
                batch.writes[*w].key == write.key
                    && rules[*topic].indexes[entry.rule].members_are_entry_keys()
            })
            .map(|(_, _, entry)| &*entry.key);
        for index_key in stored.iter().map(String::as_str).chain(earlier) {
            pipe.cmd("ZREM").arg(index_key).arg(&*write.key).ignore();
        }
    }
    pipe
}

fn add_to_index(
    rules: &[TopicRules],
    pipe: &mut redis::Pipeline,
    topic: usize,
    entry: &IndexEntry,
) {
    let rule = &rules[topic].indexes[entry.rule];
    pipe.cmd("ZADD")
        .arg(&*entry.key)
        .arg(entry.score)
        .arg(&*entry.member)
        .ignore();
    // Keep the highest-scored `max_entries`: drop ranks 0 .. -(max_entries + 1).
    pipe.cmd("ZREMRANGEBYRANK")
        .arg(&*entry.key)
        .arg(0)
        .arg(-(rule.max_entries as i64) - 1)
        .ignore();
    if let Some(ttl) = rule.ttl {
        pipe.cmd("PEXPIRE")
            .arg(&*entry.key)
            .arg(ttl.as_millis() as u64)
            .ignore();
    }
}

/// Lets a write attempt run only while every partition of its batch is still owned.
struct OwnedSlots<'a, P> {
    ownership: &'a Ownership,
    slots: &'a [P],
}

impl<'a, P: TaggedPartition> AttemptGate for OwnedSlots<'a, P> {
    type Permit = Attempt<'a>;

    fn enter(&self) -> Option<Attempt<'a>> {
        self.ownership.begin_attempt(self.slots)
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// How [`write_one_by_one`] ended.
enum OneByOne {
    /// Every write was tried: the outcomes (a refused write counts as stale, which adds no
    /// index entry), and the dead letters of the refused writes' messages.
    Written(Vec<WriteOutcome>, Vec<DeadLetter>),
    Shutdown,
    /// A partition of the batch was revoked meanwhile: start again with what is left.
    Refused,
}

/// Writes a batch one write at a time, in order, and turns each write Redis refuses into a
/// dead letter of its message, marked in `batch.rejected`.
async fn write_one_by_one(
    cache: &CacheWriter,
    batch: &mut Batch,
    rules: &[TopicRules],
    ownership: &Ownership,
    shutdown: &Shutdown,
) -> OneByOne {
    let gate = OwnedSlots {
        ownership,
        slots: &batch.slots,
    };
    // The batch was refused its attempts already: a write refused alone is refused for good.
    let mut cache = cache.clone().with_rejected_after(1);
    let mut outcomes = Vec::with_capacity(batch.writes.len());
    let mut letters = Vec::new();
    let mut rejected = Vec::new();
    for (at, write) in batch.writes.iter().enumerate() {
        match cache
            .write_gated(std::slice::from_ref(write), shutdown, &gate)
            .await
        {
            Ok(outcome) => outcomes.push(outcome.first().copied().unwrap_or(WriteOutcome::Stale)),
            Err(Stopped::Shutdown) => return OneByOne::Shutdown,
            Err(Stopped::Refused) => return OneByOne::Refused,
            Err(Stopped::Rejected(e)) => {
                let slot = &batch.slots[batch.write_slots[at]];
                let offset = batch.write_offsets[at];
                let topic_rules = &rules[slot.topic];
                tracing::warn!(
                    topic = %slot.topic_name,
                    partition = slot.partition,
                    offset,
                    error = %e,
                    dead_letter_topic = %topic_rules.dead_letter_topic,
                    "Redis refused a write; its message is dead-lettered."
                );
                letters.push(DeadLetter {
                    topic: topic_rules.dead_letter_topic.clone(),
                    source_topic: slot.topic_name.to_string(),
                    partition: slot.partition,
                    offset,
                    key: batch.delete_keys[at].as_ref().map(|key| key.to_vec()),
                    payload: match &write.change {
                        Change::Upsert(value) => Some(value.to_vec()),
                        Change::Delete => None,
                    },
                    headers: None,
                    error: Refusal::Write(e.to_string()),
                });
                rejected.push(at);
                outcomes.push(WriteOutcome::Stale);
            }
        }
    }
    batch.rejected = rejected;
    OneByOne::Written(outcomes, letters)
}

/// Decodes messages into the batch being built, and pauses the consumer when asked.
struct Reader<'a> {
    consumer: &'a OrderConsumer,
    rules: &'a [TopicRules],
    /// The topics' names, shared with the batches' slots.
    topic_names: Vec<Arc<str>>,
    /// Where the batches' upserted keys and values are copied to.
    arena: BatchArena,
    batch: Batch,
    paused: bool,
}

impl Reader<'_> {
    fn take(&mut self, capacity: usize) -> Batch {
        std::mem::replace(&mut self.batch, Batch::new(capacity))
    }

    fn add(&mut self, message: &BorrowedMessage<'_>) {
        let topic = message.topic();
        let Some(index) = self.rules.iter().position(|r| r.topic == topic) else {
            return;
        };
        let rules = &self.rules[index];
        let tag = self.consumer.context().ownership().tag();
        let slot = self
            .batch
            .slot(index, &self.topic_names[index], message.partition(), tag);
        let timestamp_ms = message.timestamp().to_millis();
        let incoming = Incoming {
            key: message.key(),
            payload: message.payload(),
            timestamp_ms,
            // librdkafka parses the headers on first use and keeps them: a message is only
            // parsed for them when a rule reads one (the origin marker, a tombstone's version).
            header: |name: &str| {
                message
                    .headers()
                    .and_then(|h| h.iter().find(|x| x.key == name).map(|x| x.value))
            },
        };
        let batch = &mut self.batch;
        match rules.decode(&incoming, &mut self.arena) {
            Decoded::Write { write, indexes } => {
                let at = batch.writes.len();
                let is_delete = write.change == Change::Delete;
                if is_delete && !rules.indexes.is_empty() {
                    batch.index_deletes.push((at, index));
                }
                batch.writes.push(write);
                batch.write_slots.push(slot);
                batch.write_offsets.push(message.offset());
                batch.delete_keys.push(if is_delete {
                    message.key().map(|key| self.arena.copy(key))
                } else {
                    None
                });
                batch.timestamps_ms.push(timestamp_ms);
                batch
                    .indexes
                    .extend(indexes.into_iter().map(|entry| (at, index, entry)));
            }
            Decoded::SkippedOrigin => batch.skipped += 1,
            Decoded::Poison(error) => {
                tracing::warn!(
                    topic,
                    partition = message.partition(),
                    offset = message.offset(),
                    reason = error.reason(),
                    error = %error,
                    dead_letter_topic = %rules.dead_letter_topic,
                    "Message dead-lettered."
                );
                batch.dead_letters.push(DeadLetter {
                    topic: rules.dead_letter_topic.clone(),
                    source_topic: topic.to_string(),
                    partition: message.partition(),
                    offset: message.offset(),
                    key: message.key().map(<[u8]>::to_vec),
                    payload: message.payload().map(<[u8]>::to_vec),
                    headers: message.headers().map(|h| h.detach()),
                    error: Refusal::Payload(error),
                });
            }
        }
        batch.messages += 1;
        let slot = &mut batch.slots[slot];
        slot.messages += 1;
        slot.next = slot.next.max(message.offset() + 1);
    }

    /// Stops fetching while the writer is behind. Repeated as the backlog grows, so
    /// partitions assigned since the last pause are paused too.
    fn pause(&mut self, batch_size: usize) {
        if self.paused && self.batch.messages % batch_size != 0 {
            return;
        }
        match self
            .consumer
            .assignment()
            .and_then(|a| self.consumer.pause(&a))
        {
            Ok(()) => {
                if !self.paused {
                    tracing::info!("Writer is behind; pausing partitions.");
                }
                self.paused = true;
            }
            Err(e) => tracing::warn!(error = %e, "Cannot pause partitions."),
        }
    }

    fn resume(&mut self) {
        if !self.paused {
            return;
        }
        match self
            .consumer
            .assignment()
            .and_then(|a| self.consumer.resume(&a))
        {
            Ok(()) => {
                tracing::info!("Writer caught up; resuming partitions.");
                self.paused = false;
            }
            Err(e) => tracing::warn!(error = %e, "Cannot resume partitions."),
        }
    }
}

/// How many batches the writer has been handed and not yet finished.
#[derive(Default)]
struct WriterLoad {
    pending: AtomicUsize,
    /// Woken each time the writer finishes a batch.
    finished: Notify,
}

impl WriterLoad {
    /// Counted before the hand-over, so the writer can never finish a batch not yet counted.
    fn handed_over(&self) {
        self.pending.fetch_add(1, Ordering::AcqRel);
    }

    fn finish(&self) {
        self.pending.fetch_sub(1, Ordering::AcqRel);
        self.finished.notify_one();
    }

    fn is_idle(&self) -> bool {
        self.pending.load(Ordering::Acquire) == 0
    }
}

/// Applies batches and stores their offsets, in order. Up to `batches_in_flight` batches
/// are written at once when their order cannot matter (see [`Batch::commutes`]); what
/// follows a write (index updates, metrics, offsets) runs one batch at a time, in order.
struct BatchWriter {
    load: Arc<WriterLoad>,
    cache: CacheWriter,
    dead_letters: DeadLetterProducer,
    consumer: Arc<OrderConsumer>,
    rules: Arc<[TopicRules]>,
    metrics: PipelineMetrics,
    batches_in_flight: usize,
}

/// A batch after its write: each write's outcome and what its deletes take out of the
/// indexes, or `None` when shutdown interrupted it and nothing of it may be stored.
type Written = (
    Batch,
    Option<(Vec<WriteOutcome>, Vec<(usize, Vec<String>)>)>,
);

impl BatchWriter {
    /// Returns how many messages it finished with (written, skipped or dead-lettered).
    async fn run(mut self, mut batches: mpsc::Receiver<Batch>, shutdown: Shutdown) -> u64 {
        let mut handled = 0;
        let mut in_flight = FuturesOrdered::new();
        // Whether the batch in flight must be written alone.
        let mut alone = false;
        // The next batch, and whether it commutes.
        let mut next: Option<(Batch, bool)> = None;
        let mut open = true;
        // Not raced with shutdown: the reader closes the channel after handing over the
        // last batch, and a batch stuck on a Redis outage gives up on shutdown by itself.
        loop {
            let may_start = |&mut (_, commutes): &mut (Batch, bool)| {
                in_flight.is_empty()
                    || (!alone && in_flight.len() < self.batches_in_flight && commutes)
            };
            if let Some((batch, commutes)) = next.take_if(may_start) {
                if !self
                    .dead_letters
                    .send_all(&batch.dead_letters, &shutdown)
                    .await
                {
                    self.load.finish();
                    break;
                }
                alone = !commutes;
                // A task of its own, so the write goes on (and its attempt ends, which a
                // revoke waits for) while this loop finishes an earlier batch.
                in_flight.push_back(AbortOnDropHandle::new(tokio::spawn(
                    self.write(batch, shutdown.clone()),
                )));
            }
            tokio::select! {
                Some(joined) = in_flight.next() => {
                    let (batch, written) = match joined {
                        Ok(written) => written,
                        Err(e) => {
                            tracing::error!(error = %e, "Batch write task failed; its offsets stay uncommitted.");
                            self.load.finish();
                            break;
                        }
                    };
                    let finished = match written {
                        Some((outcomes, removals)) => {
                            self.finish(&batch, &outcomes, &removals, &shutdown).await
                        }
                        None => false,
                    };
                    self.load.finish();
                    if !finished {
                        tracing::warn!(
                            messages = batch.messages,
                            "Batch not written before shutdown; its offsets stay uncommitted."
                        );
                        break;
                    }
                    handled += batch.messages as u64;
                }
                got = batches.recv(), if open && next.is_none() => match got {
                    Some(batch) => {
                        let commutes = batch.commutes();
                        next = Some((batch, commutes));
                    }
                    None => open = false,
                },
                else => break,
            }
        }
        handled
    }

    /// Writes a batch. Messages of partitions revoked since they were read are dropped,
    /// before the write and between its attempts: their next owner writes them.
    fn write(
        &self,
        mut batch: Batch,
        shutdown: Shutdown,
    ) -> impl Future<Output = Written> + Send + 'static {
        let mut cache = self.cache.clone();
        let rules = Arc::clone(&self.rules);
        let ownership = Arc::clone(self.consumer.context().ownership());
        let dead_letters = self.dead_letters.clone();
        async move {
            loop {
                let dropped = batch.drop_slots(&ownership.lost(&batch.slots));
                if dropped > 0 {
                    tracing::info!(
                        messages = dropped,
                        "Dropped messages of partitions revoked since they were read; their next owner writes them."
                    );
                }
                let Some(removals) = index_removals(&mut cache, &rules, &batch, &shutdown).await
                else {
                    return (batch, None);
                };
                if batch.writes.is_empty() {
                    return (batch, Some((Vec::new(), removals)));
                }
                let gate = OwnedSlots {
                    ownership: &ownership,
                    slots: &batch.slots,
                };
                match cache.write_gated(&batch.writes, &shutdown, &gate).await {
                    Ok(outcomes) => return (batch, Some((outcomes, removals))),
                    Err(Stopped::Shutdown) => return (batch, None),
                    Err(Stopped::Refused) => continue,
                    Err(Stopped::Rejected(_)) => {}
                }
                // Redis refuses the batch for a reason of one of its writes: written one by
                // one, in order, the others go through and the refused ones are
                // dead-lettered, so one write cannot stall its partition.
                match write_one_by_one(&cache, &mut batch, &rules, &ownership, &shutdown).await {
                    OneByOne::Written(outcomes, mut letters) => {
                        dead_letters
                            .read_back_messages(&mut letters, &shutdown)
                            .await;
                        if !dead_letters.send_all(&letters, &shutdown).await {
                            return (batch, None);
                        }
                        batch.dead_letters.extend(letters);
                        return (batch, Some((outcomes, removals)));
                    }
                    OneByOne::Shutdown => return (batch, None),
                    OneByOne::Refused => continue,
                }
            }
        }
    }

    /// After the batch's writes: its index updates, metrics and offsets.
    async fn finish(
        &mut self,
        batch: &Batch,
        outcomes: &[WriteOutcome],
        removals: &[(usize, Vec<String>)],
        shutdown: &Shutdown,
    ) -> bool {
        if !batch.indexes.is_empty() || !removals.is_empty() {
            // Like the write, the index additions of a partition revoked since its messages
            // were read are left to its next owner, which re-reads them (as duplicates, which
            // add their entries). Were they added after the revoke, they could land after
            // that owner has deleted the entry and taken it out of the index.
            let ownership = Arc::clone(self.consumer.context().ownership());
            loop {
                let lost = ownership.lost(&batch.slots);
                let pipe = index_pipeline(&self.rules, batch, outcomes, removals, &lost);
                if pipe.is_empty() {
                    break;
                }
                let kept: Vec<&Slot> = batch
                    .slots
                    .iter()
                    .zip(&lost)
                    .filter_map(|(slot, &lost)| (!lost).then_some(slot))
                    .collect();
                let gate = OwnedSlots {
                    ownership: &ownership,
                    slots: &kept,
                };
                match self.cache.run_pipeline_gated(&pipe, shutdown, &gate).await {
                    Ok(()) => break,
                    Err(Stopped::Shutdown) => return false,
                    Err(Stopped::Refused) => continue,
                    Err(Stopped::Rejected(e)) => {
                        // A key of the indexes holds another type, say: the entries are
                        // written, and their partition goes on without these index updates.
                        tracing::error!(
                            error = %e,
                            messages = batch.messages,
                            "Redis refused a batch's index updates; the cache entries are written, these index updates are not."
                        );
                        break;
                    }
                }
            }
        }

        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        self.metrics.count_written(
            outcomes
                .iter()
                .copied()
                .zip(batch.timestamps_ms.iter().copied())
                .enumerate()
                .filter(|(at, _)| !batch.rejected.contains(at))
                .map(|(_, written)| written),
            now_ms,
        );
        self.metrics.count_skipped(batch.skipped);
        for letter in &batch.dead_letters {
            self.metrics.count_dead_letter(letter.error.reason());
        }
        self.metrics.batch_size.observe(batch.messages as f64);
        self.store_offsets(batch);
        true
    }

    fn store_offsets(&self, batch: &Batch) {
        // A partition has more than one slot when a revoke (of another partition) came
        // while its messages were read; its offset is the furthest.
        let mut furthest: Vec<&Slot> = Vec::with_capacity(batch.slots.len());
        for slot in &batch.slots {
            match furthest
                .iter_mut()
                .find(|s| s.topic == slot.topic && s.partition == slot.partition)
            {
                Some(seen) if seen.next < slot.next => *seen = slot,
                Some(_) => {}
                None => furthest.push(slot),
            }
        }
        let mut offsets = TopicPartitionList::with_capacity(furthest.len());
        for slot in furthest {
            if let Err(e) = offsets.add_partition_offset(
                &slot.topic_name,
                slot.partition,
                Offset::Offset(slot.next),
            ) {
                tracing::warn!(error = %e, "Cannot record an offset.");
            }
        }
        // Fails for partitions revoked meanwhile; their next owner re-reads from the last
        // commit, and the re-applied writes are duplicates.
        if let Err(e) = self.consumer.store_offsets(&offsets) {
            tracing::debug!(error = %e, "Offsets not stored; partition no longer assigned.");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet::version_guard::CacheWrite;

    fn entry(key: &str) -> IndexEntry {
        IndexEntry {
            rule: 0,
            key: key.into(),
            member: key.into(),
            score: 1.0,
        }
    }

    #[test]
    fn dropping_a_slot_takes_out_its_writes_and_renumbers_the_rest() {
        let topic: Arc<str> = Arc::from("orders");
        let mut batch = Batch::new(8);
        // Partition 0 and 1 read under tag 0, then partition 0 again under tag 1.
        for (partition, tag, key, offset) in [
            (0, 0, "a", 10),
            (1, 0, "b", 20),
            (0, 1, "c", 11),
            (1, 0, "d", 21),
        ] {
            let slot = batch.slot(0, &topic, partition, tag);
            let at = batch.writes.len();
            batch.writes.push(CacheWrite::delete(key, None));
            batch.write_slots.push(slot);
            batch.write_offsets.push(offset);
            batch.delete_keys.push(Some(Bytes::from(key)));
            batch.timestamps_ms.push(Some(offset));
            batch.indexes.push((at, 0, entry(key)));
            batch.index_deletes.push((at, 0));
            batch.messages += 1;
            batch.slots[slot].messages += 1;
            batch.slots[slot].next = offset + 1;
        }
        assert_eq!(batch.slots.len(), 3);
        assert_eq!(batch.drop_slots(&[false, false, false]), 0);
        // Partition 1's slot is lost.
        assert_eq!(batch.drop_slots(&[false, true, false]), 2);
        let keys: Vec<&str> = batch.writes.iter().map(|w| &*w.key).collect();
        assert_eq!(keys, ["a", "c"]);
        assert_eq!(batch.write_slots, [0, 1]);
        assert_eq!(batch.timestamps_ms, [Some(10), Some(11)]);
        assert_eq!(batch.write_offsets, [10, 11]);
        assert_eq!(
            batch.delete_keys,
            [Some(Bytes::from("a")), Some(Bytes::from("c"))]
        );
        let indexed: Vec<(usize, &str)> = batch
            .indexes
            .iter()
            .map(|(w, _, e)| (*w, &*e.key))
            .collect();
        assert_eq!(indexed, [(0, "a"), (1, "c")]);
        assert_eq!(batch.index_deletes, [(0, 0), (1, 0)]);
        assert_eq!(batch.messages, 2);
        let slots: Vec<(i32, u64, i64)> = batch
            .slots
            .iter()
            .map(|s| (s.partition, s.tag, s.next))
            .collect();
        assert_eq!(slots, [(0, 0, 11), (0, 1, 12)]);
    }

    #[test]
    fn only_versioned_batches_without_index_deletes_are_written_alongside_others() {
        let version = Some(fleet::version::Version::new(3));
        let mut batch = Batch::new(4);
        assert!(batch.commutes());
        batch.writes.push(CacheWrite::upsert("a", "{}", version));
        batch.writes.push(CacheWrite::delete("b", version));
        assert!(batch.commutes());
        batch.index_deletes.push((1, 0));
        assert!(
            !batch.commutes(),
            "a delete that reads its indexes must see earlier writes"
        );
        batch.index_deletes.clear();
        batch.writes.push(CacheWrite::upsert("c", "{}", None));
        assert!(
            !batch.commutes(),
            "a last-writer-wins write depends on order"
        );
    }

    #[test]
    fn a_lost_slot_adds_nothing_to_the_indexes_but_keeps_its_removals() {
        use crate::config::{IndexConfig, TopicConfig};
        use fleet::key_template::KeyTemplate;
        let config = TopicConfig {
            name: "orders".into(),
            key_template: KeyTemplate::parse("order:{order_id}").unwrap(),
            version_field: None,
            ttl_secs: None,
            dead_letter_topic: None,
            indexes: vec![IndexConfig {
                key_template: KeyTemplate::parse("user:{user_id}:orders").unwrap(),
                member_template: None,
                score_field: "timestamp".into(),
                max_entries: 10,
                ttl_secs: None,
            }],
        };
        let rules = [TopicRules::new(
            &config,
            &fleet::mapping::OriginMarker::default(),
            1024,
        )];
        let topic: Arc<str> = Arc::from("orders");
        let mut batch = Batch::new(4);
        // Partition 0 keeps its slot; partition 1's is lost.
        for (partition, write) in [
            (0, CacheWrite::upsert("order:kept", "{}", None)),
            (1, CacheWrite::upsert("order:lost", "{}", None)),
            (1, CacheWrite::delete("order:gone", None)),
        ] {
            let slot = batch.slot(0, &topic, partition, 0);
            let at = batch.writes.len();
            if matches!(write.change, Change::Upsert(_)) {
                let mut index_entry = entry("user:u1:orders");
                index_entry.member = write.key.clone();
                batch.indexes.push((at, 0, index_entry));
            }
            batch.writes.push(write);
            batch.write_slots.push(slot);
        }
        let removals = [(2, vec!["user:u2:orders".to_string()])];
        let outcomes = [WriteOutcome::Applied; 3];
        let packed = |lost: &[bool]| {
            String::from_utf8_lossy(
                &index_pipeline(&rules, &batch, &outcomes, &removals, lost).get_packed_pipeline(),
            )
            .into_owned()
        };

        let all = packed(&[false, false]);
        assert!(
            all.contains("order:kept") && all.contains("order:lost"),
            "{all}"
        );
        let kept = packed(&[false, true]);
        assert!(kept.contains("order:kept"), "{kept}");
        assert!(!kept.contains("order:lost"), "{kept}");
        assert!(
            kept.contains("ZREM\r\n$14\r\nuser:u2:orders\r\n$10\r\norder:gone"),
            "{kept}"
        );
    }
}
