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
}
