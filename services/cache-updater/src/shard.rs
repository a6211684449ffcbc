//! Key-sharded Redis writers: a message's writes go to the shard of their cache key, so one
//! key's writes apply in arrival order while different keys are written in parallel, each
//! shard batching its writes into one pipeline.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use backon::BackoffBuilder;
use fleet::cache_writer::CacheWriter;
use fleet::version_guard::{CacheWrite, GuardError, WriteOutcome};
use fleet::Shutdown;
use tokio::sync::mpsc;

use crate::ack::Settlement;
use crate::decode::Op;
use crate::delivery::{Delivery, Failure};
use crate::metrics::{Outcome, PipelineMetrics};

/// One cache write and the delivery it belongs to.
pub struct Job {
    write: CacheWrite,
    delivery: Arc<Pending>,
}

/// A delivery whose writes are under way in one or more shards.
pub struct Pending {
    delivery: Delivery,
    op: Op,
    event_ms: Option<i64>,
    remaining: AtomicUsize,
    seen: AtomicU8,
    failure: Mutex<Option<String>>,
}

const SEEN_APPLIED: u8 = 1;
const SEEN_DUPLICATE: u8 = 2;

/// Senders to every shard.
#[derive(Clone)]
pub struct Shards {
    senders: Arc<[mpsc::Sender<Job>]>,
}

impl Shards {
    /// Starts `count` shard writers on `cache`. They stop once every [`Shards`] clone is
    /// dropped and their queued writes are done.
    pub fn start(
        count: usize,
        capacity: usize,
        settings: WriterSettings,
        cache: CacheWriter,
        metrics: PipelineMetrics,
        shutdown: &Shutdown,
    ) -> Self {
        let senders: Vec<_> = (0..count)
            .map(|_| {
                let (tx, rx) = mpsc::channel(capacity.max(1));
                let writer = ShardWriter {
                    cache: cache.clone(),
                    settings: settings.clone(),
                    metrics: metrics.clone(),
                };
                shutdown.spawn("shard-writer", writer.run(rx, shutdown.clone()));
                tx
            })
            .collect();
        Self {
            senders: senders.into(),
        }
    }

    /// Hands a delivery's writes to their shards, waiting while a shard is full (which stops
    /// the consumer taking more messages). Returns `false` if the writers are gone.
    pub async fn submit(
        &self,
        delivery: Delivery,
        op: Op,
        writes: Vec<CacheWrite>,
        event_ms: Option<i64>,
    ) -> bool {
        let pending = Arc::new(Pending {
            delivery,
            op,
            event_ms,
            remaining: AtomicUsize::new(writes.len()),
            seen: AtomicU8::new(0),
            failure: Mutex::new(None),
        });
        for write in writes {
            let shard = self.shard_of(&write.key);
            let job = Job {
                write,
                delivery: Arc::clone(&pending),
            };
            if self.senders[shard].send(job).await.is_err() {
                return false;
            }
        }
        true
    }

    fn shard_of(&self, key: &str) -> usize {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut hasher);
        (hasher.finish() % self.senders.len() as u64) as usize
    }
}

/// How a shard writes.
#[derive(Clone)]
pub struct WriterSettings {
    /// Most writes per pipeline.
    pub batch_size: usize,
    /// How long a batch that is not full waits for more writes.
    pub linger: Duration,
    /// Attempts of a write Redis refuses before its delivery is retried or dead-lettered.
    pub write_attempts: u32,
    /// Deliveries before a failing message is dead-lettered.
    pub max_deliveries: u32,
}

struct ShardWriter {
    cache: CacheWriter,
    settings: WriterSettings,
    metrics: PipelineMetrics,
}

/// Why a batch was not written.
enum NotWritten {
    /// Shutdown came during an outage; nothing of the batch may be acked.
    Shutdown,
    /// Redis refused it every time.
    Refused(GuardError),
}

impl ShardWriter {
    async fn run(mut self, mut jobs: mpsc::Receiver<Job>, shutdown: Shutdown) {
        let mut batch = Vec::with_capacity(self.settings.batch_size);
        let mut stopping = false;
        while jobs.recv_many(&mut batch, self.settings.batch_size).await > 0 {
            if !stopping && batch.len() < self.settings.batch_size {
                self.linger(&mut jobs, &mut batch, &shutdown).await;
            }
            if stopping {
                // Unwritten and unacked: the broker redelivers them.
                batch.clear();
                continue;
            }
            let (mut writes, mut owners): (Vec<CacheWrite>, Vec<Arc<Pending>>) =
                batch.drain(..).map(|job| (job.write, job.delivery)).unzip();
            self.metrics.batch_size.observe(writes.len() as f64);
            match self.write(&mut writes, &mut owners, &shutdown).await {
                Ok(outcomes) => {
                    for (owner, outcome) in owners.iter().zip(outcomes) {
                        self.done(owner, Ok(outcome)).await;
                    }
                }
                Err(NotWritten::Shutdown) => stopping = true,
                Err(NotWritten::Refused(_)) if writes.len() > 1 => {
                    // Find the writes Redis refuses; the others go through.
                    for (write, owner) in writes.into_iter().zip(owners) {
                        let (mut one, mut its) = (vec![write], vec![owner]);
                        match self.write(&mut one, &mut its, &shutdown).await {
                            Ok(outcomes) => {
                                if let (Some(owner), Some(outcome)) =
                                    (its.first(), outcomes.first())
                                {
                                    self.done(owner, Ok(*outcome)).await;
                                }
                            }
                            Err(NotWritten::Shutdown) => {
                                stopping = true;
                                break;
                            }
                            Err(NotWritten::Refused(e)) => {
                                if let Some(owner) = its.first() {
                                    self.done(owner, Err(e)).await;
                                }
                            }
                        }
                    }
                }
                Err(NotWritten::Refused(e)) => {
                    if let Some(owner) = owners.first() {
                        self.done(owner, Err(e)).await;
                    }
                }
            }
        }
    }

