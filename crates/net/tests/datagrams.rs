//! Bulk transfers over real QUIC with mutual TLS on loopback travel in large datagrams.

use cairn_net::{Handler, Identity, Peer, RpcClient, pki};
use cairn_proto::WireError;
use std::sync::Arc;
use std::time::Duration;

struct Sink;

impl Handler<u32, u32> for Sink {
    async fn handle(&self, _peer: &Peer, _req: u32, payload: Vec<u8>) -> Result<(u32, cairn_net::Bytes), WireError> {
        Ok((payload.len() as u32, cairn_net::Bytes::new()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_on_loopback_keep_large_datagrams() {
    let ca = pki::generate_ca("test").unwrap();
    let node = pki::issue(&ca, "node", &[cairn_net::CHUNK_SERVER_NAME]).unwrap();
    let id = Identity::from_pem(&ca.cert_pem, &node.cert_pem, &node.key_pem).unwrap();
    let server = cairn_net::server_endpoint(&id, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = server.local_addr().unwrap().to_string();
    tokio::spawn(cairn_net::serve(server, Arc::new(Sink)));
    let client = Arc::new(RpcClient::new(
        cairn_net::client_endpoint(&id).unwrap(),
        &addr,
        cairn_net::CHUNK_SERVER_NAME,
        Duration::from_secs(30),
    ));
    // Many blocks in flight at once, as a sequential writer sends them: quinn then hands the
    // socket batches of several datagrams.
    let block = cairn_net::Bytes::from(vec![1u8; 1 << 20]);
    let uploads: Vec<_> = (0..8)
        .map(|_| {
            let (client, block) = (client.clone(), block.clone());
            tokio::spawn(async move {
                for _ in 0..32 {
                    let (n, _): (u32, Vec<u8>) = client.call_with(&1u32, block.clone()).await.unwrap();
                    assert_eq!(n, 1 << 20);
                }
            })
        })
        .collect();
    for u in uploads {
        u.await.unwrap();
    }
    let stats = client.connection_stats().expect("a live connection");
    let per_datagram = stats.udp_tx.bytes / stats.udp_tx.datagrams;
    // Loopback carries 64 KiB datagrams; falling back to the 1,200-byte minimum (a spurious
    // black hole after silently dropped batches) costs 50 times the datagrams.
    assert!(
        per_datagram > 8 << 10,
        "256 MiB went out in {} datagrams of {per_datagram} bytes on average: {:?}",
        stats.udp_tx.datagrams,
        stats.path
    );
}
