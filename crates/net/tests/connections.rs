//! A server tells its peers' connections apart for its whole life, over real QUIC with mutual
//! TLS on loopback: the metadata server keys locks, leases and sessions by connection, and
//! remembers connections that ended, so an id must never be handed out twice.

use cairn_net::{Handler, Identity, Peer, RpcClient, pki};
use cairn_proto::WireError;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// Answers with the caller's connection id and reports every connection that ends.
struct Ids {
    ended: mpsc::UnboundedSender<usize>,
}

impl Handler<u32, usize> for Ids {
    async fn handle(&self, peer: &Peer, _req: u32, _payload: Vec<u8>) -> Result<(usize, cairn_net::Bytes), WireError> {
        Ok((peer.conn_id, cairn_net::Bytes::new()))
    }

    async fn disconnected(&self, peer: &Peer) {
        let _ = self.ended.send(peer.conn_id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_ids_are_never_reused() {
    let ca = pki::generate_ca("test").unwrap();
    let node = pki::issue(&ca, "node", &[cairn_net::META_SERVER_NAME]).unwrap();
    let id = Identity::from_pem(&ca.cert_pem, &node.cert_pem, &node.key_pem).unwrap();
    let server = cairn_net::server_endpoint(&id, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = server.local_addr().unwrap().to_string();
    let (ended, mut ends) = mpsc::unbounded_channel();
    tokio::spawn(cairn_net::serve(server, Arc::new(Ids { ended })));

    let seen = Mutex::new(HashSet::new());
    for round in 0..32 {
        let client = RpcClient::new(
            cairn_net::client_endpoint(&id).unwrap(),
            &addr,
            cairn_net::META_SERVER_NAME,
            Duration::from_secs(10),
        );
        let (conn, _): (usize, Vec<u8>) = client.call(&0u32).await.unwrap();
        assert!(seen.lock().unwrap().insert(conn), "round {round}: connection id {conn} was given before");
        client.close().await;
        drop(client);
        // The server is done with the connection (and may free it) before the next one comes.
        let gone = tokio::time::timeout(Duration::from_secs(10), ends.recv()).await;
        assert_eq!(gone.expect("the server saw the connection end"), Some(conn));
    }
}
