//! Version-guarded cache writes: a late, duplicated or reordered change never makes the
//! cache stale.
//!
//! For a value key `K` the guard keeps a version key next to it (see [`version_key`]):
//! `"<version>"` while `K` is live, `"<version>:deleted"` as a tombstone after a delete.
//! Readers keep doing a plain `GET K`. A server-side Lua script compares the incoming version
//! with the stored one and writes only when it is newer, so the check and the write are one
//! atomic step. Writes without a version are plain last-writer-wins `SET`/`DEL` and neither
//! read nor change the version key.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{Cmd, ErrorKind, Pipeline, RedisError, Value};

use crate::version::Version;

const SCRIPT: &str = include_str!("version_guard.lua");

/// Prefix of version keys.
pub const VERSION_KEY_PREFIX: &str = "__ver:";

/// Entries per script call: keeps each call short on the server and within Lua's stack.
pub const DEFAULT_ENTRIES_PER_CALL: usize = 500;

/// The version key of a value key, in the same Redis Cluster hash slot.
///
/// `order:1001` becomes `__ver:{order:1001}`; a key that already has a hash tag keeps it,
/// so `user:{42}:profile` becomes `__ver:user:{42}:profile`. Keys that contain `}` but no
/// valid hash tag cannot be co-located on a cluster; on a single server they work as usual.
pub fn version_key(key: &str) -> String {
    if hash_tag(key).is_some() {
        format!("{VERSION_KEY_PREFIX}{key}")
    } else {
        format!("{VERSION_KEY_PREFIX}{{{key}}}")
    }
}

/// The hash tag Redis Cluster would hash for `key`, if any.
fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let close = key[open + 1..].find('}')? + open + 1;
    (close > open + 1).then(|| &key[open + 1..close])
}

/// The Redis Cluster slot of a key.
pub fn cluster_slot(key: &str) -> u16 {
    let hashed = hash_tag(key).unwrap_or(key);
    crc16::State::<crc16::XMODEM>::calculate(hashed.as_bytes()) % 16384
}

/// What a write does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Store these bytes (normally JSON) at the key.
    Upsert(Vec<u8>),
    /// Remove the key.
    Delete,
}

/// One cache write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheWrite {
    /// The Redis key readers `GET`.
    pub key: String,
    /// Upsert or delete.
    pub change: Change,
    /// The change's version; `None` makes it a plain last-writer-wins write.
    pub version: Option<Version>,
    /// Expiry of an upserted entry.
    pub ttl: Option<Duration>,
}

impl CacheWrite {
    /// An upsert.
    pub fn upsert(
        key: impl Into<String>,
        value: impl Into<Vec<u8>>,
        version: Option<Version>,
    ) -> Self {
        Self {
            key: key.into(),
            change: Change::Upsert(value.into()),
            version,
            ttl: None,
        }
    }

    /// A delete.
    pub fn delete(key: impl Into<String>, version: Option<Version>) -> Self {
        Self {
            key: key.into(),
            change: Change::Delete,
            version,
            ttl: None,
        }
    }

    /// Sets the expiry of an upsert.
    pub fn with_ttl(mut self, ttl: Option<Duration>) -> Self {
        self.ttl = ttl;
        self
    }
}

/// What happened to one write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WriteOutcome {
    /// The write took effect.
    Applied,
    /// A newer version is stored; the write was dropped.
    Stale,
    /// The same version is stored; the write was a no-op.
    Duplicate,
}

impl WriteOutcome {
    /// A fixed metric label.
    pub fn as_label(self) -> &'static str {
        match self {
            WriteOutcome::Applied => "applied",
            WriteOutcome::Stale => "stale",
            WriteOutcome::Duplicate => "duplicate",
        }
    }
}

/// A failed guarded write. Nothing in the failed pipeline can be assumed written, but
/// retrying it is safe: guarded writes are idempotent.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// Redis refused the command or could not be reached.
    #[error("redis write failed: {0}")]
    Redis(#[from] RedisError),
    /// Redis answered something the script never returns.
    #[error("unexpected reply from the version-guard script: {0}")]
    UnexpectedReply(String),
}

