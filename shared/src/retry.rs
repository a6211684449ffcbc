//! Backoff for reconnects and transient failures, always raced against shutdown.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::shutdown::Shutdown;

/// The fleet's reconnect backoff: 100 ms doubling to 10 s, with jitter, never giving up.
pub fn reconnect_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
}

/// Runs `op` until it succeeds, sleeping with [`reconnect_backoff`] between failures and
/// logging each one. Returns `None` if shutdown was triggered first.
pub async fn until_ok<T, E, F, Fut>(what: &'static str, shutdown: &Shutdown, mut op: F) -> Option<T>
where
    E: Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut delays = reconnect_backoff().build();
    loop {
        let result = tokio::select! {
            biased;
            _ = shutdown.triggered() => return None,
            result = op() => result,
        };
        match result {
            Ok(value) => return Some(value),
            Err(e) => {
                let delay = delays.next().unwrap_or(Duration::from_secs(10));
                tracing::warn!(what, error = %e, retry_in_ms = delay.as_millis() as u64, "Attempt failed; retrying.");
                tokio::select! {
                    biased;
                    _ = shutdown.triggered() => return None,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Calls `check` every `interval` and records the answer in `status`, until shutdown.
///
/// Keeps `/readyz` honest for a connection that is idle, where no real traffic would notice
/// that it broke.
pub async fn probe_loop<F, Fut>(
    status: crate::observability::DependencyStatus,
    shutdown: Shutdown,
    interval: Duration,
    mut check: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    loop {
        let up = tokio::select! {
            biased;
            _ = shutdown.triggered() => return,
            up = tokio::time::timeout(interval.max(Duration::from_secs(1)) * 3, check()) => up.unwrap_or(false),
        };
        status.set_up(up);
        tokio::select! {
            biased;
            _ = shutdown.triggered() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_until_success() {
        let shutdown = Shutdown::new();
        let mut attempts = 0;
        let got = until_ok("test", &shutdown, || {
            attempts += 1;
            let n = attempts;
            async move {
                if n < 4 {
                    Err("not yet")
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(got, Some(4));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_retries() {
        let shutdown = Shutdown::new();
        let s = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            s.trigger();
        });
        let got: Option<()> = until_ok("test", &shutdown, || async { Err("never") }).await;
        assert_eq!(got, None);
    }
}
