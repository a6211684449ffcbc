//! Structured logging through `tracing`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::filter::{filter_fn, LevelFilter};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

use crate::config::LogFormat;

/// Libraries that log a lost connection at ERROR although the services reconnect by
/// themselves (and report the outage on `/readyz`). Their errors are logged as warnings, so an
/// alert on ERROR lines does not page for an outage that heals. (librdkafka's reports go
/// through `crate::kafka::FleetClientContext` instead.)
const RECOVERED_BY_THE_SERVICE: [&str; 1] = ["lapin"];

/// Libraries that log every attempt of a reconnect loop: redis-rs's cluster client logs each
/// node it fails to reach, each time a request finds the cluster gone, dozens of lines a second
/// through a whole-cluster outage. The services log the outage themselves (each failed write,
/// and `/readyz`), so each of these sites logs at most once per [`THROTTLE_WINDOW`].
const THROTTLED: [&str; 1] = ["redis::cluster_handling"];
const THROTTLE_WINDOW: Duration = Duration::from_secs(10);

/// Installs the global subscriber: JSON or text lines on stderr, filtered by `RUST_LOG`
/// (default `info`). Calling it twice is harmless, which keeps in-process tests simple.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // `try_init` also caps the `log` crate at the subscriber's level hint, so that records
    // from libraries that use `log` (rdkafka logs at TRACE for every message it frees) are
    // dropped by one comparison instead of a trip through the subscriber.
    let _ = subscriber(format, filter).try_init();
}

/// The subscriber [`init`] installs.
fn subscriber(format: LogFormat, filter: EnvFilter) -> impl Subscriber + Send + Sync {
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let output = match format {
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .boxed(),
        LogFormat::Text => fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .boxed(),
    };
    let throttle = Throttle::default();
    tracing_subscriber::registry()
        .with(filter)
        .with(
            output
                .with_filter(filter_fn(|metadata| !is_recovered_error(metadata)))
                .with_filter(filter_fn(move |metadata| {
                    throttle.admit(metadata.target(), metadata.line(), Instant::now())
                })),
        )
        .with(ErrorsAsWarnings)
}

/// When each throttled log site last logged, by target and line.
#[derive(Default)]
struct Throttle {
    last: Mutex<HashMap<(String, Option<u32>), Instant>>,
}

impl Throttle {
    /// Whether an event of this site may be logged `now`: always, unless the site is
    /// throttled and logged less than [`THROTTLE_WINDOW`] ago.
    fn admit(&self, target: &str, line: Option<u32>, now: Instant) -> bool {
        if !THROTTLED.iter().any(|prefix| target.starts_with(prefix)) {
            return true;
        }
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match last.get_mut(&(target.to_owned(), line)) {
            Some(at) if now.duration_since(*at) < THROTTLE_WINDOW => false,
            Some(at) => {
                *at = now;
                true
            }
            None => {
                last.insert((target.to_owned(), line), now);
                true
            }
        }
    }
}

/// Quiets a warning that repeats while a broker is away. librdkafka reports "all brokers are
/// down" from every client, and its consumer hands the same error back on every poll, many
/// times a second for as long as the outage lasts. The first of a kind is logged; the same
/// kind again within the window is only counted; the next one after the window is logged with
/// how many were left out. Kinds are few (an error and its reason), and the map is cleared
/// should they not be.
pub struct Repeats {
    window: Duration,
    seen: Mutex<HashMap<String, (Instant, u64)>>,
}

impl Repeats {
    /// The most kinds remembered before the map starts again.
    const MAX_KINDS: usize = 256;

    /// Leaves out repeats within `window` of the last logged one.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(left_out)` when an event of `kind` is to be logged at `now`, with how many of its
    /// kind were left out since the last one logged; `None` when it is to be left out.
    pub fn admit(&self, kind: &str, now: Instant) -> Option<u64> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((logged_at, left_out)) = seen.get_mut(kind) {
            if now.duration_since(*logged_at) < self.window {
                *left_out += 1;
                return None;
            }
            let before = std::mem::take(left_out);
            *logged_at = now;
            return Some(before);
        }
        if seen.len() >= Self::MAX_KINDS {
            seen.clear();
        }
        seen.insert(kind.to_owned(), (now, 0));
        Some(0)
    }
}

