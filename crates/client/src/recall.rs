//! Recalls: the metadata server tells this client that another client changed (or is about
//! to read or write) inodes it may have cached or be writing (see `cairn-meta`'s `leases`).
//! The client commits what it buffered for them and gives up their write leases, then forgets
//! them, in its own caches and in the kernel's, before answering, so the other client's
//! request goes on only once nothing here can show the old state or hide newer data.

use crate::Client;
use cairn_net::{Handler, Peer};
use cairn_proto::callback::{Callback, CallbackResponse};
use cairn_proto::{Ino, WireError};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// How the mount makes the kernel forget inodes (attributes and pages) and names.
pub type KernelInvalidator = Arc<dyn Fn(&[Ino], &[(Ino, Vec<u8>)]) + Send + Sync>;

/// How long a recall waits for the kernel to drop what it cached. Usually immediate; but a
/// name cannot be dropped while a request in that directory holds it, and that request may
/// itself wait for the change that sent this recall, so the answer does not wait forever
/// (the kernel caches for 1 s at most).
const KERNEL_WAIT: Duration = Duration::from_millis(200);

/// Answers the metadata server's callbacks on behalf of a client.
pub(crate) struct Callbacks(pub(crate) Weak<Client>);

impl Handler<Callback, CallbackResponse> for Callbacks {
    async fn handle(
        &self,
        _peer: &Peer,
        req: Callback,
        _payload: Vec<u8>,
    ) -> Result<(CallbackResponse, cairn_net::Bytes), WireError> {
        if let Some(client) = self.0.upgrade() {
            match req {
                Callback::Recall { inodes, entries } => client.recalled(inodes, entries).await,
                Callback::RecallSolo { epoch } => client.recall_solo(epoch).await,
                Callback::RecallWrites { leases } => {
                    client.stats.count("callback", "RecallWrites");
                    for (ino, epoch) in leases {
                        client.give_up_lease(ino, epoch).await;
                    }
                }
            }
        }
        Ok((CallbackResponse::Done, cairn_net::Bytes::new()))
    }

    /// A new connection to the metadata server (after the first) must hold the locks the
    /// lost one held: they are asked for again.
    async fn connected(&self, _peer: &Peer) {
        if let Some(client) = self.0.upgrade() {
            tokio::spawn(async move { client.reclaim_locks().await });
        }
    }

    /// Read leases end with the connection, and recalls sent meanwhile were missed: forget
    /// all. Write leases are claimed again by committing what they cover.
    async fn disconnected(&self, _peer: &Peer) {
        if let Some(client) = self.0.upgrade() {
            client.solo_lost();
            client.forget_all();
            tokio::spawn(async move { client.reclaim_leases().await });
        }
    }
}

impl Client {
    /// Has the kernel told about recalls too (the mount sets this once mounted).
    pub fn set_kernel_invalidator(&self, f: KernelInvalidator) {
        let _ = self.kernel_invalidator.set(f);
    }

    async fn recalled(&self, inodes: Vec<Ino>, entries: Vec<(Ino, Vec<u8>)>) {
        self.stats.count("callback", "Recall");
        let dirs = entries.iter().map(|(d, _)| *d);
        for ino in inodes.iter().copied().chain(dirs) {
            self.forget_inode(ino);
        }
        // Kept by (inode, name): dropped whole, once.
        self.xattr_misses.invalidate_all();
        // A file this client's kernel is reading cannot lose its pages before that read is
        // answered, and the read may be what caused this recall (it recalled another client's
        // write lease, whose commit recalls this one): waiting would only stall it for
        // `KERNEL_WAIT`. Its pages are dropped as soon as the read is answered instead; the
        // read itself gets data from after the change.
        let (reading, idle): (Vec<Ino>, Vec<Ino>) =
            inodes.into_iter().partition(|i| self.reads_in_flight.contains_key(i));
        if let Some(kernel) = self.kernel_invalidator.get().cloned().filter(|_| !reading.is_empty()) {
            tokio::task::spawn_blocking(move || kernel(&reading, &[]));
        }
        self.invalidate_kernel_for(idle, entries).await;
    }

    /// Has the kernel forget `inodes` (attributes and pages) and `entries`, waiting at most
    /// [`KERNEL_WAIT`].
    pub(crate) async fn invalidate_kernel_for(&self, inodes: Vec<Ino>, entries: Vec<(Ino, Vec<u8>)>) {
        if let Some(kernel) = self.kernel_invalidator.get().cloned() {
            let work = tokio::task::spawn_blocking(move || kernel(&inodes, &entries));
            if tokio::time::timeout(KERNEL_WAIT, work).await.is_err() {
                // Shown by `cairn stats`: each one held a change on another client this long.
                self.stats.count("kernel", "slow_invalidations");
            }
        }
    }

    /// Forgets everything cached about `ino`, as if this client had just changed it.
    pub(crate) fn forget_inode(&self, ino: Ino) {
        self.listings.changed_elsewhere(ino);
        self.file_attrs.drop(ino);
        self.dir_attrs.invalidate(&ino);
        self.invalidate_data(ino);
        self.page_states.invalidate(&ino);
        self.sizes.invalidate(&ino);
        self.no_xattrs.invalidate(&ino);
        self.open_hints.invalidate(&ino);
        self.inode_flags.invalidate(&ino);
        self.atimes.forget(ino);
    }

    /// Forgets every cached attribute, entry and map, and keeps answers to requests sent
    /// before now out of the caches (the connection, and with it every lease, was lost, or
    /// the session lapsed).
    pub(crate) fn forget_all(&self) {
        let epoch = self.listings.changed_everywhere();
        self.file_attrs.drop_all(epoch);
        self.map_epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.dir_attrs.invalidate_all();
        self.maps.invalidate_all();
        self.page_states.invalidate_all();
        self.sizes.invalidate_all();
        self.no_xattrs.invalidate_all();
        self.xattr_misses.invalidate_all();
        self.open_hints.invalidate_all();
    }
}
