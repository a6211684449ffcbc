//! Load tools for `bench/cache_updater.sh`.
//!
//! ```text
//! amqp_bench publish --queue Q --count N [--size 300] [--keys 100000] [--transient]
//! amqp_bench bare    --queue Q[,Q2...] --count N --prefetch P [--ack-every K]   prints msgs_per_sec=<n>
//! amqp_bench drain   --metrics URL --family F --count N     prints msgs_per_sec=<n>
//! amqp_bench delete  NAME...                                deletes these queues and exchanges
//! ```
//!
//! `publish` declares Q (durable) and fills it with envelope upserts of `--size`
//! bytes over `--keys` keys, with rising versions, persistent unless `--transient`. `bare` is the broker's ceiling: it consumes
//! with the given prefetch and only acks, with one `multiple` ack every K messages (default
//! 1: each message); given several queues, it takes an equal share of N from each, on a channel
//! per queue, and times the first delivery to the last of all. `drain` watches a service's counter
//! and times its first to its last message.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn number(args: &[String], name: &str, default: Option<u64>) -> Result<u64> {
    match arg(args, name) {
        Some(v) => v.parse().with_context(|| format!("{name} {v}")),
        None => default.with_context(|| format!("{name} is required")),
    }
}

fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("publish") => publish(&args).await,
        Some("bare") => bare(&args).await,
        Some("drain") => drain(&args).await,
        Some("delete") => delete(&args[2..]).await,
        _ => bail!("usage: amqp_bench publish|bare|drain|delete ..."),
    }
}

/// An envelope upsert padded to `size` bytes.
fn message(i: u64, keys: u64, size: usize) -> Vec<u8> {
    let head = format!(
        r#"{{"op":"upsert","key":"bench:product:{}","version":{},"value":{{"product_id":{},"name":"Product","price":19.99,"stock":7,"note":""#,
        i % keys,
        i + 1,
        i % keys
    );
    let tail = r#""}}"#;
    let pad = size.saturating_sub(head.len() + tail.len());
    format!("{head}{}{tail}", "x".repeat(pad)).into_bytes()
}

async fn publish(args: &[String]) -> Result<()> {
    let queue = arg(args, "--queue").context("--queue")?;
    let count = number(args, "--count", None)?;
    let size = number(args, "--size", Some(300))? as usize;
    let keys = number(args, "--keys", Some(100_000))?;
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default()).await?;
    // A queue cache-updater declared (with its dead-letter arguments) is used as it is.
    let mut channel = conn.create_channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    if channel
        .queue_declare(queue.as_str().into(), passive, FieldTable::default())
        .await
        .is_err()
    {
        channel = conn.create_channel().await?;
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
    }
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mode = if args.iter().any(|a| a == "--transient") {
        1
    } else {
        2
    };
    let properties = BasicProperties::default().with_delivery_mode(mode);
    let mut i = 0;
    while i < count {
        let mut confirms = Vec::new();
        for _ in 0..5_000.min(count - i) {
            confirms.push(
                channel
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        &message(i, keys, size),
                        properties.clone(),
                    )
                    .await?,
            );
            i += 1;
        }
        for confirm in confirms {
            confirm.await?;
        }
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

async fn bare(args: &[String]) -> Result<()> {
    let queues = arg(args, "--queue").context("--queue")?;
    let queues: Vec<&str> = queues.split(',').collect();
    let count = number(args, "--count", None)?;
    let prefetch = number(args, "--prefetch", Some(1000))? as u16;
    let ack_every = number(args, "--ack-every", Some(1))?.max(1);
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default()).await?;
    // One channel and consumer per queue on one connection, as cache-updater consumes them.
    let mut consumers = Vec::new();
    for (i, queue) in queues.iter().enumerate() {
        let share =
            count / queues.len() as u64 + u64::from((i as u64) < count % queues.len() as u64);
        let channel = conn.create_channel().await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                (*queue).into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        consumers.push(tokio::spawn(ack_only(channel, consumer, share, ack_every)));
    }
    let mut first: Option<Instant> = None;
    let mut last: Option<Instant> = None;
    for consumer in consumers {
        let (started, finished) = consumer.await??;
        first = match (first, started) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        last = last.max(finished);
    }
    let elapsed = match (first, last) {
        (Some(first), Some(last)) => last.duration_since(first).as_secs_f64(),
        _ => 0.0,
    };
    println!("msgs_per_sec={:.0}", (count - 1) as f64 / elapsed.max(1e-9));
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

/// Takes `count` deliveries, acking every `ack_every`-th with `multiple`; returns when the
/// first and the last arrived.
async fn ack_only(
    channel: lapin::Channel,
    mut consumer: lapin::Consumer,
    count: u64,
    ack_every: u64,
) -> Result<(Option<Instant>, Option<Instant>)> {
    let mut n = 0;
    let mut started = None;
    while n < count {
        let delivery = consumer.next().await.context("consumer closed")??;
        started.get_or_insert_with(Instant::now);
        n += 1;
        if n % ack_every == 0 || n == count {
            channel
                .basic_ack(delivery.delivery_tag, BasicAckOptions { multiple: true })
                .await?;
        }
    }
    Ok((started, started.map(|_| Instant::now())))
}

/// The sum of a metric family's samples, read with a plain HTTP/1.0 GET.
fn scrape(url: &str, family: &str) -> Result<f64> {
    let rest = url.strip_prefix("http://").context("http:// URL")?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut stream = std::net::TcpStream::connect(host)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text
        .lines()
        .filter(|l| {
            l.strip_prefix(family)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

async fn drain(args: &[String]) -> Result<()> {
    let url = arg(args, "--metrics").context("--metrics")?;
    let family = arg(args, "--family").context("--family")?;
    let count = number(args, "--count", None)? as f64;
    let mut first: Option<(Instant, f64)> = None;
    loop {
        let n = scrape(&url, &family).unwrap_or(0.0);
        let now = Instant::now();
        if first.is_none() && n > 0.0 {
            first = Some((now, n));
        }
        if let Some((at, seen)) = first {
            if n >= count {
                let elapsed = now.duration_since(at).as_secs_f64();
                println!("msgs_per_sec={:.0}", (n - seen) / elapsed.max(1e-9));
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Deletes each name as a queue and as an exchange, whichever it is.
async fn delete(names: &[String]) -> Result<()> {
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default()).await?;
    for name in names {
        // A failed delete closes its channel, so each gets a fresh one.
        let channel = conn.create_channel().await?;
        let _ = channel
            .queue_delete(
                name.as_str().into(),
                lapin::options::QueueDeleteOptions::default(),
            )
            .await;
        let channel = conn.create_channel().await?;
        let _ = channel
            .exchange_delete(
                name.as_str().into(),
                lapin::options::ExchangeDeleteOptions::default(),
            )
            .await;
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}
