//! Redis servers of a test's own: one (to fill its memory, say) or a three-master Redis
//! Cluster. Each is killed when dropped.

use std::time::Duration;

/// A Redis of its own, so filling its memory cannot disturb the other tests.
pub struct PrivateRedis {
    child: std::process::Child,
    /// `redis://127.0.0.1:<port>`.
    pub url: String,
}

impl PrivateRedis {
    /// Starts `redis-server` on a free port with `extra` arguments.
    pub async fn start(extra: &[&str]) -> anyhow::Result<Self> {
        let port = free_port_with_bus()?;
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .spawn()?;
        let url = format!("redis://127.0.0.1:{port}");
        let server = Self { child, url };
        let client = redis::Client::open(server.url.as_str())?;
        for _ in 0..100 {
            if client.get_multiplexed_async_connection().await.is_ok() {
                return Ok(server);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("redis-server on port {port} did not start")
    }
}

/// A free port whose cluster bus port (port + 10000) is free as well.
fn free_port_with_bus() -> anyhow::Result<u16> {
    for _ in 0..100 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free port pair found")
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Redis Cluster of private servers: three masters, each with a number of replicas.
pub struct PrivateCluster {
    /// The servers, masters first.
    pub nodes: Vec<PrivateRedis>,
}

impl PrivateCluster {
    /// Starts three servers and joins them into a cluster that serves every slot.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with_replicas(0).await
    }

    /// Starts three masters with `replicas` replicas each. A master that stops answering
    /// for a second is failed over to one of its replicas.
    pub async fn start_with_replicas(replicas: usize) -> anyhow::Result<Self> {
        let dir = crate::process::scratch_dir("cluster");
        let mut nodes = Vec::new();
        for node in 0..3 * (1 + replicas) {
            let config_file = dir.join(format!("nodes-{node}.conf"));
            nodes.push(
                PrivateRedis::start(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-node-timeout",
                    "1000",
                    // A replica takes over however long ago it last heard from its master.
                    "--cluster-replica-validity-factor",
                    "0",
                    "--cluster-config-file",
                    config_file.to_str().expect("UTF-8 path"),
                    "--dir",
                    dir.to_str().expect("UTF-8 path"),
                ])
                .await?,
            );
        }
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| n.url.trim_start_matches("redis://").to_string())
            .collect();
        let created = std::process::Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", &replicas.to_string()])
            .args(["--cluster-yes"])
            .output()?;
        anyhow::ensure!(
            created.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        let cluster = Self { nodes };
        for _ in 0..200 {
            if cluster.all_ok().await? {
                return Ok(cluster);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("the cluster did not reach cluster_state:ok")
    }

    async fn all_ok(&self) -> anyhow::Result<bool> {
        for node in &self.nodes {
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query_async(&mut node.connect().await?)
                .await?;
            if !info.contains("cluster_state:ok") {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

impl PrivateRedis {
    /// A plain connection to this server.
    pub async fn connect(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        Ok(redis::Client::open(self.url.as_str())?
            .get_multiplexed_async_connection()
            .await?)
    }
}

impl PrivateCluster {
    /// A cluster client's connection, which sends each command to the node owning its slot.
    pub async fn client(&self) -> anyhow::Result<redis::cluster_async::ClusterConnection> {
        let urls: Vec<&str> = self.nodes.iter().map(|n| n.url.as_str()).collect();
        Ok(redis::cluster::ClusterClient::new(urls)?
            .get_async_connection()
            .await?)
    }
}

impl PrivateCluster {
    /// Kills the first master (`kill -9`) and returns its URL; its replica takes over its
    /// slots.
    pub async fn kill_a_master(&mut self) -> anyhow::Result<String> {
        for index in 0..self.nodes.len() {
            let role: Vec<redis::Value> = redis::cmd("ROLE")
                .query_async(&mut self.nodes[index].connect().await?)
                .await?;
            if matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master") {
                let node = self.nodes.remove(index);
                let url = node.url.clone();
                drop(node);
                return Ok(url);
            }
        }
        anyhow::bail!("no master found")
    }
}
