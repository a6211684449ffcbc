//! The version guard against a real Redis.

use std::collections::BTreeMap;
use std::time::Duration;

use fleet::version::Version;
use fleet::version_guard::{version_key, CacheWrite, VersionGuard, WriteOutcome};
use fleet_tests::private_redis::{PrivateCluster, PrivateRedis, PrivateSentinel};
use fleet_tests::{redis, unique_name};
use proptest::prelude::*;
use redis::AsyncCommands;

fn guard() -> VersionGuard {
    VersionGuard::new(Duration::from_secs(3600))
}

#[tokio::test]
async fn newer_wins_older_and_duplicates_are_dropped() -> anyhow::Result<()> {
    let mut conn = redis().await?;
    let key = format!("{}:order:1001", unique_name("vg"));
    let g = guard();
    let v3 = br#"{"order_id":"1001","status":"paid","version":3}"#;
    let v2 = br#"{"order_id":"1001","status":"created","version":2}"#;
    assert_eq!(
        g.upsert_if_newer(&mut conn, &key, v3, Version::new(3), None)
            .await?,
        WriteOutcome::Applied
    );
    assert_eq!(
        g.upsert_if_newer(&mut conn, &key, v2, Version::new(2), None)
            .await?,
        WriteOutcome::Stale
    );
    assert_eq!(
        g.upsert_if_newer(&mut conn, &key, v3, Version::new(3), None)
            .await?,
        WriteOutcome::Duplicate
    );
    // Readers do a plain GET and see the JSON as written.
    let stored: Vec<u8> = conn.get(&key).await?;
    assert_eq!(stored, v3);
    assert_eq!(g.stored_state(&mut conn, &key).await?.as_deref(), Some("3"));
    Ok(())
}

#[tokio::test]
async fn delete_leaves_a_tombstone_that_stops_late_upserts() -> anyhow::Result<()> {
    let mut conn = redis().await?;
    let key = format!("{}:user:7", unique_name("vg"));
    let g = guard();
    g.upsert_if_newer(&mut conn, &key, b"{\"v\":1}", Version::new(1), None)
        .await?;
    assert_eq!(
        g.delete_if_newer(&mut conn, &key, Version::new(5)).await?,
        WriteOutcome::Applied
    );
    let value: Option<String> = conn.get(&key).await?;
    assert_eq!(value, None, "GET after a delete returns nothing");
    let exists: bool = conn.exists(&key).await?;
    assert!(!exists);
    // A late upsert older than the delete must not resurrect the key.
    assert_eq!(
        g.upsert_if_newer(&mut conn, &key, b"{\"v\":4}", Version::new(4), None)
            .await?,
        WriteOutcome::Stale
    );
    assert_eq!(conn.get::<_, Option<String>>(&key).await?, None);
    assert_eq!(
        g.stored_state(&mut conn, &key).await?.as_deref(),
        Some("5:deleted")
    );
    let tombstone_ttl: i64 = conn.pttl(version_key(&key)).await?;
    assert!(
        tombstone_ttl > 3_500_000 && tombstone_ttl <= 3_600_000,
        "{tombstone_ttl}"
    );
    // A newer upsert brings it back.
    assert_eq!(
        g.upsert_if_newer(&mut conn, &key, b"{\"v\":6}", Version::new(6), None)
            .await?,
        WriteOutcome::Applied
    );
    assert_eq!(conn.get::<_, String>(&key).await?, "{\"v\":6}");
    assert_eq!(g.stored_state(&mut conn, &key).await?.as_deref(), Some("6"));
    assert!(
        !conn.exists::<_, bool>(version_key(&key)).await?,
        "a live entry's version moves to its bucket, which does not expire"
    );
    Ok(())
}

