//! A service binary running as a real child process.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Path of a workspace binary built next to the running test executable.
pub fn binary_path(name: &str) -> PathBuf {
    // Test executables live in target/<profile>/deps; binaries one level up.
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable is in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the services first (`cargo build --workspace --bins`, as scripts/test does)",
        path.display()
    );
    path
}

/// A free loopback port. Another process could take it before it is used, which is
/// unlikely enough for tests.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// How to start a service.
#[derive(Debug, Clone)]
pub struct ServiceBuilder {
    name: String,
    env: BTreeMap<String, String>,
    config_toml: Option<String>,
    args: Vec<String>,
    metrics_port: u16,
}

impl ServiceBuilder {
    /// A service on a fresh metrics port, logging JSON at `info`.
    pub fn new(name: &str) -> Self {
        let metrics_port = free_port();
        let mut env = BTreeMap::new();
        env.insert("METRICS_ADDR".into(), format!("127.0.0.1:{metrics_port}"));
        env.insert("RUST_LOG".into(), "info".into());
        Self {
            name: name.to_string(),
            env,
            config_toml: None,
            args: Vec::new(),
            metrics_port,
        }
    }

    /// Keeps the service's own default metrics address instead of a fresh port.
    pub fn default_metrics_addr(mut self, port: u16) -> Self {
        self.env.remove("METRICS_ADDR");
        self.metrics_port = port;
        self
    }

    /// Sets an environment variable.
    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.insert(key.to_string(), value.into());
        self
    }

    /// Points the service at `cluster` in cluster mode, with every node as a seed.
    pub fn on_cluster(self, cluster: &crate::private_redis::PrivateCluster) -> Self {
        let prefix = self.name.replace('-', "_").to_uppercase();
        let more_seeds: Vec<String> = cluster.nodes[1..]
            .iter()
            .map(|node| format!("{:?}", node.url))
            .collect();
        self.env("REDIS_URL", &cluster.nodes[0].url)
            .env(&format!("{prefix}__REDIS__CLUSTER"), "true")
            .env(
                &format!("{prefix}__REDIS__CLUSTER_NODES"),
                format!("[{}]", more_seeds.join(", ")),
            )
    }

    /// Points the service at the master `sentinel` names, through the sentinel, with a
    /// `REDIS_URL` whose host and port must go unused.
    pub fn on_sentinel(self, sentinel: &crate::private_redis::PrivateSentinel) -> Self {
        let prefix = self.name.replace('-', "_").to_uppercase();
        self.env("REDIS_URL", "redis://127.0.0.1:1/0")
            .env(
                &format!("{prefix}__REDIS__SENTINEL_MASTER"),
                &sentinel.master_name,
            )
            .env(
                &format!("{prefix}__REDIS__SENTINELS"),
                format!("[{:?}]", sentinel.sentinel_url),
            )
    }

    /// Sets a config file with these TOML contents.
    pub fn config_toml(mut self, toml: impl Into<String>) -> Self {
        self.config_toml = Some(toml.into());
        self
    }

    /// Adds a command-line argument.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Starts the process. Its stderr goes to a log file that [`Service::logs`] reads.
    pub fn spawn(self) -> Result<Service> {
        let dir = scratch_dir(&self.name);
        let log_path = dir.join("service.log");
        let log = std::fs::File::create(&log_path)?;
        let mut command = Command::new(binary_path(&self.name));
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(&self.env)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(toml) = &self.config_toml {
            let path = dir.join("config.toml");
            std::fs::write(&path, toml)?;
            command.arg("--config").arg(&path);
        }
        let child = command
            .spawn()
            .with_context(|| format!("spawn {}", self.name))?;
        Ok(Service {
            name: self.name,
            child,
            metrics_port: self.metrics_port,
            log_path,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
        })
    }

    /// Runs the binary to completion (for config errors) and returns its exit status and output.
    pub async fn run_to_exit(self, timeout: Duration) -> Result<(ExitStatus, String)> {
        let mut service = self.spawn()?;
        let status = service.wait_exit(timeout).await?;
        Ok((status, service.logs()))
    }
}

