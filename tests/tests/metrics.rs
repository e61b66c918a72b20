//! Prometheus metrics: the metadata server and each chunk server serve theirs at `/metrics`
//! on the address their configuration names, and the numbers move with what clients do.

use cairn_tests::*;
use std::io::{Read, Write};
use std::path::Path;

/// `GET /metrics` from the server whose configuration is `config`.
fn scrape(config: &Path) -> String {
    let addr = toml_value(config, "metrics_listen");
    let mut s = std::net::TcpStream::connect(&addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: cairn\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    out
}

/// The value of the sample `name` (with its labels, as printed) in a scrape.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
        .parse()
        .unwrap()
}

#[test]
fn servers_report_requests_and_state_to_prometheus() {
    let c = Cluster::start(2);
    let (meta, chunk) = (c.data.join("meta.toml"), c.data.join("chunk-1.toml"));
    std::fs::write(c.path("f"), pattern(1, 3 << 20)).unwrap();
    std::fs::File::open(c.path("f")).unwrap().sync_all().unwrap();
    let before = scrape(&meta);
    assert_eq!(sample(&before, "cairn_meta_chunk_servers_alive"), 2.0);
    assert_eq!(sample(&before, "cairn_meta_chunk_servers_dead"), 0.0);
    assert!(sample(&before, "cairn_meta_files") >= 2.0, "root and f");
    assert!(sample(&before, "cairn_meta_clients") >= 1.0);
    assert!(sample(&before, "cairn_meta_free_bytes") > 0.0);
    assert!(sample(&before, "cairn_meta_requests_total{kind=\"Commit\"}") >= 1.0);
    // A change through the mount is counted at once (a chmod: namespace changes of a lone
    // client reach the server a moment later, see `deferred`).
    let chmods = |t: &str| {
        t.lines()
            .find_map(|l| l.strip_prefix("cairn_meta_requests_total{kind=\"SetAttr\"} "))
            .map_or(0.0, |v| v.parse().unwrap())
    };
    std::fs::set_permissions(c.path("f"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    assert_eq!(chmods(&scrape(&meta)), chmods(&before) + 1.0);
    // Blocks went to the chunk servers; whichever holds them counted their bytes.
    let stored: f64 = ["chunk-1.toml", "chunk-2.toml"]
        .iter()
        .map(|f| sample(&scrape(&c.data.join(f)), "cairn_chunk_stored_bytes_total"))
        .sum();
    assert!(stored >= (3 << 20) as f64 / 2.0, "{stored} bytes stored for 3 MiB of (compressible) data");
    assert!(sample(&scrape(&chunk), "cairn_chunk_capacity_bytes") > 0.0);
    // `cairn status` names the endpoints.
    let status = c.status();
    assert!(status.contains(&format!("meta http://{}/metrics", toml_value(&meta, "metrics_listen"))), "{status}");
}
