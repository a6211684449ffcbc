//! cache-updater against real RabbitMQ and Redis: the real binary, end to end and under faults.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use fleet_tests::amqp::{self, Message, Publisher};
use fleet_tests::{amqp_url, redis, socket_addr_of, wait_for, FaultProxy};
use redis::AsyncCommands;
use support::*;

/// Every key under the scenario's prefix and its value.
async fn redis_state(prefix: &str) -> Result<BTreeMap<String, String>> {
    let mut conn = redis().await?;
    let keys: Vec<String> = {
        let mut iter: redis::AsyncIter<String> = conn.scan_match(format!("{prefix}:*")).await?;
        let mut keys = Vec::new();
        while let Some(key) = futures::StreamExt::next(&mut iter).await {
            keys.push(key?);
        }
        keys
    };
    let mut state = BTreeMap::new();
    for chunk in keys.chunks(1000) {
        let values: Vec<Option<String>> = conn.mget(chunk).await?;
        for (key, value) in chunk.iter().zip(values) {
            if let Some(value) = value {
                state.insert(key.clone(), value);
            }
        }
    }
    Ok(state)
}

#[tokio::test(flavor = "multi_thread")]
async fn both_message_forms_warm_and_invalidate_leave_exactly_the_expected_redis_state(
) -> Result<()> {
    let s = Scenario::new("cu-e2e");
    let mut service = s.service("prefetch = 200").spawn()?;
    service.wait_ready(READY).await?;
    let publisher = Publisher::new().await?;
    let mut expected = BTreeMap::new();

    // Warm-up: 10,000 entries in one message, written in pipelined batches.
    let entries: Vec<String> = (0..10_000)
        .map(|i| {
            format!(
                r#"{{"key":"{}","value":{{"id":{i},"warm":true}},"version":1}}"#,
                s.key(&format!("warm:{i}"))
            )
        })
        .collect();
    for i in 0..10_000 {
        expected.insert(
            s.key(&format!("warm:{i}")),
            format!(r#"{{"id":{i},"warm":true}}"#),
        );
    }
    let warm = format!(r#"{{"op":"warm","entries":[{}]}}"#, entries.join(","));
    publisher
        .publish(&s.exchange, "cache.update", &[Message::body(warm)])
        .await?;

    let mut messages = Vec::new();
    // Plain entities, mapped by the queue's key template; a newer version wins.
    for id in 0..50 {
        for version in [2, 1] {
            let body = format!(
                r#"{{"product_id": {id}, "product_name": "Product {id} v{version}", "version": {version}}}"#
            );
            if version == 2 {
                expected.insert(s.key(&format!("product:{id}")), body.clone());
            }
            messages.push(Message::body(body));
        }
    }
    // Envelope upserts and deletes.
    for id in 0..50 {
        let key = s.key(&format!("user:{id}"));
        let value = format!(r#"{{"user":{id},"name":"User {id}"}}"#);
        messages.push(Message::body(format!(
            r#"{{"op":"upsert","key":"{key}","value":{value},"version":3,"ttl_secs":3600,"ts":{}}}"#,
            now_ms()
        )));
        if id % 5 == 0 {
            messages.push(Message::body(format!(
                r#"{{"op":"delete","key":"{key}","version":4}}"#
            )));
            // A late upsert cannot resurrect it.
            messages.push(Message::body(format!(
                r#"{{"op":"upsert","key":"{key}","value":{value},"version":2}}"#
            )));
        } else {
            expected.insert(key, value);
        }
    }
    // Invalidate every tenth warmed entry.
    for i in (0..10_000).step_by(10) {
        let key = s.key(&format!("warm:{i}"));
        expected.remove(&key);
        messages.push(Message::body(format!(
            r#"{{"op":"invalidate","key":"{key}"}}"#
        )));
    }
    // Changes that came from Redis are skipped, by header or by field.
    messages.push(
        Message::body(format!(
            r#"{{"op":"upsert","key":"{}","value":1}}"#,
            s.key("origin:header")
        ))
        .header("source", "redis"),
    );
    messages.push(Message::body(
        r#"{"product_id": "origin-field", "version": 1, "source": "redis"}"#,
    ));
    publisher
        .publish(&s.exchange, "product.changed", &messages)
        .await?;
    let total = messages.len() + 1;

    wait_handled(&[&service], total as f64, DRAIN).await?;
    wait_queue_drained(&s.queue, &[&service]).await?;
    let state = redis_state(&s.prefix).await?;
    let missing: Vec<_> = expected
        .iter()
        .filter(|(k, v)| state.get(*k) != Some(*v))
        .take(5)
        .collect();
    let extra: Vec<_> = state
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .take(5)
        .collect();
    ensure!(
        missing.is_empty() && extra.is_empty() && state.len() == expected.len(),
        "Redis holds {} keys, expected {}; wrong or missing: {missing:?}; unexpected: {extra:?}",
        state.len(),
        expected.len()
    );
    let mut conn = redis().await?;
    let ttl: i64 = conn.ttl(s.key("user:1")).await?;
    ensure!(
        (3000..=3600).contains(&ttl),
        "envelope ttl_secs applied: {ttl}"
    );

    let outcome = |op: &str, outcome: &str| {
        format!("cache_updater_messages_total{{op=\"{op}\",outcome=\"{outcome}\"}}")
    };
    ensure!(sample(&service, &outcome("warm", "applied")).await? == 1.0);
    ensure!(sample(&service, &outcome("invalidate", "applied")).await? == 1_000.0);
    ensure!(sample(&service, &outcome("entity", "applied")).await? == 50.0);
    ensure!(sample(&service, &outcome("entity", "stale")).await? == 50.0);
    ensure!(sample(&service, &outcome("upsert", "stale")).await? == 10.0);
    let skipped = sample(&service, &outcome("unknown", "skipped_origin")).await?
        + sample(&service, &outcome("entity", "skipped_origin")).await?;
    ensure!(skipped == 2.0, "origin-marked messages skipped: {skipped}");
    ensure!(
        service
            .metric_sum("cache_updater_dead_letters_total")
            .await?
            == 0.0
    );
    let metrics = service.metrics().await?;
    for family in [
        "cache_updater_redis_write_duration_seconds_count",
        "cache_updater_batch_size_writes_count",
    ] {
        ensure!(
            fleet_tests::process::metric_value(&metrics, family).unwrap_or(0.0) > 0.0,
            "{family} in:\n{metrics}"
        );
    }
    ensure!(
        fleet_tests::process::metric_value(
            &metrics,
            "cache_updater_event_to_cache_lag_seconds_count"
        ) == Some(50.0),
        "lag observed for the 50 envelopes with a ts"
    );
    ensure!(amqp::depth(&s.dead_letter_queue).await? == 0);
    service.stop().await?;
    s.cleanup().await;
    Ok(())
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

#[tokio::test(flavor = "multi_thread")]
async fn unversioned_writes_to_one_key_apply_in_arrival_order_while_keys_run_in_parallel(
) -> Result<()> {
    let s = Scenario::new("cu-order");
    let mut service = s
        .service("prefetch = 1000\nbatch_size = 7\nshards = 8")
        .spawn()?;
    service.wait_ready(READY).await?;
    // Without versions the guard cannot help: only arrival order makes the last one stick.
    let keys = 200usize;
    let rounds = 40u64;
    // One key's writes come back to back, so parallel writers would race on them.
    let messages: Vec<Message> = (0..keys)
        .flat_map(|k| (1..=rounds).map(move |v| (k, v)))
        .map(|(k, v)| {
            Message::body(format!(
                r#"{{"op":"upsert","key":"{}","value":{{"v":{v}}}}}"#,
                s.key(&format!("k:{k}"))
            ))
        })
        .collect();
    Publisher::new()
        .await?
        .publish(&s.exchange, "cache.update", &messages)
        .await?;
    wait_handled(&[&service], messages.len() as f64, DRAIN).await?;
    let highest = (0..keys)
        .map(|k| (s.key(&format!("k:{k}")), rounds))
        .collect();
    let wrong = wrong_versions(&highest).await?;
    ensure!(
        wrong.is_empty(),
        "{} keys do not hold their last write: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );
    service.stop().await?;
    s.cleanup().await;
    Ok(())
}

/// Past one queue's ceiling (one broker process per queue): a consistent-hash exchange spreads
/// keys over queues by their routing key, and since one key always lands on the same queue,
/// unversioned writes still apply in order.
#[tokio::test(flavor = "multi_thread")]
async fn a_consistent_hash_exchange_spreads_keys_over_queues_and_keeps_each_keys_order(
) -> Result<()> {
    let s = Scenario::new("cu-hash");
    let queues = [format!("{}.1", s.queue), format!("{}.2", s.queue)];
    let config = format!(
        r#"
[topology]
exchange = "{exchange}"
exchange_type = "x-consistent-hash"
dead_letter_exchange = "{dlx}"
dead_letter_queue = "{dlq}"

[consumer]
prefetch = 500
batch_size = 20

[[queues]]
name = "{q1}"

[[queues]]
name = "{q2}"
routing_keys = ["2"]
"#,
        exchange = s.exchange,
        dlx = s.dead_letter_exchange,
        dlq = s.dead_letter_queue,
        q1 = queues[0],
        q2 = queues[1],
    );
    let builder = || fleet_tests::ServiceBuilder::new("cache-updater").config_toml(config.clone());
    // The first start declares the topology; the messages then wait in the queues.
    let mut service = builder().spawn()?;
    service.wait_ready(READY).await?;
    service.stop().await?;

    let (keys, rounds) = (300usize, 20u64);
    let key = |k: usize| s.key(&format!("k:{k}"));
    // Round by round, so each key's writes are spread over the whole load.
    let messages: Vec<(String, Message)> = (1..=rounds)
        .flat_map(|v| (0..keys).map(move |k| (k, v)))
        .map(|(k, v)| {
            let body = format!(
                r#"{{"op":"upsert","key":"{}","value":{{"v":{v}}}}}"#,
                key(k)
            );
            (key(k), Message::body(body))
        })
        .collect();
    let routed: Vec<(&str, &Message)> = messages.iter().map(|(k, m)| (k.as_str(), m)).collect();
    Publisher::new()
        .await?
        .publish_routed(&s.exchange, &routed)
        .await?;
    let depths = [
        amqp::depth(&queues[0]).await?,
        amqp::depth(&queues[1]).await?,
    ];
    ensure!(
        depths.iter().sum::<u32>() as usize == messages.len() && depths.iter().all(|&d| d > 0),
        "the exchange spread {} messages as {depths:?}",
        messages.len()
    );

    let mut service = builder().spawn()?;
    service.wait_ready(READY).await?;
    wait_handled(&[&service], messages.len() as f64, DRAIN).await?;
    let last: BTreeMap<String, u64> = (0..keys).map(|k| (key(k), rounds)).collect();
    let wrong = wrong_versions(&last).await?;
    ensure!(
        wrong.is_empty(),
        "{} keys do not hold their last write: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );
    for queue in &queues {
        wait_queue_drained(queue, &[&service]).await?;
    }
    service.stop().await?;
    let names: Vec<&str> = queues.iter().map(String::as_str).collect();
    amqp::delete(&names, &[]).await?;
    s.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn three_replicas_with_reordered_duplicated_versions_end_at_the_highest_versions(
) -> Result<()> {
    let s = Scenario::new("cu-replicas");
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let mut replica = s.service("prefetch = 50\nbatch_size = 20").spawn()?;
        replica.wait_ready(READY).await?;
        replicas.push(replica);
    }
    let (messages, highest) = shuffled_upserts(&s, 300, 9_000);
    Publisher::new()
        .await?
        .publish(&s.exchange, "cache.update", &messages)
        .await?;

    let all: Vec<&fleet_tests::Service> = replicas.iter().collect();
    wait_handled(&all, messages.len() as f64, DRAIN).await?;
    wait_queue_drained(&s.queue, &all).await?;
    let wrong = wrong_versions(&highest).await?;
    ensure!(
        wrong.is_empty(),
        "{} keys not at their highest version: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );
    let mut stale_or_duplicate = 0.0;
    for replica in &replicas {
        ensure!(handled(replica).await? > 0.0, "every replica took messages");
        for outcome in ["stale", "duplicate"] {
            stale_or_duplicate += sample(
                replica,
                &format!("cache_updater_messages_total{{op=\"upsert\",outcome=\"{outcome}\"}}"),
            )
            .await?;
        }
    }
    ensure!(
        stale_or_duplicate >= 900.0,
        "900 repeats never applied: {stale_or_duplicate}"
    );
    for replica in &mut replicas {
        replica.stop().await?;
    }
    s.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_with_the_prefetch_full_loses_nothing_and_redeliveries_are_no_ops() -> Result<()> {
    let s = Scenario::new("cu-kill9");
    declare_topology(&s).await?;
    let (messages, highest) = ordered_upserts(&s, 1_000, 20_000);
    Publisher::new()
        .await?
        .publish(&s.exchange, "cache.update", &messages)
        .await?;
    // Slow Redis round trips keep the prefetch full: deliveries wait for the writers.
    let consumer = "prefetch = 300\nbatch_size = 50";
    let (first, slow_redis) = s.service_behind_a_proxy(consumer).await?;
    slow_redis.set_delay(Duration::from_millis(50));
    let mut first = first.spawn()?;
    first.wait_ready(READY).await?;
    wait_handled(&[&first], 3_000.0, DRAIN).await?;
    // Acks go out in runs, and the broker refills the window a moment later: kill at a
    // moment the window is seen full, not at whatever moment one sample lands on.
    let full_by = Instant::now() + Duration::from_secs(5);
    let unacked = loop {
        let unacked = sample(&first, "cache_updater_unacked_messages").await?;
        if unacked >= 150.0 || Instant::now() > full_by {
            break unacked;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    first.kill9()?;
    ensure!(
        unacked >= 150.0,
        "the prefetch (300) was full at the kill: {unacked} unacked"
    );

    let mut second = s.service(consumer).spawn()?;
    second.wait_ready(READY).await?;
    wait_queue_drained(&s.queue, &[&second]).await?;
    wait_highest_versions(&highest).await?;
    ensure!(
        sample(&second, "cache_updater_redeliveries_total").await? > 0.0,
        "the killed replica's unacked messages came back"
    );
    ensure!(
        second
            .metric_sum("cache_updater_dead_letters_total")
            .await?
            == 0.0
    );
    ensure!(amqp::depth(&s.dead_letter_queue).await? == 0);
    second.stop().await?;
    s.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn amqp_connection_resets_and_cuts_heal_without_loss_or_stale_acks() -> Result<()> {
    let s = Scenario::new("cu-amqpreset");
    declare_topology(&s).await?;
    let (messages, highest) = ordered_upserts(&s, 1_000, 30_000);
    let publisher = Publisher::new().await?;
    publisher
        .publish(&s.exchange, "cache.update", &messages)
        .await?;
    let proxy = FaultProxy::start(socket_addr_of(&amqp_url())).await?;
    // One small-batch writer keeps the stream long enough for resets in its middle.
    let mut service = s
        .service("prefetch = 50\nbatch_size = 5\nshards = 1")
        .env(
            "AMQP_URL",
            format!("amqp://guest:guest@{}/%2f", proxy.addr()),
        )
        .spawn()?;
    service.wait_ready(READY).await?;

    for round in 1..=3 {
        wait_handled(&[&service], 2_000.0 * f64::from(round), DRAIN).await?;
        ensure!(
            amqp::depth(&s.queue).await? > 0,
            "reset {round} came mid-stream"
        );
        proxy.reset_connections();
        tokio::time::sleep(Duration::from_millis(300)).await;
        service.wait_ready(Duration::from_secs(30)).await?;
    }
    // A cut that lasts: not ready until the broker is back.
    proxy.cut();
    service.wait_readyz(503, Duration::from_secs(20)).await?;
    let (_, body) = service.get("/readyz").await?;
    ensure!(body.contains("amqp: down"), "{body}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.restore();
    service.wait_ready(Duration::from_secs(30)).await?;

    wait_queue_drained(&s.queue, &[&service]).await?;
    wait_highest_versions(&highest).await?;
    ensure!(
        sample(&service, "cache_updater_amqp_reconnects_total").await? >= 4.0,
        "each reset and the cut caused a reconnect"
    );
    assert_no_stale_acks(&service)?;
    service.stop().await?;
    s.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_messages_of_every_kind_reach_the_dlq_with_their_reason_while_good_ones_flow(
) -> Result<()> {
    let s = Scenario::new("cu-poison");
    // A corrupted version key (a tombstone marker without a version) makes the guard's
    // script fail, so Redis refuses that entry's write on every delivery.
    let refused = s.key("refused");
    let mut conn = redis().await?;
    let _: () = conn
        .set(format!("__ver:{{{refused}}}"), "corrupted")
        .await?;
    let mut service = s
        .service("prefetch = 50\nmax_message_bytes = 2048\nmax_deliveries = 3\nwrite_attempts = 2")
        .spawn()?;
    service.wait_ready(READY).await?;

    let poison: Vec<(String, &str)> = vec![
        ("not json at all".into(), "not_json"),
        ("[1, 2, 3]".into(), "not_object"),
        (
            r#"{"op":"explode","key":"k","value":1}"#.into(),
            "invalid_field",
        ),
        (r#"{"op":"upsert","value":1}"#.into(), "missing_field"),
        (r#"{"op":"upsert","key":"k"}"#.into(), "missing_field"),
        (r#"{"product_id": 1}"#.into(), "missing_field"),
        (
            r#"{"product_id": 1, "version": "tomorrow"}"#.into(),
            "invalid_version",
        ),
        (
            format!(
                r#"{{"product_id": 2, "version": 1, "pad": "{}"}}"#,
                "y".repeat(3000)
            ),
            "too_large",
        ),
        (
            format!(r#"{{"op":"upsert","key":"{refused}","value":1,"version":1}}"#),
            "write_failed",
        ),
    ];
    let mut messages = Vec::new();
    for (i, (body, _)) in poison.iter().enumerate() {
        messages.push(Message::body(body.clone()).header("trace-id", &format!("t{i}")));
        messages.push(upsert(&s.key(&format!("good:{i}")), 1));
    }
    Publisher::new()
        .await?
        .publish(&s.exchange, "cache.update", &messages)
        .await?;

    let letters = amqp::read(&s.dead_letter_queue, poison.len(), DRAIN).await?;
    let mut by_trace: BTreeMap<String, &amqp::Received> = BTreeMap::new();
    for letter in &letters {
        by_trace.insert(letter.header("trace-id").unwrap_or("").to_string(), letter);
    }
    for (i, (body, reason)) in poison.iter().enumerate() {
        let letter = by_trace
            .get(&format!("t{i}"))
            .ok_or_else(|| anyhow::anyhow!("poison {i} ({reason}) not in the DLQ"))?;
        ensure!(
            letter.header("x-error-reason") == Some(*reason),
            "poison {i}: reason {:?}, expected {reason}",
            letter.header("x-error-reason")
        );
        ensure!(letter.header("x-error").is_some_and(|e| !e.is_empty()));
        ensure!(letter.header("x-original-queue") == Some(s.queue.as_str()));
        ensure!(letter.body == body.as_bytes(), "poison {i} kept as sent");
    }
    wait_queue_drained(&s.queue, &[&service]).await?;
    let mut conn = redis().await?;
    for i in 0..poison.len() {
        let value: Option<String> = conn.get(s.key(&format!("good:{i}"))).await?;
        ensure!(value.is_some(), "good message {i} written");
    }
    let dead = |reason: &str| format!("cache_updater_dead_letters_total{{reason=\"{reason}\"}}");
    ensure!(sample(&service, &dead("missing_field")).await? == 3.0);
    ensure!(sample(&service, &dead("write_failed")).await? == 1.0);
    ensure!(
        sample(
            &service,
            "cache_updater_messages_total{op=\"upsert\",outcome=\"retried\"}"
        )
        .await?
            == 2.0,
        "the refused write was tried on 3 deliveries, then dead-lettered"
    );
    ensure!(
        amqp::depth(&s.dead_letter_queue).await? == 0,
        "nothing else in the DLQ"
    );
    service.stop().await?;
    s.cleanup().await;
    Ok(())
}

/// A stop that comes while Redis is away: the deliveries held give way to the shutdown and go
/// back to the queue unacked, the service exits 0 well within its grace period, nothing is
/// dead-lettered or put back as a retry, and a replica started after Redis returns writes
/// every message.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_redis_outage_exits_at_once_and_hands_back_what_it_had_not_written(
) -> Result<()> {
    let s = Scenario::new("cu-cutstop");
    let (service, proxy) = s.service_behind_a_proxy("prefetch = 200").await?;
    let mut service = service.spawn()?;
    service.wait_ready(READY).await?;
    let (messages, highest) = ordered_upserts(&s, 500, 3_000);
    let publisher = Publisher::new().await?;
    publisher
        .publish(&s.exchange, "cache.update", &messages[..1_000])
        .await?;
    wait_handled(&[&service], 1_000.0, DRAIN).await?;

    proxy.cut();
    publisher
        .publish(&s.exchange, "cache.update", &messages[1_000..])
        .await?;
    service.wait_readyz(503, Duration::from_secs(20)).await?;
    // Long enough for the held deliveries' writes to be failing and retried.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let written_before_stop = handled(&service).await?;
    assert_waited_out(&service).await?;
    service.stop_within(Duration::from_secs(10)).await?;
    assert_no_stale_acks(&service)?;
    let back_in_queue = fleet_tests::amqp::depth(&s.queue).await?;
    ensure!(
        back_in_queue as f64 == 3_000.0 - written_before_stop,
        "{back_in_queue} in the queue after the stop, {written_before_stop} of 3000 written before it"
    );
    ensure!(fleet_tests::amqp::depth(&s.dead_letter_queue).await? == 0);

    proxy.restore();
    let mut after = s.service("prefetch = 200").spawn()?;
    after.wait_ready(READY).await?;
    wait_queue_drained(&s.queue, &[&after]).await?;
    wait_highest_versions(&highest).await?;
    assert_waited_out(&after).await?;
    after.stop().await?;
    s.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ten_second_redis_cut_loses_nothing_holds_the_backlog_in_the_broker_and_drains(
) -> Result<()> {
    let s = Scenario::new("cu-rediscut");
    let prefetch = 200.0;
    let (service, proxy) = s.service_behind_a_proxy("prefetch = 200").await?;
    let mut service = service.spawn()?;
    service.wait_ready(READY).await?;
    let (messages, highest) = ordered_upserts(&s, 1_000, 20_000);
    let publisher = Publisher::new().await?;
    let chunks: Vec<&[Message]> = messages.chunks(2_000).collect();
    publisher
        .publish(&s.exchange, "cache.update", chunks[0])
        .await?;
    wait_handled(&[&service], 1_000.0, DRAIN).await?;

    proxy.cut();
    service.wait_readyz(503, Duration::from_secs(20)).await?;
    let cut_at = std::time::Instant::now();
    let mut peak_rss = 0.0f64;
    let mut peak_unacked = 0.0f64;
    for chunk in &chunks[1..] {
        publisher
            .publish(&s.exchange, "cache.update", chunk)
            .await?;
        peak_rss = peak_rss.max(sample(&service, "process_resident_memory_bytes").await?);
        peak_unacked = peak_unacked.max(sample(&service, "cache_updater_unacked_messages").await?);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if let Some(left) = Duration::from_secs(10).checked_sub(cut_at.elapsed()) {
        tokio::time::sleep(left).await;
    }
    service.ensure_not_ready_for("redis").await?;
    let during = handled(&service).await?;
    let backlog = amqp::depth(&s.queue).await?;
    proxy.restore();

    ensure!(
        during < 20_000.0,
        "nothing counted as written while Redis was cut: {during}"
    );
    ensure!(
        backlog > 10_000,
        "the backlog stayed in the broker: {backlog} ready"
    );
    ensure!(
        peak_unacked <= prefetch,
        "at most the prefetch was held: {peak_unacked}"
    );
    ensure!(
        peak_rss < 64.0 * 1024.0 * 1024.0,
        "RSS stayed bounded: {peak_rss}"
    );
    wait_queue_drained(&s.queue, &[&service]).await?;
    wait_highest_versions(&highest).await?;
    service.wait_ready(Duration::from_secs(30)).await?;
    ensure!(sample(&service, "cache_updater_redis_write_failures_total").await? > 0.0);
    wait_for("every message counted", DRAIN, || async {
        Ok((handled(&service).await? >= 20_000.0).then_some(()))
    })
    .await?;
    service.stop().await?;
    s.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_under_load_acks_everything_taken_and_a_restart_redelivers_nothing() -> Result<()> {
    let s = Scenario::new("cu-sigterm");
    declare_topology(&s).await?;
    let (messages, highest) = ordered_upserts(&s, 1_000, 30_000);
    Publisher::new()
        .await?
        .publish(&s.exchange, "cache.update", &messages)
        .await?;
    let consumer = "prefetch = 500\nbatch_size = 50\nshards = 2";
    let mut first = s.service(consumer).spawn()?;
    first.wait_ready(READY).await?;
    wait_handled(&[&first], 2_000.0, DRAIN).await?;
    first.stop().await?;
    ensure!(
        first
            .logs()
            .contains("Consumers stopped; in-flight messages written and acked."),
        "{}",
        first.logs()
    );
    let left = amqp::depth(&s.queue).await?;
    ensure!(left > 0, "stopped mid-stream");

    let mut second = s.service(consumer).spawn()?;
    second.wait_ready(READY).await?;
    wait_queue_drained(&s.queue, &[&second]).await?;
    wait_highest_versions(&highest).await?;
    ensure!(
        sample(&second, "cache_updater_redeliveries_total").await? == 0.0,
        "everything the first replica took was acked"
    );
    ensure!(
        handled(&second).await? == f64::from(left),
        "the second replica handled exactly what was left"
    );
    second.stop().await?;
    s.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn quorum_queues_declared_by_two_replicas_flow_and_cap_deliveries() -> Result<()> {
    let s = Scenario::new("cu-quorum");
    let refused = s.key("refused");
    let mut conn = redis().await?;
    let _: () = conn
        .set(format!("__ver:{{{refused}}}"), "corrupted")
        .await?;
    // Both replicas declare the same quorum topology; the second declaration is a no-op.
    let config = s
        .config("prefetch = 100\nmax_deliveries = 2\nwrite_attempts = 1")
        .replace("[consumer]", "quorum_queues = true\n\n[consumer]");
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let mut replica = fleet_tests::ServiceBuilder::new("cache-updater")
            .config_toml(config.clone())
            .spawn()?;
        replica.wait_ready(READY).await?;
        replicas.push(replica);
    }
    let (mut messages, highest) = ordered_upserts(&s, 100, 2_000);
    messages.push(Message::body(format!(
        r#"{{"op":"upsert","key":"{refused}","value":1,"version":1}}"#
    )));
    Publisher::new()
        .await?
        .publish(&s.exchange, "cache.update", &messages)
        .await?;
    let letters = amqp::read(&s.dead_letter_queue, 1, DRAIN).await?;
    ensure!(letters[0].header("x-error-reason") == Some("write_failed"));
    let all: Vec<&fleet_tests::Service> = replicas.iter().collect();
    wait_queue_drained(&s.queue, &all).await?;
    wait_highest_versions(&highest).await?;
    for replica in &mut replicas {
        assert_no_stale_acks(replica)?;
        replica.stop().await?;
    }
    s.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_moved_back_to_its_queue_gets_every_try_again() -> Result<()> {
    let s = Scenario::new("cu-replay");
    let refused = s.key("refused");
    let version_key = format!("__ver:{{{refused}}}");
    let mut conn = redis().await?;
    let _: () = conn.set(&version_key, "corrupted").await?;
    let mut service = s
        .service("prefetch = 10\nmax_deliveries = 3\nwrite_attempts = 1")
        .spawn()?;
    service.wait_ready(READY).await?;
    let retried = "cache_updater_messages_total{op=\"upsert\",outcome=\"retried\"}";
    let write_failed = "cache_updater_dead_letters_total{reason=\"write_failed\"}";
    let letter_in_dlq = |letters: f64| {
        let (service, queue) = (&service, &s.dead_letter_queue);
        async move {
            wait_for("the dead letter", DRAIN, || async {
                Ok((sample(service, write_failed).await? == letters
                    && amqp::depth(queue).await? == 1)
                    .then_some(()))
            })
            .await
        }
    };
    Publisher::new()
        .await?
        .publish(&s.exchange, "cache.update", &[upsert(&refused, 7)])
        .await?;
    letter_in_dlq(1.0).await?;
    ensure!(sample(&service, retried).await? == 2.0);

    // An operator moves the letter back to its queue as it is (a shovel, or the management
    // UI's "move messages", keeps every header) before the cause is fixed: it gets all of
    // `max_deliveries` again, not the one try left over from the count it was dead-lettered
    // with.
    ensure!(amqp::move_all(&s.dead_letter_queue, &s.queue).await? == 1);
    letter_in_dlq(2.0).await?;
    ensure!(sample(&service, retried).await? == 4.0);
    ensure!(
        sample(
            &service,
            "cache_updater_dead_letters_total{reason=\"max_deliveries\"}"
        )
        .await?
            == 0.0
    );

    // Once the cause is fixed, moving it back applies it.
    let _: () = conn.del(&version_key).await?;
    ensure!(amqp::move_all(&s.dead_letter_queue, &s.queue).await? == 1);
    wait_highest_versions(&BTreeMap::from([(refused.clone(), 7)])).await?;
    wait_queue_drained(&s.queue, &[&service]).await?;
    ensure!(amqp::depth(&s.dead_letter_queue).await? == 0);
    ensure!(sample(&service, write_failed).await? == 2.0);
    ensure!(
        sample(
            &service,
            "cache_updater_messages_total{op=\"upsert\",outcome=\"applied\"}"
        )
        .await?
            == 1.0
    );

    // A letter says how many deliveries it had, in a header the service does not count.
    let other = s.key("refused-too");
    let other_version_key = format!("__ver:{{{other}}}");
    let _: () = conn.set(&other_version_key, "corrupted").await?;
    Publisher::new()
        .await?
        .publish(&s.exchange, "cache.update", &[upsert(&other, 1)])
        .await?;
    let letters = amqp::read(&s.dead_letter_queue, 1, DRAIN).await?;
    ensure!(letters[0].header("x-error-reason") == Some("write_failed"));
    ensure!(
        letters[0].header("x-deliveries") == Some("3"),
        "{:?}",
        letters[0].headers
    );
    ensure!(letters[0].header("x-cache-updater-deliveries").is_none());
    service.stop().await?;
    s.cleanup().await;
    let _: () = conn.del(&other_version_key).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_dead_letter_exchange_is_declared_again_after_a_reconnect() -> Result<()> {
    let s = Scenario::new("cu-redeclare");
    let mut service = s.service("prefetch = 10").spawn()?;
    service.wait_ready(READY).await?;
    amqp::delete(&[], &[&s.dead_letter_exchange]).await?;
    let publisher = Publisher::new().await?;
    // Dead-lettering into the missing exchange closes the publishing channel; the service
    // requeues that message, reconnects, declares its topology again, and then both poison
    // messages reach the DLQ.
    publisher
        .publish(
            &s.exchange,
            "cache.update",
            &[Message::body("first poison")],
        )
        .await?;
    wait_for("a reconnect", DRAIN, || async {
        Ok((sample(&service, "cache_updater_amqp_reconnects_total").await? >= 1.0).then_some(()))
    })
    .await?;
    service.wait_ready(Duration::from_secs(30)).await?;
    publisher
        .publish(
            &s.exchange,
            "cache.update",
            &[
                Message::body("second poison").header("trace-id", "second"),
                upsert(&s.key("after"), 1),
            ],
        )
        .await?;
    let letters = amqp::read(&s.dead_letter_queue, 2, DRAIN).await?;
    let mut bodies: Vec<&[u8]> = letters.iter().map(|l| l.body.as_slice()).collect();
    bodies.sort();
    ensure!(
        bodies == [&b"first poison"[..], b"second poison"],
        "{letters:?}"
    );
    ensure!(letters
        .iter()
        .all(|l| l.header("x-error-reason") == Some("not_json")));
    wait_queue_drained(&s.queue, &[&service]).await?;
    let value: Option<String> = redis().await?.get(s.key("after")).await?;
    ensure!(value.is_some(), "messages flow after the reconnect");
    assert_no_stale_acks(&service)?;
    service.stop().await?;
    s.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_queue_declared_elsewhere_is_named_when_it_conflicts_and_consumed_as_it_is_with_declare_false(
) -> Result<()> {
    let s = Scenario::new("cu-as-is");
    amqp::declare_plain_queue(&s.queue).await?;

    // Declaring it as configured (durable, with a dead-letter exchange) is refused by the
    // broker: the replica stays not ready and says what to do, in an ERROR line.
    let mut refused = s.service("prefetch = 10").spawn()?;
    wait_for("the refusal to be explained", READY, || async {
        Ok(refused
            .error_lines()
            .iter()
            .any(|line| line.contains(&s.queue) && line.contains("declare = false"))
            .then_some(()))
    })
    .await?;
    let (status, body) = refused.get("/readyz").await?;
    ensure!(status == 503, "{status}: {body}");
    refused.stop().await?;

    // Consumed as it is: messages sent straight to the queue (the default exchange) are
    // written, and poison still reaches the dead-letter queue with its reason.
    let config = s.config("prefetch = 10") + "declare = false\n";
    let mut service = fleet_tests::ServiceBuilder::new("cache-updater")
        .config_toml(config)
        .spawn()?;
    service.wait_ready(READY).await?;
    let product = r#"{"product_id": 9, "name": "Nine", "version": 2}"#;
    Publisher::new()
        .await?
        .publish(
            "",
            &s.queue,
            &[
                upsert(&s.key("a"), 3),
                Message::body("not json"),
                Message::body(product),
            ],
        )
        .await?;
    let letters = amqp::read(&s.dead_letter_queue, 1, DRAIN).await?;
    ensure!(letters[0].header("x-error-reason") == Some("not_json"));
    wait_queue_drained(&s.queue, &[&service]).await?;
    let mut conn = redis().await?;
    let a: Option<String> = conn.get(s.key("a")).await?;
    ensure!(
        a.is_some_and(|v| v.contains(r#""v":3"#)),
        "envelope written"
    );
    let nine: Option<String> = conn.get(s.key("product:9")).await?;
    ensure!(nine.as_deref() == Some(product), "entity written: {nine:?}");
    ensure!(
        service.error_lines().is_empty(),
        "{:?}",
        service.error_lines()
    );

    // This queue has no dead-letter exchange of its own, so a dead letter the broker does
    // not take is requeued, not rejected (which would drop it): with the dead-letter exchange
    // gone, the copy fails and the service reconnects; the message comes back and reaches
    // the dead-letter queue once the exchange is declared again.
    amqp::delete(&[], &[&s.dead_letter_exchange]).await?;
    Publisher::new()
        .await?
        .publish(
            "",
            &s.queue,
            &[Message::body("poison while the exchange is gone")],
        )
        .await?;
    let letters = amqp::read(&s.dead_letter_queue, 1, DRAIN).await?;
    ensure!(
        letters[0].body == b"poison while the exchange is gone",
        "{letters:?}"
    );
    ensure!(sample(&service, "cache_updater_amqp_reconnects_total").await? >= 1.0);
    wait_queue_drained(&s.queue, &[&service]).await?;
    service.stop().await?;
    s.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_config_exits_2_naming_the_key() -> Result<()> {
    let (status, logs) = fleet_tests::ServiceBuilder::new("cache-updater")
        .config_toml("[consumer]\nprefetch = 0\n")
        .run_to_exit(Duration::from_secs(30))
        .await?;
    ensure!(status.code() == Some(2), "{status}: {logs}");
    ensure!(logs.contains("consumer.prefetch"), "{logs}");
    Ok(())
}

/// Unversioned writes are last-writer-wins, so a replica must not write a delivery after the
/// broker took it back. Here replica A holds deliveries while its Redis is cut, then loses its
/// RabbitMQ connection: the broker redelivers them to B, which writes them and newer ones.
/// When A's Redis comes back, what A still holds must not overwrite B's newer data. (An
/// attempt already under way when the connection drops cannot be called back, so A has one
/// shard, busy with another key's write while round 2 waits behind it.)
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_never_writes_a_delivery_the_broker_took_back_even_without_versions() -> Result<()>
{
    let s = Scenario::new("cu-takeback");
    declare_topology(&s).await?;
    const KEYS: usize = 10;
    let round = |n: u64| -> Vec<Message> {
        (0..KEYS)
            .map(|k| {
                Message::body(format!(
                    r#"{{"op":"upsert","key":"{}","value":{{"round":{n}}}}}"#,
                    s.key(&format!("k:{k}"))
                ))
            })
            .collect()
    };
    let rounds_in_redis = || async {
        let mut conn = redis().await?;
        let mut rounds = Vec::new();
        for k in 0..KEYS {
            let value: Option<String> = conn.get(s.key(&format!("k:{k}"))).await?;
            rounds.push(value.unwrap_or_default());
        }
        anyhow::Ok(rounds)
    };
    let expect_round = |n: u64| format!(r#"{{"round":{n}}}"#);
    let round_written = |n: u64, what: &'static str| {
        let (rounds_in_redis, expect_round) = (&rounds_in_redis, &expect_round);
        async move {
            wait_for(what, DRAIN, || async {
                Ok((rounds_in_redis().await? == vec![expect_round(n); KEYS]).then_some(()))
            })
            .await
        }
    };

    let (a, redis_link) = s
        .service_behind_a_proxy("prefetch = 100\nshards = 1")
        .await?;
    let amqp_link = FaultProxy::start(socket_addr_of(&amqp_url())).await?;
    let mut a = a
        .env(
            "AMQP_URL",
            format!("amqp://guest:guest@{}/%2f", amqp_link.addr()),
        )
        .spawn()?;
    a.wait_ready(READY).await?;
    let publisher = Publisher::new().await?;
    publisher
        .publish(&s.exchange, "cache.update", &round(1))
        .await?;
    round_written(1, "round 1 written by A").await?;

    // A's shard is stuck on another key's write, and round 2 waits behind it.
    redis_link.cut();
    let blocker = Message::body(format!(
        r#"{{"op":"upsert","key":"{}","value":0}}"#,
        s.key("blocker")
    ));
    publisher
        .publish(&s.exchange, "cache.update", &[blocker])
        .await?;
    wait_for("A's shard stuck", DRAIN, || async {
        Ok((sample(&a, "cache_updater_redis_write_failures_total").await? >= 1.0).then_some(()))
    })
    .await?;
    publisher
        .publish(&s.exchange, "cache.update", &round(2))
        .await?;
    wait_for("A holding round 2", DRAIN, || async {
        Ok((sample(&a, "cache_updater_unacked_messages").await? > KEYS as f64).then_some(()))
    })
    .await?;
    // A loses RabbitMQ, which takes round 2 back and gives it to B; B writes it, then
    // round 3.
    amqp_link.cut();
    wait_for("round 2 back in the queue", DRAIN, || async {
        Ok((amqp::depth(&s.queue).await? == KEYS as u32 + 1).then_some(()))
    })
    .await?;
    let mut b = s.service("prefetch = 100").spawn()?;
    b.wait_ready(READY).await?;
    round_written(2, "round 2 written by B").await?;
    publisher
        .publish(&s.exchange, "cache.update", &round(3))
        .await?;
    round_written(3, "round 3 written by B").await?;

    // A's Redis comes back; what it held was taken back by the broker.
    redis_link.restore();
    wait_for("A done with what it held", DRAIN, || async {
        Ok((sample(&a, "cache_updater_unacked_messages").await? == 0.0).then_some(()))
    })
    .await?;
    let rounds = rounds_in_redis().await?;
    ensure!(
        rounds == vec![expect_round(3); KEYS],
        "B's newer writes were overwritten: {rounds:?}"
    );
    amqp_link.restore();
    a.stop().await?;
    b.stop().await?;
    s.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn on_a_redis_cluster_reordered_versions_and_warm_entries_end_where_they_should() -> Result<()>
{
    let cluster = fleet_tests::private_redis::PrivateCluster::start().await?;
    let s = Scenario::new("cu-cluster");
    let mut service = s.service("batch_size = 50").on_cluster(&cluster).spawn()?;
    service.wait_ready(READY).await?;
    let (mut messages, mut highest) = shuffled_upserts(&s, 200, 2_000);
    // A warm batch of 300 entries, spread over every node.
    let entries: Vec<String> = (0..300)
        .map(|i| {
            let key = s.key(&format!("w:{i}"));
            highest.insert(key.clone(), 3);
            format!(r#"{{"key":"{key}","value":{{"v":3}},"version":3}}"#)
        })
        .collect();
    messages.push(Message::body(format!(
        r#"{{"op":"warm","entries":[{}]}}"#,
        entries.join(",")
    )));
    Publisher::new()
        .await?
        .publish(&s.exchange, "cache.update", &messages)
        .await?;
    wait_handled(&[&service], messages.len() as f64, DRAIN).await?;
    let wrong = wrong_versions_on(&mut cluster.client().await?, &highest).await?;
    ensure!(
        wrong.is_empty(),
        "{} keys not at their highest version: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );
    for node in &cluster.nodes {
        let keys: i64 = redis::cmd("DBSIZE")
            .query_async(&mut node.connect().await?)
            .await?;
        ensure!(keys > 0, "{} holds no keys", node.url);
    }
    service.stop().await?;
    s.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_whole_redis_cluster_going_away_dead_letters_nothing_and_resumes_when_it_is_back(
) -> Result<()> {
    let mut cluster = fleet_tests::private_redis::PrivateCluster::start().await?;
    let s = Scenario::new("cu-cluster-down");
    let mut service = s.service("batch_size = 50").on_cluster(&cluster).spawn()?;
    service.wait_ready(READY).await?;
    let (messages, highest) = shuffled_upserts(&s, 200, 3_000);
    let (before, after) = messages.split_at(1_000);
    let publisher = Publisher::new().await?;
    publisher
        .publish(&s.exchange, "cache.update", before)
        .await?;
    wait_handled(&[&service], before.len() as f64, DRAIN).await?;

    // Every node stops (its connections refused), for longer than a delivery's write
    // attempts take: an outage, not a refusal, so nothing may be dead-lettered.
    cluster.stop_all().await?;
    publisher
        .publish(&s.exchange, "cache.update", after)
        .await?;
    service.wait_readyz(503, Duration::from_secs(20)).await?;
    assert_waited_out_through(&service, Duration::from_secs(15)).await?;
    ensure!(
        handled(&service).await? < messages.len() as f64,
        "nothing counted as written while the cluster was gone"
    );
    cluster.start_all_again().await?;

    wait_queue_drained(&s.queue, &[&service]).await?;
    wait_highest_versions_on(&mut cluster.client().await?, &highest).await?;
    service.wait_ready(Duration::from_secs(30)).await?;
    assert_waited_out(&service).await?;
    ensure!(amqp::depth(&s.dead_letter_queue).await? == 0);
    service.stop().await?;
    s.cleanup().await;
    Ok(())
}

/// Whether `conn`'s server refuses writes because its last snapshot failed.
async fn refuses_writes(conn: &mut redis::aio::MultiplexedConnection) -> Result<bool> {
    Ok(
        match redis::cmd("SET")
            .arg("misconf-probe")
            .arg(1)
            .query_async::<()>(conn)
            .await
        {
            Ok(()) => false,
            Err(e) if e.code() == Some("MISCONF") => true,
            Err(e) => return Err(e.into()),
        },
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_refusing_every_write_after_a_failed_snapshot_is_waited_out_not_dead_lettered(
) -> Result<()> {
    let dir = fleet_tests::process::scratch_dir("cu-misconf");
    let dir_arg = dir.to_str().expect("UTF-8 path").to_owned();
    let server =
        fleet_tests::private_redis::PrivateRedis::start(&["--save", "3600 1", "--dir", &dir_arg])
            .await?;
    let s = Scenario::new("cu-misconf");
    let mut service = s.service("").env("REDIS_URL", &server.url).spawn()?;
    service.wait_ready(READY).await?;
    let (messages, highest) = ordered_upserts(&s, 100, 1_000);
    let (before, after) = messages.split_at(100);
    let publisher = Publisher::new().await?;
    publisher
        .publish(&s.exchange, "cache.update", before)
        .await?;
    wait_handled(&[&service], before.len() as f64, DRAIN).await?;

    // A snapshot fails (its directory is gone, as when a disk fails): Redis refuses every
    // write with MISCONF until a snapshot succeeds. That is the server's state, not the
    // messages' fault, so nothing may be dead-lettered meanwhile.
    let mut conn = server.connect().await?;
    std::fs::remove_dir_all(&dir)?;
    let _: redis::Value = redis::cmd("BGSAVE").query_async(&mut conn).await?;
    wait_for("writes refused", Duration::from_secs(10), || async {
        Ok(refuses_writes(&mut server.connect().await?)
            .await?
            .then_some(()))
    })
    .await?;
    publisher
        .publish(&s.exchange, "cache.update", after)
        .await?;
    // The service must not look ready while its writes fail (under MISCONF, Redis refuses
    // PING as well).
    service.wait_readyz(503, Duration::from_secs(10)).await?;
    let refusing_since = Instant::now();
    while refusing_since.elapsed() < Duration::from_secs(10) {
        let (status, body) = service.get("/readyz").await?;
        ensure!(
            status == 503 && !body.contains("amqp: down"),
            "ready while every write failed: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    ensure!(
        handled(&service).await? <= before.len() as f64,
        "nothing counted as written while Redis refused writes"
    );

    // The operator lets writes through again.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("stop-writes-on-bgsave-error")
        .arg("no")
        .query_async(&mut conn)
        .await?;
    wait_queue_drained(&s.queue, &[&service]).await?;
    service.wait_ready(Duration::from_secs(30)).await?;
    wait_highest_versions_on(&mut conn, &highest).await?;
    assert_waited_out(&service).await?;
    service.stop().await?;
    s.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_cluster_master_failing_over_mid_stream_loses_and_dead_letters_nothing(
) -> Result<()> {
    // Two replicas each, so a promoted replica still has one to confirm writes.
    let mut cluster = fleet_tests::private_redis::PrivateCluster::start_with_replicas(2).await?;
    let s = Scenario::new("cu-cluster-failover");
    let seed = cluster.nodes[0].url.clone();
    // The master the service was pointed at dies; until its replica has taken over, writes
    // to its slots fail, and they are waited out rather than sent round the queue.
    let builder = s.service("batch_size = 50").on_cluster(&cluster);
    let kill_the_seed = async {
        let killed = cluster.kill_a_master().await?;
        ensure!(killed == seed, "the seed {seed} is a master");
        Ok(())
    };
    let (mut service, highest) = publish_across_a_failover(&s, builder, kill_the_seed).await?;
    wait_queue_drained(&s.queue, &[&service]).await?;
    wait_highest_versions_on(&mut cluster.client().await?, &highest).await?;
    assert_waited_out(&service).await?;
    service.stop().await?;
    s.cleanup().await;
    Ok(())
}

/// Redis behind Sentinel, switched over by an operator (`SENTINEL FAILOVER`) mid-stream: the
/// old master drops its clients and turns replica, the writes fail for a moment, every shard
/// asks the sentinel again and follows the new master, and nothing is lost, sent round the
/// queue or dead-lettered.
#[tokio::test(flavor = "multi_thread")]
async fn behind_sentinel_a_switchover_is_followed_without_loss_or_dead_letters() -> Result<()> {
    let sentinel = fleet_tests::private_redis::PrivateSentinel::start().await?;
    let s = Scenario::new("cu-sentinel");
    let first_master = sentinel.master_address().await?;
    let builder = s.service("batch_size = 50").on_sentinel(&sentinel);
    let (mut service, highest) =
        publish_across_a_failover(&s, builder, sentinel.switch_over()).await?;
    wait_queue_drained(&s.queue, &[&service]).await?;
    let now_master = sentinel.master_address().await?;
    ensure!(now_master != first_master, "the sentinel switched masters");
    wait_highest_versions_on(&mut sentinel.replica.connect().await?, &highest).await?;
    assert_waited_out(&service).await?;
    let new_master = format!("\"address\":\"{now_master}\"");
    ensure!(
        service.logs().contains("Reconnected to Redis") && service.logs().contains(&new_master),
        "the writers followed the switch to {now_master}: {}",
        service.logs()
    );
    // The switch was over before the rest was published, so each writer followed at once:
    // when the sentinel announced it, or at its first failed write, which found the sentinel
    // naming the new master; not after its backoff had grown over two more failures.
    let followed_at_once = service.logs().lines().any(|line| {
        serde_json::from_str::<serde_json::Value>(line).is_ok_and(|event| {
            event["message"] == "Reconnected to Redis: a sentinel announced a new master."
                || (event["message"] == "Reconnected to Redis to follow a failover."
                    && event["failures_in_a_row"] == 1
                    && event["sentinel_named_another_master"] == true)
        })
    });
    ensure!(followed_at_once, "{}", service.logs());
    service.stop().await?;
    s.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_acl_denying_the_guards_commands_is_waited_out_not_dead_lettered() -> Result<()> {
    let s = Scenario::new("cu-acl");
    let user = fleet_tests::unique_name("cu-acl");
    let password = fleet_tests::unique_name("pw");
    // Every write the service makes is refused alike: a misconfigured server, not bad
    // messages, so nothing may be dead-lettered.
    let url = fleet_tests::redis_acl_user(&user, &password, &["eval", "evalsha"]).await?;
    let mut service = s.service("").env("REDIS_URL", &url).spawn()?;
    service.wait_ready(READY).await?;
    let (messages, highest) = ordered_upserts(&s, 50, 200);
    Publisher::new()
        .await?
        .publish(&s.exchange, "cache.update", &messages)
        .await?;
    service.wait_readyz(503, Duration::from_secs(20)).await?;
    assert_waited_out_through(&service, Duration::from_secs(8)).await?;
    service.ensure_not_ready_for("redis_writes").await?;
    ensure!(
        handled(&service).await? == 0.0,
        "nothing handled while every write was refused"
    );

    // The operator grants the commands: the backlog drains.
    fleet_tests::redis_acl_user(&user, &password, &[]).await?;
    wait_queue_drained(&s.queue, &[&service]).await?;
    wait_highest_versions(&highest).await?;
    service.wait_ready(Duration::from_secs(30)).await?;
    assert_waited_out(&service).await?;
    service.stop().await?;
    fleet_tests::delete_redis_acl_user(&user).await?;
    s.cleanup().await;
    Ok(())
}
