//! order-cacher against real Kafka and Redis: the real binary, end to end and under faults.

mod support;

use std::time::Duration;

use anyhow::{ensure, Result};
use fleet_tests::kafka::{self, Record};
use fleet_tests::private_redis::PrivateCluster;
use fleet_tests::{redis, redis_url, socket_addr_of, wait_for, FaultProxy};
use rdkafka::Message;
use redis::AsyncCommands;
use support::*;

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_reordered_duplicated_messages_end_at_the_highest_versions() -> Result<()> {
    let scenario = Scenario::new("e2e", PARTITIONS).await?;
    let (records, highest) = shuffled_orders(500, 10_000);
    kafka::produce(&kafka::producer()?, &scenario.topic, &records).await?;

    let mut service = scenario.service("").spawn()?;
    service.wait_ready(READY).await?;
    wait_handled(&service, 10_000.0, DRAIN).await?;
    assert_highest_versions(&scenario, &highest).await?;

    let outcome = |o: &str| format!("order_cacher_messages_total{{outcome=\"{o}\"}}");
    let applied = sample(&service, &outcome("applied")).await?;
    let stale = sample(&service, &outcome("stale")).await?;
    let duplicate = sample(&service, &outcome("duplicate")).await?;
    ensure!(
        applied + stale + duplicate == 10_000.0,
        "outcomes add up: {applied} + {stale} + {duplicate}"
    );
    // 9,000 distinct (order, version) pairs plus 1,000 repeats: a repeat is a duplicate, or
    // stale when a newer version got there first; reordering makes some first sends stale too.
    ensure!(
        stale + duplicate >= 1_000.0 && duplicate > 0.0,
        "repeats never apply: stale {stale}, duplicate {duplicate}"
    );
    ensure!(
        (500.0..=9_000.0).contains(&applied),
        "each order applied at least once, each pair at most once: {applied}"
    );
    ensure!(sample(&service, &outcome("dead_lettered")).await? == 0.0);
    let metrics = service.metrics().await?;
    for family in [
        "order_cacher_batch_size_messages_count",
        "order_cacher_redis_write_duration_seconds_count",
        "order_cacher_event_to_cache_lag_seconds_count",
    ] {
        ensure!(
            fleet_tests::process::metric_value(&metrics, family).unwrap_or(0.0) > 0.0,
            "{family} in:\n{metrics}"
        );
    }
    let lags = fleet_tests::process::metric_value(
        &metrics,
        "order_cacher_event_to_cache_lag_seconds_count",
    );
    ensure!(
        lags == Some(10_000.0),
        "every write's lag is observed once: {lags:?}"
    );
    ensure!(
        metrics.contains("order_cacher_rebalances_total{kind=\"assign\"}"),
        "{metrics}"
    );

    service.stop().await?;
    ensure!(
        kafka::committed_total(&scenario.group, &scenario.topic, PARTITIONS).await? == 10_000,
        "every offset committed on shutdown"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_stream_loses_nothing_and_resumes_from_committed_offsets() -> Result<()> {
    let scenario = Scenario::new("kill9", PARTITIONS).await?;
    let (records, highest) = shuffled_orders(400, 10_000);
    kafka::produce(&kafka::producer()?, &scenario.topic, &records).await?;

    // Small batches and frequent commits make a mid-stream kill likely to split a batch;
    // slow Redis writes keep the stream going long enough to kill it mid-way.
    let (service, _redis) = scenario
        .slow_service("batch_size = 50\ncommit_interval_ms = 200")
        .await?;
    let mut first = service.spawn()?;
    first.wait_ready(READY).await?;
    wait_handled(&first, 3_000.0, DRAIN).await?;
    wait_for("an offset commit", DRAIN, || async {
        Ok(
            (sample(&first, "order_cacher_offset_commits_total{result=\"ok\"}").await? > 0.0)
                .then_some(()),
        )
    })
    .await?;
    first.kill9()?;
    let committed = kafka::committed_total(&scenario.group, &scenario.topic, PARTITIONS).await?;
    ensure!(
        (1..10_000).contains(&committed),
        "some offsets were committed before the kill: {committed}"
    );

    restart_and_expect_only_the_uncommitted(&scenario, &highest, 10_000, committed).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_surviving_replica_takes_over_the_partitions_of_a_killed_one() -> Result<()> {
    let scenario = Scenario::new("replicas", PARTITIONS).await?;
    let mut a = scenario.service("").spawn()?;
    let mut b = scenario.service("").spawn()?;
    a.wait_ready(READY).await?;
    b.wait_ready(READY).await?;

    // Both replicas must own partitions before the load starts.
    wait_for("both replicas assigned", DRAIN, || async {
        let a_lag = a.metrics().await?;
        let b_lag = b.metrics().await?;
        Ok((a_lag.contains("rebalances_total{kind=\"assign\"}")
            && b_lag.contains("rebalances_total{kind=\"assign\"}"))
        .then_some(()))
    })
    .await?;

    let (records, highest) = shuffled_orders(300, 9_000);
    let producer = kafka::producer()?;
    let (first_half, second_half) = records.split_at(records.len() / 2);
    kafka::produce(&producer, &scenario.topic, first_half).await?;
    wait_for("both replicas handling messages", DRAIN, || async {
        Ok((handled(&a).await? > 0.0 && handled(&b).await? > 0.0).then_some(()))
    })
    .await?;
    a.kill9()?;
    kafka::produce(&producer, &scenario.topic, second_half).await?;

    wait_highest_versions(&scenario, &highest).await?;
    ensure!(
        sample(&b, "order_cacher_rebalances_total{kind=\"assign\"}").await? >= 2.0,
        "the survivor was assigned the dead replica's partitions"
    );
    b.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_letter_topics_are_created_before_the_first_poison_message() -> Result<()> {
    let scenario = Scenario::new("dlq-create", 1).await?;
    let dlq = format!("{}.dlq", scenario.topic);
    ensure!(
        kafka::partitions_of(&dlq)?.is_none(),
        "{dlq} exists before the service starts"
    );
    let mut service = scenario.service("").spawn()?;
    service.wait_ready(READY).await?;
    wait_for(&format!("{dlq} to exist"), Duration::from_secs(30), || {
        let dlq = dlq.clone();
        async move { Ok(kafka::partitions_of(&dlq)?.map(|_| ())) }
    })
    .await?;
    ensure!(
        service.logs().contains("Dead-letter topic created."),
        "{}",
        service.logs()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_messages_are_dead_lettered_with_their_reason_and_the_partition_flows_on(
) -> Result<()> {
    let scenario = Scenario::new("poison", 1).await?;
    let poison: Vec<(Record, &str)> = vec![
        (Record::value("not json at all"), "not_json"),
        (Record::value("[1, 2, 3]"), "not_object"),
        (
            Record::value(r#"{"version": 1, "amount": 5}"#),
            "missing_field",
        ),
        (Record::value(r#"{"order_id": "p1"}"#), "missing_field"),
        (
            Record::value(r#"{"order_id": "p2", "version": "tomorrow"}"#),
            "invalid_version",
        ),
        (
            Record::value(r#"{"order_id": {"nested": 1}, "version": 2}"#),
            "invalid_field",
        ),
        (
            Record::value(format!(
                r#"{{"order_id": "p3", "version": 1, "pad": "{}"}}"#,
                "y".repeat(3000)
            )),
            "too_large",
        ),
        (
            Record {
                payload: None,
                ..Record::default()
            },
            "missing_field",
        ),
    ];
    let mut records = Vec::new();
    for (i, (record, _)) in poison.iter().enumerate() {
        records.push(record.clone().header("trace-id", &format!("t{i}")));
        records.push(Record::value(order(i, 1)));
    }
    kafka::produce(&kafka::producer()?, &scenario.topic, &records).await?;

    let mut service = scenario
        .service("")
        .config_toml(
            scenario
                .config("")
                .replace("linger_ms = 5", "linger_ms = 5\nmax_message_bytes = 2048"),
        )
        .spawn()?;
    service.wait_ready(READY).await?;
    wait_handled(&service, records.len() as f64, DRAIN).await?;

    let mut conn = redis().await?;
    for i in 0..poison.len() {
        let value: Option<String> = conn.get(scenario.key(i)).await?;
        ensure!(
            value.is_some(),
            "good message {i} after a poison one was written"
        );
    }
    let dlq = format!("{}.dlq", scenario.topic);
    let mut letters = kafka::read(&dlq, poison.len(), Duration::from_secs(30)).await?;
    // Dead letters are not promised in source order: a letter whose produce is retried
    // lands after later ones. Each names its source offset, so match on that.
    letters.sort_by_key(|letter| {
        kafka::header(letter, "x-original-offset").and_then(|offset| offset.parse::<i64>().ok())
    });
    for (i, ((record, reason), letter)) in poison.iter().zip(&letters).enumerate() {
        let got = kafka::header(letter, "x-error-reason");
        ensure!(
            got.as_deref() == Some(*reason),
            "letter {i} has reason {got:?}, expected {reason}"
        );
        ensure!(kafka::header(letter, "x-error").is_some_and(|e| !e.is_empty()));
        ensure!(
            kafka::header(letter, "x-original-topic").as_deref() == Some(scenario.topic.as_str())
        );
        ensure!(kafka::header(letter, "x-original-partition").as_deref() == Some("0"));
        ensure!(
            kafka::header(letter, "x-original-offset") == Some((2 * i).to_string()),
            "letter {i} names its offset"
        );
        ensure!(
            kafka::header(letter, "trace-id") == Some(format!("t{i}")),
            "original headers kept"
        );
        ensure!(
            letter.payload() == record.payload.as_deref(),
            "the message is kept as it was"
        );
    }
    ensure!(dead_lettered(&service).await? == poison.len() as f64);
    ensure!(
        sample(
            &service,
            "order_cacher_dead_letters_total{reason=\"missing_field\"}"
        )
        .await?
            == 3.0
    );
    service.stop().await?;
    ensure!(
        kafka::committed_total(&scenario.group, &scenario.topic, 1).await? == records.len() as i64,
        "the poison messages' offsets advanced"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_letter_refused_again_names_only_its_new_reason_and_origin() -> Result<()> {
    let scenario = Scenario::new("replayed-letter", 1).await?;
    // A letter of another topic, replayed here by an operator with its headers as they were,
    // and still not readable.
    let replayed = Record::value("still not json")
        .header("trace-id", "t1")
        .header("x-error", "an earlier failure")
        .header("x-error-reason", "write_refused")
        .header("x-original-topic", "elsewhere")
        .header("x-original-partition", "5")
        .header("x-original-offset", "77");
    let records = [replayed, Record::value(order(0, 1))];
    kafka::produce(&kafka::producer()?, &scenario.topic, &records).await?;
    let mut service = scenario.service("").spawn()?;
    service.wait_ready(READY).await?;
    wait_handled(&service, records.len() as f64, DRAIN).await?;

    let dlq = format!("{}.dlq", scenario.topic);
    let letters = kafka::read(&dlq, 1, Duration::from_secs(30)).await?;
    let letter = &letters[0];
    let only = |name: &str| kafka::headers_named(letter, name);
    ensure!(
        only("x-error-reason") == ["not_json"],
        "{:?}",
        only("x-error-reason")
    );
    ensure!(only("x-original-topic") == std::slice::from_ref(&scenario.topic));
    ensure!(only("x-original-partition") == ["0"]);
    ensure!(only("x-original-offset") == ["0"]);
    ensure!(only("x-error").len() == 1 && only("x-error")[0] != "an earlier failure");
    ensure!(
        only("trace-id") == ["t1"],
        "the message's own headers are kept"
    );
    ensure!(letter.payload() == Some(&b"still not json"[..]));
    service.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ten_second_redis_cut_loses_nothing_and_memory_stays_bounded() -> Result<()> {
    let scenario = Scenario::new("rediscut", PARTITIONS).await?;
    let (service, proxy) = scenario.service_behind_a_proxy().await?;
    let mut service = service.spawn()?;
    service.wait_ready(READY).await?;

    let (records, highest) = shuffled_orders(500, 20_000);
    let producer = kafka::producer()?;
    let chunks: Vec<&[Record]> = records.chunks(2_000).collect();
    kafka::produce(&producer, &scenario.topic, chunks[0]).await?;
    wait_handled(&service, 1_000.0, DRAIN).await?;

    proxy.cut();
    service.wait_readyz(503, Duration::from_secs(20)).await?;
    let mut peak_rss = 0.0f64;
    for chunk in &chunks[1..] {
        kafka::produce(&producer, &scenario.topic, chunk).await?;
        let rss = sample(&service, "process_resident_memory_bytes").await?;
        peak_rss = peak_rss.max(rss);
        tokio::time::sleep(Duration::from_millis(900)).await;
    }
    service.ensure_not_ready_for("redis").await?;
    let during = handled(&service).await?;
    proxy.restore();

    wait_highest_versions(&scenario, &highest).await?;
    wait_handled(&service, 20_000.0, DRAIN).await?;
    service.wait_ready(Duration::from_secs(30)).await?;
    ensure!(
        during < 20_000.0,
        "nothing was counted as written while Redis was cut: {during}"
    );
    ensure!(
        peak_rss < 96.0 * 1024.0 * 1024.0,
        "RSS stayed bounded during the outage: {peak_rss}"
    );
    ensure!(
        sample(&service, "order_cacher_redis_write_failures_total").await? > 0.0,
        "the outage was seen"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_under_load_commits_what_was_written_and_restart_reprocesses_nothing() -> Result<()>
{
    let scenario = Scenario::new("sigterm", PARTITIONS).await?;
    let (records, highest) = shuffled_orders(400, 10_000);
    kafka::produce(&kafka::producer()?, &scenario.topic, &records).await?;

    // Slow Redis writes keep the load going when SIGTERM comes.
    let (service, _redis) = scenario.slow_service("batch_size = 100").await?;
    let mut first = service.spawn()?;
    first.wait_ready(READY).await?;
    wait_handled(&first, 2_000.0, DRAIN).await?;
    first.stop().await?;
    ensure!(
        first.logs().contains("Offsets committed on shutdown"),
        "{}",
        first.logs()
    );
    let committed = kafka::committed_total(&scenario.group, &scenario.topic, PARTITIONS).await?;
    // Everything the service finished with before exiting is committed, nothing more or less.
    let handled_before_exit = first
        .logs()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|line| line["message"] == "Offsets committed on shutdown.")
        .and_then(|line| line["handled"].as_i64());
    ensure!(
        committed >= 2_000 && handled_before_exit == Some(committed),
        "committed {committed}, handled before exit {handled_before_exit:?}"
    );
    ensure!(committed < 10_000, "SIGTERM came mid-stream: {committed}");

    restart_and_expect_only_the_uncommitted(&scenario, &highest, 10_000, committed).await
}

/// A stop that comes while Redis is away: the writes being retried give way to the shutdown,
/// the service exits 0 well within its grace period, and what it commits is only what it
/// wrote, so a restart after Redis returns writes the rest and nothing is lost.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_redis_outage_exits_at_once_and_commits_only_what_was_written(
) -> Result<()> {
    let scenario = Scenario::new("cutstop", PARTITIONS).await?;
    let (service, proxy) = scenario.service_behind_a_proxy().await?;
    let mut service = service.spawn()?;
    service.wait_ready(READY).await?;
    let (records, highest) = shuffled_orders(500, 6_000);
    let producer = kafka::producer()?;
    kafka::produce(&producer, &scenario.topic, &records[..3_000]).await?;
    wait_handled(&service, 3_000.0, DRAIN).await?;

    proxy.cut();
    kafka::produce(&producer, &scenario.topic, &records[3_000..]).await?;
    service.wait_readyz(503, Duration::from_secs(20)).await?;
    // Long enough for the new messages' batches to be failing and retried.
    tokio::time::sleep(Duration::from_secs(3)).await;
    service.stop_within(Duration::from_secs(10)).await?;
    let committed = kafka::committed_total(&scenario.group, &scenario.topic, PARTITIONS).await?;
    ensure!(
        (3_000..6_000).contains(&committed),
        "committed {committed}: all that was written before the cut, none of what was not"
    );

    proxy.restore();
    restart_and_expect_only_the_uncommitted(&scenario, &highest, 6_000, committed).await
}

#[tokio::test(flavor = "multi_thread")]
async fn tombstones_delete_origin_marked_messages_are_skipped_and_indexes_are_capped() -> Result<()>
{
    let scenario = Scenario::new("features", 1).await?;
    let index = scenario.user_index(3);
    let mut service = scenario.service(&index).spawn()?;
    service.wait_ready(READY).await?;

    let placed = |id: usize, version: u64, minute: u32| {
        Record::value(format!(
            r#"{{"order_id": {id}, "user_id": "u1", "version": {version}, "timestamp": "2023-01-01 10:{minute:02}:00"}}"#
        ))
    };
    let records = vec![
        placed(1, 1, 1),
        placed(2, 1, 2),
        placed(3, 1, 3),
        placed(4, 1, 4),
        placed(5, 1, 5),
        // A versioned tombstone deletes order 1; an older one for order 2 is stale.
        Record {
            key: Some(b"1".to_vec()),
            payload: None,
            ..Record::default()
        }
        .header("version", "2"),
        placed(2, 5, 2),
        Record {
            key: Some(br#"{"order_id": 2}"#.to_vec()),
            payload: None,
            ..Record::default()
        }
        .header("version", "4"),
        // An older upsert must not bring order 1 back.
        placed(1, 1, 1),
        // Changes that came from Redis are skipped, by header or by field.
        placed(6, 1, 6).header("source", "redis"),
        Record::value(r#"{"order_id": 7, "user_id": "u1", "version": 1, "source": "redis"}"#),
    ];
    kafka::produce(&kafka::producer()?, &scenario.topic, &records).await?;
    wait_handled(&service, records.len() as f64, DRAIN).await?;

    let mut conn = redis().await?;
    ensure!(
        conn.get::<_, Option<String>>(scenario.key(1))
            .await?
            .is_none(),
        "order 1 deleted"
    );
    let two: String = conn.get(scenario.key(2)).await?;
    ensure!(
        two.contains("\"version\": 5"),
        "stale tombstone ignored: {two}"
    );
    for id in [6, 7] {
        ensure!(
            conn.get::<_, Option<String>>(scenario.key(id))
                .await?
                .is_none(),
            "order {id} skipped"
        );
    }
    ensure!(
        sample(
            &service,
            "order_cacher_messages_total{outcome=\"skipped_origin\"}"
        )
        .await?
            == 2.0
    );
    let recent: Vec<String> = conn
        .zrevrange(format!("{}:user:u1:orders", scenario.prefix), 0, -1)
        .await?;
    ensure!(
        recent == vec![scenario.key(5), scenario.key(4), scenario.key(3)],
        "the three latest orders by timestamp: {recent:?}"
    );

    // A delete takes the order out of its index; one that does not apply leaves it there.
    let tombstone = |id: usize, version: &str| {
        Record {
            key: Some(id.to_string().into_bytes()),
            payload: None,
            ..Record::default()
        }
        .header("version", version)
    };
    let more = vec![
        tombstone(5, "2"),
        tombstone(4, "1"),
        // Created and deleted in quick succession, most likely in one batch.
        placed(8, 1, 8),
        tombstone(8, "2"),
    ];
    kafka::produce(&kafka::producer()?, &scenario.topic, &more).await?;
    wait_handled(&service, (records.len() + more.len()) as f64, DRAIN).await?;
    let recent: Vec<String> = conn
        .zrevrange(format!("{}:user:u1:orders", scenario.prefix), 0, -1)
        .await?;
    ensure!(
        recent == vec![scenario.key(4), scenario.key(3)],
        "deleted orders leave the index, the duplicate delete changes nothing: {recent:?}"
    );
    ensure!(conn
        .get::<_, Option<String>>(scenario.key(8))
        .await?
        .is_none());
    Ok(())
}

/// Without a version field a write is last-writer-wins, so a replica must not write a
/// partition's messages once it has lost that partition. Here replica A holds a batch of both
/// partitions while its Redis is cut; B joins and takes one partition, re-reads it from the
/// last commit and writes it through newer messages; then A's Redis comes back. A must drop
/// what it held of the partition it lost, or B's keys go back to older data.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_never_writes_a_partition_it_lost_even_without_versions() -> Result<()> {
    let scenario = Scenario::new("revoke", 2).await?;
    let config = scenario.unversioned_config("");
    let redis_link = FaultProxy::start(socket_addr_of(&redis_url())).await?;
    let replica = |redis: String| service_with(config.clone()).env("REDIS_URL", redis);
    let mut a = replica(format!("redis://{}", redis_link.addr())).spawn()?;
    a.wait_ready(READY).await?;
    wait_for("A assigned", DRAIN, || async {
        Ok(
            (sample(&a, "order_cacher_rebalances_total{kind=\"assign\"}").await? >= 1.0)
                .then_some(()),
        )
    })
    .await?;

    const ORDERS: usize = 20;
    // Every order in round n carries "version": n; order i is on partition i % 2.
    let round = |n: u64| -> Vec<Record> {
        (0..ORDERS)
            .map(|id| Record::value(order(id, n)).partition((id % 2) as i32))
            .collect()
    };
    let producer = kafka::producer()?;
    kafka::produce(&producer, &scenario.topic, &round(1)).await?;
    wait_handled(&a, ORDERS as f64, DRAIN).await?;

    redis_link.cut();
    kafka::produce(&producer, &scenario.topic, &round(2)).await?;
    // A fetches round 2 and holds it, unable to write it.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut b = replica(redis_url()).spawn()?;
    b.wait_ready(READY).await?;
    wait_for("a partition moved from A to B", DRAIN, || async {
        Ok(
            (sample(&a, "order_cacher_rebalances_total{kind=\"revoke\"}").await? >= 1.0
                && sample(&b, "order_cacher_rebalances_total{kind=\"assign\"}").await? >= 1.0)
                .then_some(()),
        )
    })
    .await?;
    kafka::produce(&producer, &scenario.topic, &round(3)).await?;
    // B writes rounds 2 and 3 of its partition.
    wait_handled(&b, ORDERS as f64, DRAIN).await?;

    redis_link.restore();
    // A writes what it held of the partition it kept, then round 3 of it. A's keys reach
    // round 3 only after that held batch, so once every key is at 3 nothing older is left.
    let highest = (0..ORDERS).map(|id| (id, 3)).collect();
    wait_highest_versions(&scenario, &highest).await?;
    ensure!(
        a.logs().contains("revoked since they were read"),
        "A dropped what it held of the lost partition:\n{}",
        a.logs()
    );
    a.stop().await?;
    b.stop().await?;
    Ok(())
}

/// Without a version field a write is last-writer-wins, so an unversioned topic's batches must
/// reach Redis in order, even when an outage holds several of them and their retries race.
#[tokio::test(flavor = "multi_thread")]
async fn an_unversioned_topic_keeps_its_order_through_redis_outages() -> Result<()> {
    let scenario = Scenario::new("lww-order", 1).await?;
    let config = scenario.unversioned_config("").replace(
        "linger_ms = 5",
        "linger_ms = 5\nbatch_size = 10\nbatches_in_flight = 3",
    );
    let redis_link = FaultProxy::start(socket_addr_of(&redis_url())).await?;
    let mut service = service_with(config)
        .env("REDIS_URL", format!("redis://{}", redis_link.addr()))
        .spawn()?;
    service.wait_ready(READY).await?;

    const ORDERS: usize = 10;
    let producer = kafka::producer()?;
    let mut round = 0;
    // Each outage holds three rounds of every order in several batches. Retries are
    // jittered, so batches written side by side would land in any order once Redis is back,
    // and an older round would end on top in most outages.
    for outage in 1..=3 {
        redis_link.cut();
        let records: Vec<Record> = (round + 1..=round + 3)
            .flat_map(|n| (0..ORDERS).map(move |id| Record::value(order(id, n))))
            .collect();
        kafka::produce(&producer, &scenario.topic, &records).await?;
        // Long enough for a few retries of whatever the service holds.
        tokio::time::sleep(Duration::from_secs(3)).await;
        redis_link.restore();
        round += 3;
        wait_handled(&service, (round as usize * ORDERS) as f64, DRAIN).await?;
        let last = (0..ORDERS).map(|id| (id, round)).collect();
        if let Err(e) = assert_highest_versions(&scenario, &last).await {
            anyhow::bail!("after outage {outage}, not every order holds its last message: {e}");
        }
    }
    ensure!(
        sample(&service, "order_cacher_redis_write_failures_total").await? > 0.0,
        "the outages were seen"
    );
    ensure!(
        service
            .logs()
            .contains("batches holding them are written one at a time"),
        "the start-up log says the topic's batches are not written side by side:\n{}",
        service.logs()
    );
    service.stop().await?;
    Ok(())
}

/// Once a delete has applied, nothing says which indexes held the entry, so a crash between
/// the delete and its index removal would leave the entry in them for good. Here Redis
/// refuses `ZREM` to the first replica (an ACL), which stands for a crash at that point: it
/// is killed while it retries. The replica after it, with full rights, must leave the index
/// without the deleted order.
#[tokio::test(flavor = "multi_thread")]
async fn a_delete_interrupted_before_its_index_removal_still_leaves_the_index_clean() -> Result<()>
{
    let scenario = Scenario::new("index-crash", 1).await?;
    let index_key = format!("{}:user:u1:orders", scenario.prefix);
    let config = scenario.config(&format!(
        "[[topics.indexes]]\nkey_template = \"{}:user:{{user_id}}:orders\"\n",
        scenario.prefix
    ));
    let mut conn = redis().await?;
    let user = scenario.prefix.replace('-', "_");
    let no_zrem = fleet_tests::redis_acl_user(&user, "no-zrem", &["zrem"]).await?;
    let mut first = service_with(config.clone())
        .env("REDIS_URL", no_zrem)
        .spawn()?;
    first.wait_ready(READY).await?;

    let producer = kafka::producer()?;
    let placed = Record::value(
        r#"{"order_id": 1, "user_id": "u1", "version": 1, "timestamp": "2023-01-01 10:01:00"}"#,
    );
    kafka::produce(&producer, &scenario.topic, &[placed]).await?;
    wait_handled(&first, 1.0, DRAIN).await?;
    let members: Vec<String> = conn.zrange(&index_key, 0, -1).await?;
    ensure!(members == [scenario.key(1)], "indexed: {members:?}");

    let tombstone = Record {
        key: Some(b"1".to_vec()),
        payload: None,
        ..Record::default()
    }
    .header("version", "2");
    kafka::produce(&producer, &scenario.topic, &[tombstone]).await?;
    wait_for("a refused index removal", DRAIN, || async {
        Ok((sample(&first, "order_cacher_redis_write_failures_total").await? > 0.0).then_some(()))
    })
    .await?;
    first.kill9()?;

    let mut second = service_with(config).spawn()?;
    second.wait_ready(READY).await?;
    wait_for("both messages committed", DRAIN, || async {
        Ok((kafka::committed_total(&scenario.group, &scenario.topic, 1).await? == 2).then_some(()))
    })
    .await?;
    ensure!(
        conn.get::<_, Option<String>>(scenario.key(1))
            .await?
            .is_none(),
        "order 1 deleted"
    );
    let members: Vec<String> = conn.zrange(&index_key, 0, -1).await?;
    ensure!(
        members.is_empty(),
        "the deleted order left its index: {members:?}"
    );
    second.stop().await?;
    fleet_tests::delete_redis_acl_user(&user).await
}

#[tokio::test(flavor = "multi_thread")]
async fn on_a_redis_cluster_orders_end_at_their_highest_versions_and_indexes_stay_clean(
) -> Result<()> {
    let cluster = PrivateCluster::start().await?;
    let scenario = Scenario::new("cluster", PARTITIONS).await?;
    let index = scenario.user_index(5);
    let (mut records, mut highest) = shuffled_orders(300, 3_000);
    // Order 0 is deleted at a version above all of its upserts, wherever it lands among them.
    let deleted_at = highest[&0] + 1;
    records.push(
        Record {
            key: Some(b"0".to_vec()),
            payload: None,
            ..Record::default()
        }
        .header("version", &deleted_at.to_string())
        .partition(0),
    );
    highest.remove(&0);
    kafka::produce(&kafka::producer()?, &scenario.topic, &records).await?;

    let mut service = scenario.service(&index).on_cluster(&cluster).spawn()?;
    service.wait_ready(READY).await?;
    wait_handled(&service, records.len() as f64, DRAIN).await?;

    let mut conn = cluster.client().await?;
    assert_highest_versions_on(&mut conn, &scenario, &highest).await?;
    ensure!(
        conn.get::<_, Option<String>>(scenario.key(0))
            .await?
            .is_none(),
        "the deleted order stays deleted"
    );
    // Orders of user_<id % 97>: each index holds the newest 5 of its live orders, never order 0.
    for user in 0..97 {
        let index_key = format!("{}:user:user_{user}:orders", scenario.prefix);
        let members: Vec<String> = conn.zrange(&index_key, 0, -1).await?;
        let live = highest.keys().filter(|id| *id % 97 == user).count();
        ensure!(
            members.len() == live.min(5),
            "{index_key} holds {members:?}, expected {} entries",
            live.min(5)
        );
        ensure!(
            !members.contains(&scenario.key(0)),
            "{index_key} still lists the deleted order"
        );
    }
    // The keys are spread over every node.
    for node in &cluster.nodes {
        let keys: i64 = redis::cmd("DBSIZE")
            .query_async(&mut node.connect().await?)
            .await?;
        ensure!(keys > 0, "{} holds no keys", node.url);
    }
    let outcome = |o: &str| format!("order_cacher_messages_total{{outcome=\"{o}\"}}");
    let mut total = 0.0;
    for o in ["applied", "stale", "duplicate"] {
        total += sample(&service, &outcome(o)).await?;
    }
    ensure!(
        total == records.len() as f64,
        "every message applied, stale or duplicate: {total}"
    );
    service.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_cluster_master_failing_over_mid_stream_loses_nothing() -> Result<()> {
    // Two replicas each, so a promoted replica still has one to confirm writes.
    let mut cluster = PrivateCluster::start_with_replicas(2).await?;
    let scenario = Scenario::new("cluster-failover", PARTITIONS).await?;
    let cluster_seed = cluster.nodes[0].url.clone();
    // Writes count once a replica holds them: the master that dies takes along any writes
    // it had not passed on yet. The master the service was pointed at dies; until its replica
    // has taken over, writes to its slots fail and are retried, and the other seeds lead the
    // client back.
    let builder = scenario.service("").on_cluster(&cluster);
    let mut killed = String::new();
    let kill_the_seed = async {
        killed = cluster.kill_a_master().await?;
        ensure!(
            killed == cluster_seed,
            "the seed {cluster_seed} is a master"
        );
        Ok(())
    };
    let (mut service, highest) =
        produce_across_a_failover(&scenario, builder, kill_the_seed).await?;
    wait_handled(&service, 6_000.0, DRAIN).await?;
    assert_highest_versions_on(&mut cluster.client().await?, &scenario, &highest)
        .await
        .map_err(|e| e.context(format!("after {killed} was killed")))?;
    service.stop().await?;
    Ok(())
}

/// Redis behind Sentinel: the master crashes mid-stream, the sentinel promotes its replica,
/// and the service finds the new master by asking the sentinel again. Writes count once a
/// replica holds them (`wait_replicas = 1`), so they wait, not ready, until the old master is
/// back as the new one's replica; then everything drains to the new master, nothing lost.
#[tokio::test(flavor = "multi_thread")]
async fn behind_sentinel_a_crashed_master_is_replaced_by_the_one_sentinel_names_without_loss(
) -> Result<()> {
    let mut sentinel = fleet_tests::private_redis::PrivateSentinel::start().await?;
    let scenario = Scenario::new("sentinel", PARTITIONS).await?;
    let first_master = sentinel.master_address().await?;
    let builder = scenario.service("").on_sentinel(&sentinel);
    let crash = async { sentinel.master.kill() };
    let (mut service, highest) = produce_across_a_failover(&scenario, builder, crash).await?;
    service.wait_readyz(503, Duration::from_secs(20)).await?;
    wait_for(
        "the sentinel to promote the replica",
        Duration::from_secs(30),
        || async {
            let now = sentinel.master_address().await?;
            Ok((now != first_master).then_some(()))
        },
    )
    .await?;
    // The old master comes back, and the sentinel makes it the new master's replica.
    sentinel.master.start_again().await?;
    wait_handled(&service, 6_000.0, DRAIN).await?;
    service.wait_ready(Duration::from_secs(30)).await?;
    assert_highest_versions_on(&mut sentinel.replica.connect().await?, &scenario, &highest)
        .await
        .map_err(|e| e.context("on the promoted replica"))?;
    ensure!(
        dead_lettered(&service).await? == 0.0,
        "nothing dead-lettered"
    );
    ensure!(
        service
            .logs()
            .contains("Connected to the master Sentinel names."),
        "{}",
        service.logs()
    );
    service.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_out_of_memory_is_waited_out_as_not_ready_and_loses_nothing() -> Result<()> {
    let server =
        fleet_tests::private_redis::PrivateRedis::start(&["--maxmemory-policy", "noeviction"])
            .await?;
    let scenario = Scenario::new("oom", PARTITIONS).await?;
    let mut service = scenario.service("").env("REDIS_URL", &server.url).spawn()?;
    service.wait_ready(READY).await?;
    let (records, highest) = shuffled_orders(300, 6_000);
    let (before, after) = records.split_at(1_000);
    let producer = kafka::producer()?;
    kafka::produce(&producer, &scenario.topic, before).await?;
    wait_handled(&service, before.len() as f64, DRAIN).await?;

    // Redis fills up: it still answers PING, but refuses every write (OOM).
    let mut conn = server.connect().await?;
    let used: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut conn)
        .await?;
    let used: u64 = used
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .expect("used_memory")
        .trim()
        .parse()?;
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(used / 2)
        .query_async::<()>(&mut conn)
        .await?;
    kafka::produce(&producer, &scenario.topic, after).await?;
    service.wait_readyz(503, Duration::from_secs(20)).await?;
    let full_since = std::time::Instant::now();
    while full_since.elapsed() < Duration::from_secs(8) {
        service.ensure_not_ready_for("redis_writes").await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let during = handled(&service).await?;
    ensure!(
        during < records.len() as f64,
        "nothing counted as written while Redis was full: {during}"
    );

    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(0)
        .query_async::<()>(&mut conn)
        .await?;
    wait_handled(&service, records.len() as f64, DRAIN).await?;
    service.wait_ready(Duration::from_secs(30)).await?;
    assert_highest_versions_on(&mut conn, &scenario, &highest).await?;
    service.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_redis_refuses_is_dead_lettered_and_its_partition_flows_on() -> Result<()> {
    let scenario = Scenario::new("refused", 1).await?;
    // A corrupt stored version of order 3's key: Redis refuses every write of it, which
    // no retry can help (unlike an outage).
    let mut conn = redis().await?;
    let _: () = conn
        .set(
            fleet::version_guard::version_key(&scenario.key(3)),
            "not a version",
        )
        .await?;
    let mut records: Vec<Record> = (0..10).map(|i| Record::value(order(i, 1))).collect();
    // The letters keep the whole message: its Kafka key and headers too.
    records[3] = Record {
        key: Some(b"k3".to_vec()),
        ..Record::value(order(3, 1))
    }
    .header("trace-id", "t3");
    // And a tombstone of order 3, whose letter must keep the key that names what it deletes,
    // and the header that gives its version.
    records.push(
        Record {
            key: Some(b"3".to_vec()),
            payload: None,
            ..Record::default()
        }
        .header("version", "2"),
    );
    kafka::produce(&kafka::producer()?, &scenario.topic, &records).await?;
    let mut service = scenario.service("").spawn()?;
    service.wait_ready(READY).await?;
    wait_handled(&service, records.len() as f64, DRAIN).await?;

    for i in (0..10).filter(|&i| i != 3) {
        let value: Option<String> = conn.get(scenario.key(i)).await?;
        ensure!(
            value.is_some(),
            "order {i}, beside the refused one, is written"
        );
    }
    let refused: Option<String> = conn.get(scenario.key(3)).await?;
    ensure!(refused.is_none(), "the refused write wrote nothing");
    let dlq = format!("{}.dlq", scenario.topic);
    let mut letters = kafka::read(&dlq, 2, Duration::from_secs(30)).await?;
    letters.sort_by_key(|letter| kafka::header(letter, "x-original-offset"));
    for letter in &letters {
        ensure!(kafka::header(letter, "x-error-reason").as_deref() == Some("write_refused"));
        ensure!(
            kafka::header(letter, "x-error").is_some_and(|e| e.contains("malformed version state")),
            "{:?}",
            kafka::header(letter, "x-error")
        );
    }
    // Offsets "10" and "3" sort as text.
    let (tombstone, upsert) = (&letters[0], &letters[1]);
    ensure!(kafka::header(upsert, "x-original-offset").as_deref() == Some("3"));
    ensure!(
        upsert.payload() == Some(&order(3, 1)[..]),
        "the message is kept"
    );
    ensure!(
        upsert.key() == Some(&b"k3"[..])
            && kafka::header(upsert, "trace-id").as_deref() == Some("t3"),
        "the upsert keeps its key and headers: {:?} {:?}",
        upsert.key(),
        kafka::header(upsert, "trace-id")
    );
    ensure!(kafka::header(tombstone, "x-original-offset").as_deref() == Some("10"));
    ensure!(
        tombstone.key() == Some(&b"3"[..]) && tombstone.payload().is_none(),
        "the tombstone keeps its key"
    );
    ensure!(
        kafka::header(tombstone, "version").as_deref() == Some("2"),
        "the tombstone keeps its version header"
    );
    ensure!(
        sample(
            &service,
            "order_cacher_dead_letters_total{reason=\"write_refused\"}"
        )
        .await?
            == 2.0
    );
    ensure!(sample(&service, "order_cacher_messages_total{outcome=\"applied\"}").await? == 9.0);
    service.stop().await?;
    ensure!(
        kafka::committed_total(&scenario.group, &scenario.topic, 1).await? == records.len() as i64,
        "the partition's offset went past the refused message"
    );
    Ok(())
}

/// The read-back that makes a `write_refused` letter whole, on its own: a message still in
/// its partition comes back with its key, value and headers; one that retention deleted
/// leaves its letter as the batch had it, at once rather than after the whole wait.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_writes_message_is_read_back_whole_unless_it_is_gone() -> Result<()> {
    use order_cacher::dead_letter::{DeadLetter, DeadLetterProducer, Refusal, READ_BACK_WAIT};
    let topic = fleet_tests::unique_name("read-back");
    kafka::create_topic(&topic, 1).await?;
    let records: Vec<Record> = (0..4)
        .map(|i| {
            Record {
                key: Some(format!("k{i}").into_bytes()),
                ..Record::value(order(i, 1))
            }
            .header("trace-id", &format!("t{i}"))
        })
        .collect();
    kafka::produce(&kafka::producer()?, &topic, &records).await?;
    kafka::delete_records_before(&topic, 0, 2).await?;

    let letter = |offset: i64| DeadLetter {
        topic: format!("{topic}.dlq"),
        source_topic: topic.clone(),
        partition: 0,
        offset,
        key: None,
        payload: Some(b"what the batch kept".to_vec()),
        headers: None,
        error: Refusal::Write("refused".into()),
    };
    let mut letters = vec![letter(1), letter(3)];
    let config = fleet::config::KafkaConfig {
        brokers: fleet_tests::kafka_brokers(),
        ..Default::default()
    };
    let started = std::time::Instant::now();
    DeadLetterProducer::new(&config)?
        .read_back_messages(&mut letters, &fleet::Shutdown::new())
        .await;
    ensure!(
        started.elapsed() < READ_BACK_WAIT / 2,
        "a deleted message was waited for: {:?}",
        started.elapsed()
    );
    let (gone, kept) = (&letters[0], &letters[1]);
    ensure!(gone.key.is_none() && gone.payload.as_deref() == Some(&b"what the batch kept"[..]));
    ensure!(gone.headers.is_none());
    ensure!(kept.key.as_deref() == Some(&b"k3"[..]));
    ensure!(kept.payload.as_deref() == Some(&order(3, 1)[..]));
    let trace_id = kept.headers.as_ref().and_then(|headers| {
        use rdkafka::message::Headers;
        headers
            .iter()
            .find(|h| h.key == "trace-id")
            .and_then(|h| h.value.map(<[u8]>::to_vec))
    });
    ensure!(trace_id.as_deref() == Some(&b"t3"[..]), "{trace_id:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_acl_denying_the_guards_commands_stalls_as_not_ready_rather_than_dead_letters(
) -> Result<()> {
    let scenario = Scenario::new("acl", PARTITIONS).await?;
    let user = fleet_tests::unique_name("oc-acl");
    let password = fleet_tests::unique_name("pw");
    // Every write is refused alike: the server's configuration, not the messages, is wrong.
    let url = fleet_tests::redis_acl_user(&user, &password, &["eval", "evalsha"]).await?;
    let mut service = scenario.service("").env("REDIS_URL", &url).spawn()?;
    service.wait_ready(READY).await?;
    let (records, highest) = shuffled_orders(100, 1_000);
    kafka::produce(&kafka::producer()?, &scenario.topic, &records).await?;
    service.wait_readyz(503, Duration::from_secs(20)).await?;
    // Longer than a write's attempts take: the writes are waited out the whole time.
    let refused_since = std::time::Instant::now();
    while refused_since.elapsed() < Duration::from_secs(8) {
        service.ensure_not_ready_for("redis_writes").await?;
        ensure!(
            handled(&service).await? == 0.0,
            "nothing handled (or dead-lettered) while every write was refused"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    fleet_tests::redis_acl_user(&user, &password, &[]).await?;
    wait_handled(&service, records.len() as f64, DRAIN).await?;
    assert_highest_versions(&scenario, &highest).await?;
    ensure!(
        dead_lettered(&service).await? == 0.0,
        "nothing dead-lettered"
    );
    service.stop().await?;
    fleet_tests::delete_redis_acl_user(&user).await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_index_key_of_another_type_loses_only_its_own_entries() -> Result<()> {
    let scenario = Scenario::new("index-wrongtype", 1).await?;
    // user_5's index key already holds a string: Redis refuses every ZADD to it.
    let mut conn = redis().await?;
    let blocked = format!("{}:user:user_5:orders", scenario.prefix);
    let _: () = conn.set(&blocked, "not a sorted set").await?;
    let records: Vec<Record> = (0..20).map(|i| Record::value(order(i, 1))).collect();
    kafka::produce(&kafka::producer()?, &scenario.topic, &records).await?;
    let mut service = scenario.service(&scenario.user_index(5)).spawn()?;
    service.wait_ready(READY).await?;
    wait_handled(&service, records.len() as f64, DRAIN).await?;

    for i in 0..20 {
        let value: Option<String> = conn.get(scenario.key(i)).await?;
        ensure!(value.is_some(), "order {i} is written");
    }
    // Every other user's index holds its order; the blocked key is left as it was.
    for i in (0..20).filter(|&i| i != 5) {
        let index = format!("{}:user:user_{i}:orders", scenario.prefix);
        let members: Vec<String> = conn.zrange(&index, 0, -1).await?;
        ensure!(members == [scenario.key(i)], "user_{i}: {members:?}");
    }
    ensure!(conn.get::<_, String>(&blocked).await? == "not a sorted set");
    ensure!(
        service
            .logs()
            .contains("Redis refused a batch's index updates"),
        "the refusal is logged"
    );
    service.stop().await?;
    ensure!(
        kafka::committed_total(&scenario.group, &scenario.topic, 1).await? == records.len() as i64,
        "the partition went on"
    );
    Ok(())
}
