//! Failure handling: strangers are refused, bad frames are answered with errors instead of
//! hangs or crashes, a lost metadata server gives bounded errors and the mount recovers by
//! itself, and a full chunk server gives ENOSPC.

use cairn_net::{Identity, NetError, RpcClient};
use cairn_proto::frame;
use cairn_proto::meta::{MetaRequest, MetaResponse};
use cairn_proto::{ErrorCode, WireError};
use cairn_tests::*;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Bound for anything that must not hang.
const NO_HANG: Duration = Duration::from_secs(10);

fn meta_addr(c: &Cluster) -> String {
    toml_value(&c.data.join("cluster.toml"), "meta")
}

fn cluster_identity(c: &Cluster) -> Identity {
    let tls = c.data.join("tls");
    Identity::load(&tls.join("ca.pem"), &tls.join("client.pem"), &tls.join("client.key")).unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn client_config(meta: &str) -> cairn_client::ClientConfig {
    cairn_client::ClientConfig {
        meta: meta.to_string(),
        volume: "cairn".into(),
        timeout: NO_HANG,
        ..Default::default()
    }
}

async fn hello(rpc: &RpcClient) -> Result<MetaResponse, NetError> {
    let req = MetaRequest::Hello { version: cairn_proto::PROTOCOL_VERSION, volume: "cairn".into() };
    Ok(rpc.call::<_, MetaResponse>(&req).await?.0)
}

/// Runs `f` on another thread and returns its result, or panics if it takes longer than `limit`
/// (the thread is left behind; the cluster teardown unblocks it by unmounting).
fn bounded<T: Send + 'static>(what: &str, limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).unwrap_or_else(|_| panic!("{what} did not return within {limit:?}"))
}

