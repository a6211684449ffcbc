//! The consumers' Redis side: version-guarded batches that are retried with backoff until they
//! succeed, so a caller acks or commits only what is written.

use std::future::Future;
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use prometheus::{Histogram, IntCounter};
use redis::aio::ConnectionManager;

use crate::config::RedisConfig;
use crate::observability::{latency_buckets, DependencyStatus, MetricError, Metrics};
use crate::shutdown::Shutdown;
use crate::version_guard::{CacheWrite, GuardError, VersionGuard, WriteOutcome};

/// Writes batches to Redis through the version guard. Cheap to clone: clones share one
/// multiplexed connection, which reconnects by itself.
#[derive(Clone)]
pub struct CacheWriter {
    conn: ConnectionManager,
    guard: VersionGuard,
    status: DependencyStatus,
    metrics: CacheWriterMetrics,
}

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Shutdown came during a retry: nothing of the batch may be acked or committed.
    Shutdown,
    /// The gate refused the next attempt.
    Refused,
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
    /// `status` is the service's `redis` readiness switch: the writer marks it down while
    /// writes fail and up again when one succeeds.
    pub async fn connect(
        config: &RedisConfig,
        guard: VersionGuard,
        status: DependencyStatus,
        metrics: CacheWriterMetrics,
        shutdown: &Shutdown,
    ) -> Option<Self> {
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
        })
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
        self.retrying(writes.len(), shutdown, gate, |mut conn| {
            let guard = guard.clone();
            async move { guard.apply_batch(&mut conn, writes).await }
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
        self.retrying(pipe.len(), shutdown, gate, |mut conn| async move {
            pipe.query_async::<()>(&mut conn)
                .await
                .map_err(GuardError::from)
        })
        .await
    }

    /// Reads the values at `keys` (`None` where a key is missing), with the same retries as
    /// [`CacheWriter::write_gated`]. `None` means shutdown came first.
    pub async fn read_values(
        &mut self,
        keys: &[&str],
        shutdown: &Shutdown,
    ) -> Option<Vec<Option<Vec<u8>>>> {
        self.retrying(keys.len(), shutdown, &Open, |mut conn| async move {
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
    /// giving up on writes Redis refuses while waiting out an outage. Redis is marked down
    /// only when the failure is transient (unreachable or overloaded).
    pub async fn try_write(
        &mut self,
        writes: &[CacheWrite],
    ) -> Result<Vec<WriteOutcome>, GuardError> {
        let started = Instant::now();
        let result = self.guard.apply_batch(&mut self.conn, writes).await;
        match &result {
            Ok(_) => self.record_success(started),
            Err(e) => {
                self.metrics.failures.inc();
                if e.is_transient() {
                    self.status.set_up(false);
                }
            }
        }
        result
    }

    fn record_success(&self, started: Instant) {
        self.metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        self.status.set_up(true);
    }

    async fn retrying<T, F, Fut, G>(
        &mut self,
        size: usize,
        shutdown: &Shutdown,
        gate: &G,
        mut attempt: F,
    ) -> Result<T, Stopped>
    where
        F: FnMut(ConnectionManager) -> Fut,
        Fut: Future<Output = Result<T, GuardError>>,
        G: AttemptGate,
    {
        let mut delays = crate::retry::reconnect_backoff().build();
        loop {
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
                    self.status.set_up(false);
                    let delay = delays.next().unwrap_or(Duration::from_secs(10));
                    tracing::warn!(
                        error = %e,
                        transient = e.is_transient(),
                        batch = size,
                        retry_in_ms = delay.as_millis() as u64,
                        "Cache write failed; retrying the batch."
                    );
                    tokio::select! {
                        biased;
                        _ = shutdown.triggered() => return Err(Stopped::Shutdown),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}
