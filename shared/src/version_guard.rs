//! Version-guarded cache writes: a late, duplicated or reordered change never makes the
//! cache stale.
//!
//! Readers keep doing a plain `GET K`. Each batch of versioned writes is one Redis transaction
//! (`MULTI`/`EXEC`): a Lua script compares the incoming versions with the stored ones and
//! writes the new versions, the values follow as native `MSET`/`SET` commands, and a second
//! script puts back the keys whose upsert must not apply. Values never pass through Lua,
//! which keeps the guard close to plain `SET` throughput; see `version_guard.lua`.
//!
//! Where a version lives (see [`VersionGuard::bucket_key`] and [`version_key`]):
//! - a live entry without expiry: a field in one of a few hashes, its *version bucket*;
//! - a tombstone, or an entry with a TTL: a version key next to the value key, which expires.
//!
//! Writes without a version are plain last-writer-wins `SET`/`DEL` and neither read nor
//! change any version.

use std::collections::{BTreeMap, HashMap};
use std::sync::{LazyLock, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use redis::aio::ConnectionLike;
use redis::{Cmd, Pipeline, RedisError, Value};

use crate::redis_conn::SlotRouting;
use crate::version::Version;

/// The version check and version writes, step 1 of a guarded transaction.
static CHECK_SCRIPT: LazyLock<String> =
    LazyLock::new(|| script_with_common(include_str!("version_guard.lua")));
/// Puts back the keys of upserts that must not apply, step 3 of a guarded transaction.
static RESTORE_SCRIPT: LazyLock<String> =
    LazyLock::new(|| script_with_common(include_str!("version_guard_restore.lua")));

/// The scripts' SHA1 digests: a transaction sends a script's text with its first call and
/// names it by digest in later calls. That first `EVAL` has cached the script by the time a
/// later call runs, and nothing runs between the commands of a transaction, so a later
/// `EVALSHA` cannot meet a lost script cache.
static CHECK_SHA: LazyLock<String> =
    LazyLock::new(|| redis::Script::new(&CHECK_SCRIPT).get_hash().to_owned());
static RESTORE_SHA: LazyLock<String> =
    LazyLock::new(|| redis::Script::new(&RESTORE_SCRIPT).get_hash().to_owned());

/// Prefix of version keys (tombstones and versions of expiring entries).
pub const VERSION_KEY_PREFIX: &str = "__ver:";
/// Prefix of version buckets (versions of live entries without expiry).
pub const BUCKET_PREFIX: &str = "__vb:";
const STASH_PREFIX: &str = "__vstash:";

/// Version buckets on a single server. In cluster mode each slot has its own bucket.
pub const SINGLE_SERVER_BUCKETS: u16 = 4;
const CLUSTER_SLOTS: u16 = 16384;

/// Entries per script call: keeps each call short on the server and within Lua's stack.
pub const DEFAULT_ENTRIES_PER_CALL: usize = 500;

/// The services' [`VersionGuard::with_inline_below`]: on one server, batches this small cost
/// Redis less inline than in a transaction (about even at 32 writes, measured with
/// `guard_bench --inline`).
pub const INLINE_BELOW: usize = 32;

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
    crc16::State::<crc16::XMODEM>::calculate(hashed.as_bytes()) % CLUSTER_SLOTS
}

/// A short hash tag that Redis Cluster maps to `slot`: names of buckets and stash lists
/// carry it so they share the slot of the value keys they serve.
fn slot_tag(slot: u16) -> &'static str {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        let mut tags = vec![String::new(); CLUSTER_SLOTS.into()];
        let mut missing = tags.len();
        let mut candidate = 0u64;
        while missing > 0 {
            let tag = format!("{candidate:x}");
            let slot = usize::from(cluster_slot(&tag));
            if tags[slot].is_empty() {
                tags[slot] = tag;
                missing -= 1;
            }
            candidate += 1;
        }
        tags
    });
    &tags[usize::from(slot)]
}

/// A script with the helpers both share in front of it, without comments.
fn script_with_common(script: &str) -> String {
    without_comments(&format!(
        "{}\n{script}",
        include_str!("version_guard_common.lua")
    ))
}

