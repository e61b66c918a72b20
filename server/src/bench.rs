//! `cairn bench`: a short workload run on a directory of a Cairn mount and, in the same run, on
//! directories to compare it with (a local disk, a FUSE passthrough). Numbers from a shared or
//! virtual machine vary from run to run, so what it reports is ratios measured side by side.

use anyhow::{Context, bail};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Options of `cairn bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Directory to measure, normally on a Cairn mount; the workload runs in a new
    /// subdirectory, removed at the end.
    pub path: PathBuf,
    /// A directory to run the same workload on for comparison, e.g. on a local disk
    /// (repeatable). Ratios are PATH's rate over each of these.
    #[arg(long)]
    pub against: Vec<PathBuf>,
    /// MiB written and read back by the sequential phase.
    #[arg(long, default_value_t = 256)]
    pub size_mib: usize,
    /// Number of small files, and of mkdir+rmdir pairs.
    #[arg(long, default_value_t = 2000)]
    pub files: usize,
    /// One JSON object per line and measurement instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The measurements, in the order they run; every one is a rate (higher is better).
const METRICS: [(&str, &str); 10] = [
    ("seq_write", "MiB/s"),
    ("seq_read", "MiB/s"),
    ("small_create", "files/s"),
    ("small_stat", "files/s"),
    ("small_read", "files/s"),
    ("list_stat", "entries/s"),
    ("rename", "files/s"),
    ("small_delete", "files/s"),
    ("mkdir_rmdir", "pairs/s"),
    ("seq_read_again", "MiB/s"),
];

const SMALL_FILE: usize = 4096;

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if args.size_mib == 0 || args.files == 0 {
        bail!("--size-mib and --files must be at least 1");
    }
    let targets: Vec<&PathBuf> = std::iter::once(&args.path).chain(&args.against).collect();
    for t in &targets {
        if !fs::metadata(t).with_context(|| format!("{}", t.display()))?.is_dir() {
            bail!("{} is not a directory", t.display());
        }
    }
    let mut results = Vec::new();
    for t in &targets {
        if !args.json {
            eprintln!("cairn bench: running on {}", t.display());
        }
        results.push(run_on(t, args).with_context(|| format!("benchmark on {}", t.display()))?);
    }
    if args.json {
        for (t, r) in targets.iter().zip(&results) {
            for ((metric, unit), v) in METRICS.iter().zip(r) {
                let line = serde_json::json!({"target": t, "metric": metric, "value": round(*v), "unit": unit});
                println!("{line}");
            }
        }
    } else {
        print_table(&targets, &results);
    }
    Ok(())
}

/// Removes the work directory however the run ends.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Runs every phase in a new directory under `target`; one rate per entry of [`METRICS`].
fn run_on(target: &Path, args: &BenchArgs) -> anyhow::Result<Vec<f64>> {
    let dir = target.join(format!(".cairn-bench.{}", std::process::id()));
    fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let work = WorkDir(dir);
    let mut rates = Vec::with_capacity(METRICS.len());

    let big = work.0.join("seq");
    let block = noise(1 << 20);
    let mib = args.size_mib as f64;
    rates.push(rate(mib, || {
        let mut f = File::create(&big)?;
        for i in 0..args.size_mib {
            // Every MiB differs, so no layer can store it as a repeat of the one before.
            let mut b = block.clone();
            b[..8].copy_from_slice(&(i as u64).to_le_bytes());
            f.write_all(&b)?;
        }
        f.sync_all()
    })?);
    drop_kernel_caches();
    rates.push(rate(mib, || read_all(&big))?);

    let small = work.0.join("small");
    fs::create_dir(&small)?;
    let names: Vec<PathBuf> = (0..args.files).map(|i| small.join(format!("f{i:06}"))).collect();
    let n = args.files as f64;
    rates.push(rate(n, || names.iter().try_for_each(|p| fs::write(p, &block[..SMALL_FILE])))?);
    drop_kernel_caches();
    rates.push(rate(n, || names.iter().try_for_each(|p| fs::symlink_metadata(p).map(drop)))?);
    rates.push(rate(n, || names.iter().try_for_each(|p| fs::read(p).map(drop)))?);
    rates.push(rate(n, || {
        // What `ls -l` does: list, then stat every entry.
        fs::read_dir(&small)?.try_for_each(|e| fs::symlink_metadata(e?.path()).map(drop))
    })?);
    let renamed: Vec<PathBuf> = (0..args.files).map(|i| small.join(format!("r{i:06}"))).collect();
    rates.push(rate(n, || names.iter().zip(&renamed).try_for_each(|(a, b)| fs::rename(a, b)))?);
    rates.push(rate(n, || renamed.iter().try_for_each(fs::remove_file))?);
    let sub = work.0.join("d");
    rates.push(rate(n, || (0..args.files).try_for_each(|_| fs::create_dir(&sub).and_then(|_| fs::remove_dir(&sub))))?);
    // Read once more without dropping anything: what caches that outlive an open give.
    rates.push(rate(mib, || read_all(&big))?);
    Ok(rates)
}

/// Runs `f` and returns `units` per second of its wall-clock time.
fn rate(units: f64, f: impl FnOnce() -> std::io::Result<()>) -> anyhow::Result<f64> {
    let start = Instant::now();
    f()?;
    Ok(units / start.elapsed().as_secs_f64().max(1e-9))
}

/// Bytes that do not compress (xorshift64), as real data mostly does not.
fn noise(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

fn read_all(p: &Path) -> std::io::Result<()> {
    let mut f = File::open(p)?;
    let mut buf = vec![0u8; 1 << 20];
    while f.read(&mut buf)? > 0 {}
    Ok(())
}

/// Drops the kernel's page, dentry and inode caches (root only; otherwise reads may be warm
/// in the kernel, which the table says). A Cairn client's own caches are not dropped.
fn drop_kernel_caches() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
}

fn kernel_caches_droppable() -> bool {
    fs::OpenOptions::new().write(true).open("/proc/sys/vm/drop_caches").is_ok()
}

fn round(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

fn print_table(targets: &[&PathBuf], results: &[Vec<f64>]) {
    let mut header = vec!["metric".to_string(), "unit".to_string()];
    header.extend(targets.iter().map(|t| t.display().to_string()));
    header.extend(targets[1..].iter().map(|t| format!("vs {}", t.display())));
    let mut rows = vec![header];
    for (m, (metric, unit)) in METRICS.iter().enumerate() {
        let mut row = vec![metric.to_string(), unit.to_string()];
        row.extend(results.iter().map(|r| format!("{:.1}", r[m])));
        row.extend(results[1..].iter().map(|r| format!("{:.2}x", results[0][m] / r[m])));
        rows.push(row);
    }
    let widths: Vec<usize> = (0..rows[0].len()).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
    for row in rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", cells.join("  ").trim_end());
    }
    println!(
        "kernel caches dropped before seq_read and small_stat: {}",
        if kernel_caches_droppable() { "yes" } else { "no (needs root)" }
    );
    println!("ratios are the first directory's rate over each other's: above 1x it is faster");
}