impl GuardError {
    /// Whether the failure is Redis being unreachable or overloaded (retry later) rather than
    /// a refusal of this particular write.
    pub fn is_transient(&self) -> bool {
        match self {
            GuardError::Redis(e) => {
                e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || matches!(
                        e.kind(),
                        ErrorKind::Server(redis::ServerErrorKind::BusyLoading)
                            | ErrorKind::Server(redis::ServerErrorKind::TryAgain)
                            | ErrorKind::Server(redis::ServerErrorKind::ClusterDown)
                            | ErrorKind::Server(redis::ServerErrorKind::MasterDown)
                            | ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
                    )
                    || e.code() == Some("OOM")
            }
            GuardError::UnexpectedReply(_) => false,
        }
    }
}

/// Applies [`CacheWrite`]s with the version check.
#[derive(Debug, Clone)]
pub struct VersionGuard {
    script: redis::Script,
    tombstone_ttl: Duration,
    entries_per_call: usize,
    cluster: bool,
}

impl VersionGuard {
    /// A guard whose tombstones live for `tombstone_ttl` (zero keeps them forever).
    ///
    /// A delete is protected from a late older upsert for as long as its tombstone lives.
    pub fn new(tombstone_ttl: Duration) -> Self {
        Self {
            script: redis::Script::new(SCRIPT),
            tombstone_ttl,
            entries_per_call: DEFAULT_ENTRIES_PER_CALL,
            cluster: false,
        }
    }

    /// Caps how many entries one script call takes.
    pub fn with_entries_per_call(mut self, entries: usize) -> Self {
        self.entries_per_call = entries.clamp(1, 1000);
        self
    }

    /// Groups each script call's entries by Redis Cluster hash slot, so every call touches
    /// only keys of one slot. Off for a single server, where larger calls are faster.
    pub fn with_cluster_slots(mut self, cluster: bool) -> Self {
        self.cluster = cluster;
        self
    }

    /// Loads the script into the server's script cache, so later calls send only its hash.
    pub async fn load<C: ConnectionLike>(&self, conn: &mut C) -> Result<(), GuardError> {
        self.script.prepare_invoke().load_async(conn).await?;
        Ok(())
    }

    /// Writes `value` at `key` only if `version` is newer than the stored version.
    pub async fn upsert_if_newer<C: ConnectionLike>(
        &self,
        conn: &mut C,
        key: &str,
        value: &[u8],
        version: Version,
        ttl: Option<Duration>,
    ) -> Result<WriteOutcome, GuardError> {
        let write = CacheWrite::upsert(key, value, Some(version)).with_ttl(ttl);
        Ok(self.apply_batch(conn, std::slice::from_ref(&write)).await?[0])
    }

    /// Deletes `key` only if `version` is newer than the stored version, leaving a tombstone.
    pub async fn delete_if_newer<C: ConnectionLike>(
        &self,
        conn: &mut C,
        key: &str,
        version: Version,
    ) -> Result<WriteOutcome, GuardError> {
        let write = CacheWrite::delete(key, Some(version));
        Ok(self.apply_batch(conn, std::slice::from_ref(&write)).await?[0])
    }

