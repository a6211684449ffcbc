//! Redis connections: plain, TLS (`rediss://`), ACL users, Redis Cluster and a master found
//! through Redis Sentinel, reconnecting by themselves.

use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
use redis::{
    AsyncConnectionConfig, Client, Cmd, Pipeline, RedisError, RedisFuture, TlsCertificates, Value,
};

use crate::config::RedisConfig;
use crate::observability::DependencyStatus;
use crate::shutdown::Shutdown;
use tokio::sync::watch;

/// A client of `url` (the config's own, a master's that Sentinel named, or a sentinel's) with
/// the config's TLS settings: it reads the CA file for `rediss://` with a private CA.
fn client_for(config: &RedisConfig, url: &str) -> Result<Client, RedisError> {
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
                url,
                TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                },
            )
        }
        None => Client::open(url),
    }
}

/// A multiplexed connection to one server or to a cluster. Cheap to clone: clones share it.
#[derive(Clone)]
pub enum RedisConnection {
    /// One server.
    Server(ConnectionManager),
    /// The master Sentinel named, at this `host:port`.
    Sentinel(ConnectionManager, Arc<str>),
    /// A Redis Cluster: each command goes to the node owning its keys' slot, and a pipeline to
    /// the node of its first key, so a pipeline must keep to one slot (but see
    /// [`SlotRouting::on_node`]). The slot map is shared by the connection's clones.
    Cluster(ClusterConnection, Arc<Topology>),
}

impl RedisConnection {
    /// Whether this is a cluster connection.
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConnection::Cluster(..))
    }

    /// Behind Sentinel, the `host:port` of the master this connects to.
    pub fn sentinel_master(&self) -> Option<&str> {
        match self {
            RedisConnection::Sentinel(_, address) => Some(address),
            _ => None,
        }
    }
}

/// Which node serves each hash slot, as one `CLUSTER SLOTS` reply had it.
#[derive(Debug, PartialEq, Eq)]
pub struct SlotNodes {
    node_of_slot: Vec<u16>,
}

/// Hash slots in a Redis Cluster.
const SLOTS: usize = 16_384;
/// The node of a slot that no node serves.
const NO_NODE: u16 = u16::MAX;

impl SlotNodes {
    /// The node serving `slot`, as an index that tells nodes apart.
    pub fn node_of(&self, slot: u16) -> u16 {
        self.node_of_slot
            .get(usize::from(slot))
            .copied()
            .unwrap_or(NO_NODE)
    }

    /// Reads a `CLUSTER SLOTS` reply: `[start, end, [host, port, id, ..], replicas..]` per
    /// range. Nodes are told apart by id (by host and port where a reply has no id).
    pub fn from_cluster_slots(reply: &Value) -> Option<Self> {
        let Value::Array(ranges) = reply else {
            return None;
        };
        let mut node_of_slot = vec![NO_NODE; SLOTS];
        let mut nodes: Vec<Vec<u8>> = Vec::new();
        for range in ranges {
            let Value::Array(range) = range else {
                return None;
            };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
                (range.first(), range.get(1), range.get(2))
            else {
                return None;
            };
            let identity = match (master.get(2), master.first(), master.get(1)) {
                (Some(Value::BulkString(id)), _, _) => id.clone(),
                (_, Some(Value::BulkString(host)), Some(Value::Int(port))) => {
                    [&host[..], b":", port.to_string().as_bytes()].concat()
                }
                _ => return None,
            };
            let node = match nodes.iter().position(|known| *known == identity) {
                Some(node) => node,
                None => {
                    nodes.push(identity);
                    nodes.len() - 1
                }
            };
            let (start, end) = (usize::try_from(*start).ok()?, usize::try_from(*end).ok()?);
            for slot in node_of_slot.get_mut(start..=end)? {
                *slot = u16::try_from(node).ok()?;
            }
        }
        Some(Self { node_of_slot })
    }
}

