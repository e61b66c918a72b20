//! The `GET /metrics` endpoint: one fixed answer per connection, so a small responder over
//! tokio does (an HTTP library would bring a dozen crates for it). Every connection has a
//! deadline and a size limit, and bad requests get 400, 404 or 405; none stops the server.

use crate::Metrics;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A scrape that takes longer than this is dropped.
const DEADLINE: Duration = Duration::from_secs(10);
/// Requests larger than this are refused (a scrape's is a few hundred bytes).
const MAX_REQUEST: usize = 8 << 10;
/// Connections answered at once; more wait in the listen queue.
const MAX_CONNECTIONS: usize = 16;

/// Serves `metrics` at `addr` in a background task. A port that cannot be bound is logged and
/// the server goes on without metrics: they are not worth an outage.
pub fn spawn<F, Fut>(addr: SocketAddr, metrics: Arc<Metrics>, refresh: F)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        match TcpListener::bind(addr).await {
            Ok(listener) => {
                tracing::info!(listen = %addr, "metrics at /metrics");
                serve(listener, metrics, refresh).await
            }
            Err(e) => tracing::error!("cannot serve metrics on {addr}: {e}; running without them"),
        }
    });
}

/// Serves `metrics` on `listener` until the process ends, calling `refresh` before each
/// scrape so the server can set the gauges that describe its state.
pub async fn serve<F, Fut>(listener: TcpListener, metrics: Arc<Metrics>, refresh: F)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let refresh = Arc::new(refresh);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            Err(e) => {
                tracing::warn!("metrics listener: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (metrics, refresh) = (metrics.clone(), refresh.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let _ = tokio::time::timeout(DEADLINE, answer(sock, &metrics, refresh.as_ref())).await;
        });
    }
}

async fn answer<F, Fut>(mut sock: TcpStream, metrics: &Metrics, refresh: &F) -> std::io::Result<()>
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut req = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = sock.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        req.extend_from_slice(&buf[..n]);
        if req.len() > MAX_REQUEST {
            return reply(&mut sock, "400 Bad Request", "request too large\n").await;
        }
    }
    let line = String::from_utf8_lossy(req.split(|b| *b == b'\r').next().unwrap_or_default()).into_owned();
    let mut words = line.split(' ');
    let (method, target, version) = (words.next(), words.next(), words.next());
    if !version.is_some_and(|v| v.starts_with("HTTP/1.")) || words.next().is_some() {
        return reply(&mut sock, "400 Bad Request", "not an HTTP/1 request\n").await;
    }
    match (method, target.map(|t| t.split('?').next().unwrap_or(t))) {
        (Some("GET"), Some("/metrics")) => {
            refresh().await;
            reply(&mut sock, "200 OK", &metrics.render()).await
        }
        (Some("GET"), _) => reply(&mut sock, "404 Not Found", "metrics are at /metrics\n").await,
        _ => reply(&mut sock, "405 Method Not Allowed", "only GET\n").await,
    }
}

async fn reply(sock: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(body.as_bytes()).await?;
    sock.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    async fn get(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn scrapes_refresh_then_answer_and_bad_requests_are_refused() {
        let mut m = Metrics::new("cairn_test");
        let g = m.gauge("scrapes", "Scrapes so far");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let count = Arc::new(AtomicU64::new(0));
        let seen = count.clone();
        tokio::spawn(serve(listener, Arc::new(m), move || {
            let n = seen.fetch_add(1, Ordering::Relaxed) + 1;
            g.set(n as i64);
            async {}
        }));
        let ok = get(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.lines().any(|l| l == "cairn_test_scrapes 1"), "{ok}");
        assert!(get(addr, b"GET / HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 404"));
        assert!(get(addr, b"POST /metrics HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 405"));
        assert!(get(addr, b"garbage\r\n\r\n").await.starts_with("HTTP/1.1 400"));
        assert!(get(addr, &vec![b'A'; 20_000]).await.starts_with("HTTP/1.1 400"));
        // A client that connects and says nothing does not stop the others.
        let _idle = TcpStream::connect(addr).await.unwrap();
        let again = get(addr, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n").await;
        assert!(again.lines().any(|l| l == "cairn_test_scrapes 2"), "{again}");
    }
}