    /// Applies many writes in one pipelined round trip and reports each one's outcome, in
    /// input order. Writes to the same key take effect in input order.
    pub async fn apply_batch<C: ConnectionLike>(
        &self,
        conn: &mut C,
        writes: &[CacheWrite],
    ) -> Result<Vec<WriteOutcome>, GuardError> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let plan = self.plan(writes);
        let pipe = self.pipeline(writes, &plan);
        let replies: Vec<Value> = match pipe.query_async(conn).await {
            Ok(replies) => replies,
            Err(e) if e.kind() == ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                // The server lost its script cache (restart, failover, SCRIPT FLUSH). No call
                // ran, and every write is idempotent, so load the script and send it all again.
                self.load(conn).await?;
                pipe.query_async(conn).await?
            }
            Err(e) => return Err(e.into()),
        };
        if replies.len() != plan.len() {
            return Err(GuardError::UnexpectedReply(format!(
                "{} replies for {} commands",
                replies.len(),
                plan.len()
            )));
        }
        let mut outcomes = vec![WriteOutcome::Applied; writes.len()];
        for (call, reply) in plan.iter().zip(replies) {
            if let Call::Guarded(indices) = call {
                let codes = match reply {
                    Value::BulkString(bytes) => bytes,
                    Value::SimpleString(s) => s.into_bytes(),
                    other => return Err(GuardError::UnexpectedReply(format!("{other:?}"))),
                };
                if codes.len() != indices.len() {
                    return Err(GuardError::UnexpectedReply(format!(
                        "{} outcomes for {} entries",
                        codes.len(),
                        indices.len()
                    )));
                }
                for (&index, code) in indices.iter().zip(codes) {
                    outcomes[index] = match code {
                        b'A' => WriteOutcome::Applied,
                        b'S' => WriteOutcome::Stale,
                        b'D' => WriteOutcome::Duplicate,
                        other => {
                            return Err(GuardError::UnexpectedReply(format!(
                                "outcome code {other}"
                            )))
                        }
                    };
                }
            }
        }
        Ok(outcomes)
    }

    /// Splits writes into pipeline commands. Versioned writes between two unversioned ones
    /// share script calls; an unversioned write is its own command, so order per key holds.
    fn plan(&self, writes: &[CacheWrite]) -> Vec<Call> {
        let mut calls = Vec::new();
        let mut run: Vec<usize> = Vec::new();
        for (index, write) in writes.iter().enumerate() {
            if write.version.is_some() {
                run.push(index);
            } else {
                self.flush_run(writes, &mut run, &mut calls);
                calls.push(Call::Plain(index));
            }
        }
        self.flush_run(writes, &mut run, &mut calls);
        calls
    }

    fn flush_run(&self, writes: &[CacheWrite], run: &mut Vec<usize>, calls: &mut Vec<Call>) {
        if run.is_empty() {
            return;
        }
        if self.cluster {
            // Stable grouping by slot keeps each key's writes in order.
            let mut by_slot: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
            for &index in run.iter() {
                by_slot
                    .entry(cluster_slot(&writes[index].key))
                    .or_default()
                    .push(index);
            }
            for group in by_slot.into_values() {
                self.split_into_calls(writes, &group, calls);
            }
        } else {
            self.split_into_calls(writes, run, calls);
        }
        run.clear();
    }

    /// Cuts a run into script calls of at most `entries_per_call` distinct keys. A key seen
    /// again starts the next call: calls run in pipeline order, so its writes keep their order
    /// and the script needs no per-key bookkeeping.
    fn split_into_calls(&self, writes: &[CacheWrite], run: &[usize], calls: &mut Vec<Call>) {
        let mut call: Vec<usize> = Vec::with_capacity(run.len().min(self.entries_per_call));
        let mut keys: HashSet<&str> = HashSet::with_capacity(call.capacity());
        for &index in run {
            let key = writes[index].key.as_str();
            if call.len() == self.entries_per_call || keys.contains(key) {
                calls.push(Call::Guarded(std::mem::take(&mut call)));
                keys.clear();
            }
            keys.insert(key);
            call.push(index);
        }
        if !call.is_empty() {
            calls.push(Call::Guarded(call));
        }
    }

    fn pipeline(&self, writes: &[CacheWrite], plan: &[Call]) -> Pipeline {
        let mut pipe = redis::pipe();
        let tombstone_ms = self.tombstone_ttl.as_millis().to_string();
        for call in plan {
            match call {
                Call::Plain(index) => pipe.add_command(plain_command(&writes[*index])),
                Call::Guarded(indices) => {
                    pipe.add_command(self.script_call(writes, indices, &tombstone_ms))
                }
            };
        }
        pipe
    }
}

impl VersionGuard {
    /// One EVALSHA in the layout `version_guard.lua` documents: columns, not rows, so the
    /// script creates as few Lua strings per entry as possible.
    fn script_call(&self, writes: &[CacheWrite], indices: &[usize], tombstone_ms: &str) -> Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.script.get_hash()).arg(indices.len() * 2);
        for &index in indices {
            cmd.arg(&writes[index].key);
        }
        for &index in indices {
            cmd.arg(version_key(&writes[index].key));
        }
        let mut ops = String::with_capacity(indices.len());
        let mut ttls = Vec::new();
        for &index in indices {
            let write = &writes[index];
            ops.push(match (&write.change, write.ttl) {
                (Change::Delete, _) => 'd',
                (Change::Upsert(_), None) => 'u',
                (Change::Upsert(_), Some(ttl)) => {
                    ttls.push(ttl.as_millis().max(1) as u64);
                    't'
                }
            });
        }
        cmd.arg(tombstone_ms).arg(ops);
        for &index in indices {
            let version = writes[index]
                .version
                .expect("guarded calls hold versioned writes");
            cmd.arg(version.get());
        }
        for &index in indices {
            match &writes[index].change {
                Change::Upsert(value) => cmd.arg(value.as_slice()),
                Change::Delete => cmd.arg(""),
            };
        }
        for ttl in ttls {
            cmd.arg(ttl);
        }
        cmd
    }
}

