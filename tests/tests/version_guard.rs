//! The version guard against a real Redis.

use std::collections::BTreeMap;
use std::time::Duration;

use fleet::version::Version;
use fleet::version_guard::{version_key, CacheWrite, VersionGuard, WriteOutcome};
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
    let version: String = conn.get(version_key(&key)).await?;
    assert_eq!(version, "3");
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
    assert_eq!(conn.get::<_, String>(version_key(&key)).await?, "5:deleted");
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
    assert_eq!(
        conn.pttl::<_, i64>(version_key(&key)).await?,
        -1,
        "a live entry's version does not expire"
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
        CacheWrite::upsert(&key, "a", None),
        CacheWrite::upsert(&key, "b", None),
    ];
    assert_eq!(
        g.apply_batch(&mut conn, &writes).await?,
        vec![WriteOutcome::Applied; 2]
    );
    assert_eq!(conn.get::<_, String>(&key).await?, "b");
    assert!(
        !conn.exists::<_, bool>(version_key(&key)).await?,
        "no version is recorded"
    );
    g.apply_batch(&mut conn, &[CacheWrite::delete(&key, None)])
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
        CacheWrite::upsert(&a, "a2", Some(Version::new(2))),
        CacheWrite::upsert(&a, "a1", Some(Version::new(1))),
        CacheWrite::upsert(&b, "b5", Some(Version::new(5))),
        CacheWrite::upsert(&a, "a2", Some(Version::new(2))),
        CacheWrite::delete(&b, Some(Version::new(6))),
        CacheWrite::upsert(&b, "b7", Some(Version::new(7))).with_ttl(Some(Duration::from_secs(30))),
        CacheWrite::upsert(&a, "a3", Some(Version::new(3))),
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
    Ok(())
}

/// A change is identified by (key, version); its op and value follow from them, so a
/// duplicate delivery is byte-identical to the original.
fn change(prefix: &str, key: u8, version: u8) -> CacheWrite {
    let name = format!("{prefix}:{key}");
    if (u32::from(version) * 7 + u32::from(key) * 3) % 4 == 0 {
        CacheWrite::delete(name, Some(Version::new(version.into())))
    } else {
        CacheWrite::upsert(
            name,
            format!("{{\"key\":{key},\"version\":{version}}}"),
            Some(Version::new(version.into())),
        )
    }
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
    ) {
        let runtime = RUNTIME.with(|r| r.clone());
        runtime.block_on(async {
            let mut conn = shared_connection().await;
            let prefix = unique_name("prop");
            let guard = VersionGuard::new(Duration::from_secs(600)).with_entries_per_call(entries_per_call);
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
                let version: Option<String> = conn.get(version_key(&name)).await.expect("GET");
                match model.get(&k) {
                    None => {
                        prop_assert_eq!(value, None);
                        prop_assert_eq!(version, None);
                    }
                    Some(&highest) => match change(&prefix, k, highest).change {
                        fleet::version_guard::Change::Delete => {
                            prop_assert_eq!(value, None);
                            prop_assert_eq!(version, Some(format!("{highest}:deleted")));
                        }
                        fleet::version_guard::Change::Upsert(bytes) => {
                            prop_assert_eq!(value.map(String::into_bytes), Some(bytes));
                            prop_assert_eq!(version, Some(highest.to_string()));
                        }
                    },
                }
                let _: () = conn.del(&[name.clone(), version_key(&name)]).await.expect("DEL");
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