    /// Gives a batch that is not full `linger` to fill, then takes what came. One timer
    /// rather than a wake-up per arriving write; shutdown cuts it short.
    async fn linger(
        &self,
        jobs: &mut mpsc::Receiver<Job>,
        batch: &mut Vec<Job>,
        shutdown: &Shutdown,
    ) {
        if self.settings.linger.is_zero() {
            return;
        }
        tokio::select! {
            biased;
            _ = shutdown.triggered() => {}
            _ = tokio::time::sleep(self.settings.linger) => {}
        }
        while batch.len() < self.settings.batch_size {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
    }

    /// Writes a batch, waiting out Redis outages with backoff. Writes Redis refuses are
    /// tried `write_attempts` times. Before every attempt, the writes of deliveries the broker
    /// took back (their channel closed) leave `writes` and `owners`: the broker redelivers
    /// them, maybe to another replica, whose newer writes they must not overwrite.
    async fn write(
        &mut self,
        writes: &mut Vec<CacheWrite>,
        owners: &mut Vec<Arc<Pending>>,
        shutdown: &Shutdown,
    ) -> Result<Vec<WriteOutcome>, NotWritten> {
        let mut delays = fleet::retry::reconnect_backoff().build();
        let mut refused = 0;
        loop {
            drop_taken_back(writes, owners);
            if writes.is_empty() {
                return Ok(Vec::new());
            }
            let error = match self.cache.try_write(writes).await {
                Ok(outcomes) => return Ok(outcomes),
                Err(e) => e,
            };
            let transient = error.is_transient();
            // Only a refusal of this write's own is given up on; an outage, or a refusal that
            // every write meets (an ACL denying a command, say), is waited out.
            if error.refuses_this_write() {
                refused += 1;
                if refused >= self.settings.write_attempts {
                    return Err(NotWritten::Refused(error));
                }
            }
            let delay = delays.next().unwrap_or(Duration::from_secs(10));
            tracing::warn!(
                error = %error,
                transient,
                batch = writes.len(),
                retry_in_ms = delay.as_millis() as u64,
                "Cache write failed; retrying."
            );
            if !self.cache.back_off(delay, shutdown).await {
                return Err(NotWritten::Shutdown);
            }
        }
    }

    /// Records one write of a delivery, and finishes the delivery after its last write.
    async fn done(&self, owner: &Arc<Pending>, result: Result<WriteOutcome, GuardError>) {
        match result {
            Ok(outcome) => {
                self.metrics.count_entry(outcome);
                let bit = match outcome {
                    WriteOutcome::Applied => SEEN_APPLIED,
                    WriteOutcome::Duplicate => SEEN_DUPLICATE,
                    WriteOutcome::Stale => 0,
                };
                owner.seen.fetch_or(bit, Ordering::Relaxed);
            }
            Err(e) => {
                let mut failure = owner.failure.lock().unwrap_or_else(|e| e.into_inner());
                failure.get_or_insert_with(|| e.to_string());
            }
        }
        if owner.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let failure = owner
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let delivery = &owner.delivery;
        if let Some(error) = failure {
            let failure = Failure::WriteFailed(error);
            let outcome = if delivery.deliveries() >= self.settings.max_deliveries {
                delivery.dead_letter(&failure).await;
                Outcome::DeadLettered
            } else {
                delivery.retry(&failure).await;
                Outcome::Retried
            };
            self.metrics.count(owner.op, outcome);
            return;
        }
        let seen = owner.seen.load(Ordering::Relaxed);
        let outcome = if seen & SEEN_APPLIED != 0 {
            Outcome::Applied
        } else if seen & SEEN_DUPLICATE != 0 {
            Outcome::Duplicate
        } else {
            Outcome::Stale
        };
        self.metrics.count(owner.op, outcome);
        if let Some(event_ms) = owner.event_ms {
            let now_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            self.metrics
                .event_to_cache_lag
                .observe((now_ms - event_ms).max(0) as f64 / 1000.0);
        }
        delivery.settle(Settlement::Ack);
    }
}

/// Removes the writes of deliveries the broker took back. They are not settled: their channel
/// is closed, and the broker redelivers them.
fn drop_taken_back(writes: &mut Vec<CacheWrite>, owners: &mut Vec<Arc<Pending>>) {
    if !owners.iter().any(|owner| owner.delivery.taken_back()) {
        return;
    }
    let before = writes.len();
    let mut kept_owners = Vec::with_capacity(owners.len());
    let mut kept_writes = Vec::with_capacity(writes.len());
    for (write, owner) in std::mem::take(writes)
        .into_iter()
        .zip(std::mem::take(owners))
    {
        if !owner.delivery.taken_back() {
            kept_writes.push(write);
            kept_owners.push(owner);
        }
    }
    *writes = kept_writes;
    *owners = kept_owners;
    tracing::info!(
        dropped = before - writes.len(),
        "Dropped writes of deliveries the broker took back when their channel closed; they are redelivered."
    );
}
