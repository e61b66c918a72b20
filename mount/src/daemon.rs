//! Running in the background the way mount(8) expects: the helper returns only once the mount
//! works, with exit status 0, or prints why it failed and exits non-zero.

use anyhow::{Context, bail};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

/// Environment variable naming the fd a background child reports readiness on.
const READY_FD_ENV: &str = "CAIRN_MOUNT_READY_FD";

/// Re-runs this program in the background (new session, output to `log`) and waits until it
/// reports that the mount is live. Returns the error it reported, if any.
pub fn spawn_background(log: &Path) -> anyhow::Result<()> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid two-element array for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("creating the readiness pipe");
    }
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening log file {}", log.display()))?;
    let exe = std::env::current_exe().context("finding this program")?;
    let child_fd = write_end.as_raw_fd();
    let mut cmd = Command::new(exe);
    cmd.args(std::env::args_os().skip(1))
        .arg("--foreground")
        .env(READY_FD_ENV, child_fd.to_string())
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Keep the write end open across exec (clear FD_CLOEXEC).
            if libc::fcntl(child_fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the background client")?;
    drop(write_end);
    let mut answer = String::new();
    std::fs::File::from(read_end).read_to_string(&mut answer).context("waiting for the client")?;
    if answer.trim() == "ok" {
        return Ok(());
    }
    let status = child.wait()?;
    if answer.trim().is_empty() {
        bail!("the background client exited ({status}) before the mount was ready; see {}", log.display());
    }
    bail!("{}", answer.trim())
}

/// In a background child: the pipe to report readiness on, if started by [`spawn_background`].
pub fn ready_pipe() -> Option<std::fs::File> {
    let fd: i32 = std::env::var(READY_FD_ENV).ok()?.parse().ok()?;
    // SAFETY: the parent passed this fd to us for exactly this purpose; we take ownership once.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    // SAFETY: setting FD_CLOEXEC on an fd we own.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Some(file)
}

/// Tells the waiting parent how the mount went.
pub fn report(pipe: Option<std::fs::File>, result: &anyhow::Result<()>) {
    if let Some(mut p) = pipe {
        let msg = match result {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("{e:#}"),
        };
        let _ = p.write_all(msg.as_bytes());
    }
}
