//! `cairn fsck`: checks that the namespace and the slice tables agree with each other
//! (entries, link counts, directory tree, slice ownership, the slice-id counter) and that
//! every slice still has a live copy. Runs on a live server, from one database snapshot.

use crate::service::MetaService;
use crate::store::reads;
use cairn_proto::FsckReport;
use std::sync::atomic::Ordering;

impl MetaService {
    pub(crate) async fn fsck(&self) -> crate::Result<FsckReport> {
        let (mut problems, (inodes, dentries, slices)) = reads::fsck(&self.store.readers).await?;
        let lost = self.repair_stats.lost.load(Ordering::Relaxed);
        if lost > 0 {
            problems.push(format!("{lost} slices have no live copy (their chunk servers are down or gone)"));
        }
        Ok(FsckReport { inodes, dentries, slices, problems })
    }
}
