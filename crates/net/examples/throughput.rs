//! Measures request/response throughput of the QUIC transport on loopback:
//! `cargo run --release -p cairn-net --example throughput [payload_mib] [requests] [concurrency]`.

use cairn_net::{Handler, Identity, Peer, RpcClient, pki};
use cairn_proto::WireError;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Echo(cairn_net::Bytes);

impl Handler<u32, u32> for Echo {
    async fn handle(&self, _peer: &Peer, req: u32, payload: Vec<u8>) -> Result<(u32, cairn_net::Bytes), WireError> {
        // Request 0 asks for a payload back; anything else uploads one.
        Ok((payload.len() as u32, if req == 0 { self.0.clone() } else { cairn_net::Bytes::new() }))
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let size = args.first().copied().unwrap_or(4) << 20;
    let requests = args.get(1).copied().unwrap_or(200);
    let concurrency = args.get(2).copied().unwrap_or(4);
    let ca = pki::generate_ca("bench").unwrap();
    let node = pki::issue(&ca, "node", &[cairn_net::CHUNK_SERVER_NAME]).unwrap();
    let id = Identity::from_pem(&ca.cert_pem, &node.cert_pem, &node.key_pem).unwrap();
    let server = cairn_net::server_endpoint(&id, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = server.local_addr().unwrap().to_string();
    tokio::spawn(cairn_net::serve(server, Arc::new(Echo(vec![7u8; size as usize].into()))));
    let client = Arc::new(RpcClient::new(
        cairn_net::client_endpoint(&id).unwrap(),
        &addr,
        cairn_net::CHUNK_SERVER_NAME,
        Duration::from_secs(30),
    ));
    let upload = cairn_net::Bytes::from(vec![1u8; size as usize]);
    for (name, req) in [("download", 0u32), ("upload", 1u32)] {
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let (client, upload) = (client.clone(), upload.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..requests / concurrency {
                    let payload = if req == 0 { cairn_net::Bytes::new() } else { upload.clone() };
                    let _: (u32, Vec<u8>) = client.call_with(&req, payload).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let secs = start.elapsed().as_secs_f64();
        let mib = (requests / concurrency * concurrency * size) as f64 / (1 << 20) as f64;
        println!("{name}: {mib:.0} MiB in {secs:.2}s = {:.0} MiB/s", mib / secs);
    }
}
