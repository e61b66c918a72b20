//! Permission checks on the mount with real unprivileged users.
//!
//! Every scenario runs twice: on a plain directory under /tmp (what Linux does) and on the Cairn
//! mount, and both must give the expected answers. Users (created idempotently, as root):
//! `cairntest` (uid 2001, member of `cairngrp`, gid 2100) and `cairnother` (uid 2002).

use cairn_tests::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const TEST_UID: u32 = 2001;
const OTHER_UID: u32 = 2002;
const GRP_GID: u32 = 2100;

/// Runs a user-management command, treating "already exists" as success and retrying while
/// another process holds the passwd/group lock.
fn admin(args: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("running {args:?}: {e}"));
        // useradd/groupadd exit 9 when the name is taken; 4 when the id is (by our own user).
        match out.status.code() {
            Some(0) | Some(9) => return,
            Some(4) if String::from_utf8_lossy(&out.stderr).contains("already") => return,
            _ if Instant::now() < deadline && String::from_utf8_lossy(&out.stderr).contains("lock") => {
                std::thread::sleep(Duration::from_millis(100));
            }
            _ => panic!("{args:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr)),
        }
    }
}

fn id_of(flag: &str, user: &str) -> Vec<u32> {
    let out = run(Command::new("id").arg(flag).arg(user));
    out.split_whitespace().map(|s| s.parse().expect("numeric id")).collect()
}

/// The two test users, created if missing. Returns their primary gids.
fn ensure_users() -> (u32, u32) {
    admin(&["groupadd", "-g", &GRP_GID.to_string(), "cairngrp"]);
    admin(&["useradd", "-M", "-u", &TEST_UID.to_string(), "cairntest"]);
    admin(&["useradd", "-M", "-u", &OTHER_UID.to_string(), "cairnother"]);
    admin(&["usermod", "-a", "-G", "cairngrp", "cairntest"]);
    assert_eq!(id_of("-u", "cairntest"), vec![TEST_UID], "uid of cairntest");
    assert_eq!(id_of("-u", "cairnother"), vec![OTHER_UID], "uid of cairnother");
    assert!(id_of("-G", "cairntest").contains(&GRP_GID), "cairntest is not in cairngrp");
    assert!(!id_of("-G", "cairnother").contains(&GRP_GID), "cairnother must not be in cairngrp");
    let (a, b) = (id_of("-g", "cairntest")[0], id_of("-g", "cairnother")[0]);
    assert_ne!(a, GRP_GID);
    assert_ne!(b, GRP_GID);
    (a, b)
}

/// One filesystem call in perl, exiting with the errno it failed with (0 on success).
const OP: &str = r#"
my ($op, @a) = @ARGV;
my $ok;
if ($op eq "read") { $ok = open(my $f, "<", $a[0]); if ($ok) { my $b; $ok = defined(sysread($f, $b, 16)); } }
elsif ($op eq "write") { $ok = open(my $f, ">>", $a[0]); if ($ok) { $ok = syswrite($f, "w"); } }
elsif ($op eq "create") { $ok = open(my $f, ">", $a[0]); }
elsif ($op eq "mkdir") { $ok = mkdir($a[0], 0777); }
elsif ($op eq "chmod") { $ok = chmod(oct($a[1]), $a[0]); }
elsif ($op eq "chown") { $ok = chown($a[1], $a[2], $a[0]); }
elsif ($op eq "unlink") { $ok = unlink($a[0]); }
elsif ($op eq "rename") { $ok = rename($a[0], $a[1]); }
else { exit 254; }
exit($ok ? 0 : (($! + 0) || 255));
"#;