/// The version bucket serving `slot` (a bucket number on a single server).
fn bucket_name(slot: u16) -> String {
    format!("{BUCKET_PREFIX}{{{}}}", slot_tag(slot))
}

fn without_comments(script: &str) -> String {
    // The script travels with the first call of every transaction (EVAL, never a missing
    // EVALSHA before it), so only its code is sent, and the server hashes less of it.
    script
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// What a write does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Store these bytes (normally JSON) at the key. `Bytes`, so a batch's values can be
    /// slices of one shared buffer.
    Upsert(Bytes),
    /// Remove the key.
    Delete,
}

/// A cache key: UTF-8 text in a [`Bytes`], so that a batch's keys can be slices of one
/// shared buffer, as its values are.
pub type CacheKey = bytestring::ByteString;

/// One cache write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheWrite {
    /// The Redis key readers `GET`.
    pub key: CacheKey,
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
        key: impl Into<CacheKey>,
        value: impl Into<Bytes>,
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
    pub fn delete(key: impl Into<CacheKey>, version: Option<Version>) -> Self {
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
    /// Fewer replicas than asked confirmed the writes in time (`WAIT`).
    #[error("{got} of {wanted} replicas confirmed the writes in time")]
    NotReplicated {
        /// Replicas asked for.
        wanted: u32,
        /// Replicas that confirmed.
        got: i64,
    },
}

impl GuardError {
    /// Whether the failure is Redis being unreachable, overloaded or between states (the
    /// same write succeeds later, unchanged). See also [`GuardError::refuses_this_write`].
    pub fn is_transient(&self) -> bool {
        match self {
            GuardError::Redis(e) => {
                e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    // A cluster client with no live connection to the slot's node (every
                    // node down, or the node gone before its replica took over).
                    || e.kind() == redis::ErrorKind::ClusterConnectionNotFound
                    // Credentials the server no longer takes refuse every write alike.
                    || e.kind() == redis::ErrorKind::AuthenticationFailed
                    || server_error_codes(e).iter().any(|code| {
                        // Loading, failing over, slots moving, out of memory, busy with a
                        // script, refusing writes since a snapshot failed (a full disk, say),
                        // or a connection not (or no longer) authenticated: the server's
                        // state, not the write's, and the same write succeeds later.
                        matches!(
                            code.as_str(),
                            "LOADING"
                                | "MISCONF"
                                | "NOAUTH"
                                | "WRONGPASS"
                                | "MOVED"
                                | "ASK"
                                | "TRYAGAIN"
                                | "CLUSTERDOWN"
                                | "MASTERDOWN"
                                | "READONLY"
                                | "OOM"
                                | "BUSY"
                                | "NOREPLICAS"
                        )
                    })
            }
            GuardError::UnexpectedReply(_) => false,
            GuardError::NotReplicated { .. } => true,
        }
    }

    /// Whether Redis refused this write for a reason of the write's own, which no retry
    /// helps and which other writes do not share: a corrupt stored version of its key, or an
    /// ACL that denies its key. Writes that fail this way are given up (dead-lettered) after a
    /// few attempts. Every other failure (an outage, and refusals that meet every write
    /// alike, such as an ACL denying the guard's commands or a version bucket of the wrong
    /// type) is waited out, with the service not ready.
    pub fn refuses_this_write(&self) -> bool {
        let GuardError::Redis(e) = self else {
            return false;
        };
        let text = e.to_string();
        text.contains(MALFORMED_STATE)
            || (self.has_code("NOPERM") && text.contains("access") && text.contains("key"))
    }

    /// Whether Redis answered with a server error of this code (`WRONGTYPE`, say), also
    /// inside a failed pipeline or transaction.
    pub fn has_code(&self, code: &str) -> bool {
        matches!(self, GuardError::Redis(e) if server_error_codes(e).iter().any(|c| c == code))
    }
}

/// How the check script names a write whose stored version it cannot read
/// (`version_guard.lua`).
const MALFORMED_STATE: &str = "malformed version state of ";

