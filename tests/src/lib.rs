//! Integration-test harness: real service binaries against real Redis, RabbitMQ and Kafka.
//!
//! Endpoints come from `REDIS_URL`, `KAFKA_BROKERS` and `AMQP_URL` and default to the
//! loopback brokers that `scripts/deps up` starts. Every test takes its own names from
//! [`unique_name`], so tests run in parallel without seeing each other's data.

pub mod amqp;
pub mod fault_proxy;
pub mod kafka;
pub mod private_redis;
pub mod process;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;

pub use fault_proxy::FaultProxy;
pub use process::{Service, ServiceBuilder};

/// The Redis the tests use.
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The Kafka bootstrap brokers the tests use.
pub fn kafka_brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// The RabbitMQ the tests use.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// `host:port` of a URL or broker list entry, for pointing a [`FaultProxy`] at it.
pub fn socket_addr_of(url_or_host_port: &str) -> SocketAddr {
    let host_port = match url::Url::parse(url_or_host_port) {
        Ok(url) if url.host_str().is_some() => format!(
            "{}:{}",
            url.host_str().unwrap_or("127.0.0.1"),
            url.port_or_known_default().unwrap_or(6379)
        ),
        _ => url_or_host_port
            .split(',')
            .next()
            .unwrap_or_default()
            .to_string(),
    };
    let host_port = host_port.replace("localhost", "127.0.0.1");
    host_port
        .parse()
        .unwrap_or_else(|_| panic!("{host_port} is not host:port"))
}

/// The folder `scripts/deps` keeps broker state in (TLS material lives in `tls/`).
pub fn deps_dir() -> PathBuf {
    std::env::var("DEPS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.deps"))
}

/// Restarts one of the shared brokers with `scripts/deps restart <service>`, keeping its data.
/// Every test of the running binary sees the outage, so only a test binary of its own may
/// call this (cargo runs test binaries one after another).
pub fn restart_broker(service: &str) -> anyhow::Result<()> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/deps");
    let output = std::process::Command::new(script)
        .args(["restart", service])
        .env("DEPS_DIR", deps_dir())
        .output()
        .with_context(|| format!("run scripts/deps restart {service}"))?;
    anyhow::ensure!(
        output.status.success(),
        "scripts/deps restart {service}: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// A name no other test or run uses: `<label>-<pid>-<counter>-<random>`.
pub fn unique_name(label: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "{label}-{}-{}-{:06x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>() & 0xff_ffff
    )
}

/// A multiplexed Redis connection for assertions and setup.
pub async fn redis() -> anyhow::Result<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(redis_url())?;
    Ok(client.get_multiplexed_async_connection().await?)
}

/// Creates (or resets) the Redis ACL user `user` with `password`, every key and channel, and
/// every command but those in `denied` (such as `zrem`). Returns a `redis://` URL for it.
pub async fn redis_acl_user(user: &str, password: &str, denied: &[&str]) -> anyhow::Result<String> {
    let mut setuser = redis::cmd("ACL");
    setuser
        .arg("SETUSER")
        .arg(user)
        .arg("reset")
        .arg("on")
        .arg(format!(">{password}"))
        .arg("~*")
        .arg("&*")
        .arg("+@all");
    for command in denied {
        setuser.arg(format!("-{command}"));
    }
    setuser.query_async::<()>(&mut redis().await?).await?;
    Ok(format!(
        "redis://{user}:{password}@{}",
        socket_addr_of(&redis_url())
    ))
}

/// Removes a user made by [`redis_acl_user`].
pub async fn delete_redis_acl_user(user: &str) -> anyhow::Result<()> {
    redis::cmd("ACL")
        .arg("DELUSER")
        .arg(user)
        .query_async::<()>(&mut redis().await?)
        .await?;
    Ok(())
}

/// Polls `check` every 100 ms until it returns `Some`, failing with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(
    what: &str,
    timeout: std::time::Duration,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