/// Runs one operation as `uid` (with its groups) and returns the errno it got, 0 for success.
fn as_user(uid: u32, gid: u32, op: &str, args: &[&str]) -> i64 {
    let out = Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--init-groups")
        .args(["perl", "-e", OP, op])
        .args(args)
        .output()
        .expect("running setpriv");
    let code = out.status.code().unwrap_or_else(|| panic!("{op} {args:?} as {uid} was killed: {}", out.status));
    assert!(
        code != 254 && code != 255,
        "{op} {args:?} as {uid}: helper failed ({code}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    i64::from(code)
}

fn chown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn meta(p: &Path) -> std::fs::Metadata {
    std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
}

/// Runs every scenario under `base` (an empty root-owned directory) and records the answers.
fn scenario(base: &Path, gid_a: u32, gid_b: u32) -> Vec<(&'static str, i64)> {
    let p = |rel: &str| base.join(rel).to_string_lossy().into_owned();
    let a = |op: &str, args: &[&str]| as_user(TEST_UID, gid_a, op, args);
    let b = |op: &str, args: &[&str]| as_user(OTHER_UID, gid_b, op, args);
    let mut r = Vec::new();

    // Plain mode bits against a non-owner.
    std::fs::write(base.join("secret"), b"root only").unwrap();
    chmod(&base.join("secret"), 0o600);
    std::fs::write(base.join("public"), b"everyone reads").unwrap();
    chmod(&base.join("public"), 0o644);
    std::fs::create_dir(base.join("ro")).unwrap();
    chmod(&base.join("ro"), 0o755);
    r.push(("read 0600 root file", a("read", &[&p("secret")])));
    r.push(("read 0644 root file", a("read", &[&p("public")])));
    r.push(("write 0644 root file", a("write", &[&p("public")])));
    r.push(("create in 0755 root dir", a("create", &[&p("ro/new")])));
    r.push(("mkdir in 0755 root dir", a("mkdir", &[&p("ro/sub")])));
    r.push(("unlink in 0755 root dir", a("unlink", &[&p("public")])));
    r.push(("root file unchanged", i64::from(std::fs::read(base.join("public")).unwrap() == b"everyone reads")));

    // chmod and chown are for the owner (and root) only.
    std::fs::write(base.join("afile"), b"a").unwrap();
    chown(&base.join("afile"), TEST_UID, gid_a);
    chmod(&base.join("afile"), 0o644);
    r.push(("other chmods a's file", b("chmod", &[&p("afile"), "0666"])));
    r.push(("other chowns a's file to self", b("chown", &[&p("afile"), &OTHER_UID.to_string(), "-1"])));
    r.push(("user chmods root file", a("chmod", &[&p("secret"), "0644"])));
    r.push(("owner gives file away", a("chown", &[&p("afile"), &OTHER_UID.to_string(), "-1"])));
    r.push(("owner chgrps to a foreign group", a("chown", &[&p("afile"), "-1", &gid_b.to_string()])));
    r.push(("owner chmods own file", a("chmod", &[&p("afile"), "0600"])));
    r.push(("mode after owner chmod", i64::from(meta(&base.join("afile")).mode() & 0o7777)));
    r.push(("owner chgrps to own supplementary group", a("chown", &[&p("afile"), "-1", &GRP_GID.to_string()])));
    r.push(("gid after chgrp", i64::from(meta(&base.join("afile")).gid())));
    r.push(("uid after refused chown", i64::from(meta(&base.join("afile")).uid())));

    // Sticky directory: only the owner of an entry may remove or rename it.
    let t = base.join("tmp");
    std::fs::create_dir(&t).unwrap();
    chmod(&t, 0o1777);
    r.push(("a creates in sticky dir", a("create", &[&p("tmp/a")])));
    r.push(("owner of new file", i64::from(meta(&t.join("a")).uid())));
    r.push(("b creates in sticky dir", b("create", &[&p("tmp/b")])));
    r.push(("b unlinks a's file", b("unlink", &[&p("tmp/a")])));
    r.push(("b renames a's file", b("rename", &[&p("tmp/a"), &p("tmp/stolen")])));
    r.push(("b renames onto a's file", b("rename", &[&p("tmp/b"), &p("tmp/a")])));
    r.push(("a's file still there", i64::from(t.join("a").exists())));
    r.push(("a renames own file", a("rename", &[&p("tmp/a"), &p("tmp/a2")])));
    r.push(("b unlinks own file", b("unlink", &[&p("tmp/b")])));
    r.push(("root unlinks a's file", i64::from(std::fs::remove_file(t.join("a2")).is_ok())));

    // Setgid directory: new entries take the directory's group; subdirectories inherit the bit.
    let sg = base.join("sg");
    std::fs::create_dir(&sg).unwrap();
    chown(&sg, 0, GRP_GID);
    chmod(&sg, 0o2775);
    r.push(("a creates in setgid dir", a("create", &[&p("sg/f")])));
    r.push(("gid of file in setgid dir", i64::from(meta(&sg.join("f")).gid())));
    r.push(("a mkdirs in setgid dir", a("mkdir", &[&p("sg/sub")])));
    let sub = meta(&sg.join("sub"));
    r.push(("gid of subdir in setgid dir", i64::from(sub.gid())));
    r.push(("subdir has setgid", i64::from(sub.mode() & 0o2000 != 0)));
    r.push(("a creates in inherited setgid subdir", a("create", &[&p("sg/sub/g")])));
    r.push(("gid of file two levels down", i64::from(meta(&sg.join("sub/g")).gid())));
    std::fs::create_dir(sg.join("rootsub")).unwrap();
    r.push(("gid of root's subdir", i64::from(meta(&sg.join("rootsub")).gid())));

    // Group permissions through a supplementary group.
    let g = base.join("grp");
    std::fs::create_dir(&g).unwrap();
    chown(&g, 0, GRP_GID);
    chmod(&g, 0o770);
    std::fs::write(base.join("grpfile"), b"group data").unwrap();
    chown(&base.join("grpfile"), 0, GRP_GID);
    chmod(&base.join("grpfile"), 0o640);
    r.push(("member reads group file", a("read", &[&p("grpfile")])));
    r.push(("member writes 0640 group file", a("write", &[&p("grpfile")])));
    r.push(("non-member reads group file", b("read", &[&p("grpfile")])));
    r.push(("member creates in 0770 group dir", a("create", &[&p("grp/x")])));
    r.push(("non-member creates in 0770 group dir", b("create", &[&p("grp/y")])));
    r.push(("non-member reads in 0770 group dir", b("read", &[&p("grp/x")])));
    chmod(&base.join("grpfile"), 0o660);
    r.push(("member writes 0660 group file", a("write", &[&p("grpfile")])));
    r.push(("group file content", i64::from(std::fs::read(base.join("grpfile")).unwrap() == b"group dataw")));
    r
}

fn expected() -> Vec<(&'static str, i64)> {
    let (ok, acces, perm) = (0, i64::from(libc::EACCES), i64::from(libc::EPERM));
    vec![
        ("read 0600 root file", acces),
        ("read 0644 root file", ok),
        ("write 0644 root file", acces),
        ("create in 0755 root dir", acces),
        ("mkdir in 0755 root dir", acces),
        ("unlink in 0755 root dir", acces),
        ("root file unchanged", 1),
        ("other chmods a's file", perm),
        ("other chowns a's file to self", perm),
        ("user chmods root file", perm),
        ("owner gives file away", perm),
        ("owner chgrps to a foreign group", perm),
        ("owner chmods own file", ok),
        ("mode after owner chmod", 0o600),
        ("owner chgrps to own supplementary group", ok),
        ("gid after chgrp", i64::from(GRP_GID)),
        ("uid after refused chown", i64::from(TEST_UID)),
        ("a creates in sticky dir", ok),
        ("owner of new file", i64::from(TEST_UID)),
        ("b creates in sticky dir", ok),
        ("b unlinks a's file", perm),
        ("b renames a's file", perm),
        ("b renames onto a's file", perm),
        ("a's file still there", 1),
        ("a renames own file", ok),
        ("b unlinks own file", ok),
        ("root unlinks a's file", 1),
        ("a creates in setgid dir", ok),
        ("gid of file in setgid dir", i64::from(GRP_GID)),
        ("a mkdirs in setgid dir", ok),
        ("gid of subdir in setgid dir", i64::from(GRP_GID)),
        ("subdir has setgid", 1),
        ("a creates in inherited setgid subdir", ok),
        ("gid of file two levels down", i64::from(GRP_GID)),
        ("gid of root's subdir", i64::from(GRP_GID)),
        ("member reads group file", ok),
        ("member writes 0640 group file", acces),
        ("non-member reads group file", acces),
        ("member creates in 0770 group dir", ok),
        ("non-member creates in 0770 group dir", acces),
        ("non-member reads in 0770 group dir", acces),
        ("member writes 0660 group file", ok),
        ("group file content", 1),
    ]
}

fn check(place: &str, got: &[(&str, i64)], want: &[(&str, i64)]) {
    let bad: Vec<String> = want
        .iter()
        .zip(got)
        .filter(|(w, g)| w != g)
        .map(|(w, g)| format!("  {}: expected {}, got {} ({})", w.0, w.1, g.1, g.0))
        .collect();
    assert_eq!(got.len(), want.len(), "{place}: scenario length");
    assert!(bad.is_empty(), "{place}:\n{}", bad.join("\n"));
}

#[test]
fn unprivileged_users_get_linux_permission_semantics() {
    let (gid_a, gid_b) = ensure_users();
    let want = expected();

    // Reference run on a local directory.
    let local = tempfile::Builder::new().prefix("cairn-perm-local-").tempdir().unwrap();
    chmod(local.path(), 0o755);
    let local_base = local.path().join("base");
    std::fs::create_dir(&local_base).unwrap();
    chmod(&local_base, 0o755);
    let got = scenario(&local_base, gid_a, gid_b);
    check("local /tmp reference", &got, &want);

    let c = Cluster::start(3);
    // The users must be able to reach the mount point inside the (0700) test directory.
    chmod(c.tmp.path(), 0o755);
    let base = c.path("base");
    std::fs::create_dir(&base).unwrap();
    chmod(&base, 0o755);
    let got = scenario(&base, gid_a, gid_b);
    check("cairn mount", &got, &want);

    // The answers come from the metadata server, not only the kernel's cache: a second client
    // sees the same owners, groups and modes.
    let second = c.mount_again("second", "");
    let other = second.join("base");
    assert_eq!(meta(&other.join("sg/f")).gid(), GRP_GID);
    assert_eq!(meta(&other.join("sg/sub")).mode() & 0o2000, 0o2000);
    assert_eq!(meta(&other.join("tmp")).mode() & 0o7777, 0o1777);
    assert_eq!(meta(&other.join("afile")).mode() & 0o7777, 0o600);
    assert_eq!(meta(&other.join("grp/x")).uid(), TEST_UID);
    assert_eq!(as_user(OTHER_UID, gid_b, "read", &[&other.join("secret").to_string_lossy()]), i64::from(libc::EACCES));
}