/// The codes of the server errors in `e`, including those inside a failed pipeline or an
/// aborted transaction.
fn server_error_codes(e: &RedisError) -> Vec<String> {
    let mut codes: Vec<String> = e.code().map(str::to_owned).into_iter().collect();
    if let Some(errors) = e.clone().into_server_errors() {
        codes.extend(errors.iter().map(|(_, error)| error.code().to_owned()));
    }
    codes
}

/// Applies [`CacheWrite`]s with the version check.
#[derive(Debug, Clone)]
pub struct VersionGuard {
    tombstone_ttl: Duration,
    entries_per_call: usize,
    cluster: bool,
    inline_values: bool,
    inline_below: usize,
}

impl VersionGuard {
    /// A guard whose tombstones live for `tombstone_ttl` (zero keeps them forever).
    ///
    /// A delete is protected from a late older upsert for as long as its tombstone lives.
    pub fn new(tombstone_ttl: Duration) -> Self {
        Self {
            tombstone_ttl,
            entries_per_call: DEFAULT_ENTRIES_PER_CALL,
            cluster: false,
            inline_values: false,
            inline_below: 0,
        }
    }

    /// Caps how many entries one script call takes.
    pub fn with_entries_per_call(mut self, entries: usize) -> Self {
        self.entries_per_call = entries.clamp(1, 1000);
        self
    }

    /// Cluster mode: every script call and transaction touches keys of one hash slot, and
    /// each slot has its own version bucket. Off for a single server, where few buckets and
    /// one transaction per batch are faster.
    ///
    /// The bucket layout differs between the modes, so a dataset moves between a single
    /// server and a cluster only together with its versions re-written (or flushed).
    pub fn with_cluster_slots(mut self, cluster: bool) -> Self {
        self.cluster = cluster;
        self.inline_values = cluster;
        self
    }

    /// The inline form (on in cluster mode, where it is the default): each script call is
    /// the whole write, values included, named by digest (`EVALSHA`, and `EVAL` only after a
    /// lost script cache), with no transaction around it. Far cheaper per call, so it suits
    /// the many small calls of a cluster, one or more per hash slot; values passing through
    /// Lua make it dearer per entry than the transaction for large calls on one server.
    pub fn with_inline_values(mut self, inline: bool) -> Self {
        self.inline_values = inline;
        self
    }

    /// Batches of fewer than `writes` writes take the inline form on one server too: for
    /// small batches it costs Redis less than the transaction's fixed costs (see
    /// docs/version-guard.md). Zero, the default, keeps every batch in the transaction.
    pub fn with_inline_below(mut self, writes: usize) -> Self {
        self.inline_below = writes;
        self
    }

    /// Compiles both scripts on the server: a server that cannot run them fails at start-up
    /// rather than on the first write. Calls send the scripts themselves, so a lost script
    /// cache (restart, failover, `SCRIPT FLUSH`) never fails a write.
    pub async fn load<C: ConnectionLike>(&self, conn: &mut C) -> Result<(), GuardError> {
        for script in [CHECK_SCRIPT.as_str(), RESTORE_SCRIPT.as_str()] {
            redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(script)
                .query_async::<String>(conn)
                .await?;
        }
        Ok(())
    }

    /// The version bucket (a hash) holding the version of `key` while `key` is live without
    /// expiry.
    pub fn bucket_key(&self, key: &str) -> String {
        bucket_name(self.bucket_slot(key))
    }

    fn bucket_slot(&self, key: &str) -> u16 {
        let buckets = if self.cluster {
            CLUSTER_SLOTS
        } else {
            SINGLE_SERVER_BUCKETS
        };
        cluster_slot(key) % buckets
    }

    /// The version state stored for `key`: `"<version>"`, `"<version>:deleted"` for a
    /// tombstone, or `None` if the guard has never seen the key (or its state expired).
    pub async fn stored_state<C: ConnectionLike>(
        &self,
        conn: &mut C,
        key: &str,
    ) -> Result<Option<String>, GuardError> {
        let field: Option<String> = redis::cmd("HGET")
            .arg(self.bucket_key(key))
            .arg(key)
            .query_async(conn)
            .await?;
        if field.is_some() {
            return Ok(field);
        }
        Ok(redis::cmd("GET")
            .arg(version_key(key))
            .query_async(conn)
            .await?)
    }

