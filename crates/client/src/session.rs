//! Whether this client may still use what it cached. The metadata server recalls cached
//! state from live clients only: one it has not heard from for 5 s (`LIVENESS` in
//! `cairn-meta`'s `leases`) is no longer waited for. So the client uses its caches only while
//! its last answered request was sent less than [`SESSION_FRESH`] ago, sends `Renew` when it
//! has been idle for a second, and forgets everything when that lapses (a stopped process,
//! a cut network, a restarted server).

use crate::Client;
use cairn_proto::meta::MetaRequest;
use std::sync::Weak;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Caches are used only while the last answered request was sent less than this ago: less
/// than the server's `LIVENESS`, so the client stops before the server stops waiting.
const SESSION_FRESH: Duration = Duration::from_secs(4);
/// A client idle this long sends `Renew`.
const RENEW_AFTER: Duration = Duration::from_secs(1);

pub(crate) struct Session {
    started: Instant,
    /// When (ms after `started`) the last request that got an answer was sent.
    answered_ms: AtomicU64,
    /// Caches were dropped because the session lapsed, and nothing was answered since.
    lapsed: AtomicBool,
}

impl Session {
    pub(crate) fn new() -> Session {
        Session { started: Instant::now(), answered_ms: AtomicU64::new(0), lapsed: AtomicBool::new(false) }
    }

    /// The time a request is sent, to pass to [`Session::answered`].
    pub(crate) fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// A request sent at `sent` (from [`Session::now`]) got an answer; true if the session
    /// had lapsed before it (nothing answered for [`SESSION_FRESH`]), whether or not a
    /// cache read noticed: then recalls may have been missed, and the caches must go.
    pub(crate) fn answered(&self, sent: u64) -> bool {
        let before = self.answered_ms.fetch_max(sent, Ordering::AcqRel);
        let was_lapsed = self.lapsed.swap(false, Ordering::AcqRel);
        !was_lapsed && sent.saturating_sub(before) >= SESSION_FRESH.as_millis() as u64
    }

    fn idle(&self) -> Duration {
        Duration::from_millis(self.now().saturating_sub(self.answered_ms.load(Ordering::Acquire)))
    }
}

impl Client {
    /// How long the kernel may keep the attributes and names this client gives it now: until
    /// the client would stop trusting its own caches ([`SESSION_FRESH`] after the last
    /// answered request was sent), so before the server stops waiting for this client's
    /// answer to a recall. A recall reaches the kernel only while the client runs; this bound
    /// holds even for a client that is stopped or cut off, whose kernel can no longer be told.
    /// Renewals keep it at 3 to 4 s while the client is connected.
    pub fn kernel_ttl(&self) -> Duration {
        SESSION_FRESH.saturating_sub(self.session.idle())
    }

    /// [`Client::check_session`], and whether the caches may be used.
    pub(crate) fn check_session_fresh(&self) -> bool {
        self.check_session();
        self.session.idle() < SESSION_FRESH
    }

    /// Drops every cache if the session lapsed; called before answering from a cache.
    pub(crate) fn check_session(&self) {
        if self.session.idle() >= SESSION_FRESH && !self.session.lapsed.swap(true, Ordering::AcqRel) {
            tracing::debug!("no answer from the metadata server lately: dropping cached state");
            self.forget_all();
        }
    }
}

/// Sends `Renew` whenever the client has been idle for [`RENEW_AFTER`], until it is dropped.
pub(crate) async fn renew_loop(client: Weak<Client>) {
    loop {
        tokio::time::sleep(RENEW_AFTER / 2).await;
        let Some(c) = client.upgrade() else { return };
        if c.session.idle() >= RENEW_AFTER {
            let _ = c.call(MetaRequest::Renew).await;
        }
    }
}
