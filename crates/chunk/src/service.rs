//! The chunk server's request handling, heartbeat and run loop.

use crate::scrub::{BadSlices, ScrubConfig};
use crate::store::{BlockStore, StoreError, off_thread};
use cairn_net::{Bytes, Handler, Identity, Peer, RpcClient};
use cairn_proto::chunk::{ChunkRequest, ChunkResponse};
use cairn_proto::meta::{MetaRequest, MetaResponse};
use cairn_proto::*;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tracing::{error, info, warn};

/// What `cairn chunk` needs to run.
#[derive(Debug, Clone)]
pub struct ChunkConfig {
    pub id: ServerId,
    pub listen: SocketAddr,
    /// Address clients should use to reach this server.
    pub advertise: String,
    pub meta: String,
    pub data_dir: PathBuf,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub heartbeat: Duration,
    /// Failure domain reported to the metadata server.
    pub zone: String,
    pub scrub: ScrubConfig,
    /// TCP address serving Prometheus metrics at `/metrics`; none serves none.
    pub metrics: Option<SocketAddr>,
}

struct ChunkService {
    store: BlockStore,
    bad: BadSlices,
    /// Connections to other chunk servers, for `Replicate`, by address.
    peers: std::sync::Mutex<std::collections::HashMap<String, Arc<RpcClient>>>,
    endpoint: quinn::Endpoint,
    metrics: Arc<cairn_metrics::Metrics>,
    gauges: crate::metrics::ChunkGauges,
}

/// Deadline of each block fetched from another chunk server.
const PEER_TIMEOUT: Duration = Duration::from_secs(30);

impl ChunkService {
    fn peer(&self, addr: &str) -> Arc<RpcClient> {
        let mut peers = self.peers.lock().expect("peers lock");
        let rpc = peers.entry(addr.to_string()).or_insert_with(|| {
            Arc::new(RpcClient::new(self.endpoint.clone(), addr, cairn_net::CHUNK_SERVER_NAME, PEER_TIMEOUT))
        });
        rpc.clone()
    }

    /// Fetches each block from `from`, checks it and stores it with fsync.
    async fn replicate(&self, keys: Vec<cairn_proto::chunk::BlockKey>, from: &str) -> Result<(), WireError> {
        let rpc = self.peer(from);
        for key in keys {
            let fetched = rpc.call::<_, ChunkResponse>(&ChunkRequest::Get { key }).await;
            let (_, block) = fetched.map_err(|e| match e {
                cairn_net::NetError::Remote(w) => w,
                other => WireError::new(other.code(), format!("fetching {key:?} from {from}: {other}")),
            })?;
            let (store, len) = (self.store.clone(), block.len());
            blocking(move || store.put(key, &block, true)).await?;
            self.gauges.stored.inc_by(len as u64);
        }
        Ok(())
    }

    /// Counts the bytes a read of `key` served (`len` of its result), or notes the block's
    /// slice as bad when it failed its checksum.
    fn served<T>(
        &self,
        key: cairn_proto::chunk::BlockKey,
        got: Result<T, StoreError>,
        len: fn(&T) -> usize,
    ) -> Result<T, WireError> {
        match &got {
            Ok(data) => {
                self.gauges.served.inc_by(len(data) as u64);
            }
            Err(StoreError::Corrupt { .. }) => {
                self.gauges.corrupt.inc();
                self.bad.add(key.slice);
            }
            Err(_) => {}
        }
        got.map_err(wire)
    }
}

