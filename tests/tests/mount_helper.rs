//! `mount -t cairn`, fstab lines and two volumes side by side, through mount(8) itself.
//!
//! mount(8) runs `/sbin/mount.cairn`; the test links it to the freshly built `cairn-mount`
//! unless a real (non-symlink) helper is installed there already, and restores the links after.

use cairn_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Links mount(8)'s helpers for `-t cairn` and for the `fuse.cairn` type of live mounts
/// (remount) to the freshly built client; the guards put back what was there before.
fn install_helpers() -> [HelperLink; 2] {
    [install_helper(Path::new("/sbin/mount.cairn")), install_helper(Path::new("/sbin/mount.fuse.cairn"))]
}

/// A helper link this test made, and the link it replaced (if any), restored on drop so the
/// machine keeps pointing at whatever the user installed.
struct HelperLink {
    link: PathBuf,
    before: Option<PathBuf>,
    ours: bool,
}

impl Drop for HelperLink {
    fn drop(&mut self) {
        if !self.ours {
            return;
        }
        match &self.before {
            Some(target) => replace_link(&self.link, target),
            None => {
                let _ = std::fs::remove_file(&self.link);
            }
        }
    }
}

fn install_helper(link: &Path) -> HelperLink {
    let ours = bin("cairn-mount");
    let mut guard = HelperLink { link: link.to_path_buf(), before: None, ours: false };
    match std::fs::symlink_metadata(link) {
        Ok(m) if !m.file_type().is_symlink() => {} // a packaged helper: use it
        Ok(_) => {
            let before = std::fs::read_link(link).ok();
            if before.as_deref() != Some(ours.as_path()) {
                replace_link(link, &ours);
                guard.before = before;
                guard.ours = true;
            }
        }
        Err(_) => {
            std::os::unix::fs::symlink(&ours, link).unwrap();
            guard.ours = true;
        }
    }
    guard
}

/// Points the symlink `link` at `target` atomically.
fn replace_link(link: &Path, target: &Path) {
    let tmp = link.with_file_name(format!(".{}.tmp", link.file_name().unwrap().to_string_lossy()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).unwrap();
    std::fs::rename(&tmp, link).unwrap();
}

struct Unmount<'a>(&'a Path);

impl Drop for Unmount<'_> {
    fn drop(&mut self) {
        umount_lazy(self.0);
    }
}

#[test]
fn mount_t_cairn_fstab_lines_and_two_volumes() {
    let _helpers = install_helpers();
    let a = Cluster::start(1);
    let b = Cluster::start(1);
    std::fs::write(a.path("only-in-a"), b"A").unwrap();
    std::fs::write(b.path("only-in-b"), b"B").unwrap();
    let (src_a, src_b) = (a.source(), b.source());
    assert_ne!(src_a, src_b, "two volumes must have different mount sources");

    // `mount -t cairn SOURCE DIR` with the options users put in fstab.
    let dir = a.tmp.path().join("via-mount");
    std::fs::create_dir_all(&dir).unwrap();
    let _guard = Unmount(&dir);
    run(Command::new("mount")
        .args(["-t", "cairn", "-o", "rw,_netdev,nofail,noatime,x-systemd.automount"])
        .arg(&src_a)
        .arg(&dir));
    assert_eq!(mount_source(&dir).as_deref(), Some(src_a.as_str()));
    assert_eq!(std::fs::read(dir.join("only-in-a")).unwrap(), b"A");
    assert!(!dir.join("only-in-b").exists());
    // `mount -o remount,ro` (as xfstests does) turns the live mount read-only, and back.
    run(Command::new("mount").args(["-o", "remount,ro,nodiratime"]).arg(&dir));
    let err = std::fs::write(dir.join("while-ro"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    run(Command::new("mount").args(["-o", "remount,rw"]).arg(&dir));
    std::fs::write(dir.join("after-rw"), b"x").unwrap();
    assert_eq!(std::fs::read(a.path("after-rw")).unwrap(), b"x");
    // `umount` ends the client.
    run(Command::new("umount").arg(&dir));
    assert!(mount_source(&dir).is_none());

    // An fstab line (read from a file of our own with `mount -T`, never /etc/fstab).
    let fstab = b.tmp.path().join("fstab");
    let dir_b = b.tmp.path().join("via-fstab");
    std::fs::create_dir_all(&dir_b).unwrap();
    let _guard_b = Unmount(&dir_b);
    std::fs::write(
        &fstab,
        format!(
            "{src_b} {} cairn defaults,_netdev,nofail,noauto,x-systemd.requires=network-online.target 0 0\n",
            dir_b.display()
        ),
    )
    .unwrap();
    run(Command::new("mount").arg("-T").arg(&fstab).arg(&dir_b));
    assert_eq!(std::fs::read(dir_b.join("only-in-b")).unwrap(), b"B");
    // Writes through the second client are seen by the first one's mount of the same volume.
    std::fs::write(dir_b.join("from-fstab-mount"), b"hello").unwrap();
    run(Command::new("umount").arg(&dir_b));
    assert_eq!(std::fs::read(b.path("from-fstab-mount")).unwrap(), b"hello");

    // A wrong volume name is refused with a clear error and a failing exit status.
    let wrong = src_a.rsplit_once(":/").unwrap().0.to_string() + ":/no-such-volume";
    let out = Command::new("mount").args(["-t", "cairn"]).arg(&wrong).arg(&dir).output().unwrap();
    assert!(!out.status.success());
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(msg.contains("no-such-volume"), "unclear error: {msg}");
    assert!(mount_source(&dir).is_none());
}