/// A cluster connection's slot map, read when first wanted and forgotten when a pipeline
/// sent by it fails, so the next batch reads the topology as it is then.
#[derive(Debug, Default)]
pub struct Topology {
    slot_nodes: RwLock<Option<Arc<SlotNodes>>>,
}

impl Topology {
    fn current(&self) -> Option<Arc<SlotNodes>> {
        self.slot_nodes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set(&self, nodes: Option<Arc<SlotNodes>>) {
        *self.slot_nodes.write().unwrap_or_else(|e| e.into_inner()) = nodes;
    }
}

/// What the version guard needs to know of a connection to send one pipeline per cluster node
/// rather than one per hash slot. Connections that track no slot map (a plain connection to
/// one server or one node) keep the defaults: no map, and pipelines sent as they are.
pub trait SlotRouting: ConnectionLike + Clone + Send + Sync {
    /// Which node serves each slot, when this connection tracks it (reading it when unknown).
    fn slot_nodes(&mut self) -> impl Future<Output = Option<Arc<SlotNodes>>> + Send {
        async { None }
    }

    /// A connection that sends each pipeline to the node serving `slot`, whatever slots its
    /// commands name; the pipeline must keep to slots of that node.
    fn on_node(&self, slot: u16) -> impl ConnectionLike + Send {
        let _ = slot;
        self.clone()
    }
}

impl SlotRouting for MultiplexedConnection {}

impl SlotRouting for RedisConnection {
    async fn slot_nodes(&mut self) -> Option<Arc<SlotNodes>> {
        let RedisConnection::Cluster(conn, topology) = self else {
            return None;
        };
        if let Some(nodes) = topology.current() {
            return Some(nodes);
        }
        let reply: Value = match redis::cmd("CLUSTER").arg("SLOTS").query_async(conn).await {
            Ok(reply) => reply,
            Err(e) => {
                tracing::debug!(error = %e, "Could not read the cluster's slot map.");
                return None;
            }
        };
        let nodes = SlotNodes::from_cluster_slots(&reply).map(Arc::new);
        topology.set(nodes.clone());
        nodes
    }

    fn on_node(&self, slot: u16) -> impl ConnectionLike + Send {
        Routed {
            conn: self.clone(),
            slot,
        }
    }
}

/// [`RedisConnection::on_node`]'s connection: pipelines to a cluster go to the node serving
/// `slot`; everything else goes as the connection sends it.
struct Routed {
    conn: RedisConnection,
    slot: u16,
}

impl ConnectionLike for Routed {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        self.conn.req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        let slot = self.slot;
        let (conn, topology) = match &mut self.conn {
            RedisConnection::Cluster(conn, topology) => (conn, topology),
            server => return server.req_packed_commands(pipeline, offset, count),
        };
        Box::pin(async move {
            let route = SingleNodeRoutingInfo::SpecificNode(Route::new(slot, SlotAddr::Master));
            let result = conn
                .route_pipeline(pipeline.clone(), offset, count, route)
                .await;
            // A slot that moved answers MOVED or ASK; a node that went away, an error. Either
            // way the map that grouped this pipeline is read again for the next batch.
            let failed = match &result {
                Ok(replies) => replies.iter().any(|r| matches!(r, Value::ServerError(_))),
                Err(_) => true,
            };
            if failed {
                topology.set(None);
            }
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.conn.get_db()
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConnection::Server(conn) | RedisConnection::Sentinel(conn, _) => {
                conn.req_packed_command(cmd)
            }
            RedisConnection::Cluster(conn, _) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConnection::Server(conn) | RedisConnection::Sentinel(conn, _) => {
                conn.req_packed_commands(pipeline, offset, count)
            }
            RedisConnection::Cluster(conn, _) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Server(conn) | RedisConnection::Sentinel(conn, _) => conn.get_db(),
            RedisConnection::Cluster(conn, _) => conn.get_db(),
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
            Arc::default(),
        ));
    }
    let manager_config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(connect_timeout))
        .set_response_timeout(Some(response_timeout))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(2));
    let Some(master) = &config.sentinel_master else {
        return Ok(RedisConnection::Server(
            ConnectionManager::new_with_config(
                client_for(config, config.url.expose())?,
                manager_config,
            )
            .await?,
        ));
    };
    let url = sentinel_master_url(config, master).await?;
    let mut conn =
        ConnectionManager::new_with_config(client_for(config, &url)?, manager_config).await?;
    // A sentinel can name a server that is no longer the master, just after a failover.
    if !is_master(&mut conn).await? {
        return Err(RedisError::from((
            redis::ErrorKind::Io,
            "the server Sentinel named is not a master (yet)",
            master.clone(),
        )));
    }
    let address = address_of(&url);
    tracing::info!(master = %master, address = %address, "Connected to the master Sentinel names.");
    Ok(RedisConnection::Sentinel(conn, address.into()))
}

