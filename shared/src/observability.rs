//! Prometheus metrics, readiness, and the HTTP server for `/metrics`, `/healthz`, `/readyz`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The metrics of one service: a registry whose metric names start with the service's
/// namespace, plus the readiness of its broker connections.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    namespace: String,
    readiness: Readiness,
}

/// Failure to build a metric; only a programming error (a duplicate or malformed name).
pub type MetricError = prometheus::Error;

impl Metrics {
    /// A registry for `namespace` (such as `order_cacher`) with process metrics and
    /// `<namespace>_build_info`.
    pub fn new(namespace: &str) -> Result<Self, MetricError> {
        let registry = Registry::new();
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let up = IntGaugeVec::new(
            Opts::new(
                "dependency_up",
                "1 while the connection to a dependency is up.",
            )
            .namespace(namespace),
            &["dependency"],
        )?;
        registry.register(Box::new(up.clone()))?;
        let metrics = Self {
            registry,
            namespace: namespace.to_string(),
            readiness: Readiness {
                inner: Arc::new(ReadinessInner {
                    dependencies: Mutex::new(BTreeMap::new()),
                    draining: AtomicBool::new(false),
                    up_gauge: up,
                }),
            },
        };
        let info = metrics.gauge_vec(
            "build_info",
            "Build information; the value is always 1.",
            &["version"],
        )?;
        info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        Ok(metrics)
    }

    /// The readiness of this service's dependencies.
    pub fn readiness(&self) -> &Readiness {
        &self.readiness
    }

    /// The underlying registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Registers a counter named `<namespace>_<name>`; `name` should end in `_total`.
    pub fn counter(&self, name: &str, help: &str) -> Result<IntCounter, MetricError> {
        let c = IntCounter::with_opts(Opts::new(name, help).namespace(self.namespace.as_str()))?;
        self.registry.register(Box::new(c.clone()))?;
        Ok(c)
    }

