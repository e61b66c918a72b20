//! Admin commands that ask the metadata server to act: `cairn chunk drain`, `cairn fsck`,
//! `cairn gc`.

use crate::format::ClusterFile;
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `cairn chunk …` commands (without one, `cairn chunk --config` runs a server).
#[derive(clap::Subcommand, Debug)]
pub enum ChunkCommand {
    /// Move every copy off a chunk server before removing it; waits until it holds nothing.
    Drain {
        /// The chunk server's id (as `cairn status` lists it).
        id: u64,
        /// Volume directory written by `cairn format` / `cairn local up`.
        #[arg(long, default_value = crate::local::DEFAULT_DATA)]
        data: PathBuf,
        /// Stop draining: the server takes new copies again.
        #[arg(long)]
        undo: bool,
        /// Return once the drain has started instead of waiting for it to finish.
        #[arg(long)]
        no_wait: bool,
    },
}

/// Runs a `cairn chunk …` admin command.
pub fn chunk(command: ChunkCommand) -> anyhow::Result<()> {
    let ChunkCommand::Drain { id, data, undo, no_wait } = command;
    let (rt, cluster) = setup(&data)?;
    rt.block_on(async {
        let client = crate::local::connect(&data, &cluster, Duration::from_secs(10)).await?;
        // Counts per server are as of the last scan: only one that started after the drain
        // request tells when the server is empty.
        let scans = client.statfs().await?.scans;
        client.drain(id, !undo).await.with_context(|| format!("draining chunk server {id}"))?;
        if undo {
            println!("chunk server {id} is no longer draining");
            return Ok(());
        }
        println!("chunk server {id} is draining: it gets no new copies and its copies are being moved");
        if no_wait {
            return Ok(());
        }
        let mut last = None;
        loop {
            let servers = client.list_servers().await?;
            let s = servers.iter().find(|s| s.id == id).context("the server is no longer registered")?;
            if s.slices == 0 && client.statfs().await?.scans > scans + 1 {
                println!(
                    "chunk server {id} holds no slice any more: it can be stopped and removed \
                     (its leftover block files are deleted by reconciliation while it runs)"
                );
                return Ok(());
            }
            if last != Some(s.slices) {
                println!("  {} slices ({}) left on server {id}", s.slices, crate::status::human(s.bytes));
                last = Some(s.slices);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}

/// Options of `cairn fsck` and `cairn gc`.
#[derive(clap::Args, Debug)]
pub struct VolumeDir {
    /// Volume directory written by `cairn format` / `cairn local up`.
    #[arg(long, default_value = crate::local::DEFAULT_DATA)]
    pub data: PathBuf,
}

/// Runs one long admin request against the volume in `data` (up to 600 s: both walk the
/// whole volume).
fn ask<T>(
    data: &Path,
    request: impl AsyncFnOnce(&cairn_client::Client) -> cairn_client::Result<T>,
) -> anyhow::Result<T> {
    let (rt, cluster) = setup(data)?;
    rt.block_on(async {
        let client = crate::local::connect(data, &cluster, Duration::from_secs(600)).await?;
        let answer = request(&client).await;
        // Another client connected keeps a mount from holding the solo lease.
        client.disconnect().await;
        Ok(answer?)
    })
}

/// Prints what the metadata server's checks found; fails if they found anything.
pub fn fsck(args: &VolumeDir) -> anyhow::Result<()> {
    let report = ask(&args.data, async |c| c.fsck().await)?;
    println!(
        "checked {} inodes, {} directory entries, {} slice rows: {} problems",
        report.inodes,
        report.dentries,
        report.slices,
        report.problems.len()
    );
    for p in &report.problems {
        println!("  {p}");
    }
    anyhow::ensure!(report.problems.is_empty(), "the volume has {} inconsistencies", report.problems.len());
    Ok(())
}

/// Has every live chunk server reconciled now and prints what is left to delete.
pub fn gc(args: &VolumeDir) -> anyhow::Result<()> {
    let report = ask(&args.data, async |c| c.gc().await)?;
    let mut failed = 0;
    for s in &report.servers {
        match &s.error {
            Some(e) => {
                failed += 1;
                println!("chunk server {}: not reconciled: {e}", s.id);
            }
            None => println!(
                "chunk server {}: {} slices stored, {} deleted now, {} unreferenced waiting (oldest seen {} s ago)",
                s.id, s.slices, s.deleted, s.waiting, s.oldest_secs
            ),
        }
    }
    println!(
        "{} removed files about to be freed, {} slices of their data queued for deletion",
        report.removed, report.queued
    );
    println!(
        "copies no file references are deleted {} s after they are first seen (orphan_grace_secs)",
        report.grace_secs
    );
    anyhow::ensure!(failed == 0, "{failed} chunk servers could not be reconciled");
    Ok(())
}

fn setup(data: &Path) -> anyhow::Result<(tokio::runtime::Runtime, ClusterFile)> {
    let cluster: ClusterFile = cairn_config::load(&data.join("cluster.toml"))?;
    Ok((crate::runtime()?, cluster))
}