/// Behind Sentinel, whether the sentinels now name another master than the one `conn` is
/// connected to. One question to a sentinel: cheap enough to ask after every failed write,
/// so a writer follows a failover at its first failure after the switch rather than after
/// its backoff has grown over several more.
pub async fn sentinel_names_another_master(config: &RedisConfig, conn: &RedisConnection) -> bool {
    let (Some(master), Some(current)) = (&config.sentinel_master, conn.sentinel_master()) else {
        return false;
    };
    match sentinel_master_url(config, master).await {
        Ok(url) => address_of(&url) != current,
        Err(_) => false,
    }
}

/// Behind Sentinel, a counter of the master switches (`+switch-master`) that the sentinels
/// announce for the configured master; `None` otherwise. Each configured sentinel is listened
/// to on a connection of its own, subscribed again (with backoff) when it drops, so the count
/// may rise once per sentinel for one switch. The listeners stop at shutdown, or when every
/// receiver is gone.
///
/// A writer that is backing off between failed writes would otherwise learn of a failover
/// only at its next attempt, up to the backoff's 10 s later.
pub fn announced_master_switches(
    config: &RedisConfig,
    shutdown: &Shutdown,
) -> Option<watch::Receiver<u64>> {
    let master = config.sentinel_master.clone()?;
    let (switches, receiver) = watch::channel(0);
    for sentinel in &config.sentinels {
        tokio::spawn(listen_for_master_switches(
            config.clone(),
            sentinel.expose().to_string(),
            master.clone(),
            switches.clone(),
            shutdown.clone(),
        ));
    }
    Some(receiver)
}

/// The `+switch-master` channel's messages: `<master name> <old ip> <old port> <new ip> <new port>`.
const SWITCH_MASTER: &str = "+switch-master";

async fn listen_for_master_switches(
    config: RedisConfig,
    sentinel: String,
    master: String,
    switches: watch::Sender<u64>,
    shutdown: Shutdown,
) {
    loop {
        let subscribed = tokio::select! {
            _ = switches.closed() => return,
            subscribed = crate::retry::until_ok(
                "subscribe to a sentinel's master switches",
                &shutdown,
                || subscribe_to_master_switches(&config, &sentinel),
            ) => subscribed,
        };
        let Some(mut pubsub) = subscribed else {
            return;
        };
        let mut messages = pubsub.on_message();
        loop {
            let message = tokio::select! {
                _ = switches.closed() => return,
                _ = shutdown.triggered() => return,
                message = messages.next() => message,
            };
            let Some(message) = message else {
                break;
            };
            let Ok(text) = message.get_payload::<String>() else {
                continue;
            };
            if text.split(' ').next() == Some(master.as_str()) {
                tracing::info!(master = %master, "A sentinel announced a new master.");
                switches.send_modify(|count| *count += 1);
            }
        }
        tracing::warn!(
            sentinel = %address_of(&sentinel),
            "The sentinel closed the subscription to its master switches; subscribing again."
        );
    }
}

