//! The consumers' Redis side: version-guarded batches that are retried with backoff until they
//! succeed, so a caller acks or commits only what is written.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use prometheus::{Histogram, IntCounter};

use crate::config::RedisConfig;
use crate::observability::{latency_buckets, DependencyStatus, MetricError, Metrics, Readiness};
use crate::redis_conn::{RedisConnection, SlotRouting};
use crate::shutdown::Shutdown;
use crate::version_guard::{CacheWrite, GuardError, VersionGuard, WriteOutcome};
use tokio::sync::watch;

/// Writes batches to Redis through the version guard. Cheap to clone: clones share one
/// multiplexed connection, which reconnects by itself.
#[derive(Clone)]
pub struct CacheWriter {
    conn: RedisConnection,
    guard: VersionGuard,
    status: DependencyStatus,
    metrics: CacheWriterMetrics,
    /// Shared by clones, and read by every attempt.
    config: Arc<RedisConfig>,
    failures_in_a_row: u32,
    /// Attempts of a write Redis refuses before [`Stopped::Rejected`]; `None` retries on.
    rejected_after: Option<u32>,
    /// Behind Sentinel, the master switches the sentinels announce: a new master is followed
    /// at once, even by a writer that is backing off.
    switches: Option<watch::Receiver<u64>>,
}

/// Tells whether a failure is a refusal of the write's own ([`CacheWriter::with_rejected_after`]).
type OwnRefusal = fn(&GuardError) -> bool;

fn refuses_this_index_update(e: &GuardError) -> bool {
    e.refuses_this_write() || e.has_code("WRONGTYPE")
}

/// The name of the writer's readiness switch.
pub const WRITES_READINESS: &str = "redis_writes";

/// Failed writes in a row after which a connection to a cluster, or to the master Sentinel
/// names, is built anew from the config.
const FAILOVER_RECONNECT_AFTER: u32 = 3;

/// The writer's metrics, registered once per service.
#[derive(Clone)]
pub struct CacheWriterMetrics {
    duration: Histogram,
    failures: IntCounter,
}

impl CacheWriterMetrics {
    /// Registers `<namespace>_redis_write_duration_seconds` and
    /// `<namespace>_redis_write_failures_total`.
    pub fn register(metrics: &Metrics) -> Result<Self, MetricError> {
        Ok(Self {
            duration: metrics.histogram(
                "redis_write_duration_seconds",
                "Time of one successful pipelined cache write (one batch).",
                latency_buckets(),
            )?,
            failures: metrics.counter(
                "redis_write_failures_total",
                "Batch writes that failed and were retried.",
            )?,
        })
    }
}

/// Why a retried write gave up.
#[derive(Debug)]
pub enum Stopped {
    /// Shutdown came during a retry: nothing of the batch may be acked or committed.
    Shutdown,
    /// The gate refused the next attempt.
    Refused,
    /// Redis refused the write itself (not an outage) as many times as
    /// [`CacheWriter::with_rejected_after`] allows: retrying will not help.
    Rejected(GuardError),
}

/// Asked before every attempt of a gated write ([`CacheWriter::write_gated`]).
pub trait AttemptGate {
    /// Held while the attempt runs.
    type Permit;
    /// A permit for one attempt, or `None` to stop the write.
    fn enter(&self) -> Option<Self::Permit>;
}

/// The gate of ungated writes: every attempt goes ahead.
pub struct Open;

impl AttemptGate for Open {
    type Permit = ();

    fn enter(&self) -> Option<()> {
        Some(())
    }
}

impl CacheWriter {
    /// Connects with backoff and loads the guard's script. `None` means shutdown came first.
    ///
    /// The writer registers the readiness switch `redis_writes`, down while writes fail and
    /// up again when one succeeds. It is apart from `redis` (whether Redis answers a `PING`,
    /// kept by [`crate::watch::redis`]): a server out of memory, or refusing writes since a
    /// snapshot failed, still answers `PING`, and the service must not look ready then.
    pub async fn connect(
        config: &RedisConfig,
        guard: VersionGuard,
        readiness: &Readiness,
        metrics: CacheWriterMetrics,
        shutdown: &Shutdown,
    ) -> Option<Self> {
        let status = readiness.dependency(WRITES_READINESS);
        let conn = crate::redis_conn::connect_with_retry(config, &status, shutdown).await?;
        crate::retry::until_ok("load version-guard script", shutdown, || {
            let (guard, mut conn) = (guard.clone(), conn.clone());
            async move { guard.load(&mut conn).await }
        })
        .await?;
        Some(Self {
            conn,
            guard,
            status,
            metrics,
            config: Arc::new(config.clone()),
            failures_in_a_row: 0,
            rejected_after: None,
            switches: crate::redis_conn::announced_master_switches(config, shutdown),
        })
    }

