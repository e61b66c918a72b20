//! Requests behind the `cairn` admin commands, which connect as a client of the volume.

use crate::{Client, Result, unexpected};
use cairn_proto::meta::{MetaRequest, MetaResponse};
use cairn_proto::{FsckReport, GcReport, ServerId};

impl Client {
    /// Starts (or stops) moving every copy off chunk server `id` (`cairn chunk drain`).
    pub async fn drain(&self, id: ServerId, drain: bool) -> Result<()> {
        self.call_empty(MetaRequest::Drain { id, drain }).await
    }

    /// Runs the metadata server's consistency checks (`cairn fsck`).
    pub async fn fsck(&self) -> Result<FsckReport> {
        match self.call(MetaRequest::Fsck).await? {
            MetaResponse::Fsck(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Reconciles every chunk server now and reports what waits for deletion (`cairn gc`).
    pub async fn gc(&self) -> Result<GcReport> {
        match self.call(MetaRequest::Gc).await? {
            MetaResponse::Gc(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }
}