fn wire(e: StoreError) -> WireError {
    if matches!(e, StoreError::Corrupt { .. }) {
        error!("{e}");
    }
    WireError::new(e.code(), e.to_string())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, WireError> {
    off_thread(f).await.map_err(wire)
}

impl Handler<ChunkRequest, ChunkResponse> for ChunkService {
    async fn handle(
        &self,
        _peer: &Peer,
        req: ChunkRequest,
        payload: Vec<u8>,
    ) -> Result<(ChunkResponse, Bytes), WireError> {
        self.metrics.request((&req).into(), self.handle_request(req, payload)).await
    }
}

impl ChunkService {
    async fn handle_request(&self, req: ChunkRequest, payload: Vec<u8>) -> Result<(ChunkResponse, Bytes), WireError> {
        let store = self.store.clone();
        match req {
            ChunkRequest::Put { key, sync } => {
                let len = payload.len() as u64;
                blocking(move || store.put(key, &payload, sync)).await?;
                self.gauges.stored.inc_by(len);
                Ok((ChunkResponse::Done, Bytes::new()))
            }
            ChunkRequest::Get { key } => {
                let block = self.served(key, off_thread(move || store.get(key)).await, Bytes::len)?;
                Ok((ChunkResponse::Block, block))
            }
            ChunkRequest::GetFrame { key, frame } => {
                let (framed, part) =
                    self.served(key, off_thread(move || store.get_frame(key, frame)).await, |g| g.1.len())?;
                Ok((if framed { ChunkResponse::Frame } else { ChunkResponse::Block }, part))
            }
            ChunkRequest::PutMany { blocks, sync } => {
                let total: u64 = blocks.iter().map(|(_, len)| u64::from(*len)).sum();
                if total != payload.len() as u64 {
                    let why = format!("PutMany names {total} bytes of blocks, the payload has {}", payload.len());
                    return Err(WireError::new(ErrorCode::BadRequest, why));
                }
                blocking(move || {
                    let mut at = 0;
                    let parts: Vec<_> = blocks
                        .iter()
                        .map(|&(key, len)| {
                            at += len as usize;
                            (key, &payload[at - len as usize..at])
                        })
                        .collect();
                    store.put_many(&parts, sync)
                })
                .await?;
                self.gauges.stored.inc_by(total);
                Ok((ChunkResponse::Done, Bytes::new()))
            }
            ChunkRequest::Sync { keys } => {
                blocking(move || store.sync(&keys)).await?;
                Ok((ChunkResponse::Done, Bytes::new()))
            }
            ChunkRequest::Delete { keys } => {
                blocking(move || store.delete(&keys)).await?;
                Ok((ChunkResponse::Done, Bytes::new()))
            }
            ChunkRequest::Replicate { keys, from } => {
                self.replicate(keys, &from).await?;
                Ok((ChunkResponse::Done, Bytes::new()))
            }
            ChunkRequest::List { bucket } => {
                Ok((ChunkResponse::Blocks(blocking(move || store.bucket_blocks(bucket)).await?), Bytes::new()))
            }
            ChunkRequest::Stat => {
                let (capacity, free) = blocking(move || Ok(store.usage()?)).await?;
                Ok((ChunkResponse::Stat { capacity, free }, Bytes::new()))
            }
        }
    }
}

async fn heartbeat_loop(config: ChunkConfig, store: BlockStore, bad: BadSlices, meta: RpcClient) {
    let mut announced = false;
    loop {
        let (capacity, free) = store.usage().unwrap_or((0, 0));
        let reported = bad.pending();
        let req = MetaRequest::Heartbeat {
            id: config.id,
            addr: config.advertise.clone(),
            zone: config.zone.clone(),
            capacity,
            free,
            bad: reported.clone(),
        };
        match meta.call::<_, MetaResponse>(&req).await {
            Ok(_) => {
                bad.reported(&reported);
                if !announced {
                    info!(meta = %config.meta, "registered with the metadata server");
                    announced = true;
                }
            }
            Err(e) => {
                if announced {
                    warn!("heartbeat to {} failed: {e}", config.meta);
                }
                announced = false;
            }
        }
        tokio::time::sleep(config.heartbeat).await;
    }
}

/// Why the chunk server could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Net(#[from] cairn_net::NetError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Runs the chunk server until the process is stopped.
pub async fn run(config: ChunkConfig) -> Result<(), RunError> {
    let identity = Identity::load(&config.ca, &config.cert, &config.key)?;
    let store = BlockStore::open(&config.data_dir)?;
    let endpoint = cairn_net::server_endpoint(&identity, config.listen)?;
    let client_endpoint = cairn_net::client_endpoint(&identity)?;
    let meta = RpcClient::new(
        client_endpoint.clone(),
        &config.meta,
        cairn_net::META_SERVER_NAME,
        config.heartbeat.max(Duration::from_secs(1)) * 3,
    );
    info!(id = config.id, listen = %endpoint.local_addr()?, data = %config.data_dir.display(), "chunk server ready");
    let bad = BadSlices::default();
    tokio::spawn(heartbeat_loop(config.clone(), store.clone(), bad.clone(), meta));
    let scrub_state = config.data_dir.join("scrub.last");
    tokio::spawn(crate::scrub::scrub_loop(store.clone(), bad.clone(), config.scrub, scrub_state));
    let mut metrics = cairn_metrics::Metrics::new("cairn_chunk");
    let gauges = crate::metrics::ChunkGauges::register(&mut metrics);
    let metrics = Arc::new(metrics);
    if let Some(addr) = config.metrics {
        let (g, s) = (gauges.clone(), store.clone());
        cairn_metrics::spawn(addr, metrics.clone(), move || {
            g.refresh(&s);
            async {}
        });
    }
    let service = ChunkService { store, bad, peers: Default::default(), endpoint: client_endpoint, metrics, gauges };
    cairn_net::serve(endpoint, Arc::new(service)).await;
    Ok(())
}
