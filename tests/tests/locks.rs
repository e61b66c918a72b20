//! File locks across two clients (separate mount processes): flock, fcntl byte ranges, OFD
//! locks, blocking waits, interruption, deadlock detection, release on close, on process
//! death and on client death, and sqlite3 transactions from two mounts on one database.
//!
//! Locks are taken by real processes: a small Python interpreter per lock holder that runs
//! the lines it is sent (see [`PRELUDE`]) and answers `ok <value>`, `err <errno>` or `intr`.

use cairn_tests::*;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Runs the lines it reads; the answer is an expression's value, or what a statement left
/// in `r`. `lk` packs a `struct flock` for
/// `fcntl.fcntl` (answering what F_GETLK reports: type, whence, start, len, pid); `raw`
/// calls libc directly, so a signal's EINTR is seen as such rather than retried by Python.
const PRELUDE: &str = r#"
import ctypes, errno, fcntl, os, signal, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
FL = 'hhqqi4x'
class Intr(Exception): pass
def alarm(s, f): raise Intr()
signal.signal(signal.SIGALRM, alarm)
signal.signal(signal.SIGUSR1, lambda s, f: None)
def lk(f, cmd, typ, start, length):
    return struct.unpack(FL, fcntl.fcntl(f, cmd, struct.pack(FL, typ, 0, start, length, 0)))
def raw_lk(f, cmd, typ, start, length):
    buf = ctypes.create_string_buffer(struct.pack(FL, typ, 0, start, length, 0))
    return (libc.fcntl(f, cmd, buf), ctypes.get_errno())
def raw_flock(f, op):
    return (libc.flock(f, op), ctypes.get_errno())
G = globals()
print('ready', os.getpid(), flush=True)
for line in sys.stdin:
    G['r'] = None
    try:
        try:
            code = compile(line, '<line>', 'eval')
        except SyntaxError:
            exec(line, G)
        else:
            G['r'] = eval(code, G)
        print('ok', repr(r), flush=True)
    except Intr:
        print('intr', flush=True)
    except OSError as e:
        print('err', e.errno, flush=True)
"#;

/// A Python process taking locks, driven line by line.
struct Py {
    child: Child,
    stdin: ChildStdin,
    out: mpsc::Receiver<String>,
    pid: i32,
}

impl Py {
    fn start() -> Py {
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(PRELUDE)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, out) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut p = Py { child, stdin, out, pid: 0 };
        let ready = p.answer(Duration::from_secs(10));
        p.pid = ready.strip_prefix("ready ").expect("ready line").parse().unwrap();
        p
    }

    /// Sends a line without waiting for its answer.
    fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
    }

    fn answer(&self, within: Duration) -> String {
        self.out.recv_timeout(within).unwrap_or_else(|e| panic!("no answer from python within {within:?}: {e}"))
    }

    /// The answer given within `d`, if any (`None`: the call is blocked).
    fn answered_within(&self, d: Duration) -> Option<String> {
        self.out.recv_timeout(d).ok()
    }

    /// Runs a line and returns its answer.
    fn run(&mut self, line: &str) -> String {
        self.send(line);
        self.answer(Duration::from_secs(20))
    }

    /// Runs a line that must succeed.
    fn ok(&mut self, line: &str) -> String {
        let a = self.run(line);
        assert!(a.starts_with("ok"), "{line:?} answered {a:?}");
        a
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the child this test started.
        unsafe { libc::kill(self.pid, sig) };
    }
}

