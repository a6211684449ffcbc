//! Graceful shutdown in two phases: tell every task to stop, then wait for each to finish.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The shutdown signal handed to a service's `run`, and the set of tasks it spawned.
///
/// Loops race [`Shutdown::triggered`] against their work; [`Shutdown::spawn`] names a task
/// so that a shutdown that overruns its grace period can say which tasks were still running.
#[derive(Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    tracker: TaskTracker,
    running: Arc<Mutex<BTreeMap<u64, &'static str>>>,
    next_id: Arc<AtomicU64>,
}

impl Shutdown {
    /// A signal that has not fired.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks every task to stop.
    pub fn trigger(&self) {
        self.token.cancel();
    }

    /// Whether stopping was asked.
    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes once stopping was asked.
    pub async fn triggered(&self) {
        self.token.cancelled().await
    }

    /// The underlying token, for APIs that take one.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Spawns a named task that is waited for by [`Shutdown::wait_for_tasks`].
    pub fn spawn<F>(&self, name: &'static str, future: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.running_tasks().insert(id, name);
        let running = Arc::clone(&self.running);
        self.tracker.spawn(async move {
            let _guard = RemoveOnDrop { running, id };
            future.await
        })
    }

    /// Waits until every spawned task has finished.
    pub async fn wait_for_tasks(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// Names of the tasks that have not finished yet.
    pub fn still_running(&self) -> Vec<&'static str> {
        self.running_tasks().values().copied().collect()
    }

    fn running_tasks(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, &'static str>> {
        // A poisoned map only means a task panicked while holding it; the names are intact.
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct RemoveOnDrop {
    running: Arc<Mutex<BTreeMap<u64, &'static str>>>,
    id: u64,
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

/// Completes on the first SIGTERM or SIGINT.
pub async fn os_signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn names_tasks_until_they_finish() {
        let shutdown = Shutdown::new();
        let s = shutdown.clone();
        shutdown.spawn("quick", async move { s.triggered().await });
        shutdown.spawn("stubborn", tokio::time::sleep(Duration::from_secs(3600)));
        assert_eq!(shutdown.still_running(), vec!["quick", "stubborn"]);
        shutdown.trigger();
        let waited =
            tokio::time::timeout(Duration::from_millis(200), shutdown.wait_for_tasks()).await;
        assert!(waited.is_err(), "the stubborn task keeps the tracker open");
        assert_eq!(shutdown.still_running(), vec!["stubborn"]);
    }
}