    /// Gives up on a write or pipeline that Redis refuses (a corrupt stored version, say,
    /// rather than an outage) after `attempts` attempts, with [`Stopped::Rejected`], instead
    /// of retrying it for as long as it takes. Outages are still waited out.
    pub fn with_rejected_after(mut self, attempts: u32) -> Self {
        self.rejected_after = Some(attempts.max(1));
        self
    }

    /// Writes one batch and returns each write's outcome, in order, asking `gate` before
    /// every attempt ([`Open`] lets every attempt go ahead).
    ///
    /// Failures are retried with backoff for as long as it takes: guarded writes are
    /// idempotent, so re-sending a batch that half-applied is safe. The first attempt runs
    /// even after shutdown was asked, so in-flight work can finish; retries give up on
    /// shutdown with [`Stopped::Shutdown`], and the caller must then ack or commit nothing of
    /// the batch. When the gate says no, the write stops with [`Stopped::Refused`], and the
    /// caller may change the batch and write it again. The gate's permit is held while an
    /// attempt runs, so the gate's owner can wait for the attempt in flight.
    pub async fn write_gated<G: AttemptGate>(
        &mut self,
        writes: &[CacheWrite],
        shutdown: &Shutdown,
        gate: &G,
    ) -> Result<Vec<WriteOutcome>, Stopped> {
        let guard = self.guard.clone();
        let config = Arc::clone(&self.config);
        let config = &*config;
        let rejected_after = self
            .rejected_after
            .map(|limit| (limit, GuardError::refuses_this_write as OwnRefusal));
        self.retrying(writes.len(), shutdown, gate, rejected_after, |mut conn| {
            let guard = guard.clone();
            async move {
                let outcomes = guard.apply_batch(&mut conn, writes).await?;
                replicated(&mut conn, config).await?;
                Ok(outcomes)
            }
        })
        .await
    }

    /// Runs an idempotent pipeline (such as index updates) with the same retries as
    /// [`CacheWriter::write_gated`].
    pub async fn run_pipeline(
        &mut self,
        pipe: &redis::Pipeline,
        shutdown: &Shutdown,
    ) -> Option<()> {
        self.run_pipeline_gated(pipe, shutdown, &Open).await.ok()
    }

    /// Runs an idempotent pipeline like [`CacheWriter::run_pipeline`], asking `gate` before
    /// every attempt, as [`CacheWriter::write_gated`] does.
    pub async fn run_pipeline_gated<G: AttemptGate>(
        &mut self,
        pipe: &redis::Pipeline,
        shutdown: &Shutdown,
        gate: &G,
    ) -> Result<(), Stopped> {
        // On a cluster, commands of different slots need no order between them: the pipeline
        // goes as one part per node (per slot while the slot map is unknown), sent together,
        // each keeping its commands' order.
        let cluster = self.conn.is_cluster();
        let config = Arc::clone(&self.config);
        let config = &*config;
        // Unlike the guard's own bucket, an index key of another type is one entry's
        // (its user's, say): the other commands of the pipeline ran, and only that one's
        // update is given up.
        let rejected_after = self
            .rejected_after
            .map(|limit| (limit, refuses_this_index_update as OwnRefusal));
        self.retrying(
            pipe.len(),
            shutdown,
            gate,
            rejected_after,
            |mut conn| async move {
                if !cluster {
                    pipe.query_async::<()>(&mut conn).await?;
                    return replicated(&mut conn, config).await;
                }
                let nodes = conn.slot_nodes().await;
                let parts = split_by_slot(pipe, |slot| {
                    nodes.as_ref().map_or(slot, |nodes| nodes.node_of(slot))
                });
                let routed = nodes.is_some();
                futures::future::try_join_all(parts.iter().map(|(slot, part)| {
                    let mut conn = conn.clone();
                    async move {
                        if routed {
                            part.query_async::<()>(&mut conn.on_node(*slot)).await
                        } else {
                            part.query_async::<()>(&mut conn).await
                        }
                    }
                }))
                .await?;
                replicated(&mut conn, config).await
            },
        )
        .await
    }

    /// Reads the values at `keys` (`None` where a key is missing), with the same retries as
    /// [`CacheWriter::write_gated`]. `None` means shutdown came first.
    pub async fn read_values(
        &mut self,
        keys: &[&str],
        shutdown: &Shutdown,
    ) -> Option<Vec<Option<Vec<u8>>>> {
        self.retrying(keys.len(), shutdown, &Open, None, |mut conn| async move {
            redis::cmd("MGET")
                .arg(keys)
                .query_async(&mut conn)
                .await
                .map_err(GuardError::from)
        })
        .await
        .ok()
    }

