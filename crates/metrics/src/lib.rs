//! Prometheus metrics of a Cairn server: every request counted with its latency by kind where
//! it is handled, and what a server reports of its state when scraped, served as Prometheus
//! text at `GET /metrics` on a plain HTTP port (`metrics_listen` in its configuration).

mod http;

pub use http::{serve, spawn};
pub use prometheus_client::metrics::counter::Counter;
pub use prometheus_client::metrics::gauge::Gauge;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::time::Instant;

/// The label of per-request metrics: the request's kind (`Lookup`, `Put`, …).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    kind: &'static str,
}

/// A server's metrics, all named `<prefix>_…` (`cairn_meta_…`, `cairn_chunk_…`).
pub struct Metrics {
    registry: Registry,
    requests: Family<Kind, Counter>,
    failures: Family<Kind, Counter>,
    seconds: Family<Kind, Histogram>,
}

impl Metrics {
    /// Metrics with the request counters and latencies registered.
    pub fn new(prefix: &str) -> Metrics {
        let mut registry = Registry::with_prefix(prefix);
        let requests = Family::<Kind, Counter>::default();
        let failures = Family::<Kind, Counter>::default();
        // 50 µs to about 3 min: a cached lookup to a slow repair.
        let seconds =
            Family::<Kind, Histogram>::new_with_constructor(|| Histogram::new(exponential_buckets(5e-5, 3.0, 15)));
        registry.register("requests", "Requests handled, by kind", requests.clone());
        registry.register("request_failures", "Requests answered with an error, by kind", failures.clone());
        registry.register("request_seconds", "Time to handle a request, by kind", seconds.clone());
        Metrics { registry, requests, failures, seconds }
    }

    /// Runs the handling of a request of `kind` and records it: count, failure, duration.
    pub async fn request<T, E>(
        &self,
        kind: &'static str,
        handling: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let started = Instant::now();
        let answer = handling.await;
        self.record(kind, started, answer.is_ok());
        answer
    }

    fn record(&self, kind: &'static str, started: Instant, ok: bool) {
        let k = Kind { kind };
        self.requests.get_or_create(&k).inc();
        if !ok {
            self.failures.get_or_create(&k).inc();
        }
        self.seconds.get_or_create(&k).observe(started.elapsed().as_secs_f64());
    }

    /// Registers a counter the server increments itself (`_total` is added to its name).
    pub fn counter(&mut self, name: &str, help: &str) -> Counter {
        let c = Counter::default();
        self.registry.register(name, help, c.clone());
        c
    }

    /// Registers a gauge the server sets, usually when it is scraped.
    pub fn gauge(&mut self, name: &str, help: &str) -> Gauge {
        let g = Gauge::default();
        self.registry.register(name, help, g.clone());
        g
    }

    /// The metrics in the Prometheus text format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// Moves `counter` up to `total`, a count the server keeps itself (it never goes down).
pub fn catch_up(counter: &Counter, total: u64) {
    counter.inc_by(total.saturating_sub(counter.get()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_server_counters_render_as_prometheus_text() {
        let mut m = Metrics::new("cairn_test");
        let bytes = m.counter("bytes", "Bytes stored");
        let up = m.gauge("servers", "Servers up");
        m.record("Lookup", Instant::now(), true);
        m.record("Lookup", Instant::now(), false);
        catch_up(&bytes, 4096);
        catch_up(&bytes, 10);
        up.set(3);
        let text = m.render();
        for line in [
            "cairn_test_requests_total{kind=\"Lookup\"} 2",
            "cairn_test_request_failures_total{kind=\"Lookup\"} 1",
            "cairn_test_request_seconds_count{kind=\"Lookup\"} 2",
            "cairn_test_bytes_total 4096",
            "cairn_test_servers 3",
            "# TYPE cairn_test_request_seconds histogram",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing from:\n{text}");
        }
    }
}