async fn subscribe_to_master_switches(
    config: &RedisConfig,
    sentinel: &str,
) -> Result<redis::aio::PubSub, RedisError> {
    let mut pubsub = tokio::time::timeout(
        Duration::from_millis(config.connect_timeout_ms),
        client_for(config, sentinel)?.get_async_pubsub(),
    )
    .await
    .map_err(|_| RedisError::from((redis::ErrorKind::Io, "connect timed out")))??;
    pubsub.subscribe(SWITCH_MASTER).await?;
    Ok(pubsub)
}

/// `url` with the host and port of the master `master`, which the configured sentinels are
/// asked for in turn.
async fn sentinel_master_url(config: &RedisConfig, master: &str) -> Result<String, RedisError> {
    let timeouts = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(config.connect_timeout_ms)))
        .set_response_timeout(Some(Duration::from_millis(config.response_timeout_ms)));
    let mut last_error = None;
    for sentinel in &config.sentinels {
        let asked = async {
            let mut conn = client_for(config, sentinel.expose())?
                .get_multiplexed_async_connection_with_config(&timeouts)
                .await?;
            redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(master)
                .query_async::<Option<(String, u16)>>(&mut conn)
                .await
        };
        match asked.await {
            Ok(Some((host, port))) => {
                let mut url = config.url.url().clone();
                let placed = url.set_host(Some(&host)).is_ok() && url.set_port(Some(port)).is_ok();
                if placed {
                    return Ok(url.to_string());
                }
                last_error = Some(RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "Sentinel gave an address that does not fit redis.url",
                    format!("{host}:{port}"),
                )));
            }
            Ok(None) => {
                last_error = Some(RedisError::from((
                    redis::ErrorKind::Io,
                    "a sentinel does not know the master",
                    format!("{master} at {sentinel}"),
                )));
            }
            Err(e) => {
                tracing::warn!(sentinel = %sentinel, error = %e, "Sentinel did not answer.");
                last_error = Some(e);
            }
        }
    }
    Err(last_error.unwrap_or_else(|| {
        RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "no sentinel configured",
        ))
    }))
}

/// Whether the server answers `ROLE` as a master.
async fn is_master<C: ConnectionLike + Send>(conn: &mut C) -> Result<bool, RedisError> {
    let role: Vec<Value> = redis::cmd("ROLE").query_async(conn).await?;
    Ok(matches!(role.first(), Some(Value::BulkString(kind)) if kind == b"master"))
}

/// `host:port` of a URL, for logs (never its credentials).
fn address_of(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .map(|u| {
            format!(
                "{}:{}",
                u.host_str().unwrap_or(""),
                u.port().unwrap_or(6379)
            )
        })
        .unwrap_or_default()
}

/// Connects with backoff until Redis answers, marking `status` as it goes. `None` means
/// shutdown came first.
pub async fn connect_with_retry(
    config: &RedisConfig,
    status: &DependencyStatus,
    shutdown: &Shutdown,
) -> Option<RedisConnection> {
    match &config.sentinel_master {
        Some(master) => tracing::info!(
            master = %master,
            sentinels = %config.sentinels.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            "Connecting to the Redis master through Sentinel."
        ),
        None => tracing::info!(url = %config.url, "Connecting to Redis."),
    }
    let conn = crate::retry::until_ok("redis connect", shutdown, || async {
        let mut conn = connect(config).await?;
        redis::cmd("PING").query_async::<()>(&mut conn).await?;
        Ok::<_, RedisError>(conn)
    })
    .await?;
    status.set_up(true);
    Some(conn)
}