    /// Writes one batch once, for callers that decide themselves what to retry, such as
    /// giving up on writes Redis refuses while waiting out an outage. The writes' readiness
    /// switch goes down unless the failure is a refusal of this write's own
    /// ([`GuardError::refuses_this_write`]).
    pub async fn try_write(
        &mut self,
        writes: &[CacheWrite],
    ) -> Result<Vec<WriteOutcome>, GuardError> {
        self.follow_an_announced_switch().await;
        let started = Instant::now();
        let result = match self.guard.apply_batch(&mut self.conn, writes).await {
            Ok(outcomes) => replicated(&mut self.conn, &self.config)
                .await
                .map(|()| outcomes),
            Err(e) => Err(e),
        };
        match &result {
            Ok(_) => self.record_success(started),
            Err(e) => {
                self.metrics.failures.inc();
                self.after_failure(e).await;
            }
        }
        result
    }

    /// A failure that is not this write's own (an outage, or a refusal every write meets)
    /// makes the service not ready until a write succeeds.
    async fn after_failure(&mut self, e: &GuardError) {
        if e.refuses_this_write() {
            return;
        }
        self.status.set_up(false);
        // Not only after transient errors: a server that turned replica under a connection
        // refuses some commands outright (`WAIT cannot be used with replica instances`).
        self.follow_failover().await;
    }

    fn record_success(&mut self, started: Instant) {
        self.metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        self.status.set_up(true);
        self.failures_in_a_row = 0;
    }

    /// A cluster client learns a new topology from `MOVED` replies, but a master that died
    /// before answering never sends one, and the client keeps trying it after its replica
    /// took over. So after a few failed writes in a row the cluster connection is built
    /// anew from the seeds, which reads the topology as it is now. Behind Sentinel, the
    /// sentinels are asked again where the master is: the old one is down, or answers as a
    /// replica. Any failure that is waited out counts, whatever its kind: a connection can
    /// even be built anew to a master that turns replica a moment later. Behind Sentinel the
    /// sentinels are also asked at every failure, and a master they no longer name is left
    /// at once.
    async fn follow_failover(&mut self) {
        self.failures_in_a_row += 1;
        if !self.config.follows_failovers() {
            return;
        }
        let moved =
            crate::redis_conn::sentinel_names_another_master(&self.config, &self.conn).await;
        if !moved && self.failures_in_a_row % FAILOVER_RECONNECT_AFTER != 0 {
            return;
        }
        if self.reconnect().await {
            tracing::info!(
                failures_in_a_row = self.failures_in_a_row,
                sentinel_named_another_master = moved,
                "Reconnected to Redis to follow a failover."
            );
        }
    }

    /// Connects anew, to the master the sentinels name or to the cluster as it is now; keeps
    /// the connection it has if that fails.
    async fn reconnect(&mut self) -> bool {
        match crate::redis_conn::connect(&self.config).await {
            Ok(conn) => {
                self.conn = conn;
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "Could not reconnect to Redis after a failover.");
                false
            }
        }
    }

    async fn retrying<T, F, Fut, G>(
        &mut self,
        size: usize,
        shutdown: &Shutdown,
        gate: &G,
        rejected_after: Option<(u32, OwnRefusal)>,
        mut attempt: F,
    ) -> Result<T, Stopped>
    where
        F: FnMut(RedisConnection) -> Fut,
        Fut: Future<Output = Result<T, GuardError>>,
        G: AttemptGate,
    {
        let mut delays = crate::retry::reconnect_backoff().build();
        let mut rejected = 0;
        loop {
            self.follow_an_announced_switch().await;
            let Some(permit) = gate.enter() else {
                return Err(Stopped::Refused);
            };
            let started = Instant::now();
            let result = attempt(self.conn.clone()).await;
            drop(permit);
            match result {
                Ok(value) => {
                    self.record_success(started);
                    return Ok(value);
                }
                Err(e) => {
                    self.metrics.failures.inc();
                    match rejected_after {
                        Some((limit, refuses_this_write)) if refuses_this_write(&e) => {
                            rejected += 1;
                            if rejected >= limit {
                                return Err(Stopped::Rejected(e));
                            }
                        }
                        _ => self.after_failure(&e).await,
                    }
                    let delay = delays.next().unwrap_or(Duration::from_secs(10));
                    tracing::warn!(
                        error = %e,
                        transient = e.is_transient(),
                        batch = size,
                        retry_in_ms = delay.as_millis() as u64,
                        "Cache write failed; retrying the batch."
                    );
                    if !self.back_off(delay, shutdown).await {
                        return Err(Stopped::Shutdown);
                    }
                }
            }
        }
    }

    /// Waits `delay` before the next attempt, or less if the sentinels announce a new master
    /// meanwhile, which is then followed at once. `false` means shutdown came first.
    pub async fn back_off(&mut self, delay: Duration, shutdown: &Shutdown) -> bool {
        let announced = tokio::select! {
            biased;
            _ = shutdown.triggered() => return false,
            () = announced_switch(&mut self.switches) => true,
            _ = tokio::time::sleep(delay) => false,
        };
        if announced {
            self.follow_announced_master().await;
        }
        true
    }

    /// Follows a switch announced since this writer last looked, before an attempt.
    async fn follow_an_announced_switch(&mut self) {
        let Some(switches) = self.switches.as_mut() else {
            return;
        };
        if switches.has_changed().unwrap_or(false) {
            switches.mark_unchanged();
            self.follow_announced_master().await;
        }
    }

    /// Reconnects if the sentinels name another master than this writer's. One announcement
    /// comes from every sentinel, so most find the writer already moved.
    async fn follow_announced_master(&mut self) {
        if crate::redis_conn::sentinel_names_another_master(&self.config, &self.conn).await
            && self.reconnect().await
        {
            tracing::info!("Reconnected to Redis: a sentinel announced a new master.");
        }
    }
}