    /// Writes `value` at `key` only if `version` is newer than the stored version.
    pub async fn upsert_if_newer<C: SlotRouting>(
        &self,
        conn: &mut C,
        key: &str,
        value: &[u8],
        version: Version,
        ttl: Option<Duration>,
    ) -> Result<WriteOutcome, GuardError> {
        let write =
            CacheWrite::upsert(key, Bytes::copy_from_slice(value), Some(version)).with_ttl(ttl);
        Ok(self.apply_batch(conn, std::slice::from_ref(&write)).await?[0])
    }

    /// Deletes `key` only if `version` is newer than the stored version, leaving a tombstone.
    pub async fn delete_if_newer<C: SlotRouting>(
        &self,
        conn: &mut C,
        key: &str,
        version: Version,
    ) -> Result<WriteOutcome, GuardError> {
        let write = CacheWrite::delete(key, Some(version));
        Ok(self.apply_batch(conn, std::slice::from_ref(&write)).await?[0])
    }

    /// Applies many writes in one round trip and one transaction (one per hash slot in
    /// cluster mode, sent together) and reports each one's outcome, in input order. Writes
    /// to the same key take effect in input order.
    ///
    /// On an error nothing of a failed transaction took effect, except in the rare case
    /// where Redis ran it and the connection broke before the reply: retrying is safe either
    /// way, because guarded writes are idempotent.
    pub async fn apply_batch<C: SlotRouting>(
        &self,
        conn: &mut C,
        writes: &[CacheWrite],
    ) -> Result<Vec<WriteOutcome>, GuardError> {
        let mut outcomes = vec![WriteOutcome::Applied; writes.len()];
        if writes.is_empty() {
            return Ok(outcomes);
        }
        let plan = self.plan(writes);
        let form = if self.inline_values || (!self.cluster && writes.len() < self.inline_below) {
            Form::Inline { send_text: false }
        } else {
            Form::Transaction
        };
        if !self.cluster {
            let calls: Vec<&Call> = plan.iter().collect();
            for (index, outcome) in self.run_calls(conn, writes, &calls, form).await? {
                outcomes[index] = outcome;
            }
            return Ok(outcomes);
        }
        // Keys of different slots need no order between them: each slot's calls keep their
        // order, and the slots go out together. Inline, the slots of one node share one
        // pipeline when the connection knows which node serves which slot; a transaction
        // must keep to one slot.
        let mut by_slot: BTreeMap<u16, Vec<&Call>> = BTreeMap::new();
        for call in &plan {
            let first = match call {
                Call::Plain(index) => *index,
                Call::Guarded(indices) => indices[0],
            };
            by_slot
                .entry(cluster_slot(&writes[first].key))
                .or_default()
                .push(call);
        }
        let nodes = match form {
            Form::Inline { .. } => conn.slot_nodes().await,
            Form::Transaction => None,
        };
        // Per group: the slot whose node it goes to, and its calls.
        let mut groups: BTreeMap<u16, (u16, Vec<&Call>)> = BTreeMap::new();
        for (slot, calls) in by_slot {
            let group = nodes.as_ref().map_or(slot, |nodes| nodes.node_of(slot));
            groups
                .entry(group)
                .or_insert_with(|| (slot, Vec::new()))
                .1
                .extend(calls);
        }
        let routed = nodes.is_some();
        let results = futures::future::try_join_all(groups.into_values().map(|(slot, calls)| {
            let conn = conn.clone();
            async move {
                if routed {
                    let mut conn = conn.on_node(slot);
                    self.run_calls(&mut conn, writes, &calls, form).await
                } else {
                    let mut conn = conn;
                    self.run_calls(&mut conn, writes, &calls, form).await
                }
            }
        }))
        .await?;
        for (index, outcome) in results.into_iter().flatten() {
            outcomes[index] = outcome;
        }
        Ok(outcomes)
    }