    /// Registers a labelled counter. Labels must come from a small fixed vocabulary.
    pub fn counter_vec(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntCounterVec, MetricError> {
        let c = IntCounterVec::new(
            Opts::new(name, help).namespace(self.namespace.as_str()),
            labels,
        )?;
        self.registry.register(Box::new(c.clone()))?;
        Ok(c)
    }

    /// Registers a gauge.
    pub fn gauge(&self, name: &str, help: &str) -> Result<IntGauge, MetricError> {
        let g = IntGauge::with_opts(Opts::new(name, help).namespace(self.namespace.as_str()))?;
        self.registry.register(Box::new(g.clone()))?;
        Ok(g)
    }

    /// Registers a labelled gauge.
    pub fn gauge_vec(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntGaugeVec, MetricError> {
        let g = IntGaugeVec::new(
            Opts::new(name, help).namespace(self.namespace.as_str()),
            labels,
        )?;
        self.registry.register(Box::new(g.clone()))?;
        Ok(g)
    }

    /// Registers a histogram with the given bucket bounds (base units, e.g. seconds).
    pub fn histogram(
        &self,
        name: &str,
        help: &str,
        buckets: Vec<f64>,
    ) -> Result<Histogram, MetricError> {
        let h = Histogram::with_opts(
            HistogramOpts::new(name, help)
                .namespace(self.namespace.as_str())
                .buckets(buckets),
        )?;
        self.registry.register(Box::new(h.clone()))?;
        Ok(h)
    }

    /// Registers a labelled histogram.
    pub fn histogram_vec(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
        buckets: Vec<f64>,
    ) -> Result<HistogramVec, MetricError> {
        let h = HistogramVec::new(
            HistogramOpts::new(name, help)
                .namespace(self.namespace.as_str())
                .buckets(buckets),
            labels,
        )?;
        self.registry.register(Box::new(h.clone()))?;
        Ok(h)
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec fails only on a malformed metric family, which registration prevents.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Latency buckets from 100 µs to 10 s, for Redis and broker round trips.
pub fn latency_buckets() -> Vec<f64> {
    vec![
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0,
    ]
}

/// Whether the service's broker connections are up. `/readyz` is 200 only when every
/// registered dependency is up and the service is not draining for shutdown.
#[derive(Clone)]
pub struct Readiness {
    inner: Arc<ReadinessInner>,
}

struct ReadinessInner {
    dependencies: Mutex<BTreeMap<&'static str, Arc<AtomicBool>>>,
    draining: AtomicBool,
    up_gauge: IntGaugeVec,
}

/// The up/down switch of one dependency, held by the component that talks to it.
#[derive(Clone)]
pub struct DependencyStatus {
    name: &'static str,
    up: Arc<AtomicBool>,
    gauge: IntGauge,
}

impl DependencyStatus {
    /// Marks the dependency up or down, logging only changes.
    pub fn set_up(&self, up: bool) {
        let was = self.up.swap(up, Ordering::Relaxed);
        self.gauge.set(i64::from(up));
        if was != up {
            if up {
                tracing::info!(dependency = self.name, "Dependency is up.");
            } else {
                tracing::warn!(dependency = self.name, "Dependency is down.");
            }
        }
    }

    /// Whether the dependency is up.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }
}

impl Readiness {
    /// Registers a dependency, initially down. Registering a name twice returns the same switch.
    pub fn dependency(&self, name: &'static str) -> DependencyStatus {
        let mut deps = self
            .inner
            .dependencies
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let up = Arc::clone(deps.entry(name).or_default());
        let gauge = self.inner.up_gauge.with_label_values(&[name]);
        gauge.set(i64::from(up.load(Ordering::Relaxed)));
        DependencyStatus { name, up, gauge }
    }

    /// Marks the service as draining: not ready, whatever its dependencies say.
    pub fn set_draining(&self) {
        self.inner.draining.store(true, Ordering::Relaxed);
    }

    /// Marks the service as draining as soon as `shutdown` fires, while its loops still run.
    pub fn drain_on(&self, shutdown: &crate::shutdown::Shutdown) {
        let (readiness, shutdown) = (self.clone(), shutdown.clone());
        tokio::spawn(async move {
            shutdown.triggered().await;
            readiness.set_draining();
        });
    }

    /// Whether the service is ready, and one line per dependency.
    pub fn report(&self) -> (bool, String) {
        let deps = self
            .inner
            .dependencies
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut ready = !self.inner.draining.load(Ordering::Relaxed);
        let mut text = String::new();
        if !ready {
            text.push_str("shutdown: draining\n");
        }
        for (name, up) in deps.iter() {
            let up = up.load(Ordering::Relaxed);
            ready &= up;
            text.push_str(&format!("{name}: {}\n", if up { "up" } else { "down" }));
        }
        (ready, text)
    }
}

/// The running HTTP server; dropping it stops it.
pub struct HttpServer {
    local_addr: SocketAddr,
    task: JoinHandle<()>,
}

impl HttpServer {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds `addr` and serves `/metrics`, `/healthz` and `/readyz` until dropped.
///
/// The server outlives the service's shutdown signal on purpose: while in-flight work
/// drains, `/readyz` answers 503 and `/metrics` still shows the drain.
pub async fn serve(addr: SocketAddr, metrics: Metrics) -> std::io::Result<HttpServer> {
    let listener = TcpListener::bind(addr).await?;
    let local_addr = listener.local_addr()?;
    tracing::info!(%local_addr, "Metrics and health server listening.");
    let task = tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "Metrics server accept failed.");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let metrics = metrics.clone();
                    async move { Ok::<_, Infallible>(route(&req, &metrics)) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(HttpServer { local_addr, task })
}

fn route(req: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String, content_type: &'static str| {
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts are valid")
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "GET only\n".into(),
            "text/plain",
        );
    }
    match req.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            metrics.render(),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        "/healthz" => text(StatusCode::OK, "ok\n".into(), "text/plain"),
        "/readyz" => {
            let (ready, report) = metrics.readiness().report();
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, report, "text/plain")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into(), "text/plain"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_every_dependency_and_no_drain() {
        let metrics = Metrics::new("test_ready").unwrap();
        let redis = metrics.readiness().dependency("redis");
        let kafka = metrics.readiness().dependency("kafka");
        assert!(!metrics.readiness().report().0);
        redis.set_up(true);
        assert!(!metrics.readiness().report().0);
        kafka.set_up(true);
        let (ready, text) = metrics.readiness().report();
        assert!(ready);
        assert_eq!(text, "kafka: up\nredis: up\n");
        metrics.readiness().set_draining();
        assert!(!metrics.readiness().report().0);
    }

    #[test]
    fn exposition_has_process_build_and_dependency_metrics() {
        let metrics = Metrics::new("test_expo").unwrap();
        metrics.readiness().dependency("redis").set_up(true);
        let c = metrics.counter("things_total", "Things.").unwrap();
        c.inc();
        let text = metrics.render();
        assert!(text.contains("test_expo_build_info{version=\""), "{text}");
        assert!(
            text.contains("test_expo_dependency_up{dependency=\"redis\"} 1"),
            "{text}"
        );
        assert!(text.contains("test_expo_things_total 1"), "{text}");
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
        assert!(text.contains("process_open_fds"), "{text}");
        assert!(text.contains("process_cpu_seconds_total"), "{text}");
    }
}