/// A running service process, killed when dropped.
pub struct Service {
    name: String,
    child: Child,
    metrics_port: u16,
    log_path: PathBuf,
    http: reqwest::Client,
}

impl Service {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Base URL of the metrics and health server.
    pub fn http_base(&self) -> String {
        format!("http://127.0.0.1:{}", self.metrics_port)
    }

    /// GETs a path and returns the status code and body.
    pub async fn get(&self, path: &str) -> Result<(u16, String)> {
        let response = self
            .http
            .get(format!("{}{path}", self.http_base()))
            .send()
            .await?;
        let status = response.status().as_u16();
        Ok((status, response.text().await?))
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        self.wait_readyz(200, timeout).await
    }

    /// Waits until `/readyz` answers `status`.
    pub async fn wait_readyz(&mut self, status: u16, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no answer");
        while Instant::now() < deadline {
            if let Some(exit) = self.child.try_wait()? {
                bail!(
                    "{} exited with {exit} while waiting for /readyz {status}; logs:\n{}",
                    self.name,
                    self.logs()
                );
            }
            match self.get("/readyz").await {
                Ok((code, _)) if code == status => return Ok(()),
                Ok((code, body)) => last = format!("{code}: {body}"),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "{} /readyz never answered {status} (last: {last}); logs:\n{}",
            self.name,
            self.logs()
        )
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> Result<String> {
        let (status, body) = self.get("/metrics").await?;
        anyhow::ensure!(status == 200, "/metrics answered {status}");
        Ok(body)
    }

    /// The value of one sample, such as `order_cacher_messages_total{outcome="applied"}`.
    /// Labels must be written in the order the exposition prints them.
    pub async fn metric(&self, sample: &str) -> Result<Option<f64>> {
        Ok(metric_value(&self.metrics().await?, sample))
    }

    /// The sum of every sample of a metric family, such as all outcomes of
    /// `order_cacher_messages_total`.
    pub async fn metric_sum(&self, family: &str) -> Result<f64> {
        Ok(metric_family_sum(&self.metrics().await?, family))
    }

    /// Expects `/readyz` to answer 503 naming `dependency` as down.
    pub async fn ensure_not_ready_for(&self, dependency: &str) -> Result<()> {
        let (status, body) = self.get("/readyz").await?;
        anyhow::ensure!(
            status == 503 && body.contains(&format!("{dependency}: down")),
            "{} /readyz while {dependency} should be down: {status} {body}",
            self.name
        );
        Ok(())
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) -> Result<()> {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM)?;
        Ok(())
    }

    /// Sends SIGTERM and expects exit code 0 within 30 s; the error carries the logs.
    pub async fn stop(&mut self) -> Result<()> {
        self.stop_within(Duration::from_secs(30)).await
    }

    /// Sends SIGTERM and expects exit code 0 within `limit`; the error carries the logs.
    pub async fn stop_within(&mut self, limit: Duration) -> Result<()> {
        let started = Instant::now();
        self.sigterm()?;
        let status = self.wait_exit(limit).await?;
        anyhow::ensure!(
            status.code() == Some(0),
            "{} exited {status} on SIGTERM after {:?}; logs:\n{}",
            self.name,
            started.elapsed(),
            self.logs()
        );
        Ok(())
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill9(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not exit within {timeout:?}; logs:\n{}",
                    self.name,
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Everything the process wrote so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The JSON log lines at level ERROR so far.
    pub fn error_lines(&self) -> Vec<String> {
        self.logs()
            .lines()
            .filter(|line| line.contains("\"level\":\"ERROR\""))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Finds a sample's value in a Prometheus text exposition.
pub fn metric_value(exposition: &str, sample: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let rest = line.strip_prefix(sample)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

/// The sum of every sample of one metric family in a text exposition.
pub fn metric_family_sum(exposition: &str, family: &str) -> f64 {
    exposition
        .lines()
        .filter(|line| {
            line.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A fresh directory for one test's files.
pub fn scratch_dir(label: &str) -> PathBuf {
    let dir = std::env::temp_dir()
        .join("fleet-tests")
        .join(crate::unique_name(label));
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}
