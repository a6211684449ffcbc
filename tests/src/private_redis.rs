//! Redis servers of a test's own: one (to fill its memory, say) or a three-master Redis
//! Cluster. Each is killed when dropped.

use std::time::Duration;

use anyhow::Context;

/// A Redis of its own, so filling its memory cannot disturb the other tests.
pub struct PrivateRedis {
    child: Option<std::process::Child>,
    args: Vec<String>,
    /// `redis://127.0.0.1:<port>`.
    pub url: String,
}

impl PrivateRedis {
    /// Starts `redis-server` on a free port with `extra` arguments.
    pub async fn start(extra: &[&str]) -> anyhow::Result<Self> {
        let port = free_port_with_bus()?.to_string();
        // Snapshots (for `stop`, and a replica's copy of its master) go to a scratch folder,
        // not the tests' working directory, unless `extra` names another `--dir`.
        let dir = crate::process::scratch_dir(&format!("redis-{port}"));
        let dir = dir.to_str().context("a UTF-8 scratch path")?.to_owned();
        let mut args: Vec<String> = ["--bind", "127.0.0.1", "--port", &port]
            .into_iter()
            .chain(["--save", "", "--appendonly", "no", "--dir", &dir])
            // Its own snapshot file, for `stop`, even beside other servers in one directory.
            .chain(["--dbfilename", &format!("dump-{port}.rdb")])
            .map(str::to_owned)
            .collect();
        args.extend(extra.iter().map(|arg| arg.to_string()));
        let mut server = Self {
            child: None,
            args,
            url: format!("redis://127.0.0.1:{port}"),
        };
        server.start_again().await?;
        Ok(server)
    }

    /// Starts the server again after [`PrivateRedis::stop`], on the same port, with the data
    /// it saved.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "{} is running", self.url);
        self.child = Some(
            std::process::Command::new("redis-server")
                .args(&self.args)
                .stdout(std::process::Stdio::null())
                .spawn()?,
        );
        let client = redis::Client::open(self.url.as_str())?;
        for _ in 0..100 {
            if client.get_multiplexed_async_connection().await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("redis-server at {} did not start", self.url)
    }

    /// Stops the server as an operator would (`SHUTDOWN SAVE`): its data is kept for
    /// [`PrivateRedis::start_again`], and clients get their connections refused meanwhile.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // The server closes the connection instead of answering.
        let _ = redis::cmd("SHUTDOWN")
            .arg("SAVE")
            .query_async::<()>(&mut self.connect().await?)
            .await;
        child.wait()?;
        Ok(())
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
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
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
        cluster.wait_ok().await?;
        Ok(cluster)
    }

    /// Stops every node ([`PrivateRedis::stop`]): the whole cluster is gone.
    pub async fn stop_all(&mut self) -> anyhow::Result<()> {
        for node in &mut self.nodes {
            node.stop().await?;
        }
        Ok(())
    }

    /// Starts every node again, and waits until the cluster serves every slot.
    pub async fn start_all_again(&mut self) -> anyhow::Result<()> {
        for node in &mut self.nodes {
            node.start_again().await?;
        }
        self.wait_ok().await
    }

    async fn wait_ok(&self) -> anyhow::Result<()> {
        for _ in 0..200 {
            if self.all_ok().await? {
                return Ok(());
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

impl PrivateRedis {
    /// Kills the server (`kill -9`), as a crash would; [`PrivateRedis::start_again`] brings it
    /// back, empty.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }
}

/// A master with one replica, watched by one sentinel that fails over quickly.
pub struct PrivateSentinel {
    /// The first master.
    pub master: PrivateRedis,
    /// Its replica.
    pub replica: PrivateRedis,
    /// The name the sentinel knows the master by.
    pub master_name: String,
    /// `redis://127.0.0.1:<port>` of the sentinel.
    pub sentinel_url: String,
    sentinel: std::process::Child,
}

impl PrivateSentinel {
    /// Starts the master, its replica and the sentinel, and waits until the sentinel knows
    /// the replica (so that it can fail over to it).
    pub async fn start() -> anyhow::Result<Self> {
        let master = PrivateRedis::start(&[]).await?;
        let master_port = port_of(&master.url)?;
        let replica =
            PrivateRedis::start(&["--replicaof", "127.0.0.1", &master_port.to_string()]).await?;
        let master_name = crate::unique_name("master");
        let port = crate::process::free_port();
        let dir = crate::process::scratch_dir("sentinel");
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor {master_name} 127.0.0.1 {master_port} 1\n\
                 sentinel down-after-milliseconds {master_name} 1000\n\
                 sentinel failover-timeout {master_name} 3000\n",
                dir.display()
            ),
        )?;
        let sentinel = std::process::Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(std::fs::File::create(dir.join("sentinel.log"))?)
            .spawn()?;
        let sentinel = Self {
            master,
            replica,
            master_name,
            sentinel_url: format!("redis://127.0.0.1:{port}"),
            sentinel,
        };
        let client = redis::Client::open(sentinel.sentinel_url.as_str())?;
        for _ in 0..200 {
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                let replicas: Result<Vec<redis::Value>, _> = redis::cmd("SENTINEL")
                    .arg("replicas")
                    .arg(&sentinel.master_name)
                    .query_async(&mut conn)
                    .await;
                if replicas.is_ok_and(|r| !r.is_empty()) {
                    return Ok(sentinel);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("the sentinel did not find the replica")
    }

    /// Has the sentinel switch masters, as an operator does (`SENTINEL FAILOVER`), and waits
    /// until it names the new one: the command only starts the failover.
    pub async fn switch_over(&self) -> anyhow::Result<()> {
        let before = self.master_address().await?;
        let mut conn = redis::Client::open(self.sentinel_url.as_str())?
            .get_multiplexed_async_connection()
            .await?;
        redis::cmd("SENTINEL")
            .arg("FAILOVER")
            .arg(&self.master_name)
            .query_async::<()>(&mut conn)
            .await?;
        crate::wait_for(
            "the sentinel to name a new master",
            Duration::from_secs(30),
            || {
                let before = before.clone();
                async move { Ok((self.master_address().await? != before).then_some(())) }
            },
        )
        .await
    }

    /// The `host:port` the sentinel names as the master now.
    pub async fn master_address(&self) -> anyhow::Result<String> {
        let mut conn = redis::Client::open(self.sentinel_url.as_str())?
            .get_multiplexed_async_connection()
            .await?;
        let (host, port): (String, u16) = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.master_name)
            .query_async(&mut conn)
            .await?;
        Ok(format!("{host}:{port}"))
    }
}

impl Drop for PrivateSentinel {
    fn drop(&mut self) {
        let _ = self.sentinel.kill();
        let _ = self.sentinel.wait();
    }
}

fn port_of(url: &str) -> anyhow::Result<u16> {
    url::Url::parse(url)?
        .port()
        .ok_or_else(|| anyhow::anyhow!("no port in {url}"))
}