impl Default for Repeats {
    /// Ten seconds, as for the throttled library sites.
    fn default() -> Self {
        Self::new(THROTTLE_WINDOW)
    }
}

fn is_recovered_error(metadata: &Metadata<'_>) -> bool {
    is_recovered(*metadata.level(), metadata.target())
}

fn is_recovered(level: Level, target: &str) -> bool {
    level == Level::ERROR
        && RECOVERED_BY_THE_SERVICE.iter().any(|library| {
            target
                .strip_prefix(library)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
        })
}

/// Logs each of those errors again as a warning, with the same message and fields; the output
/// layer skips the original.
struct ErrorsAsWarnings;

impl<S: Subscriber> Layer<S> for ErrorsAsWarnings {
    /// Without a hint, the whole subscriber would have none, and `log` records of every
    /// level would reach it.
    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::ERROR)
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        if !is_recovered_error(event.metadata()) {
            return;
        }
        let mut fields = FieldText::default();
        event.record(&mut fields);
        tracing::warn!(
            target: "lapin",
            source = event.metadata().target(),
            details = fields.details.trim_start(),
            "{}",
            fields.message
        );
    }
}

/// An event's message, and its other fields as `name=value` text.
#[derive(Default)]
struct FieldText {
    message: String,
    details: String,
}

impl Visit for FieldText {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_owned();
        } else {
            let _ = write!(self.details, " {}={value}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            let _ = write!(self.details, " {}={value:?}", field.name());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttled_site_logs_once_per_window_and_others_always() {
        let throttle = Throttle::default();
        let start = Instant::now();
        let site = "redis::cluster_handling::async_connection";
        assert!(throttle.admit(site, Some(1871), start));
        assert!(!throttle.admit(site, Some(1871), start + Duration::from_secs(1)));
        // Another line of the same module is a site of its own.
        assert!(throttle.admit(site, Some(1482), start + Duration::from_secs(1)));
        assert!(throttle.admit(site, Some(1871), start + THROTTLE_WINDOW));
        for _ in 0..3 {
            assert!(throttle.admit("redis::aio::connection_manager", Some(1), start));
            assert!(throttle.admit("order_cacher::pipeline", Some(1), start));
        }
    }

    #[test]
    fn a_repeated_kind_is_counted_within_the_window_and_reported_after_it() {
        let repeats = Repeats::new(Duration::from_secs(10));
        let start = Instant::now();
        let at = |secs| start + Duration::from_secs(secs);
        assert_eq!(repeats.admit("all brokers down", at(0)), Some(0));
        assert_eq!(repeats.admit("all brokers down", at(1)), None);
        assert_eq!(repeats.admit("all brokers down", at(9)), None);
        // Another kind is not held back by the first.
        assert_eq!(repeats.admit("authentication failed", at(9)), Some(0));
        assert_eq!(repeats.admit("all brokers down", at(10)), Some(2));
        assert_eq!(repeats.admit("all brokers down", at(11)), None);
        assert_eq!(repeats.admit("all brokers down", at(30)), Some(1));
        assert_eq!(repeats.admit("all brokers down", at(45)), Some(0));
    }

    #[test]
    fn only_errors_of_the_listed_libraries_are_recovered() {
        assert!(is_recovered(Level::ERROR, "lapin::io_loop"));
        assert!(is_recovered(Level::ERROR, "lapin"));
        assert!(!is_recovered(Level::WARN, "lapin::io_loop"));
        assert!(!is_recovered(Level::ERROR, "lapinou"));
        assert!(!is_recovered(Level::ERROR, "cache_updater::consumer"));
    }

    #[test]
    fn the_subscriber_hints_the_filter_level_so_log_records_below_it_cost_nothing() {
        for (directives, level) in [
            ("warn", LevelFilter::WARN),
            ("info", LevelFilter::INFO),
            ("warn,order_cacher=debug", LevelFilter::DEBUG),
        ] {
            for format in [LogFormat::Json, LogFormat::Text] {
                let subscriber = subscriber(format, EnvFilter::new(directives));
                assert_eq!(subscriber.max_level_hint(), Some(level), "{directives}");
            }
        }
    }
}
