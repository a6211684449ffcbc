//! Redis connections: plain, TLS (`rediss://`), ACL users and Redis Cluster, reconnecting by
//! themselves.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Client, Cmd, Pipeline, RedisError, RedisFuture, TlsCertificates, Value};

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

/// A multiplexed connection to one server or to a cluster. Cheap to clone: clones share it.
#[derive(Clone)]
pub enum RedisConnection {
    /// One server.
    Server(ConnectionManager),
    /// A Redis Cluster: each command goes to the node owning its keys' slot, and a pipeline to
    /// the node of its first key, so a pipeline must keep to one slot.
    Cluster(ClusterConnection),
}

impl RedisConnection {
    /// Whether this is a cluster connection.
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConnection::Cluster(_))
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConnection::Server(conn) => conn.req_packed_command(cmd),
            RedisConnection::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConnection::Server(conn) => conn.req_packed_commands(pipeline, offset, count),
            RedisConnection::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Server(conn) => conn.get_db(),
            RedisConnection::Cluster(conn) => conn.get_db(),
        }
    }
}

/// Connects once. The returned connection reconnects by itself after a broken connection
/// (and, to a cluster, follows slot moves and failovers).
pub async fn connect(config: &RedisConfig) -> Result<RedisConnection, RedisError> {
    let connect_timeout = Duration::from_millis(config.connect_timeout_ms);
    let response_timeout = Duration::from_millis(config.response_timeout_ms);
    if config.cluster {
        let seeds = std::iter::once(&config.url).chain(&config.cluster_nodes);
        let cluster = ClusterClient::builder(seeds.map(|url| url.expose()))
            .connection_timeout(connect_timeout)
            .response_timeout(response_timeout)
            .retries(2)
            .max_retry_wait(2_000)
            .build()?;
        return Ok(RedisConnection::Cluster(
            cluster.get_async_connection().await?,
        ));
    }
    let manager_config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(connect_timeout))
        .set_response_timeout(Some(response_timeout))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(2));
    Ok(RedisConnection::Server(
        ConnectionManager::new_with_config(client(config)?, manager_config).await?,
    ))
}

/// Connects with backoff until Redis answers, marking `status` as it goes. `None` means
/// shutdown came first.
pub async fn connect_with_retry(
    config: &RedisConfig,
    status: &DependencyStatus,
    shutdown: &Shutdown,
) -> Option<RedisConnection> {
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
pub async fn probe(conn: RedisConnection, status: DependencyStatus, shutdown: Shutdown) {
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
