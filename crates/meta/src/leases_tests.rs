//! Sessions and leases over real QUIC connections with mutual TLS: what the lease table
//! holds once a client's connection has ended.

use crate::leases::Leases;
use cairn_net::{Bytes, Handler, Identity, Peer, RpcClient, pki};
use cairn_proto::WireError;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// Request 0 registers the session and takes a read lease on inode 7, as most metadata
/// requests do; request 1 is a slow request that only registers the session, held until
/// the test releases it.
const QUICK: u32 = 0;
const HELD: u32 = 1;

/// A server that keeps its sessions in [`Leases`] as the metadata service does.
#[derive(Default)]
struct Server {
    leases: Leases,
    /// Signalled when a held request has arrived, when a connection has ended and when a
    /// held request has finished; `release` lets a held request go on.
    arrived: Notify,
    gone: Notify,
    release: Notify,
    finished: Notify,
}

impl Handler<u32, u32> for Server {
    async fn handle(&self, peer: &Peer, req: u32, _payload: Vec<u8>) -> Result<(u32, Bytes), WireError> {
        if req == HELD {
            self.arrived.notify_one();
            self.release.notified().await;
        }
        self.leases.seen(peer);
        match req {
            HELD => self.finished.notify_one(),
            _ => self.leases.grant(peer, &[7]),
        }
        Ok((0, Bytes::new()))
    }

    async fn disconnected(&self, peer: &Peer) {
        self.leases.disconnected(peer.conn_id);
        self.gone.notify_one();
    }
}

async fn timely(what: &str, wait: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(Duration::from_secs(10), wait).await.unwrap_or_else(|_| panic!("{what} never happened"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_outlives_its_connection_leaves_no_session_behind() {
    let ca = pki::generate_ca("test").unwrap();
    let node = pki::issue(&ca, "meta", &[cairn_net::META_SERVER_NAME]).unwrap();
    let user = pki::issue(&ca, "client", &[cairn_net::CLIENT_NAME]).unwrap();
    let server_id = Identity::from_pem(&ca.cert_pem, &node.cert_pem, &node.key_pem).unwrap();
    let client_id = Identity::from_pem(&ca.cert_pem, &user.cert_pem, &user.key_pem).unwrap();
    let endpoint = cairn_net::server_endpoint(&server_id, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap().to_string();
    let server = Arc::new(Server::default());
    tokio::spawn(cairn_net::serve(endpoint, server.clone()));
    let connect = || {
        let endpoint = cairn_net::client_endpoint(&client_id).unwrap();
        Arc::new(RpcClient::new(endpoint, &addr, cairn_net::META_SERVER_NAME, Duration::from_secs(30)))
    };
    let (leaving, staying) = (connect(), connect());
    leaving.call::<_, u32>(&QUICK).await.unwrap();
    staying.call::<_, u32>(&QUICK).await.unwrap();
    assert_eq!(server.leases.counts().0, 2, "two client sessions");

    // A request of the leaving client is still being handled when its connection ends (a
    // mount's last requests at unmount), and only then registers the client as seen.
    let late = tokio::spawn({
        let leaving = leaving.clone();
        async move { leaving.call::<_, u32>(&HELD).await }
    });
    timely("the held request's arrival", server.arrived.notified()).await;
    leaving.close().await;
    timely("the end of the connection", server.gone.notified()).await;
    server.release.notify_one();
    timely("the end of the held request", server.finished.notified()).await;
    assert!(late.await.unwrap().is_err(), "the held request cannot be answered on a closed connection");

    assert_eq!(server.leases.counts().0, 1, "the ended connection is a session again");
    staying.call::<_, u32>(&QUICK).await.unwrap();
    assert_eq!(server.leases.counts().0, 1);
    assert_eq!(server.leases.counts().1, 1, "inode 7 keeps its lease");
    staying.close().await;
    timely("the end of the second connection", server.gone.notified()).await;
    assert_eq!(server.leases.counts(), (0, 0, 0), "an ended connection keeps no session or lease");
}

/// A lookup or listing that reads a file while another request's recall of that file's
/// writer is under way must read it again: the recall is counted when it starts and again
/// once its holder answered (here at once: the holder is gone), so a request that took its
/// count after the start still sees it move.
#[tokio::test]
async fn a_recall_is_counted_again_once_answered() {
    let leases = Leases::default();
    leases.set_writer(9, 41, 1);
    let before = leases.recalls();
    let (recalled, lost) = leases.recall_writers(42, &[9], None).await;
    assert!(recalled);
    assert_eq!(lost, vec![(9, 1)], "a holder that is gone does not answer");
    assert_eq!(leases.recalls(), before + 2, "counted at its start and once answered");
}
