//! Calls the metadata server makes back to a client over the client's own connection.

use crate::types::Ino;
use serde::{Deserialize, Serialize};

/// A request from the metadata server to a client.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Callback {
    /// Another client changed these: forget the attributes (and data maps) cached for
    /// `inodes`, the entries and listings of those that are directories, and the names in
    /// `entries` (`(directory, name)`), in this client and in its kernel, then answer. The
    /// change is answered to its maker only after every holder answered (or its lease ran
    /// out), so nobody sees the old state after the change returned.
    Recall { inodes: Vec<Ino>, entries: Vec<(Ino, Vec<u8>)> },
    /// Another client is about to read or change these files, whose write leases this
    /// client holds (file, epoch): commit what is buffered for them, give the leases up, then
    /// answer. What this client cached stays valid (it wrote it); a later change elsewhere
    /// recalls it with `Recall`. A lease granted after the one named is kept.
    RecallWrites { leases: Vec<(Ino, u64)> },
    /// Another client connected: send every namespace change made under the solo lease
    /// `epoch` (`MetaRequest::Deferred`), stop making them locally, then answer.
    RecallSolo { epoch: u64 },
}

/// A client's answer to a [`Callback`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum CallbackResponse {
    Done,
}