    /// Runs `calls` in order in `form` (one transaction, or one pipeline of whole-write
    /// script calls). Returns the writes that did not apply, with their outcomes.
    async fn run_calls<C: ConnectionLike>(
        &self,
        conn: &mut C,
        writes: &[CacheWrite],
        calls: &[&Call],
        form: Form,
    ) -> Result<Vec<(usize, WriteOutcome)>, GuardError> {
        let (pipe, replies_wanted) = self.pipeline(writes, calls, form);
        let replies: Vec<Value> = match pipe.query_async(conn).await {
            // Inline, a lost script cache is harmless: nothing of a call that met it ran, and
            // calls that ran before it are idempotent, so every call goes again, the first
            // sending the script's text. (A transaction sends the text with its first call.)
            Err(e)
                if form != Form::Transaction
                    && server_error_codes(&e).iter().any(|c| c == "NOSCRIPT") =>
            {
                let (pipe, _) = self.pipeline(writes, calls, Form::Inline { send_text: true });
                pipe.query_async(conn).await?
            }
            result => result?,
        };
        if replies.len() != replies_wanted.len() {
            return Err(GuardError::UnexpectedReply(format!(
                "{} replies for {} commands",
                replies.len(),
                replies_wanted.len()
            )));
        }
        let mut not_applied = Vec::new();
        for (wanted, reply) in replies_wanted.iter().zip(replies) {
            if let Some(indices) = wanted {
                record_outcomes(indices, reply, &mut not_applied)?;
            }
        }
        Ok(not_applied)
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

    /// Cuts a run into script calls of at most `entries_per_call` distinct keys. The n-th
    /// write to a key goes into a call after every call holding its earlier writes, so its
    /// writes keep their order and the script needs no per-key bookkeeping; writes to
    /// different keys need no order between them, so a repeated key adds only a small call.
    fn split_into_calls(&self, writes: &[CacheWrite], run: &[usize], calls: &mut Vec<Call>) {
        let mut seen: HashMap<&str, usize> = HashMap::with_capacity(run.len());
        let mut layers: Vec<Vec<usize>> = Vec::new();
        for &index in run {
            let count = seen.entry(&*writes[index].key).or_insert(0);
            if *count == layers.len() {
                layers.push(Vec::new());
            }
            layers[*count].push(index);
            *count += 1;
        }
        for layer in layers {
            for call in layer.chunks(self.entries_per_call) {
                calls.push(Call::Guarded(call.to_vec()));
            }
        }
    }

    /// The pipeline of `calls` in `form`. Returns, per command, the entries whose outcomes
    /// its reply carries (script calls), in the order the reply lists them.
    fn pipeline(
        &self,
        writes: &[CacheWrite],
        calls: &[&Call],
        form: Form,
    ) -> (Pipeline, Vec<Option<Vec<usize>>>) {
        let mut pipe = redis::pipe();
        if form == Form::Transaction {
            pipe.atomic();
        }
        let mut replies = Vec::new();
        let tombstone_ms = self.tombstone_ttl.as_millis().to_string();
        let mut check_sent = form == Form::Inline { send_text: false };
        let mut restore_sent = false;
        for call in calls {
            match call {
                Call::Plain(index) => {
                    pipe.add_command(plain_command(&writes[*index]));
                    replies.push(None);
                }
                Call::Guarded(indices) => {
                    let check_script = script_call(&CHECK_SCRIPT, &CHECK_SHA, &mut check_sent);
                    let (mut check, ordered, stash) =
                        self.check_call(check_script, writes, indices, &tombstone_ms);
                    if form != Form::Transaction {
                        for &index in &ordered {
                            if let Change::Upsert(value) = &writes[index].change {
                                check.arg(&value[..]);
                            }
                        }
                        pipe.add_command(check);
                        replies.push(Some(ordered));
                        continue;
                    }
                    pipe.add_command(check);
                    let upserts = value_writes(writes, &ordered);
                    replies.push(Some(ordered));
                    if !upserts.is_empty() {
                        replies.extend(upserts.iter().map(|_| None));
                        for cmd in upserts {
                            pipe.add_command(cmd);
                        }
                        let mut restore =
                            script_call(&RESTORE_SCRIPT, &RESTORE_SHA, &mut restore_sent);
                        restore.arg(1).arg(stash);
                        pipe.add_command(restore);
                        replies.push(None);
                    }
                }
            }
        }
        (pipe, replies)
    }

    /// The stash list of a call, in the slot of the call's keys.
    fn stash_key(&self, key: &str) -> String {
        format!("{STASH_PREFIX}{{{}}}", slot_tag(self.bucket_slot(key)))
    }

    /// The check script's call, in the layout `version_guard.lua` documents: entries grouped
    /// by bucket, columns rather than rows, so the script creates few Lua strings per entry.
    /// Returns the entries in the order of the call, and the call's stash list.
    fn check_call(
        &self,
        mut cmd: Cmd,
        writes: &[CacheWrite],
        indices: &[usize],
        tombstone_ms: &str,
    ) -> (Cmd, Vec<usize>, String) {
        let mut by_bucket: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
        for &index in indices {
            by_bucket
                .entry(self.bucket_slot(&writes[index].key))
                .or_default()
                .push(index);
        }
        let ordered: Vec<usize> = by_bucket.values().flatten().copied().collect();
        cmd.arg(ordered.len() + by_bucket.len() + 1);
        for &index in &ordered {
            cmd.arg(&*writes[index].key);
        }
        for &slot in by_bucket.keys() {
            cmd.arg(bucket_name(slot));
        }
        let stash = self.stash_key(&writes[ordered[0]].key);
        cmd.arg(&stash);
        let mut ops = String::with_capacity(ordered.len());
        let mut ttls = Vec::new();
        for &index in &ordered {
            let write = &writes[index];
            ops.push(match (&write.change, write.ttl) {
                (Change::Delete, _) => 'd',
                (Change::Upsert(_), None) => 'u',
                (Change::Upsert(_), Some(ttl)) => {
                    ttls.push(ttl_millis(ttl));
                    't'
                }
            });
        }
        cmd.arg(tombstone_ms).arg(ops);
        for group in by_bucket.values() {
            cmd.arg(group.len());
        }
        for &index in &ordered {
            let version = writes[index]
                .version
                .expect("guarded calls hold versioned writes");
            cmd.arg(version.get());
        }
        for ttl in ttls {
            cmd.arg(ttl);
        }
        (cmd, ordered, stash)
    }
}

/// A call of `script`: `EVAL` with its text the first time in a transaction (`sent` false),
/// `EVALSHA` with its digest after that.
fn script_call(script: &str, sha: &str, sent: &mut bool) -> Cmd {
    if std::mem::replace(sent, true) {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(sha);
        cmd
    } else {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(script);
        cmd
    }
}

/// Every upsert's value, whatever the check decided: one `MSET` for those without expiry,
/// a `SET .. PX` for each with a TTL.
fn value_writes(writes: &[CacheWrite], indices: &[usize]) -> Vec<Cmd> {
    let mut commands = Vec::new();
    let mut mset = redis::cmd("MSET");
    let mut plain = 0;
    for &index in indices {
        let write = &writes[index];
        let Change::Upsert(value) = &write.change else {
            continue;
        };
        match write.ttl {
            None => {
                mset.arg(&*write.key).arg(&value[..]);
                plain += 1;
            }
            Some(_) => commands.push(set_command(write, value)),
        }
    }
    if plain > 0 {
        commands.push(mset);
    }
    commands
}

/// Adds the entries of a script call's reply that did not apply to `not_applied`.
fn record_outcomes(
    indices: &[usize],
    reply: Value,
    not_applied: &mut Vec<(usize, WriteOutcome)>,
) -> Result<(), GuardError> {
    let codes = match reply {
        Value::BulkString(bytes) => bytes,
        Value::SimpleString(s) => s.into_bytes(),
        other => return Err(GuardError::UnexpectedReply(format!("{other:?}"))),
    };
    // An empty reply: every entry applied.
    if codes.is_empty() {
        return Ok(());
    }
    if codes.len() != indices.len() {
        return Err(GuardError::UnexpectedReply(format!(
            "{} outcomes for {} entries",
            codes.len(),
            indices.len()
        )));
    }
    for (&index, code) in indices.iter().zip(codes) {
        match code {
            b'A' => {}
            b'S' => not_applied.push((index, WriteOutcome::Stale)),
            b'D' => not_applied.push((index, WriteOutcome::Duplicate)),
            other => return Err(GuardError::UnexpectedReply(format!("outcome code {other}"))),
        }
    }
    Ok(())
}

fn ttl_millis(ttl: Duration) -> u64 {
    ttl.as_millis().clamp(1, u128::from(u64::MAX)) as u64
}

fn plain_command(write: &CacheWrite) -> Cmd {
    match &write.change {
        Change::Upsert(value) => set_command(write, value),
        Change::Delete => {
            let mut cmd = redis::cmd("DEL");
            cmd.arg(&*write.key);
            cmd
        }
    }
}

/// `SET key value`, with `PX` when the write has a TTL.
fn set_command(write: &CacheWrite, value: &[u8]) -> Cmd {
    let mut cmd = redis::cmd("SET");
    cmd.arg(&*write.key).arg(value);
    if let Some(ttl) = write.ttl {
        cmd.arg("PX").arg(ttl_millis(ttl));
    }
    cmd
}

/// How a group of calls goes to Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    /// One transaction: per call, the check script, native value writes and the restore
    /// script.
    Transaction,
    /// A plain pipeline of whole-write script calls, named by digest; with `send_text` the
    /// first carries the script's text.
    Inline { send_text: bool },
}