/// Resolves when the sentinels announce a master switch; never without Sentinel.
async fn announced_switch(switches: &mut Option<watch::Receiver<u64>>) {
    if let Some(switches) = switches {
        if switches.changed().await.is_ok() {
            return;
        }
    }
    std::future::pending().await
}

/// With `redis.wait_replicas`, waits until that many replicas hold this connection's writes
/// (on a cluster, of every master: the client sends `WAIT` to each and takes the least).
async fn replicated(conn: &mut RedisConnection, config: &RedisConfig) -> Result<(), GuardError> {
    if config.wait_replicas == 0 {
        return Ok(());
    }
    let got: i64 = redis::cmd("WAIT")
        .arg(config.wait_replicas)
        .arg(config.wait_timeout_ms)
        .query_async(conn)
        .await?;
    if got < i64::from(config.wait_replicas) {
        return Err(GuardError::NotReplicated {
            wanted: config.wait_replicas,
            got,
        });
    }
    Ok(())
}

/// `pipe`'s commands as one pipeline per Redis Cluster hash slot, each in the original order.
/// A command's key is its first argument, as in the single-key commands these pipelines hold.
/// Replies are dropped.
/// Splits a pipeline into parts of commands whose slots `group` maps alike, each keeping its
/// commands' order, with the slot of each part's first command. A command's key is taken to
/// be its first argument, as in the index commands (ZADD, ZREM, ZREMRANGEBYRANK, PEXPIRE) sent
/// this way.
fn split_by_slot(
    pipe: &redis::Pipeline,
    group: impl Fn(u16) -> u16,
) -> Vec<(u16, redis::Pipeline)> {
    let mut parts: std::collections::BTreeMap<u16, (u16, redis::Pipeline)> = Default::default();
    for cmd in pipe.cmd_iter() {
        let slot = match cmd.args_iter().nth(1) {
            Some(redis::Arg::Simple(key)) => {
                crate::version_guard::cluster_slot(&String::from_utf8_lossy(key))
            }
            _ => 0,
        };
        parts
            .entry(group(slot))
            .or_insert_with(|| (slot, redis::pipe()))
            .1
            .add_command(cmd.clone())
            .ignore();
    }
    parts.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pipeline_splits_by_slot_keeping_each_slots_order() {
        let mut pipe = redis::pipe();
        pipe.cmd("ZADD")
            .arg("user:{1}:orders")
            .arg(1)
            .arg("order:1");
        pipe.cmd("ZADD")
            .arg("user:{2}:orders")
            .arg(2)
            .arg("order:2");
        pipe.cmd("ZREMRANGEBYRANK")
            .arg("user:{1}:orders")
            .arg(0)
            .arg(-11);
        let parts = split_by_slot(&pipe, |slot| slot);
        assert_eq!(parts.len(), 2);
        let packed: Vec<(u16, String)> = parts
            .iter()
            .map(|(slot, p)| {
                let text = String::from_utf8_lossy(&p.get_packed_pipeline()).into_owned();
                (*slot, text)
            })
            .collect();
        let (slot, first) = packed
            .iter()
            .find(|(_, p)| p.contains("user:{1}:orders"))
            .expect("slot of user 1");
        assert_eq!(*slot, crate::version_guard::cluster_slot("user:{1}:orders"));
        assert!(first.find("ZADD").unwrap() < first.find("ZREMRANGEBYRANK").unwrap());
        assert!(!first.contains("user:{2}"));

        // Slots one node serves share a part, each slot's commands in order.
        let parts = split_by_slot(&pipe, |_| 0);
        assert_eq!(parts.len(), 1);
        let (slot, all) = &parts[0];
        assert_eq!(*slot, crate::version_guard::cluster_slot("user:{1}:orders"));
        let all = String::from_utf8_lossy(&all.get_packed_pipeline()).into_owned();
        assert!(all.find("user:{2}").unwrap() < all.find("ZREMRANGEBYRANK").unwrap());
    }
}