impl Drop for Py {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn err(errno: i32) -> String {
    format!("err {errno}")
}

/// Opens `path` read-write as `var` in `p`.
fn open(p: &mut Py, var: &str, path: &Path) {
    p.ok(&format!("{var} = os.open({:?}, os.O_RDWR | os.O_CREAT, 0o644)", path.to_str().unwrap()));
}

/// Retries `line` on `p` until it answers `want` (a release sent in the background, like
/// the kernel's RELEASE after a last close, may take a moment).
fn eventually(p: &mut Py, line: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let a = p.run(line);
        if a == want {
            return;
        }
        assert!(Instant::now() < deadline, "{line:?} still answers {a:?}, not {want:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writes a file `f` and opens it in one Python per mount: as `f` through mount A (the
/// cluster's) and as `g` through mount `b`.
fn two_openers(c: &Cluster, b: &Path) -> (Py, Py) {
    std::fs::write(c.path("f"), b"x").unwrap();
    let (mut pa, mut pb) = (Py::start(), Py::start());
    open(&mut pa, "f", &c.path("f"));
    open(&mut pb, "g", &b.join("f"));
    (pa, pb)
}

const EX_NB: &str = "fcntl.LOCK_EX | fcntl.LOCK_NB";
const SH_NB: &str = "fcntl.LOCK_SH | fcntl.LOCK_NB";

#[test]
fn flock_is_enforced_across_mounts_and_released_on_close_and_on_kill() {
    let c = Cluster::start(1);
    let b = c.mount_again("b", "");
    let (mut pa, mut pb) = two_openers(&c, &b);

    pa.ok("fcntl.flock(f, fcntl.LOCK_EX)");
    assert_eq!(pb.run(&format!("fcntl.flock(g, {EX_NB})")), err(libc::EWOULDBLOCK), "exclusive on A, B");
    assert_eq!(pb.run(&format!("fcntl.flock(g, {SH_NB})")), err(libc::EWOULDBLOCK));
    // flock and fcntl locks do not conflict (Linux semantics).
    assert_eq!(pb.run("fcntl.lockf(g, fcntl.LOCK_EX | fcntl.LOCK_NB)"), "ok None", "fcntl lock beside a flock");
    pb.ok("fcntl.lockf(g, fcntl.LOCK_UN)");
    // Released on close (RELEASE of the last descriptor).
    pa.ok("os.close(f)");
    eventually(&mut pb, &format!("fcntl.flock(g, {EX_NB})"), "ok None");
    pb.ok("fcntl.flock(g, fcntl.LOCK_UN)");

    // A flock taken by another thread of the process is still a flock (the mount tells flock
    // from fcntl by the requesting thread's system call).
    open(&mut pa, "h", &c.path("f"));
    pa.ok("import threading; t = threading.Thread(target=fcntl.flock, args=(h, fcntl.LOCK_EX)); t.start(); t.join()");
    assert_eq!(pb.run(&format!("fcntl.flock(g, {EX_NB})")), err(libc::EWOULDBLOCK), "flock from a thread");
    assert_eq!(pb.run("fcntl.lockf(g, fcntl.LOCK_EX | fcntl.LOCK_NB)"), "ok None", "fcntl beside a thread's flock");
    pb.ok("fcntl.lockf(g, fcntl.LOCK_UN)");
    pa.ok("os.close(h)");
    eventually(&mut pb, &format!("fcntl.flock(g, {EX_NB})"), "ok None");
    pb.ok("fcntl.flock(g, fcntl.LOCK_UN)");

    // Shared + shared.
    open(&mut pa, "f", &c.path("f"));
    pa.ok("fcntl.flock(f, fcntl.LOCK_SH)");
    assert_eq!(pb.run(&format!("fcntl.flock(g, {SH_NB})")), "ok None", "shared on both");
    assert_eq!(pb.run(&format!("fcntl.flock(g, {EX_NB})")), err(libc::EWOULDBLOCK), "upgrade while A shares");
    pb.ok("fcntl.flock(g, fcntl.LOCK_UN)");
    // A blocking flock on B waits for A, and gets the lock once A unlocks.
    pa.ok("fcntl.flock(f, fcntl.LOCK_EX)");
    pb.send("fcntl.flock(g, fcntl.LOCK_EX)");
    assert_eq!(pb.answered_within(Duration::from_secs(1)), None, "B's flock did not wait");
    pa.ok("fcntl.flock(f, fcntl.LOCK_UN)");
    assert_eq!(pb.answer(Duration::from_secs(5)), "ok None");
    // A blocked flock is interrupted by a signal (EINTR; the handler returns normally).
    assert_eq!(pa.run(&format!("fcntl.flock(f, {EX_NB})")), err(libc::EWOULDBLOCK));
    pb.ok("fcntl.flock(g, fcntl.LOCK_UN)");
    pa.ok("fcntl.flock(f, fcntl.LOCK_EX)");
    pb.send("r = raw_flock(g, fcntl.LOCK_EX)");
    assert_eq!(pb.answered_within(Duration::from_millis(500)), None);
    pb.signal(libc::SIGUSR1);
    assert_eq!(pb.answer(Duration::from_secs(5)), format!("ok (-1, {})", libc::EINTR));

    // Released when the holder is SIGKILLed.
    drop(pa);
    eventually(&mut pb, &format!("fcntl.flock(g, {EX_NB})"), "ok None");
    drop(pb);
    umount_lazy(&b);
}

const F_SETLK: &str = "fcntl.F_SETLK";
const F_SETLKW: &str = "fcntl.F_SETLKW";
const F_GETLK: &str = "fcntl.F_GETLK";

#[test]
fn byte_ranges_conflict_split_and_merge_across_mounts() {
    let c = Cluster::start(1);
    let b = c.mount_again("b", "");
    let (mut pa, mut pb) = two_openers(&c, &b);
    let wr = |f: &str, cmd: &str, start: u64, len: u64| format!("lk({f}, {cmd}, fcntl.F_WRLCK, {start}, {len})");
    let rd = |f: &str, cmd: &str, start: u64, len: u64| format!("lk({f}, {cmd}, fcntl.F_RDLCK, {start}, {len})");
    let un = |f: &str, start: u64, len: u64| format!("lk({f}, {F_SETLK}, fcntl.F_UNLCK, {start}, {len})");
    let (wrlck, rdlck, unlck) = (libc::F_WRLCK, libc::F_RDLCK, libc::F_UNLCK);

    pa.ok(&wr("f", F_SETLK, 0, 10));
    pb.ok(&wr("g", F_SETLK, 10, 10));
    assert_eq!(pb.run(&rd("g", F_SETLK, 5, 2)), err(libc::EAGAIN), "overlap with A's write lock");
    assert_eq!(pa.run(&rd("f", F_SETLK, 15, 1)), err(libc::EAGAIN), "overlap with B's write lock");
    // F_GETLK on B reports A's lock: type, range and A's process id (same machine here).
    let reported = pb.ok(&wr("g", F_GETLK, 5, 2));
    assert_eq!(reported, format!("ok ({wrlck}, 0, 0, 10, {})", pa.pid), "F_GETLK of A's lock through B");
    assert_eq!(pb.ok(&wr("g", F_GETLK, 30, 5)), format!("ok ({unlck}, 0, 30, 5, 0)"), "free range");

    // Unlocking the middle splits A's lock: both ends still conflict, the middle is free.
    pa.ok(&un("f", 3, 4));
    assert_eq!(pb.run(&wr("g", F_SETLK, 2, 1)), err(libc::EAGAIN), "left part kept");
    assert_eq!(pb.run(&wr("g", F_SETLK, 7, 1)), err(libc::EAGAIN), "right part kept");
    assert_eq!(pb.ok(&wr("g", F_GETLK, 0, 3)), format!("ok ({wrlck}, 0, 0, 3, {})", pa.pid), "left part");
    assert_eq!(pb.ok(&wr("g", F_GETLK, 7, 0)), format!("ok ({wrlck}, 0, 7, 3, {})", pa.pid), "right part");
    pb.ok(&wr("g", F_SETLK, 3, 4));

    // Adjacent read ranges of one owner merge into one lock.
    pa.ok(&rd("f", F_SETLK, 20, 10));
    pa.ok(&rd("f", F_SETLK, 30, 10));
    assert_eq!(pb.ok(&wr("g", F_GETLK, 25, 10)), format!("ok ({rdlck}, 0, 20, 20, {})", pa.pid), "merged");
    assert_eq!(pb.run(&rd("g", F_SETLK, 25, 10)), "ok (0, 0, 25, 10, 0)", "readers share");
    pb.ok(&un("g", 25, 10));
    // A write lock inside A's read range replaces that part only.
    pa.ok(&wr("f", F_SETLK, 28, 4));
    assert_eq!(pb.ok(&rd("g", F_GETLK, 20, 20)), format!("ok ({wrlck}, 0, 28, 4, {})", pa.pid));
    assert_eq!(pb.ok(&wr("g", F_GETLK, 20, 5)), format!("ok ({rdlck}, 0, 20, 8, {})", pa.pid));

    // Closing any descriptor of the file releases all of the process's locks on it.
    open(&mut pa, "f2", &c.path("f"));
    pa.ok("os.close(f2)");
    assert_eq!(pb.run(&wr("g", F_SETLK, 0, 0)), "ok (1, 0, 0, 0, 0)", "A's locks gone with its close");
    pb.ok(&un("g", 0, 0));
    // And process exit releases them too.
    pa.ok(&wr("f", F_SETLK, 100, 1));
    assert_eq!(pb.run(&wr("g", F_SETLK, 100, 1)), err(libc::EAGAIN));
    drop(pa);
    eventually(&mut pb, &wr("g", F_SETLK, 100, 1), "ok (1, 0, 100, 1, 0)");
    drop(pb);
    umount_lazy(&b);
}

#[test]
fn ofd_locks_conflict_across_mounts_and_per_open_file() {
    let c = Cluster::start(1);
    let b = c.mount_again("b", "");
    std::fs::write(c.path("f"), b"x").unwrap();
    let (mut pa, mut pb) = (Py::start(), Py::start());
    open(&mut pa, "f", &c.path("f"));
    open(&mut pa, "f2", &c.path("f"));
    open(&mut pb, "g", &b.join("f"));
    let ofd =
        |f: &str, cmd: &str, typ: &str, start: u64, len: u64| format!("lk({f}, {cmd}, fcntl.{typ}, {start}, {len})");

    pa.ok(&ofd("f", "fcntl.F_OFD_SETLK", "F_WRLCK", 0, 100));
    assert_eq!(pb.run(&ofd("g", "fcntl.F_OFD_SETLK", "F_WRLCK", 50, 10)), err(libc::EAGAIN), "OFD vs OFD");
    assert_eq!(pb.run(&ofd("g", F_SETLK, "F_RDLCK", 99, 1)), err(libc::EAGAIN), "POSIX vs OFD");
    let got = pb.ok(&ofd("g", "fcntl.F_OFD_GETLK", "F_RDLCK", 50, 1));
    assert!(got.starts_with(&format!("ok ({}, 0, 0, 100, ", libc::F_WRLCK)), "F_OFD_GETLK: {got}");
    pb.ok(&ofd("g", "fcntl.F_OFD_SETLK", "F_WRLCK", 100, 10));
    // Another open file description of the same process conflicts too.
    assert_eq!(pa.run(&ofd("f2", "fcntl.F_OFD_SETLK", "F_RDLCK", 10, 1)), err(libc::EAGAIN), "second OFD");
    // Closing another descriptor does not release an OFD lock; closing its own does.
    pa.ok("os.close(f2)");
    assert_eq!(pb.run(&ofd("g", "fcntl.F_OFD_SETLK", "F_WRLCK", 50, 10)), err(libc::EAGAIN));
    pa.ok("os.close(f)");
    eventually(&mut pb, &ofd("g", "fcntl.F_OFD_SETLK", "F_WRLCK", 50, 10), "ok (1, 0, 50, 10, 0)");
    drop((pa, pb));
    umount_lazy(&b);
}

#[test]
fn blocking_locks_wait_are_interrupted_and_detect_deadlocks() {
    let c = Cluster::start(1);
    let b = c.mount_again("b", "");
    let (mut pa, mut pb) = two_openers(&c, &b);
    let wr = |f: &str, cmd: &str, start: u64| format!("lk({f}, {cmd}, fcntl.F_WRLCK, {start}, 1)");
    let un = |f: &str, start: u64| format!("lk({f}, {F_SETLK}, fcntl.F_UNLCK, {start}, 1)");

    // F_SETLKW on B waits while A holds the byte, and gets it once A unlocks.
    pa.ok(&wr("f", F_SETLK, 1));
    pb.send(&wr("g", F_SETLKW, 1));
    assert_eq!(pb.answered_within(Duration::from_millis(1500)), None, "F_SETLKW did not wait");
    pa.ok(&un("f", 1));
    assert_eq!(pb.answer(Duration::from_secs(5)), "ok (1, 0, 1, 1, 0)", "F_SETLKW after the release");
    assert_eq!(pa.run(&wr("f", F_SETLK, 1)), err(libc::EAGAIN), "B holds it now");
    pb.ok(&un("g", 1));

    // A blocked F_SETLKW is interrupted: by SIGALRM whose handler raises (Python sees the
    // call return), and by a signal whose handler returns (EINTR from fcntl itself).
    pa.ok(&wr("f", F_SETLK, 1));
    let started = Instant::now();
    pb.send(&format!("signal.setitimer(signal.ITIMER_REAL, 1.0); {}", wr("g", F_SETLKW, 1)));
    assert_eq!(pb.answer(Duration::from_secs(5)), "intr");
    assert!(started.elapsed() < Duration::from_secs(3), "interrupted only after {:?}", started.elapsed());
    pb.send(&format!("r = raw_lk(g, {F_SETLKW}, fcntl.F_WRLCK, 1, 1)"));
    assert_eq!(pb.answered_within(Duration::from_millis(500)), None);
    pb.signal(libc::SIGUSR1);
    assert_eq!(pb.answer(Duration::from_secs(5)), format!("ok (-1, {})", libc::EINTR));
    assert_eq!(pb.run(&wr("g", F_SETLK, 1)), err(libc::EAGAIN), "an interrupted wait takes nothing");

    // Deadlock: A holds 1 and waits for 2, held by B; B asking for 1 gets EDEADLK.
    pb.ok(&wr("g", F_SETLK, 2));
    pa.send(&wr("f", F_SETLKW, 2));
    assert_eq!(pa.answered_within(Duration::from_millis(500)), None, "A did not wait");
    assert_eq!(
        pb.run(&format!("r = raw_lk(g, {F_SETLKW}, fcntl.F_WRLCK, 1, 1)")),
        format!("ok (-1, {})", libc::EDEADLK)
    );
    // B gives up its byte: A's wait ends with the lock.
    pb.ok(&un("g", 2));
    assert_eq!(pa.answer(Duration::from_secs(5)), "ok (1, 0, 2, 1, 0)");
    assert_eq!(pb.run(&wr("g", F_SETLK, 2)), err(libc::EAGAIN));
    drop((pa, pb));
    umount_lazy(&b);
}

#[test]
fn locks_of_a_dead_client_are_released() {
    let c = Cluster::start(1);
    let (b, mount_pid) = c.mount_again_with_pid("b");
    let (mut pa, mut pb) = two_openers(&c, &b);
    pb.ok("lk(g, fcntl.F_SETLK, fcntl.F_WRLCK, 0, 0)");
    pb.ok("fcntl.flock(g, fcntl.LOCK_EX)");
    assert_eq!(pa.run("lk(f, fcntl.F_SETLK, fcntl.F_RDLCK, 5, 1)"), err(libc::EAGAIN));
    assert_eq!(pa.run(&format!("fcntl.flock(f, {SH_NB})")), err(libc::EWOULDBLOCK));

    // B's mount process dies without a word: the metadata server drops its locks when the
    // connection times out, and A's waits end with the locks.
    kill9(mount_pid);
    let started = Instant::now();
    pa.send("signal.setitimer(signal.ITIMER_REAL, 60); r = lk(f, fcntl.F_SETLKW, fcntl.F_RDLCK, 5, 1)");
    assert_eq!(pa.answer(Duration::from_secs(70)), "ok (0, 0, 5, 1, 0)", "the dead client's lock stayed");
    eprintln!("a dead client's lock was released after {:?}", started.elapsed());
    pa.ok("signal.setitimer(signal.ITIMER_REAL, 0)");
    pa.ok("fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)");
    drop((pa, pb));
    umount_lazy(&b);
}

#[test]
fn locks_survive_a_metadata_server_restart() {
    let c = Cluster::start_with(1, &["-o", "timeout=2"]);
    let b = c.mount_again("b", "timeout=2");
    let (mut pa, mut pb) = two_openers(&c, &b);
    pa.ok("lk(f, fcntl.F_SETLK, fcntl.F_WRLCK, 0, 10)");
    pa.ok("lk(f, fcntl.F_SETLK, fcntl.F_RDLCK, 20, 5)");
    pa.ok("fcntl.flock(f, fcntl.LOCK_SH)");
    assert_eq!(pb.run("lk(g, fcntl.F_SETLK, fcntl.F_WRLCK, 5, 1)"), err(libc::EAGAIN));

    // The metadata server dies and comes back: A's mount reconnects and takes its locks back
    // within the grace period, during which B's requests wait rather than take them.
    c.set_config("meta.toml", "lock_grace_secs", "10");
    c.kill9("meta");
    c.up(1, &[]);
    let wr = |start: u64, len: u64| format!("lk(g, fcntl.F_SETLK, fcntl.F_WRLCK, {start}, {len})");
    assert_eq!(pb.run(&wr(5, 1)), err(libc::EAGAIN), "A's write lock was lost with the restart");
    assert_eq!(pb.run(&wr(22, 1)), err(libc::EAGAIN), "A's read lock was lost with the restart");
    let reported = pb.ok("lk(g, fcntl.F_GETLK, fcntl.F_WRLCK, 0, 0)");
    assert_eq!(reported, format!("ok ({}, 0, 0, 10, {})", libc::F_WRLCK, pa.pid), "F_GETLK after the restart");
    assert_eq!(pb.run(&format!("fcntl.flock(g, {EX_NB})")), err(libc::EWOULDBLOCK), "A's flock was lost");
    assert_eq!(pb.run(&format!("fcntl.flock(g, {SH_NB})")), "ok None", "a shared flock beside A's");
    assert_eq!(pb.run(&wr(10, 10)), "ok (1, 0, 10, 10, 0)", "the free range between A's locks");

    // Released as before: by A's unlock and by A's close.
    pa.ok("lk(f, fcntl.F_SETLK, fcntl.F_UNLCK, 0, 10)");
    assert_eq!(pb.run(&wr(5, 1)), "ok (1, 0, 5, 1, 0)", "A's unlock after the restart");
    pa.ok("os.close(f)");
    eventually(&mut pb, &wr(20, 5), "ok (1, 0, 20, 5, 0)");
    eventually(&mut pb, &format!("fcntl.flock(g, {EX_NB})"), "ok None");
    drop((pa, pb));
    umount_lazy(&b);
}

/// One client's share of the sqlite3 test: `n` transactions, each inserting a row and
/// incrementing a counter (a read-modify-write that a stale read would lose). Prints the
/// number of commits.
const SQLITE_WORKER: &str = r#"
import sqlite3, sys, time
path, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
db = sqlite3.connect(path, timeout=60, isolation_level=None)
db.execute('PRAGMA journal_mode=DELETE')
done = 0
while done < n:
    try:
        db.execute('BEGIN IMMEDIATE')
        db.execute('INSERT INTO rows(who, i) VALUES (?, ?)', (who, done))
        db.execute('UPDATE counter SET n = n + 1')
        db.execute('COMMIT')
        done += 1
    except sqlite3.OperationalError as e:
        print('retry:', e, file=sys.stderr, flush=True)
        try:
            db.execute('ROLLBACK')
        except sqlite3.OperationalError:
            pass
        time.sleep(0.01)
db.close()
print(done, flush=True)
"#;

#[test]
fn sqlite_transactions_from_two_mounts_keep_every_committed_row() {
    const N: u32 = 200;
    let c = Cluster::start(1);
    let b = c.mount_again("b", "");
    // The rollback journal works over file locks; WAL needs memory shared between the
    // processes (mmap of the -shm file), which clients on different machines cannot share.
    let setup = "PRAGMA journal_mode=DELETE; CREATE TABLE rows(who TEXT, i INT, UNIQUE(who, i)); \
                 CREATE TABLE counter(n INT); INSERT INTO counter VALUES (0);";
    run(Command::new("sqlite3").arg(c.path("db")).arg(setup));
    let worker = |dir: &Path, who: &str| {
        Command::new("python3")
            .arg("-c")
            .arg(SQLITE_WORKER)
            .arg(dir.join("db"))
            .arg(who)
            .arg(N.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let started = Instant::now();
    let (wa, wb) = (worker(&c.mnt, "a"), worker(&b, "b"));
    let (oa, ob) = (wa.wait_with_output().unwrap(), wb.wait_with_output().unwrap());
    eprintln!("{} transactions from two mounts took {:?}", 2 * N, started.elapsed());
    assert!(oa.status.success() && ob.status.success(), "a worker failed: {oa:?} {ob:?}");
    let committed: u32 =
        [oa, ob].iter().map(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<u32>().unwrap()).sum();
    assert_eq!(committed, 2 * N);
    for dir in [&c.mnt, &b] {
        let q = |sql: &str| run(Command::new("sqlite3").arg(dir.join("db")).arg(sql)).trim().to_string();
        assert_eq!(q("SELECT count(*) FROM rows"), committed.to_string(), "rows seen through {}", dir.display());
        assert_eq!(q("SELECT n FROM counter"), committed.to_string(), "a lost update, seen through {}", dir.display());
        assert_eq!(q("SELECT count(*) FROM rows WHERE who = 'a'"), N.to_string());
        assert_eq!(q("PRAGMA integrity_check"), "ok");
    }
    umount_lazy(&b);
}

/// The kernel names an OFD or flock lock's owner by its open file description's address and
/// sends the RELEASE of a closed one in the background; a new open can get the same address
/// first. The old description's release must not drop the new one's lock.
#[test]
fn a_late_release_does_not_drop_the_lock_of_a_newer_open() {
    let c = Cluster::start(1);
    let b = c.mount_again("b", "");
    let (mut pa, mut pb) = two_openers(&c, &b);
    pa.ok(&format!("P = {:?}", c.path("f").to_str().unwrap()));
    for (take, try_b) in [
        ("fcntl.flock(fd, fcntl.LOCK_EX)", format!("fcntl.flock(g, {EX_NB})")),
        (
            "lk(fd, fcntl.F_OFD_SETLKW, fcntl.F_WRLCK, 0, 0)",
            "lk(g, fcntl.F_OFD_SETLK, fcntl.F_WRLCK, 0, 0)".to_string(),
        ),
    ] {
        for round in 0..40 {
            pa.ok(&format!(
                "fd = os.open(P, os.O_RDWR); {take}; os.write(fd, b'x' * 100000); os.close(fd); fd = os.open(P, os.O_RDWR); {take}"
            ));
            // Time for the first open's RELEASE to be handled.
            std::thread::sleep(Duration::from_millis(20));
            assert_eq!(pb.run(&try_b), err(libc::EAGAIN), "round {round} of {take}: A's lock was dropped");
            pa.ok("os.close(fd)");
        }
    }
    drop((pa, pb));
    umount_lazy(&b);
}