#[derive(Debug)]
enum Call {
    Plain(usize),
    Guarded(Vec<usize>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn server_error(reply: &[u8]) -> GuardError {
        let value = redis::parse_redis_value(reply).expect("a RESP error");
        GuardError::Redis(value.extract_error().expect_err("an error reply"))
    }

    #[test]
    fn outages_and_moving_slots_are_transient_and_refusals_are_not() {
        let no_node = GuardError::Redis(RedisError::from((
            redis::ErrorKind::ClusterConnectionNotFound,
            "No connections found",
        )));
        assert!(no_node.is_transient());
        for reply in [
            &b"-MOVED 3999 127.0.0.1:6381\r\n"[..],
            b"-ASK 3999 127.0.0.1:6381\r\n",
            b"-CLUSTERDOWN The cluster is down\r\n",
            b"-LOADING Redis is loading the dataset in memory\r\n",
            b"-OOM command not allowed when used memory > 'maxmemory'.\r\n",
            b"-MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk.\r\n",
            b"-NOAUTH Authentication required.\r\n",
        ] {
            assert!(server_error(reply).is_transient(), "{reply:?}");
        }
        for reply in [
            &b"-ERR Error running script: corrupt version state\r\n"[..],
            b"-NOSCRIPT No matching script\r\n",
            b"-CROSSSLOT Keys in request don't hash to the same slot\r\n",
        ] {
            assert!(!server_error(reply).is_transient(), "{reply:?}");
        }
    }

    #[test]
    fn only_a_corrupt_version_or_a_denied_key_refuses_the_write_itself() {
        for reply in [
            &b"-ERR version guard refused the batch: malformed version state of order:1\r\n"[..],
            b"-NOPERM this user has no permissions to access one of the keys used as arguments\r\n",
            b"-NOPERM No permissions to access a key\r\n",
        ] {
            let error = server_error(reply);
            assert!(error.refuses_this_write(), "{reply:?}");
            assert!(!error.is_transient(), "{reply:?}");
        }
        for reply in [
            &b"-NOPERM this user has no permissions to run the 'evalsha' command\r\n"[..],
            b"-NOPERM this user has no permissions to run the 'keys' command\r\n",
            b"-ERR version guard refused the batch: __vb:{0}: WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
            b"-ERR unknown command 'EVALSHA'\r\n",
            b"-OOM command not allowed when used memory > 'maxmemory'.\r\n",
        ] {
            assert!(!server_error(reply).refuses_this_write(), "{reply:?}");
        }
    }

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
    fn slot_tags_hash_to_their_slot() {
        for slot in [0, 1, 15, 4242, 16383] {
            assert_eq!(cluster_slot(slot_tag(slot)), slot);
        }
        let guard = VersionGuard::new(Duration::ZERO).with_cluster_slots(true);
        for key in ["order:1001", "user:{42}:profile", "ü:1"] {
            assert_eq!(cluster_slot(&guard.bucket_key(key)), cluster_slot(key));
            assert_eq!(cluster_slot(&guard.stash_key(key)), cluster_slot(key));
        }
        let single = VersionGuard::new(Duration::ZERO);
        let buckets: HashSet<String> = (0..1000)
            .map(|i| single.bucket_key(&format!("order:{i}")))
            .collect();
        assert_eq!(buckets.len(), usize::from(SINGLE_SERVER_BUCKETS));
    }

    #[test]
    fn scripts_are_sent_without_comments() {
        assert!(!CHECK_SCRIPT.contains("--"));
        assert!(CHECK_SCRIPT.contains("redis.call('HSET'"));
        assert!(!RESTORE_SCRIPT.contains("--"));
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

        // A repeated key's later write goes into a later call; the others stay together.
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
        assert_eq!(plan, vec![vec![0, 1, 3], vec![2]]);
    }

    #[test]
    fn a_transaction_sends_each_script_text_once() {
        let guard = VersionGuard::new(Duration::from_secs(60));
        let writes = vec![
            CacheWrite::upsert("a", "1", Some(Version::new(1))),
            CacheWrite::upsert("a", "2", Some(Version::new(2))),
            CacheWrite::upsert("a", "3", Some(Version::new(3))),
        ];
        let plan = guard.plan(&writes);
        assert_eq!(plan.len(), 3, "one call per write of the repeated key");
        let calls: Vec<&Call> = plan.iter().collect();
        let (pipe, _) = guard.pipeline(&writes, &calls, Form::Transaction);
        let packed = String::from_utf8_lossy(&pipe.get_packed_pipeline()).into_owned();
        assert_eq!(packed.matches(CHECK_SCRIPT.as_str()).count(), 1);
        assert_eq!(packed.matches(RESTORE_SCRIPT.as_str()).count(), 1);
        assert_eq!(packed.matches(CHECK_SHA.as_str()).count(), 2);
        assert_eq!(packed.matches(RESTORE_SHA.as_str()).count(), 2);
        let eval = packed.find("EVAL\r\n").expect("an EVAL");
        let evalsha = packed.find("EVALSHA").expect("an EVALSHA");
        assert!(eval < evalsha, "the text goes first");
    }

    #[test]
    fn the_inline_form_names_the_script_by_digest_and_carries_the_values() {
        let guard = VersionGuard::new(Duration::from_secs(60)).with_inline_values(true);
        let writes = vec![
            CacheWrite::upsert("a", "value-a", Some(Version::new(1))),
            CacheWrite::delete("b", Some(Version::new(1))),
            CacheWrite::upsert("a", "value-a2", Some(Version::new(2))),
        ];
        let plan = guard.plan(&writes);
        let calls: Vec<&Call> = plan.iter().collect();
        let (pipe, replies) = guard.pipeline(&writes, &calls, Form::Inline { send_text: false });
        let packed = String::from_utf8_lossy(&pipe.get_packed_pipeline()).into_owned();
        assert!(
            !packed.contains("MULTI") && !packed.contains("MSET"),
            "{packed}"
        );
        assert!(!packed.contains(CHECK_SCRIPT.as_str()));
        assert_eq!(packed.matches(CHECK_SHA.as_str()).count(), 2);
        assert!(packed.contains("value-a\r\n") && packed.contains("value-a2"));
        assert_eq!(replies.len(), 2);
        let (pipe, _) = guard.pipeline(&writes, &calls, Form::Inline { send_text: true });
        let packed = String::from_utf8_lossy(&pipe.get_packed_pipeline()).into_owned();
        assert_eq!(packed.matches(CHECK_SCRIPT.as_str()).count(), 1);
        assert_eq!(packed.matches(CHECK_SHA.as_str()).count(), 1);
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