#[tokio::test]
async fn ttl_applies_to_value_and_version_outlives_it() -> anyhow::Result<()> {
    let mut conn = redis().await?;
    let key = format!("{}:order:ttl", unique_name("vg"));
    let g = guard();
    g.upsert_if_newer(
        &mut conn,
        &key,
        b"{}",
        Version::new(1),
        Some(Duration::from_secs(60)),
    )
    .await?;
    let value_ttl: i64 = conn.pttl(&key).await?;
    let version_ttl: i64 = conn.pttl(version_key(&key)).await?;
    assert!(value_ttl > 59_000 && value_ttl <= 60_000, "{value_ttl}");
    assert!(
        version_ttl > 3_590_000,
        "the version is kept for the tombstone TTL: {version_ttl}"
    );
    // A short TTL really expires the value, and the older write after it is still refused.
    g.upsert_if_newer(
        &mut conn,
        &key,
        b"{\"v\":2}",
        Version::new(2),
        Some(Duration::from_millis(50)),
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(conn.get::<_, Option<String>>(&key).await?, None);
    assert_eq!(
        g.upsert_if_newer(&mut conn, &key, b"{\"v\":1}", Version::new(1), None)
            .await?,
        WriteOutcome::Stale
    );
    Ok(())
}

#[tokio::test]
async fn unversioned_writes_are_last_writer_wins() -> anyhow::Result<()> {
    let mut conn = redis().await?;
    let key = format!("{}:plain", unique_name("vg"));
    let g = guard();
    let writes = vec![
        CacheWrite::upsert(key.as_str(), "a", None),
        CacheWrite::upsert(key.as_str(), "b", None),
    ];
    assert_eq!(
        g.apply_batch(&mut conn, &writes).await?,
        vec![WriteOutcome::Applied; 2]
    );
    assert_eq!(conn.get::<_, String>(&key).await?, "b");
    assert_eq!(
        g.stored_state(&mut conn, &key).await?,
        None,
        "no version is recorded"
    );
    g.apply_batch(&mut conn, &[CacheWrite::delete(key.as_str(), None)])
        .await?;
    assert!(!conn.exists::<_, bool>(&key).await?);
    Ok(())
}

#[tokio::test]
async fn batch_reports_each_outcome_in_order() -> anyhow::Result<()> {
    let mut conn = redis().await?;
    let prefix = unique_name("vg");
    let (a, b) = (format!("{prefix}:a"), format!("{prefix}:b"));
    let g = guard().with_entries_per_call(3);
    let writes = vec![
        CacheWrite::upsert(a.as_str(), "a2", Some(Version::new(2))),
        CacheWrite::upsert(a.as_str(), "a1", Some(Version::new(1))),
        CacheWrite::upsert(b.as_str(), "b5", Some(Version::new(5))),
        CacheWrite::upsert(a.as_str(), "a2", Some(Version::new(2))),
        CacheWrite::delete(b.as_str(), Some(Version::new(6))),
        CacheWrite::upsert(b.as_str(), "b7", Some(Version::new(7)))
            .with_ttl(Some(Duration::from_secs(30))),
        CacheWrite::upsert(a.as_str(), "a3", Some(Version::new(3))),
    ];
    use WriteOutcome::*;
    assert_eq!(
        g.apply_batch(&mut conn, &writes).await?,
        vec![Applied, Stale, Applied, Duplicate, Applied, Applied, Applied]
    );
    assert_eq!(conn.get::<_, String>(&a).await?, "a3");
    assert_eq!(conn.get::<_, String>(&b).await?, "b7");
    assert!(conn.pttl::<_, i64>(&b).await? > 0);
    Ok(())
}

#[tokio::test]
async fn survives_a_flushed_script_cache() -> anyhow::Result<()> {
    let mut conn = redis().await?;
    let key = format!("{}:noscript", unique_name("vg"));
    let g = guard();
    g.upsert_if_newer(&mut conn, &key, b"1", Version::new(1), None)
        .await?;
    redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async::<()>(&mut conn)
        .await?;
    assert_eq!(
        g.upsert_if_newer(&mut conn, &key, b"2", Version::new(2), None)
            .await?,
        WriteOutcome::Applied
    );
    assert_eq!(conn.get::<_, String>(&key).await?, "2");
    // A repeated key takes several script calls in one transaction: the first sends the
    // script text, the later ones name it by digest, right after a flush too.
    redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async::<()>(&mut conn)
        .await?;
    let batch = vec![
        CacheWrite::upsert(key.as_str(), "4", Some(Version::new(4))),
        CacheWrite::upsert(key.as_str(), "3", Some(Version::new(3))),
        CacheWrite::upsert(key.as_str(), "5", Some(Version::new(5))),
    ];
    assert_eq!(
        g.apply_batch(&mut conn, &batch).await?,
        vec![
            WriteOutcome::Applied,
            WriteOutcome::Stale,
            WriteOutcome::Applied
        ]
    );
    assert_eq!(conn.get::<_, String>(&key).await?, "5");
    Ok(())
}

#[tokio::test]
async fn a_stale_upsert_leaves_the_key_exactly_as_it_was() -> anyhow::Result<()> {
    let mut conn = redis().await?;
    let prefix = unique_name("vg");
    let (live, deleted) = (format!("{prefix}:live"), format!("{prefix}:deleted"));
    let g = guard();
    g.upsert_if_newer(
        &mut conn,
        &live,
        b"v5",
        Version::new(5),
        Some(Duration::from_secs(900)),
    )
    .await?;
    g.delete_if_newer(&mut conn, &deleted, Version::new(5))
        .await?;
    use WriteOutcome::*;
    let late = vec![
        CacheWrite::upsert(live.as_str(), "v4", Some(Version::new(4))),
        CacheWrite::upsert(deleted.as_str(), "v4", Some(Version::new(4))),
    ];
    assert_eq!(g.apply_batch(&mut conn, &late).await?, vec![Stale, Stale]);
    let late_with_ttl = vec![
        CacheWrite::upsert(live.as_str(), "v5", Some(Version::new(5)))
            .with_ttl(Some(Duration::from_secs(5))),
        CacheWrite::upsert(deleted.as_str(), "v3", Some(Version::new(3)))
            .with_ttl(Some(Duration::from_secs(5))),
    ];
    assert_eq!(
        g.apply_batch(&mut conn, &late_with_ttl).await?,
        vec![Duplicate, Stale]
    );
    assert_eq!(conn.get::<_, String>(&live).await?, "v5");
    let ttl: i64 = conn.pttl(&live).await?;
    assert!(ttl > 890_000, "the value keeps its own TTL: {ttl}");
    assert!(!conn.exists::<_, bool>(&deleted).await?, "no resurrection");
    let leftovers: Vec<String> = conn.keys(format!("__vkeep:*{prefix}*")).await?;
    assert!(leftovers.is_empty(), "{leftovers:?}");
    Ok(())
}

#[tokio::test]
async fn a_corrupt_version_state_refuses_the_whole_batch_and_changes_nothing() -> anyhow::Result<()>
{
    let mut conn = redis().await?;
    let prefix = unique_name("vg");
    let (good, corrupt) = (format!("{prefix}:good"), format!("{prefix}:corrupt"));
    let g = guard();
    let _: () = conn.set(&good, "before").await?;
    let _: () = conn.set(&corrupt, "before").await?;
    let _: () = conn.set(version_key(&corrupt), "not a version").await?;
    let batch = vec![
        CacheWrite::upsert(good.as_str(), "after", Some(Version::new(1))),
        CacheWrite::upsert(corrupt.as_str(), "after", Some(Version::new(1))),
    ];
    let error = g.apply_batch(&mut conn, &batch).await.unwrap_err();
    assert!(!error.is_transient(), "{error}");
    assert!(
        error.to_string().contains("malformed version state"),
        "{error}"
    );
    assert_eq!(conn.get::<_, String>(&good).await?, "before");
    assert_eq!(conn.get::<_, String>(&corrupt).await?, "before");
    assert_eq!(g.stored_state(&mut conn, &good).await?, None);
    // Alone, the sound write goes through.
    assert_eq!(
        g.apply_batch(&mut conn, &batch[..1]).await?,
        vec![WriteOutcome::Applied]
    );
    assert_eq!(conn.get::<_, String>(&good).await?, "after");
    // Alone (one script call holding one write), the corrupt one is refused all the same.
    let error = g.apply_batch(&mut conn, &batch[1..]).await.unwrap_err();
    assert!(
        error.to_string().contains("malformed version state"),
        "{error}"
    );
    assert_eq!(conn.get::<_, String>(&corrupt).await?, "before");
    Ok(())
}

#[tokio::test]
async fn a_malformed_bucket_field_refuses_a_write_it_would_block_and_yields_to_a_newer_one(
) -> anyhow::Result<()> {
    let mut conn = redis().await?;
    let key = format!("{}:field", unique_name("vg"));
    let g = guard();
    let bucket = g.bucket_key(&key);
    let _: () = conn.set(&key, "before").await?;
    // Longer than any version below, so by length it looks newer than all of them.
    let _: () = conn.hset(&bucket, &key, "not a version").await?;
    let blocked = g
        .upsert_if_newer(&mut conn, &key, b"after", Version::new(12), None)
        .await
        .unwrap_err();
    assert!(!blocked.is_transient(), "{blocked}");
    assert!(
        blocked.to_string().contains("malformed version state"),
        "{blocked}"
    );
    assert_eq!(conn.get::<_, String>(&key).await?, "before");
    // A version that compares newer replaces the field and heals the entry.
    let newer = u64::MAX;
    assert_eq!(
        g.upsert_if_newer(&mut conn, &key, b"after", Version::new(newer), None)
            .await?,
        WriteOutcome::Applied
    );
    assert_eq!(conn.get::<_, String>(&key).await?, "after");
    assert_eq!(
        g.stored_state(&mut conn, &key).await?,
        Some(newer.to_string())
    );
    Ok(())
}

#[tokio::test]
async fn a_version_key_without_expiry_from_an_older_layout_is_honoured() -> anyhow::Result<()> {
    let mut conn = redis().await?;
    let key = format!("{}:legacy", unique_name("vg"));
    let g = guard();
    let _: () = conn.set(&key, "v7").await?;
    let _: () = conn.set(version_key(&key), "7").await?;
    assert_eq!(
        g.upsert_if_newer(&mut conn, &key, b"v6", Version::new(6), None)
            .await?,
        WriteOutcome::Stale
    );
    assert_eq!(
        g.upsert_if_newer(&mut conn, &key, b"v8", Version::new(8), None)
            .await?,
        WriteOutcome::Applied
    );
    assert_eq!(conn.get::<_, String>(&key).await?, "v8");
    assert!(!conn.exists::<_, bool>(version_key(&key)).await?);
    assert_eq!(g.stored_state(&mut conn, &key).await?.as_deref(), Some("8"));
    Ok(())
}

/// `write` with its value padded to about 2 KB.
fn padded(mut write: CacheWrite) -> CacheWrite {
    if let fleet::version_guard::Change::Upsert(value) = &mut write.change {
        let mut longer = value.to_vec();
        longer.extend(std::iter::repeat_n(b' ', 2048));
        *value = longer.into();
    }
    write
}

/// A change is identified by (key, version); its op, value and TTL follow from them, so a
/// duplicate delivery is byte-identical to the original.
fn change(prefix: &str, key: u8, version: u8) -> CacheWrite {
    let name = format!("{prefix}:{key}");
    let mix = u32::from(version) * 7 + u32::from(key) * 3;
    if mix % 4 == 0 {
        CacheWrite::delete(name, Some(Version::new(version.into())))
    } else {
        let ttl = (mix % 3 == 0).then(|| Duration::from_secs(600));
        CacheWrite::upsert(
            name,
            format!("{{\"key\":{key},\"version\":{version}}}"),
            Some(Version::new(version.into())),
        )
        .with_ttl(ttl)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_on_the_same_keys_end_at_the_highest_versions() -> anyhow::Result<()> {
    // Eight connections send interleaved batches of random versioned upserts (with and
    // without TTL) and deletes over twelve keys, as replicas of a consumer would.
    let prefix = unique_name("vg-conc");
    let guard = VersionGuard::new(Duration::from_secs(600)).with_entries_per_call(7);
    let mut tasks = Vec::new();
    for writer in 0..8u64 {
        // Half the writers use the inline form, so both forms meet on the same keys.
        let guard = guard.clone().with_inline_values(writer % 2 == 1);
        let prefix = prefix.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = redis().await?;
            let mut highest: BTreeMap<u8, u8> = BTreeMap::new();
            for round in 0..150u64 {
                let size = 1 + ((writer * 31 + round * 17) % 60) as usize;
                let batch: Vec<(u8, u8)> = (0..size)
                    .map(|_| (rand::random::<u8>() % 12, 1 + rand::random::<u8>() % 250))
                    .collect();
                // Large values make each transaction span several socket reads on the
                // server, the case where commands of different clients could interleave.
                let writes: Vec<CacheWrite> = batch
                    .iter()
                    .map(|&(k, v)| padded(change(&prefix, k, v)))
                    .collect();
                guard.apply_batch(&mut conn, &writes).await?;
                for (k, v) in batch {
                    let top = highest.entry(k).or_insert(v);
                    *top = (*top).max(v);
                }
            }
            anyhow::Ok(highest)
        }));
    }
    let mut highest: BTreeMap<u8, u8> = BTreeMap::new();
    for task in tasks {
        for (k, v) in task.await?? {
            let top = highest.entry(k).or_insert(v);
            *top = (*top).max(v);
        }
    }
    let mut conn = redis().await?;
    for (&k, &v) in &highest {
        let name = format!("{prefix}:{k}");
        let value: Option<String> = conn.get(&name).await?;
        let state = guard.stored_state(&mut conn, &name).await?;
        let write = padded(change(&prefix, k, v));
        match write.change {
            fleet::version_guard::Change::Delete => {
                anyhow::ensure!(value.is_none(), "{name} must stay deleted at {v}");
                anyhow::ensure!(state == Some(format!("{v}:deleted")), "{name}: {state:?}");
            }
            fleet::version_guard::Change::Upsert(bytes) => {
                anyhow::ensure!(
                    value.as_deref().map(str::as_bytes) == Some(&bytes[..]),
                    "{name} at {v}"
                );
                anyhow::ensure!(state == Some(v.to_string()), "{name}: {state:?}");
                let ttl: i64 = conn.pttl(&name).await?;
                anyhow::ensure!((ttl > 0) == write.ttl.is_some(), "{name} PTTL {ttl}");
            }
        }
        let moved_aside = format!("__vkeep:{{{name}}}");
        anyhow::ensure!(!conn.exists::<_, bool>(&moved_aside).await?);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 10_000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Any interleaving, permutation and duplication of versioned upserts and deletes, in
    /// batches of any size, ends in the state of the highest version, and every write's
    /// outcome matches a sequential model.
    #[test]
    fn final_state_is_the_highest_version(
        deliveries in prop::collection::vec((0u8..3, 1u8..12), 1..40),
        batch_size in 1usize..10,
        entries_per_call in 1usize..6,
        // 0: transactions; 1: the inline form; 2: inline for batches under 5 writes.
        form in 0u8..3,
    ) {
        let runtime = RUNTIME.with(|r| r.clone());
        runtime.block_on(async {
            let mut conn = shared_connection().await;
            let prefix = unique_name("prop");
            let guard = VersionGuard::new(Duration::from_secs(600))
                .with_entries_per_call(entries_per_call)
                .with_inline_values(form == 1)
                .with_inline_below(if form == 2 { 5 } else { 0 });
            let writes: Vec<CacheWrite> = deliveries.iter().map(|&(k, v)| change(&prefix, k, v)).collect();

            let mut outcomes = Vec::new();
            for batch in writes.chunks(batch_size) {
                outcomes.extend(guard.apply_batch(&mut conn, batch).await.expect("redis write"));
            }

            let mut model: BTreeMap<u8, u8> = BTreeMap::new();
            for (i, &(k, v)) in deliveries.iter().enumerate() {
                let expected = match model.get(&k) {
                    Some(&cur) if v < cur => WriteOutcome::Stale,
                    Some(&cur) if v == cur => WriteOutcome::Duplicate,
                    _ => { model.insert(k, v); WriteOutcome::Applied }
                };
                prop_assert_eq!(outcomes[i], expected, "delivery {} of {:?}", i, deliveries);
            }

            for k in 0u8..3 {
                let name = format!("{prefix}:{k}");
                let value: Option<String> = conn.get(&name).await.expect("GET");
                let value_ttl: i64 = conn.pttl(&name).await.expect("PTTL");
                let state = guard.stored_state(&mut conn, &name).await.expect("state");
                match model.get(&k) {
                    None => {
                        prop_assert_eq!(value, None);
                        prop_assert_eq!(state, None);
                    }
                    Some(&highest) => {
                        let write = change(&prefix, k, highest);
                        match write.change {
                            fleet::version_guard::Change::Delete => {
                                prop_assert_eq!(value, None);
                                prop_assert_eq!(state, Some(format!("{highest}:deleted")));
                            }
                            fleet::version_guard::Change::Upsert(bytes) => {
                                prop_assert_eq!(value.as_deref().map(str::as_bytes), Some(&bytes[..]));
                                prop_assert_eq!(state, Some(highest.to_string()));
                                // Stale upserts after it put the key back with its own TTL.
                                prop_assert_eq!(value_ttl > 0, write.ttl.is_some(), "PTTL {}", value_ttl);
                            }
                        }
                    }
                }
                let moved_aside = format!("__vkeep:{{{name}}}");
                prop_assert!(!conn.exists::<_, bool>(&moved_aside).await.expect("EXISTS"));
                let _: () = conn.del(&[name.clone(), version_key(&name)]).await.expect("DEL");
                let _: () = conn.hdel(guard.bucket_key(&name), &name).await.expect("HDEL");
            }
            Ok(())
        })?;
    }
}

thread_local! {
    static RUNTIME: std::rc::Rc<tokio::runtime::Runtime> = std::rc::Rc::new(
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime"),
    );
    static CONNECTION: std::cell::RefCell<Option<redis::aio::MultiplexedConnection>> =
        const { std::cell::RefCell::new(None) };
}

async fn shared_connection() -> redis::aio::MultiplexedConnection {
    if let Some(conn) = CONNECTION.with(|c| c.borrow().clone()) {
        return conn;
    }
    let conn = redis().await.expect("connect to Redis");
    CONNECTION.with(|c| *c.borrow_mut() = Some(conn.clone()));
    conn
}

#[tokio::test]
async fn the_inline_form_writes_through_a_lost_script_cache() -> anyhow::Result<()> {
    // A server of its own: flushing the script cache must not disturb the other tests.
    use WriteOutcome::*;
    let server = PrivateRedis::start(&[]).await?;
    let mut conn = server.connect().await?;
    let g = guard().with_inline_values(true);
    g.load(&mut conn).await?;
    let v1 = CacheWrite::upsert("order:1", "v1", Some(Version::new(1)));
    assert_eq!(
        g.apply_batch(&mut conn, std::slice::from_ref(&v1)).await?,
        vec![Applied]
    );
    redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async::<()>(&mut conn)
        .await?;
    let batch = [
        CacheWrite::upsert("order:1", "v3", Some(Version::new(3))),
        v1,
        CacheWrite::upsert("order:2", "v1", Some(Version::new(1)))
            .with_ttl(Some(Duration::from_secs(60))),
        CacheWrite::delete("order:3", Some(Version::new(1))),
    ];
    assert_eq!(
        g.apply_batch(&mut conn, &batch).await?,
        vec![Applied, Stale, Applied, Applied]
    );
    assert_eq!(
        conn.get::<_, Option<String>>("order:1").await?.as_deref(),
        Some("v3")
    );
    assert_eq!(
        conn.get::<_, Option<String>>("order:2").await?.as_deref(),
        Some("v1")
    );
    assert!(conn.pttl::<_, i64>("order:2").await? > 0);
    assert_eq!(
        g.stored_state(&mut conn, "order:3").await?.as_deref(),
        Some("1:deleted")
    );
    Ok(())
}

#[tokio::test]
async fn out_of_memory_is_transient_and_writes_nothing() -> anyhow::Result<()> {
    let server = PrivateRedis::start(&["--maxmemory-policy", "noeviction"]).await?;
    let mut conn = redis::Client::open(server.url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let g = guard();
    g.load(&mut conn).await?;
    let _: () = conn.set("filler", vec![b'x'; 4 << 20]).await?;
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("2mb")
        .query_async::<()>(&mut conn)
        .await?;
    let write = CacheWrite::upsert("order:1", "v1", Some(Version::new(1)));
    let error = g
        .apply_batch(&mut conn, std::slice::from_ref(&write))
        .await
        .unwrap_err();
    assert!(error.is_transient(), "{error}");
    assert!(!conn.exists::<_, bool>("order:1").await?);
    // Memory is freed: the same write goes through.
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("64mb")
        .query_async::<()>(&mut conn)
        .await?;
    assert_eq!(
        g.apply_batch(&mut conn, &[write]).await?,
        vec![WriteOutcome::Applied]
    );
    Ok(())
}

#[tokio::test]
async fn cluster_mode_keeps_every_call_on_one_slot_of_a_real_cluster() -> anyhow::Result<()> {
    let cluster = PrivateCluster::start().await?;
    let guard = VersionGuard::new(Duration::from_secs(600)).with_cluster_slots(true);
    // Keys of every kind: plain, with a hash tag, and keys sharing one tag.
    let keys: Vec<String> = (0..60)
        .map(|i| match i % 3 {
            0 => format!("order:{i}"),
            1 => format!("user:{{{i}}}:profile"),
            _ => format!("cart:{{shared}}:{i}"),
        })
        .collect();
    // Which node serves which slots: [[start, end, [host, port, id], ...], ...].
    let ranges: Vec<Vec<redis::Value>> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut cluster.nodes[0].connect().await?)
        .await?;
    let slots: Vec<(u16, u16, u16)> = ranges
        .iter()
        .map(|range| -> anyhow::Result<(u16, u16, u16)> {
            let number = |v: &redis::Value| match v {
                redis::Value::Int(n) => Ok(*n as u16),
                other => Err(anyhow::anyhow!("not a number: {other:?}")),
            };
            let redis::Value::Array(master) = &range[2] else {
                anyhow::bail!("no master in {range:?}");
            };
            Ok((number(&range[0])?, number(&range[1])?, number(&master[1])?))
        })
        .collect::<anyhow::Result<_>>()?;
    let mut checked = 0;
    for node in &cluster.nodes {
        let mut conn = node.connect().await?;
        let port: u16 = node.url.rsplit(':').next().expect("port").parse()?;
        // This node's keys: a plain connection may only touch slots the node owns.
        let mut mine = Vec::new();
        for key in &keys {
            let slot: u16 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(key)
                .query_async(&mut conn)
                .await?;
            assert_eq!(slot, fleet::version_guard::cluster_slot(key));
            if slots
                .iter()
                .any(|(start, end, owner)| (*start..=*end).contains(&slot) && *owner == port)
            {
                mine.push(key.clone());
            }
        }
        let first: Vec<CacheWrite> = mine
            .iter()
            .map(|k| CacheWrite::upsert(k.as_str(), "v5", Some(Version::new(5))))
            .collect();
        assert!(guard
            .apply_batch(&mut conn, &first)
            .await?
            .iter()
            .all(|o| *o == WriteOutcome::Applied));
        // A stale upsert, a duplicate, a delete and an expiring upsert on the same keys.
        let mut second = Vec::new();
        for (i, key) in mine.iter().enumerate() {
            second.push(match i % 4 {
                0 => CacheWrite::upsert(key.as_str(), "v4", Some(Version::new(4))),
                1 => CacheWrite::upsert(key.as_str(), "v5", Some(Version::new(5))),
                2 => CacheWrite::delete(key.as_str(), Some(Version::new(6))),
                _ => CacheWrite::upsert(key.as_str(), "v7", Some(Version::new(7)))
                    .with_ttl(Some(Duration::from_secs(60))),
            });
        }
        let outcomes = guard.apply_batch(&mut conn, &second).await?;
        for (i, key) in mine.iter().enumerate() {
            let value: Option<String> = conn.get(key).await?;
            let (outcome, expected) = match i % 4 {
                0 => (WriteOutcome::Stale, Some("v5")),
                1 => (WriteOutcome::Duplicate, Some("v5")),
                2 => (WriteOutcome::Applied, None),
                _ => (WriteOutcome::Applied, Some("v7")),
            };
            assert_eq!(outcomes[i], outcome, "{key}");
            assert_eq!(value.as_deref(), expected, "{key}");
            checked += 1;
        }
    }
    assert_eq!(checked, keys.len(), "every key was owned by one node");
    Ok(())
}

/// A connection of the services' kind to `cluster`, every node a seed.
async fn service_connection(
    cluster: &PrivateCluster,
) -> anyhow::Result<fleet::redis_conn::RedisConnection> {
    let config = fleet::config::RedisConfig {
        url: fleet::secret::RedactedUrl::parse(&cluster.nodes[0].url)?,
        cluster_nodes: cluster.nodes[1..]
            .iter()
            .map(|node| fleet::secret::RedactedUrl::parse(&node.url))
            .collect::<Result<_, _>>()?,
        cluster: true,
        ..Default::default()
    };
    Ok(fleet::redis_conn::connect(&config).await?)
}

/// The id of the node serving `slot`, and the ids of all nodes.
async fn slot_owner(
    conn: &mut redis::aio::MultiplexedConnection,
    slot: u16,
) -> anyhow::Result<(String, Vec<String>)> {
    let nodes: String = redis::cmd("CLUSTER").arg("NODES").query_async(conn).await?;
    let mut owner = None;
    let mut ids = Vec::new();
    for line in nodes.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        ids.push(fields[0].to_string());
        for range in &fields[8..] {
            let (start, end) = range.split_once('-').unwrap_or((range, range));
            if (start.parse::<u16>()?..=end.parse::<u16>()?).contains(&slot) {
                owner = Some(fields[0].to_string());
            }
        }
    }
    Ok((owner.expect("every slot is served"), ids))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_batch_goes_one_pipeline_per_node_and_follows_a_slot_that_moved(
) -> anyhow::Result<()> {
    let cluster = PrivateCluster::start().await?;
    let mut conn = service_connection(&cluster).await?;
    let guard = VersionGuard::new(Duration::from_secs(60)).with_cluster_slots(true);
    guard.load(&mut conn).await?;
    let keys: Vec<String> = (0..300).map(|i| format!("pn:{i}")).collect();
    let writes = |version: u64| -> Vec<CacheWrite> {
        keys.iter()
            .map(|k| {
                CacheWrite::upsert(
                    k.as_str(),
                    format!("v{version}"),
                    Some(Version::new(version)),
                )
            })
            .collect()
    };
    let outcomes = guard.apply_batch(&mut conn, &writes(1)).await?;
    assert!(outcomes.iter().all(|o| *o == WriteOutcome::Applied));

    // A slot moves to another node behind the connection's back: the slot map it read is
    // stale, so the pipeline that still carries that slot meets MOVED. That failure is
    // transient, and the batch written again goes where the slot is now.
    // Its slot is below every other key's, so it leads its node's pipeline, which is routed
    // by its first slot: the client's own slot map must be set right as well.
    let lowest = keys
        .iter()
        .map(|k| fleet::version_guard::cluster_slot(k))
        .min()
        .expect("keys");
    let moving = (0..)
        .map(|i| format!("pn:moving:{i}"))
        .find(|k| fleet::version_guard::cluster_slot(k) < lowest)
        .expect("a key in a lower slot");
    let moving = moving.as_str();
    let slot = fleet::version_guard::cluster_slot(moving);
    let mut seed = cluster.nodes[0].connect().await?;
    let (owner, ids) = slot_owner(&mut seed, slot).await?;
    let target = ids
        .iter()
        .find(|id| **id != owner)
        .expect("three nodes")
        .clone();
    for node in &cluster.nodes {
        let _: () = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("NODE")
            .arg(&target)
            .query_async(&mut node.connect().await?)
            .await?;
    }
    let mut batch = writes(2);
    batch.push(CacheWrite::upsert(moving, "v2", Some(Version::new(2))));
    let mut attempts = 0;
    let outcomes = loop {
        attempts += 1;
        match guard.apply_batch(&mut conn, &batch).await {
            Ok(outcomes) => break outcomes,
            Err(e) if e.is_transient() && attempts < 5 => continue,
            Err(e) => return Err(e.into()),
        }
    };
    // A retried batch reports writes its failed attempt made as duplicates.
    assert!(outcomes
        .iter()
        .all(|o| matches!(o, WriteOutcome::Applied | WriteOutcome::Duplicate)));
    let mut reader = cluster.client().await?;
    for key in keys.iter().map(String::as_str).chain([moving]) {
        let value: Option<String> = reader.get(key).await?;
        assert_eq!(value.as_deref(), Some("v2"), "{key}");
    }
    let (now, _) = slot_owner(&mut seed, slot).await?;
    assert_eq!(now, target, "the slot moved");
    Ok(())
}

#[tokio::test]
async fn a_refused_write_leaves_no_trace_in_the_inline_form_and_does_in_the_transaction(
) -> anyhow::Result<()> {
    let prefix = unique_name("vg-trace");
    let mut conn = redis().await?;
    for inline in [false, true] {
        let stale = format!("{prefix}:{inline}:stale");
        let g = guard().with_inline_values(inline);
        g.apply_batch(
            &mut conn,
            &[CacheWrite::upsert(
                stale.as_str(),
                "v5",
                Some(Version::new(5)),
            )],
        )
        .await?;
        let mut events = redis::Client::open(fleet_tests::redis_url())?
            .get_async_pubsub()
            .await?;
        events.psubscribe(format!("__keyspace@*__:{stale}")).await?;
        // A batch large enough for the transaction form, with one stale write in it.
        let mut batch: Vec<CacheWrite> = (0..40)
            .map(|i| {
                CacheWrite::upsert(
                    format!("{prefix}:{inline}:{i}"),
                    "v1",
                    Some(Version::new(1)),
                )
            })
            .collect();
        batch.push(CacheWrite::upsert(
            stale.as_str(),
            "v4",
            Some(Version::new(4)),
        ));
        let outcomes = g.apply_batch(&mut conn, &batch).await?;
        assert_eq!(outcomes.last(), Some(&WriteOutcome::Stale));
        assert_eq!(conn.get::<_, String>(&stale).await?, "v5");
        let mut seen = Vec::new();
        let mut stream = events.on_message();
        while let Ok(Some(message)) = tokio::time::timeout(
            Duration::from_millis(300),
            futures::StreamExt::next(&mut stream),
        )
        .await
        {
            seen.push(message.get_payload::<String>()?);
        }
        if inline {
            assert!(
                seen.is_empty(),
                "inline, the stale write touched its key: {seen:?}"
            );
        } else {
            // The documented side effect of the transaction form.
            assert!(seen.iter().any(|event| event == "rename_from"), "{seen:?}");
        }
    }
    Ok(())
}

/// Behind Sentinel, a writer that is backing off between failed writes follows a master
/// switch the sentinel announces (`+switch-master`) at once, not at its next attempt.
#[tokio::test]
async fn a_writer_backing_off_follows_the_master_a_sentinel_announces_at_once() -> anyhow::Result<()>
{
    use fleet::cache_writer::{CacheWriter, CacheWriterMetrics};
    use fleet::secret::RedactedUrl;

    let sentinel = PrivateSentinel::start().await?;
    let config = fleet::config::RedisConfig {
        // Behind Sentinel only the scheme, credentials and database of `url` are used.
        url: RedactedUrl::parse("redis://127.0.0.1:1/0")?,
        sentinel_master: Some(sentinel.master_name.clone()),
        sentinels: vec![RedactedUrl::parse(&sentinel.sentinel_url)?],
        ..Default::default()
    };
    let metrics = fleet::observability::Metrics::new("sentinel_switch_test")?;
    let shutdown = fleet::shutdown::Shutdown::new();
    let mut writer = CacheWriter::connect(
        &config,
        guard(),
        metrics.readiness(),
        CacheWriterMetrics::register(&metrics)?,
        &shutdown,
    )
    .await
    .ok_or_else(|| anyhow::anyhow!("the writer did not connect"))?;
    let key = format!("{}:user:1", unique_name("sw"));
    let write = |version: u64| {
        [CacheWrite::upsert(
            key.clone(),
            version.to_string().into_bytes(),
            Some(Version::new(version)),
        )]
    };
    writer.try_write(&write(1)).await?;

    // The announcement reaches only a subscriber: wait until the writer's listener is one.
    let to_sentinel = redis::Client::open(sentinel.sentinel_url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    fleet_tests::wait_for(
        "the writer to subscribe to the sentinel",
        Duration::from_secs(10),
        || {
            let mut to_sentinel = to_sentinel.clone();
            async move {
                let clients: String = redis::cmd("CLIENT")
                    .arg("LIST")
                    .query_async(&mut to_sentinel)
                    .await?;
                Ok(clients.lines().any(|c| c.contains(" sub=1 ")).then_some(()))
            }
        },
    )
    .await?;

    sentinel.switch_over().await?;
    // A backoff far longer than the test's patience: only the announcement ends it early.
    let announced = tokio::time::timeout(
        Duration::from_secs(30),
        writer.back_off(Duration::from_secs(600), &shutdown),
    )
    .await
    .map_err(|_| anyhow::anyhow!("the writer slept through the announced switch"))?;
    assert!(announced, "no shutdown was asked");

    writer.try_write(&write(2)).await?;
    let mut new_master = redis::Client::open(sentinel.replica.url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let stored: Option<String> = new_master.get(&key).await?;
    assert_eq!(
        stored.as_deref(),
        Some("2"),
        "the write went to the new master"
    );
    Ok(())
}
