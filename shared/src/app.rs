//! What every service binary does around its `run`: flags, config, logs, signals, exit code.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::config::{self, RuntimeConfig, ServiceSpec, ShutdownConfig, TelemetryConfig, Validate};
use crate::shutdown::{os_signal, Shutdown};

/// Exit code when the grace period ran out before in-flight work finished.
pub const GRACE_EXPIRED_EXIT_CODE: u8 = 3;

/// A service's config, as [`main`] needs it.
pub trait ServiceConfig: DeserializeOwned + Serialize + Validate {
    /// Log and metrics settings.
    fn telemetry(&self) -> &TelemetryConfig;
    /// Shutdown settings.
    fn shutdown(&self) -> &ShutdownConfig;
    /// Async runtime settings.
    fn runtime(&self) -> &RuntimeConfig;
}

#[derive(Debug, Parser)]
#[command(version, about = None)]
struct Cli {
    /// TOML config file; its keys are overridden by the environment.
    #[arg(long, env = "CONFIG_FILE", value_name = "PATH")]
    config: Option<PathBuf>,
    /// Load and check the config, print it as TOML with secrets masked, and exit.
    #[arg(long)]
    check_config: bool,
}

/// Runs a service binary to completion and returns its exit code:
/// 0 after a clean stop, 1 when `run` failed, 2 for a bad config or bad flags,
/// 3 when shutdown overran the grace period, 130 on a second signal.
pub fn main<C, F, Fut, E>(spec: &ServiceSpec, run: F) -> ExitCode
where
    C: ServiceConfig,
    F: FnOnce(C, Shutdown) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let cli = Cli::parse();
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let config: C = match config::load(spec, cli.config.as_deref(), &env) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{}: {e}", spec.name);
            return ExitCode::from(config::CONFIG_EXIT_CODE as u8);
        }
    };
    if cli.check_config {
        return match toml::to_string_pretty(&config) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: cannot print the config: {e}", spec.name);
                ExitCode::FAILURE
            }
        };
    }
    crate::telemetry::init(config.telemetry().log_format);
    let grace = config.shutdown().grace_period();

    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = config.runtime().worker_threads(spec) {
        builder.worker_threads(threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "Cannot start the async runtime.");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        let shutdown = Shutdown::new();
        spawn_signal_listener(shutdown.clone(), grace);
        supervise(spec, config, grace, shutdown, run).await
    });
    // Blocking metadata probes may still be parked in librdkafka; don't wait on them.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

/// The first SIGTERM or SIGINT starts a graceful shutdown; a second one exits at once.
fn spawn_signal_listener(signals: Shutdown, grace: Duration) {
    tokio::spawn(async move {
        match os_signal().await {
            Ok(signal) => tracing::info!(
                signal,
                grace_period_secs = grace.as_secs(),
                "Shutdown requested; draining."
            ),
            Err(e) => {
                tracing::error!(error = %e, "Cannot listen for signals; stopping.");
            }
        }
        signals.trigger();
        if os_signal().await.is_ok() {
            tracing::error!("Second signal; exiting without draining.");
            std::process::exit(130);
        }
    });
}

/// Runs the service and turns its end into an exit code, enforcing the grace period.
async fn supervise<C, F, Fut, E>(
    spec: &ServiceSpec,
    config: C,
    grace: Duration,
    shutdown: Shutdown,
    run: F,
) -> ExitCode
where
    F: FnOnce(C, Shutdown) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tracing::info!(
        service = spec.name,
        version = env!("CARGO_PKG_VERSION"),
        "Starting."
    );
    let overrun = async {
        shutdown.triggered().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        result = run(config, shutdown.clone()) => match result {
            Ok(()) => {
                tracing::info!("Stopped cleanly.");
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!(error = %e, "Service failed.");
                ExitCode::FAILURE
            }
        },
        () = overrun => {
            tracing::error!(
                grace_period_secs = grace.as_secs(),
                still_running = ?shutdown.still_running(),
                "Shutdown grace period elapsed before in-flight work finished; exiting."
            );
            ExitCode::from(GRACE_EXPIRED_EXIT_CODE)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ShortEnv;

    const SPEC: ServiceSpec = ServiceSpec {
        name: "test",
        default_metrics_port: 1,
        short_env: &[ShortEnv::RedisUrl],
        default_worker_threads: 0,
    };

    #[tokio::test(start_paused = true)]
    async fn clean_stop_exits_zero() {
        let shutdown = Shutdown::new();
        shutdown.trigger();
        let code = supervise(
            &SPEC,
            (),
            Duration::from_secs(5),
            shutdown,
            |(), s: Shutdown| async move {
                s.triggered().await;
                Ok::<_, String>(())
            },
        )
        .await;
        assert_eq!(code, ExitCode::SUCCESS);
    }

    #[tokio::test(start_paused = true)]
    async fn failure_exits_one() {
        let code = supervise(
            &SPEC,
            (),
            Duration::from_secs(5),
            Shutdown::new(),
            |(), _| async { Err::<(), _>("broken") },
        )
        .await;
        assert_eq!(code, ExitCode::FAILURE);
    }

    #[tokio::test(start_paused = true)]
    async fn overrunning_the_grace_period_exits_three() {
        let shutdown = Shutdown::new();
        shutdown.trigger();
        let code = supervise(
            &SPEC,
            (),
            Duration::from_secs(5),
            shutdown.clone(),
            |(), s: Shutdown| async move {
                s.spawn("stuck-writer", std::future::pending::<()>());
                s.wait_for_tasks().await;
                Ok::<_, String>(())
            },
        )
        .await;
        assert_eq!(code, ExitCode::from(GRACE_EXPIRED_EXIT_CODE));
        assert_eq!(shutdown.still_running(), vec!["stuck-writer"]);
    }
}