fn plain_command(write: &CacheWrite) -> Cmd {
    match &write.change {
        Change::Upsert(value) => {
            let mut cmd = redis::cmd("SET");
            cmd.arg(&write.key).arg(value.as_slice());
            if let Some(ttl) = write.ttl {
                cmd.arg("PX").arg(ttl.as_millis().max(1) as u64);
            }
            cmd
        }
        Change::Delete => {
            let mut cmd = redis::cmd("DEL");
            cmd.arg(&write.key);
            cmd
        }
    }
}

#[derive(Debug)]
enum Call {
    Plain(usize),
    Guarded(Vec<usize>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_key_shares_the_slot() {
        for key in [
            "order:1001",
            "user:{42}:profile",
            "a",
            "a{b",
            "{x",
            "{tag}rest",
            "ü:1",
        ] {
            let vk = version_key(key);
            assert_eq!(cluster_slot(key), cluster_slot(&vk), "{key} vs {vk}");
            assert!(vk.starts_with(VERSION_KEY_PREFIX));
        }
        assert_eq!(version_key("order:1001"), "__ver:{order:1001}");
        assert_eq!(version_key("user:{42}:p"), "__ver:user:{42}:p");
    }

    #[test]
    fn slots_match_redis() {
        // Values from CLUSTER KEYSLOT on a real server.
        assert_eq!(cluster_slot("foo"), 12182);
        assert_eq!(
            cluster_slot("{user1000}.following"),
            cluster_slot("user1000")
        );
        assert_eq!(cluster_slot("123456789"), 12739);
    }

    #[test]
    fn plan_keeps_order_around_unversioned_writes() {
        let guard = VersionGuard::new(Duration::from_secs(60)).with_entries_per_call(2);
        let writes = vec![
            CacheWrite::upsert("a", "1", Some(Version::new(1))),
            CacheWrite::upsert("b", "1", Some(Version::new(1))),
            CacheWrite::upsert("c", "1", Some(Version::new(1))),
            CacheWrite::delete("a", None),
            CacheWrite::upsert("a", "2", Some(Version::new(2))),
        ];
        let plan = guard.plan(&writes);
        let shape: Vec<String> = plan
            .iter()
            .map(|c| match c {
                Call::Plain(i) => format!("p{i}"),
                Call::Guarded(v) => format!("g{v:?}"),
            })
            .collect();
        assert_eq!(shape, ["g[0, 1]", "g[2]", "p3", "g[4]"]);

        // A repeated key starts a new call.
        let writes = vec![
            CacheWrite::upsert("a", "1", Some(Version::new(1))),
            CacheWrite::upsert("b", "1", Some(Version::new(1))),
            CacheWrite::upsert("a", "2", Some(Version::new(2))),
            CacheWrite::upsert("c", "2", Some(Version::new(2))),
        ];
        let guard = VersionGuard::new(Duration::from_secs(60));
        let plan: Vec<_> = guard
            .plan(&writes)
            .into_iter()
            .map(|c| match c {
                Call::Guarded(v) => v,
                Call::Plain(_) => panic!("all versioned"),
            })
            .collect();
        assert_eq!(plan, vec![vec![0, 1], vec![2, 3]]);
    }

    #[test]
    fn cluster_plan_puts_one_slot_in_each_call() {
        let guard = VersionGuard::new(Duration::ZERO).with_cluster_slots(true);
        let writes: Vec<_> = (0..200)
            .map(|i| CacheWrite::upsert(format!("order:{}", i % 50), "v", Some(Version::new(i))))
            .collect();
        for call in guard.plan(&writes) {
            let Call::Guarded(indices) = call else {
                panic!("all writes are versioned")
            };
            let slot = cluster_slot(&writes[indices[0]].key);
            assert!(indices
                .iter()
                .all(|&i| cluster_slot(&writes[i].key) == slot));
            assert!(indices.windows(2).all(|w| w[0] < w[1]), "order kept");
        }
    }
}