/// Keeps `status` in step with whether Redis answers `PING`, until shutdown. Behind Sentinel
/// the server must also still be the master, and after a few failed probes in a row the
/// sentinels are asked again where the master is.
pub async fn probe(
    conn: RedisConnection,
    config: RedisConfig,
    status: DependencyStatus,
    shutdown: Shutdown,
) {
    let behind_sentinel = config.sentinel_master.is_some();
    let state = Arc::new(tokio::sync::Mutex::new(ProbeState {
        conn,
        failures_in_a_row: 0,
    }));
    let config = Arc::new(config);
    crate::retry::probe_loop(status, shutdown, Duration::from_secs(2), move || {
        let (state, config) = (Arc::clone(&state), Arc::clone(&config));
        async move {
            let mut state = state.lock().await;
            let mut conn = state.conn.clone();
            let up = if behind_sentinel {
                is_master(&mut conn).await.unwrap_or(false)
            } else {
                redis::cmd("PING")
                    .query_async::<()>(&mut conn)
                    .await
                    .is_ok()
            };
            if up {
                state.failures_in_a_row = 0;
                return true;
            }
            state.failures_in_a_row += 1;
            let ask_again = behind_sentinel
                && (state.failures_in_a_row % SENTINEL_ASK_AGAIN_AFTER == 0
                    || sentinel_names_another_master(&config, &state.conn).await);
            if ask_again {
                if let Ok(fresh) = connect(&config).await {
                    state.conn = fresh;
                }
            }
            false
        }
    })
    .await
}

/// The probe's connection, replaced behind Sentinel when it keeps failing.
struct ProbeState {
    conn: RedisConnection,
    failures_in_a_row: u32,
}

/// Failed probes in a row after which the sentinels are asked for the master again.
const SENTINEL_ASK_AGAIN_AFTER: u32 = 2;

#[cfg(test)]
mod tests {
    use super::*;

    fn node(host: &str, port: i64, id: Option<&str>) -> Value {
        let mut fields = vec![Value::BulkString(host.into()), Value::Int(port)];
        fields.extend(id.map(|id| Value::BulkString(id.into())));
        Value::Array(fields)
    }

    fn range(start: i64, end: i64, master: Value) -> Value {
        Value::Array(vec![Value::Int(start), Value::Int(end), master])
    }

    #[test]
    fn a_cluster_slots_reply_tells_which_slots_share_a_node() {
        let reply = Value::Array(vec![
            range(0, 99, node("127.0.0.1", 7001, Some("a"))),
            range(100, 199, node("127.0.0.1", 7002, Some("b"))),
            // A second range of the first node.
            range(200, 16_383, node("127.0.0.1", 7001, Some("a"))),
        ]);
        let nodes = SlotNodes::from_cluster_slots(&reply).expect("a valid reply");
        assert_eq!(nodes.node_of(0), nodes.node_of(99));
        assert_eq!(nodes.node_of(0), nodes.node_of(16_383));
        assert_ne!(nodes.node_of(99), nodes.node_of(100));
        assert_eq!(nodes.node_of(100), nodes.node_of(199));

        // Without ids, host and port tell nodes apart; a slot no range covers has no node.
        let reply = Value::Array(vec![
            range(0, 10, node("127.0.0.1", 7001, None)),
            range(11, 20, node("127.0.0.1", 7002, None)),
        ]);
        let nodes = SlotNodes::from_cluster_slots(&reply).expect("a valid reply");
        assert_ne!(nodes.node_of(10), nodes.node_of(11));
        assert_eq!(nodes.node_of(21), NO_NODE);
    }

    #[test]
    fn a_reply_that_is_not_a_slot_map_gives_none() {
        for reply in [
            Value::Nil,
            Value::Array(vec![Value::Int(0)]),
            Value::Array(vec![range(0, 16_384, node("h", 1, Some("a")))]),
            Value::Array(vec![range(5, 1, node("h", 1, Some("a")))]),
        ] {
            assert_eq!(SlotNodes::from_cluster_slots(&reply), None, "{reply:?}");
        }
    }
}