#[test]
fn peers_without_a_cluster_certificate_are_refused() {
    let c = Cluster::start(1);
    std::fs::write(c.path("hello"), b"hi").unwrap();
    let meta = meta_addr(&c);
    let chunk = toml_value(&c.data.join("chunk-1.toml"), "listen");
    let real_ca = std::fs::read_to_string(c.data.join("tls/ca.pem")).unwrap();

    let evil_ca = cairn_net::pki::generate_ca("evil").unwrap();
    let evil = cairn_net::pki::issue(&evil_ca, "cairn client", &["client.cairn"]).unwrap();
    // Trusts only its own CA: refuses the servers, and they refuse it.
    let foreign = Identity::from_pem(&evil_ca.cert_pem, &evil.cert_pem, &evil.key_pem).unwrap();
    // Trusts the cluster CA (so it would accept the server) but presents a foreign certificate:
    // only the servers' client verification stands between it and the volume.
    let impostor = Identity::from_pem(&real_ca, &evil.cert_pem, &evil.key_pem).unwrap();

    let rt = runtime();
    rt.block_on(async {
        // Control: the cluster's own identity gets in.
        let ok = cairn_client::Client::connect(client_config(&meta), &cluster_identity(&c)).await;
        assert!(ok.is_ok(), "the cluster's own client certificate was refused");

        for (who, id) in [("foreign CA", &foreign), ("impostor", &impostor)] {
            let started = Instant::now();
            let r = cairn_client::Client::connect(client_config(&meta), id).await;
            let e = r.err().unwrap_or_else(|| panic!("{who}: connected to the volume"));
            assert!(started.elapsed() < NO_HANG, "{who}: refusal took {:?}", started.elapsed());
            assert_ne!(e.code, ErrorCode::TimedOut, "{who}: {e}");

            for (addr, name) in [(&meta, cairn_net::META_SERVER_NAME), (&chunk, cairn_net::CHUNK_SERVER_NAME)] {
                let endpoint = cairn_net::client_endpoint(id).unwrap();
                let rpc = RpcClient::new(endpoint, addr, name, NO_HANG);
                let r = if name == cairn_net::META_SERVER_NAME {
                    hello(&rpc).await.map(|_| ())
                } else {
                    rpc.call::<_, cairn_proto::chunk::ChunkResponse>(&cairn_proto::chunk::ChunkRequest::Stat)
                        .await
                        .map(|_| ())
                };
                match r {
                    Ok(()) => panic!("{who}: {name} at {addr} answered a request"),
                    Err(NetError::Remote(e)) => panic!("{who}: {name} served the request: {e}"),
                    Err(NetError::Timeout { .. }) => {
                        panic!("{who}: {name} hung instead of refusing")
                    }
                    Err(_) => {}
                }
            }
        }
    });

    // A second mount with a client.toml naming the foreign certificate fails loudly.
    let dir = c.tmp.path().join("foreign");
    std::fs::create_dir_all(&dir).unwrap();
    let mnt = c.tmp.path().join("foreign-mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::write(dir.join("ca.pem"), &real_ca).unwrap();
    std::fs::write(dir.join("client.pem"), &evil.cert_pem).unwrap();
    std::fs::write(dir.join("client.key"), &evil.key_pem).unwrap();
    std::fs::write(
        dir.join("client.toml"),
        format!(
            "timeout_secs = 5\n[tls]\nca = \"{0}/ca.pem\"\ncert = \"{0}/client.pem\"\nkey = \"{0}/client.key\"\n",
            dir.display()
        ),
    )
    .unwrap();
    let out = Command::new(bin("cairn-mount"))
        .arg(c.source())
        .arg(&mnt)
        .arg("-o")
        .arg(format!("config={},log={}", dir.join("client.toml").display(), dir.join("mount.log").display()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if mount_source(&mnt).is_some() {
        umount_lazy(&mnt);
        panic!("mounted with a foreign certificate");
    }
    assert!(!out.status.success(), "mount with a foreign certificate exited 0: {stderr}");
    assert!(
        stderr.contains("cannot reach volume") && stderr.to_lowercase().contains("certificate"),
        "unclear error for a foreign certificate: {stderr}"
    );
    eprintln!("foreign mount refused: {}", stderr.trim());
    // The real mount is unaffected.
    assert_eq!(std::fs::read(c.path("hello")).unwrap(), b"hi");
}

/// What came back on a stream carrying a hand-made request.
#[derive(Debug)]
enum Outcome {
    /// A well-formed answer frame.
    Answer(Result<MetaResponse, WireError>),
    /// The server reset its side of the stream.
    Reset,
    /// Anything else: an empty or unparsable answer, a lost connection.
    Other(#[allow(dead_code, reason = "shown in failure messages")] String),
}

/// Sends `bytes` on a new stream of `conn` (finishing it unless `finish` is false) and reads
/// the answer, all within [`NO_HANG`].
async fn raw(conn: &quinn::Connection, bytes: &[u8], finish: bool) -> Outcome {
    let work = async {
        let (mut send, mut recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => return Outcome::Other(format!("open_bi: {e}")),
        };
        // The server may stop reading early (oversized frame): a failed write is expected then.
        let _ = send.write_all(bytes).await;
        if finish {
            let _ = send.finish();
        }
        match recv.read_to_end(64 << 20).await {
            Ok(answer) => match frame::decode_frame::<Result<MetaResponse, WireError>>(&answer) {
                Ok((a, _)) => Outcome::Answer(a),
                Err(e) => Outcome::Other(format!("{} answer bytes: {e}", answer.len())),
            },
            Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(_))) => Outcome::Reset,
            Err(e) => Outcome::Other(e.to_string()),
        }
    };
    tokio::time::timeout(NO_HANG, work)
        .await
        .unwrap_or_else(|_| panic!("no answer within {NO_HANG:?} to {} bytes", bytes.len()))
}

fn prefix(header: u32, payload: u32) -> Vec<u8> {
    let mut v = header.to_le_bytes().to_vec();
    v.extend_from_slice(&payload.to_le_bytes());
    v
}

fn assert_refused(what: &str, o: &Outcome) {
    match o {
        Outcome::Answer(Err(e)) if e.code == ErrorCode::BadRequest => {}
        Outcome::Reset => {}
        other => panic!("{what}: expected an error answer or a reset, got {other:?}"),
    }
}

#[test]
fn malformed_and_oversized_frames_are_answered_not_hung() {
    let c = Cluster::start(1);
    std::fs::write(c.path("before"), b"still here").unwrap();
    let meta_pid = c.pid("meta");
    let meta: std::net::SocketAddr = meta_addr(&c).parse().unwrap();
    let identity = cluster_identity(&c);

    let rt = runtime();
    rt.block_on(async {
        let endpoint = cairn_net::client_endpoint(&identity).unwrap();
        let conn = endpoint
            .connect(meta, cairn_net::META_SERVER_NAME)
            .unwrap()
            .await
            .expect("connecting with the cluster's identity");

        let valid = frame::encode_head(
            &MetaRequest::Hello { version: cairn_proto::PROTOCOL_VERSION, volume: "cairn".into() },
            0,
        )
        .unwrap();
        match raw(&conn, &valid, true).await {
            Outcome::Answer(Ok(MetaResponse::Hello { .. })) => {}
            other => panic!("a valid hand-made Hello was not answered: {other:?}"),
        }

        // Garbage where the header should be: well-sized, undecodable.
        let mut garbage = prefix(200, 48);
        garbage.extend((0..248u32).map(|i| (i.wrapping_mul(167) ^ 0xa5) as u8 | 0x80));
        assert_refused("garbage header", &raw(&conn, &garbage, true).await);

        // A valid message followed by junk in its header.
        let mut trailing = valid.clone();
        trailing.extend_from_slice(b"junk");
        let hlen = u32::from_le_bytes(trailing[0..4].try_into().unwrap()) + 4;
        trailing[0..4].copy_from_slice(&hlen.to_le_bytes());
        assert_refused("trailing bytes", &raw(&conn, &trailing, true).await);

        // An unknown request variant.
        let mut unknown = prefix(2, 0);
        unknown.extend_from_slice(&[0x7f, 0x00]);
        assert_refused("unknown variant", &raw(&conn, &unknown, true).await);

        // A prefix claiming a 100 MiB header, alone and followed by a flood of bytes.
        let huge = prefix(100 << 20, 0);
        assert_refused("100 MiB header claim", &raw(&conn, &huge, true).await);
        let mut flood = huge.clone();
        flood.resize(8 << 20, 0x55);
        assert_refused("100 MiB header flood", &raw(&conn, &flood, true).await);
        // And a 100 MiB payload behind a valid header.
        let mut big_payload = valid.clone();
        big_payload[4..8].copy_from_slice(&(100u32 << 20).to_le_bytes());
        assert_refused("100 MiB payload claim", &raw(&conn, &big_payload, true).await);

        // Truncated requests: the sender finished before the frame was complete.
        assert_refused("empty stream", &raw(&conn, &[], true).await);
        assert_refused("partial prefix", &raw(&conn, &[1, 2, 3], true).await);
        let mut short = prefix(100, 0);
        short.extend_from_slice(&[0; 10]);
        assert_refused("partial header", &raw(&conn, &short, true).await);

        // A stream the client abandons mid-request (reset): nothing to answer, nothing breaks.
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.write_all(&prefix(100, 0)).await.unwrap();
        let _ = send.reset(7u32.into());

        // The same connection still serves well-formed requests.
        match raw(&conn, &valid, true).await {
            Outcome::Answer(Ok(MetaResponse::Hello { .. })) => {}
            other => panic!("connection unusable after bad frames: {other:?}"),
        }
        assert!(conn.close_reason().is_none(), "server closed the connection");
        conn.close(0u32.into(), b"done");
        endpoint.wait_idle().await;
    });

    // The metadata server is still the same process, and the mount still works.
    assert_eq!(c.pid("meta"), meta_pid);
    assert!(Path::new(&format!("/proc/{meta_pid}/exe")).exists(), "meta server died");
    assert_eq!(std::fs::read(c.path("before")).unwrap(), b"still here");
    std::fs::write(c.path("after"), b"fine").unwrap();
    assert_eq!(std::fs::metadata(c.path("after")).unwrap().len(), 4, "stat after the bad frames");
}

fn os_err(r: std::io::Result<impl Sized>) -> Option<i32> {
    r.err().map(|e| e.raw_os_error().unwrap_or(-1))
}

#[test]
fn lost_metadata_server_gives_bounded_errors_and_the_mount_recovers() {
    let c = Cluster::start_with(3, &["-o", "timeout=2"]);
    std::fs::write(c.path("before"), b"data").unwrap();
    let mount_pid = c.pid("mount");
    let source = c.source();

    c.kill9("meta");
    let killed = Instant::now();

    let accepted = [libc::EIO, libc::ETIMEDOUT];
    let p = c.path("never-seen-before");
    let r = bounded("stat of a new name", NO_HANG, move || os_err(std::fs::metadata(&p)));
    assert!(r.is_some_and(|e| accepted.contains(&e)), "stat without a metadata server: {r:?}");
    let p = c.path("created-while-down");
    let r = bounded("creating a file", NO_HANG, move || os_err(std::fs::write(&p, b"x")));
    assert!(r.is_some_and(|e| accepted.contains(&e)), "create without a metadata server: {r:?}");
    let p = c.mnt.clone();
    let r = bounded("listing the root", NO_HANG, move || {
        os_err(std::fs::read_dir(&p).and_then(|d| d.collect::<Result<Vec<_>, _>>()))
    });
    assert!(r.is_some_and(|e| accepted.contains(&e)), "readdir without a metadata server: {r:?}");

    // Bring the metadata server back; the mount is left alone and must recover by itself.
    eprintln!("errors seen within {:?} of the crash", killed.elapsed());
    let restart = Instant::now();
    c.up(3, &[]);
    eprintln!("restart took {:?}", restart.elapsed());
    assert_eq!(c.pid("mount"), mount_pid, "the client was restarted");
    assert_eq!(mount_source(&c.mnt).as_deref(), Some(source.as_str()));
    let deadline = Instant::now() + Duration::from_secs(60);
    let recovered_at = loop {
        let p = c.path("after");
        let r = bounded("writing after the restart", NO_HANG, move || std::fs::write(&p, b"back"));
        match r {
            Ok(()) => break Instant::now(),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => panic!("the mount did not recover after the metadata server came back: {e}"),
        }
    };
    eprintln!("mount recovered {:?} after the restart", recovered_at - restart);
    assert_eq!(std::fs::read(c.path("after")).unwrap(), b"back");
    assert_eq!(std::fs::read(c.path("before")).unwrap(), b"data");
    assert!(std::fs::metadata(c.path("never-seen-before")).is_err());
    let names: Vec<_> =
        std::fs::read_dir(&c.mnt).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(names.contains(&"before".to_string()) && names.contains(&"after".to_string()));
    assert_eq!(c.pid("mount"), mount_pid);
}

#[test]
fn full_chunk_server_gives_enospc_and_keeps_earlier_files() {
    let t = FullDisk::start(1, &[], "8m");
    let c = &t.c;

    let early: Vec<u8> = (0..1_500_000u32).map(|i| (i % 253) as u8).collect();
    {
        let mut f = std::fs::File::create(c.path("early")).unwrap();
        f.write_all(&early).unwrap();
        f.sync_all().unwrap();
    }
    std::fs::write(c.path("small"), b"small file").unwrap();

    // Incompressible: the volume compresses blocks, and a pattern would fit.
    let big = pattern(1, 20 << 20);
    let p = c.path("big");
    let result = bounded("writing 20 MiB to a full disk", Duration::from_secs(60), move || {
        let mut f = std::fs::File::create(&p)?;
        f.write_all(&big)?;
        f.sync_all()?;
        drop(f);
        Ok::<_, std::io::Error>(())
    });
    match result {
        Ok(()) => panic!("20 MiB fit on an 8 MiB chunk server"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "writing past a full chunk server: {e}"),
    }

    // What was written before is intact, also for a client with cold caches.
    assert_eq!(std::fs::read(c.path("early")).unwrap(), early);
    assert_eq!(std::fs::read(c.path("small")).unwrap(), b"small file");
    let second = c.mount_again("second", "");
    assert_eq!(std::fs::read(second.join("early")).unwrap(), early);
    assert_eq!(std::fs::read(second.join("small")).unwrap(), b"small file");
    umount_lazy(&second);
}
