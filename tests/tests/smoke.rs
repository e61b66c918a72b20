//! The basic slice works: a local cluster comes up, a file round-trips, it comes back after
//! down and up, and a second client sees the same volume through `mount.cairn`.

use cairn_tests::*;

#[test]
fn write_read_and_survive_restart() {
    let c = Cluster::start(3);
    let data: Vec<u8> = (0..10_000_000u32).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(c.path("big"), &data).unwrap();
    std::fs::write(c.path("small"), b"hello").unwrap();
    assert_eq!(std::fs::read(c.path("big")).unwrap(), data);
    let source = c.source();
    assert!(source.ends_with(":/cairn"), "source {source}");
    let second = c.mount_again("second", "");
    assert_eq!(std::fs::read(second.join("small")).unwrap(), b"hello");
    umount_lazy(&second);
    c.down();
    assert!(mount_source(&c.mnt).is_none(), "down left the mount behind");
    c.up(3, &[]);
    assert_eq!(std::fs::read(c.path("big")).unwrap(), data);
    assert_eq!(std::fs::read(c.path("small")).unwrap(), b"hello");

    // Unmounted by hand, the cluster is still found by its mountpoint and stopped.
    let meta = c.pid("meta");
    run(std::process::Command::new("umount").arg(&c.mnt));
    let out = run(std::process::Command::new(bin("cairn")).args(["local", "down"]).arg(&c.mnt));
    assert!(out.contains(&c.data.display().to_string()), "down stopped another cluster: {out}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while !exited(meta) {
        assert!(
            std::time::Instant::now() < deadline,
            "the metadata server outlived `down` of its unmounted mountpoint"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn a_server_that_cannot_start_fails_local_up_at_once_naming_it() {
    let tmp = tempfile::Builder::new().prefix("cairn-test-").tempdir().unwrap();
    let (data, mnt) = (tmp.path().join("data"), tmp.path().join("mnt"));
    run(std::process::Command::new(bin("cairn")).args(["format", "--data"]).arg(&data));
    let config = data.join("chunk-2.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("no_such_key = 1\n{text}")).unwrap();
    let out =
        std::process::Command::new(bin("cairn")).args(["local", "up"]).arg(&mnt).arg("--data").arg(&data).output();
    let down =
        || run(std::process::Command::new(bin("cairn")).args(["local", "down"]).arg(&mnt).arg("--data").arg(&data));
    let out = out.unwrap();
    down();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "local up succeeded without chunk server 2");
    assert!(err.contains("chunk-2 exited") && err.contains("no_such_key") && err.contains("chunk-2.log"), "{err}");
}

#[test]
fn a_chunk_server_whose_port_was_taken_moves_to_free_ones() {
    let tmp = tempfile::Builder::new().prefix("cairn-test-").tempdir().unwrap();
    let (data, mnt) = (tmp.path().join("data"), tmp.path().join("mnt"));
    run(std::process::Command::new(bin("cairn")).args(["format", "--data"]).arg(&data).args(["--chunk-servers", "1"]));
    let config = data.join("chunk-1.toml");
    let listen = |text: &str| text.lines().find(|l| l.starts_with("listen")).unwrap().to_string();
    let before = listen(&std::fs::read_to_string(&config).unwrap());
    let port: u16 = before.trim_end_matches('"').rsplit(':').next().unwrap().parse().unwrap();
    // Another program takes the port between the format and the start.
    let squatter = std::net::UdpSocket::bind(("127.0.0.1", port)).unwrap();
    let out = std::process::Command::new(bin("cairn"))
        .args(["local", "up"])
        .arg(&mnt)
        .arg("--data")
        .arg(&data)
        .args(["--chunk-servers", "1"])
        .output()
        .unwrap();
    let up = out.status.success() && std::fs::write(mnt.join("f"), b"moved").is_ok();
    let read = std::fs::read(mnt.join("f"));
    run(std::process::Command::new(bin("cairn")).args(["local", "down"]).arg(&mnt).arg("--data").arg(&data));
    drop(squatter);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(up, "local up did not work around the taken port: {err}");
    assert_eq!(read.unwrap(), b"moved");
    assert!(err.contains("chunk-1: its port was taken"), "{err}");
    let after = listen(&std::fs::read_to_string(&config).unwrap());
    assert_ne!(after, before, "the chunk server kept its taken port");
    assert!(std::fs::read_to_string(&config).unwrap().contains("data_dir = \"chunk-1\""), "paths made absolute");
}

#[test]
fn a_pid_file_naming_another_program_neither_stands_for_the_server_nor_gets_it_stopped() {
    let c = Cluster::start(1);
    c.kill9("chunk-1");
    // The dead server's number went to another program, which also says "cairn".
    let mut other = std::process::Command::new("bash").args(["-c", "exec -a cairn-other sleep 120"]).spawn().unwrap();
    let other_pid = other.id() as i32;
    std::fs::write(c.data.join("run/chunk-1.pid"), format!("{other_pid}\n")).unwrap();
    c.up(1, &[]);
    let restarted = c.pid("chunk-1");
    std::fs::write(c.path("f"), b"stored by the restarted chunk server").unwrap();
    c.down();
    let other_alive = other.try_wait().unwrap().is_none();
    let _ = other.kill();
    let _ = other.wait();
    assert_ne!(restarted, other_pid, "up took another program for chunk-1");
    assert!(other_alive, "down stopped another program");
}
