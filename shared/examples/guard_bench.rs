//! Throughput of pipelined version-guarded writes, for `bench/version_guard.sh`.
//!
//! Each client connection sends batches of `--batch` upserts of `--value-size` bytes to random
//! keys, one batch per round trip, with ever-increasing versions so every write is applied
//! (the most expensive path). Prints one line: `guarded_writes_per_sec=<n>`.
//!
//! With `--script-floor` it instead sends the same keys and values through the cheapest
//! possible script, one `MSET` of the values with no version read or write, and prints
//! `script_floor_writes_per_sec=<n>`: what passing the values through Lua costs on this
//! server before guarding anything.
//!
//! With `--wait-replicas <n>` each batch is followed by `WAIT <n>`, for `bench/guard_wait.sh`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use fleet::version::Version;
use fleet::version_guard::{CacheWrite, VersionGuard};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    #[arg(long, default_value_t = 8)]
    clients: usize,
    #[arg(long, default_value_t = 100)]
    batch: usize,
    #[arg(long, default_value_t = 300)]
    value_size: usize,
    #[arg(long, default_value_t = 1_000_000)]
    writes: u64,
    #[arg(long, default_value_t = 100_000)]
    keyspace: u64,
    #[arg(long, default_value = "bench:guard")]
    prefix: String,
    /// Measure the unguarded script instead of the guard.
    #[arg(long)]
    script_floor: bool,
    /// `--redis-url` is a node of a Redis Cluster: write through a cluster client, with the
    /// guard in cluster mode (one script call per hash slot, one pipeline per node).
    #[arg(long)]
    cluster: bool,
    /// After each batch, wait until this many replicas hold it (`WAIT`), as the services do
    /// with `redis.wait_replicas`.
    #[arg(long, default_value_t = 0)]
    wait_replicas: u32,
    /// The guard's inline form on a single server too (it is always on in cluster mode).
    #[arg(long)]
    inline: bool,
}

/// KEYS: value keys; ARGV: their values. No version is read or written.
const FLOOR_SCRIPT: &str = r#"
local kv = {}
for i = 1, #KEYS do
  kv[2 * i - 1] = KEYS[i]
  kv[2 * i] = ARGV[i]
end
redis.call('MSET', unpack(kv))
return #KEYS
"#;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let guard = VersionGuard::new(Duration::from_secs(3600))
        .with_entries_per_call(args.batch)
        .with_cluster_slots(args.cluster)
        .with_inline_values(args.cluster || args.inline);
    let value = vec![b'x'; args.value_size];
    let version = Arc::new(AtomicU64::new(1));
    let remaining = Arc::new(AtomicU64::new(args.writes));
    let floor = redis::Script::new(FLOOR_SCRIPT);
    let connect = || async {
        let config = fleet::config::RedisConfig {
            url: fleet::secret::RedactedUrl::parse(&args.redis_url)?,
            cluster: args.cluster,
            ..Default::default()
        };
        Ok::<_, anyhow::Error>(fleet::redis_conn::connect(&config).await?)
    };
    let mut conn = connect().await?;
    guard.load(&mut conn).await?;
    floor.prepare_invoke().load_async(&mut conn).await?;

    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.clients {
        // One connection per client, as redis-benchmark does.
        let mut conn = connect().await?;
        let (guard, floor, value, version, remaining) = (
            guard.clone(),
            floor.clone(),
            value.clone(),
            version.clone(),
            remaining.clone(),
        );
        let (batch, keyspace, prefix) = (args.batch as u64, args.keyspace, args.prefix.clone());
        let (script_floor, wait_replicas) = (args.script_floor, args.wait_replicas);
        tasks.push(tokio::spawn(async move {
            let mut writes = Vec::with_capacity(batch as usize);
            loop {
                let n = remaining
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                        r.checked_sub(batch.min(r).max(1))
                    })
                    .map(|r| batch.min(r))
                    .unwrap_or(0);
                if n == 0 {
                    return Ok::<_, anyhow::Error>(());
                }
                writes.clear();
                for _ in 0..n {
                    let v = version.fetch_add(1, Ordering::Relaxed);
                    let key = format!("{prefix}:{}", rand::random::<u64>() % keyspace);
                    writes.push(CacheWrite::upsert(
                        key,
                        value.clone(),
                        Some(Version::new(v)),
                    ));
                }
                if script_floor {
                    let mut call = floor.prepare_invoke();
                    for write in &writes {
                        call.key(&*write.key);
                    }
                    for _ in &writes {
                        call.arg(value.as_slice());
                    }
                    let _: i64 = call.invoke_async(&mut conn).await?;
                } else {
                    guard.apply_batch(&mut conn, &writes).await?;
                }
                if wait_replicas > 0 {
                    let got: u32 = redis::cmd("WAIT")
                        .arg(wait_replicas)
                        .arg(5_000)
                        .query_async(&mut conn)
                        .await?;
                    anyhow::ensure!(got >= wait_replicas, "WAIT: {got} replicas");
                }
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let name = if args.script_floor {
        "script_floor"
    } else {
        "guarded"
    };
    println!("{name}_writes_per_sec={:.0}", args.writes as f64 / elapsed);
    Ok(())
}
