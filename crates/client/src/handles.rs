//! Registrations of open handles with the metadata server, which keeps an unlinked file
//! alive until its last registered handle closes (`Open`, `Close`).
//!
//! A small file opened read-only while this client knows its data map (a listing gave it, and
//! the read lease on the file keeps it current) is opened without asking the server: `tar c`,
//! `cp -r`, compilers and `git` open thousands of files, read them whole and close them at
//! once, and the `Open` round trip was half of each one's cost. Such a handle is registered
//! only if it stays open for [`REGISTER_AFTER`]; most are closed before, and then neither
//! `Open` nor `Close` is sent. That is safe because the server frees an inode that lost its
//! last link only seconds later (`cairn-meta`'s `removed` queue), well after this.
//!
//! A late registration and a close of the same file must reach the server in that order
//! (QUIC streams are not ordered): a close waits for a registration in flight.

use crate::Client;
use cairn_proto::Ino;
use cairn_proto::meta::MetaRequest;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use std::sync::Arc;
use std::time::Duration;

/// How long a handle opened without the server stays unregistered. Far below the delay
/// before the metadata server frees an unlinked inode (5 s).
const REGISTER_AFTER: Duration = Duration::from_secs(1);

/// One file's handles opened without the server.
#[derive(Default)]
pub(crate) struct Unregistered {
    /// Handles not registered yet.
    count: u32,
    /// A late registration being sent, which a close must wait for.
    in_flight: Option<Shared<BoxFuture<'static, ()>>>,
}

impl Client {
    /// Counts a handle opened without the server, and registers it if it is still open
    /// after [`REGISTER_AFTER`].
    pub(crate) fn register_later(self: &Arc<Self>, ino: Ino) {
        self.unregistered.entry(ino).or_default().count += 1;
        let client = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(REGISTER_AFTER).await;
            let sending = {
                let Some(mut u) = client.unregistered.get_mut(&ino) else { return };
                if u.count == 0 {
                    // Closed before: the last of its timers forgets the file.
                    drop(u);
                    client.unregistered.remove_if(&ino, |_, u| u.count == 0 && u.in_flight.is_none());
                    return;
                }
                u.count -= 1;
                let c = client.clone();
                let open = async move {
                    if let Err(e) = c.call(MetaRequest::Open { ino }).await {
                        tracing::warn!(ino, "late registration of an open file: {e}");
                    }
                };
                let open = open.boxed().shared();
                u.in_flight = Some(open.clone());
                open
            };
            sending.clone().await;
            client.unregistered.remove_if_mut(&ino, |_, u| {
                if u.in_flight.as_ref().is_some_and(|f| f.ptr_eq(&sending)) {
                    u.in_flight = None;
                }
                u.count == 0 && u.in_flight.is_none()
            });
        });
    }

    /// What a close of a handle of `ino` must send: nothing if that handle (or another of
    /// the file's) was never registered, else a `Close` after the registration in flight.
    fn closing(&self, ino: Ino) -> Closing {
        let Some(mut u) = self.unregistered.get_mut(&ino) else { return Closing::Send(None) };
        if u.count > 0 {
            u.count -= 1;
            return Closing::Nothing;
        }
        Closing::Send(u.in_flight.clone())
    }

    /// Drops a handle's registration with the metadata server. Needs no answer: the server
    /// orders it after every earlier request of this client that could observe it, and a
    /// lost one is cleaned up with the connection. Not waiting saves a round trip on every
    /// close.
    pub(crate) fn send_close(self: &Arc<Self>, ino: Ino) {
        let Closing::Send(registering) = self.closing(ino) else { return };
        let client = self.clone();
        tokio::spawn(async move {
            if let Some(r) = registering {
                r.await;
            }
            if let Err(e) = client.call_empty(MetaRequest::Close { ino }).await {
                tracing::debug!(ino, "close registration: {e}");
            }
        });
    }
}

/// What closing a handle takes (see [`Client::closing`]).
enum Closing {
    /// Nothing: the server never heard of the handle.
    Nothing,
    /// A `Close`, once the late registration given, if any, was answered.
    Send(Option<Shared<BoxFuture<'static, ()>>>),
}
