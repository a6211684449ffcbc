//! Redis connections: plain, TLS (`rediss://`) and ACL users, reconnecting by themselves.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, RedisError, TlsCertificates};

use crate::config::RedisConfig;
use crate::observability::DependencyStatus;
use crate::shutdown::Shutdown;

/// Builds a client from the config; reads the CA file for `rediss://` with a private CA.
pub fn client(config: &RedisConfig) -> Result<Client, RedisError> {
    match &config.tls_ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| {
                RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "cannot read redis.tls_ca_file",
                    format!("{}: {e}", path.display()),
                ))
            })?;
            Client::build_with_tls(
                config.url.expose(),
                TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                },
            )
        }
        None => Client::open(config.url.expose()),
    }
}

/// Connects once. The returned manager reconnects by itself after a broken connection.
pub async fn connect(config: &RedisConfig) -> Result<ConnectionManager, RedisError> {
    let manager_config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(config.connect_timeout_ms)))
        .set_response_timeout(Some(Duration::from_millis(config.response_timeout_ms)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(2));
    ConnectionManager::new_with_config(client(config)?, manager_config).await
}

/// Connects with backoff until Redis answers, marking `status` as it goes. `None` means
/// shutdown came first.
pub async fn connect_with_retry(
    config: &RedisConfig,
    status: &DependencyStatus,
    shutdown: &Shutdown,
) -> Option<ConnectionManager> {
    tracing::info!(url = %config.url, "Connecting to Redis.");
    let conn = crate::retry::until_ok("redis connect", shutdown, || async {
        let mut conn = connect(config).await?;
        redis::cmd("PING").query_async::<()>(&mut conn).await?;
        Ok::<_, RedisError>(conn)
    })
    .await?;
    status.set_up(true);
    Some(conn)
}

/// Keeps `status` in step with whether Redis answers `PING`, until shutdown.
pub async fn probe(conn: ConnectionManager, status: DependencyStatus, shutdown: Shutdown) {
    crate::retry::probe_loop(status, shutdown, Duration::from_secs(2), move || {
        let mut conn = conn.clone();
        async move {
            redis::cmd("PING")
                .query_async::<()>(&mut conn)
                .await
                .is_ok()
        }
    })
    .await
}
