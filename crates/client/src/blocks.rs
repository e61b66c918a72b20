//! Talking to chunk servers: the server list, placement, storing and fetching blocks, and the
//! in-memory cache of decoded blocks (safe without invalidation: blocks never change).

use crate::{Client, ClientConfig, ClientError, Result, unexpected};
use cairn_net::Bytes;
use cairn_net::RpcClient;
use cairn_proto::chunk::{BlockKey, ChunkRequest, ChunkResponse};
use cairn_proto::meta::{MetaRequest, MetaResponse};
use cairn_proto::*;
use dashmap::DashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{error, warn};

/// How long the chunk-server list is trusted before it is fetched again.
const SERVER_LIST_TTL: Duration = Duration::from_secs(3);
/// Slice ids reserved per request to the metadata server.
const SLICE_ID_BATCH: u64 = 256;

/// Blocks up to this size are encoded and decoded on the network thread; bigger ones on the
/// blocking pool, where zstd and ChaCha20 cost that thread nothing.
const INLINE_CODEC_BYTES: u64 = 256 << 10;
/// Slices up to this size that this client stores go into its block cache too: small files
/// are what programs read back soon (a build its objects, `git status` what `git clone`
/// wrote), while big writes would only evict data being read.
const CACHE_WRITTEN_BYTES: u64 = 64 << 10;

/// Runs codec work (zstd, ChaCha20-Poly1305) on `bytes` bytes: inline when small, on tokio's
/// blocking pool when large, so that megabytes of it do not stall the one network thread.
async fn codec_work<T: Send + 'static>(
    bytes: u64,
    work: impl FnOnce() -> T + Send + 'static,
) -> std::result::Result<T, tokio::task::JoinError> {
    match bytes > INLINE_CODEC_BYTES {
        true => tokio::task::spawn_blocking(work).await,
        false => Ok(work()),
    }
}

/// The codec's name for a block: its slice and index.
fn block_id(slice: SliceId, index: usize) -> cairn_block::BlockId {
    cairn_block::BlockId { slice, index: index as u32 }
}

/// What the block cache holds under a key: a whole block (`None`), or one frame of it (a small
/// read's, see [`Client::frame`]).
pub(crate) type Piece = (BlockKey, Option<u32>);

/// A cached block or frame: its plain bytes are `bytes[start..]` (a block stored as is keeps
/// its header in front, so fetching it costs no copy).
pub(crate) struct Block {
    bytes: Vec<u8>,
    start: usize,
}

impl Block {
    pub(crate) fn data(&self) -> &[u8] {
        &self.bytes[self.start..]
    }
}

pub(crate) struct BlockClient {
    endpoint: quinn::Endpoint,
    timeout: Duration,
    rpcs: DashMap<ServerId, Arc<RpcClient>>,
    servers: Mutex<Option<(Instant, Arc<Vec<ChunkServerInfo>>)>>,
    slice_ids: Mutex<(SliceId, SliceId)>,
    pub(crate) cache: moka::future::Cache<Piece, Arc<Block>>,
    /// Blocks kept on local disk, encoded (see `disk_cache`), if configured.
    disk: Option<crate::disk_cache::DiskCache>,
}

impl BlockClient {
    pub(crate) fn new(endpoint: quinn::Endpoint, config: &ClientConfig) -> Result<BlockClient> {
        let disk = match &config.disk_cache {
            Some((dir, bytes)) => Some(crate::disk_cache::DiskCache::open(dir, *bytes).map_err(|e| {
                ClientError::new(ErrorCode::Io, format!("cannot open the disk cache in {}: {e}", dir.display()))
            })?),
            None => None,
        };
        Ok(BlockClient {
            endpoint,
            timeout: config.timeout,
            rpcs: DashMap::new(),
            servers: Mutex::new(None),
            slice_ids: Mutex::new((0, 0)),
            cache: moka::future::Cache::builder()
                .max_capacity(config.cache_bytes)
                // Plain LRU: TinyLFU admission would turn away freshly read blocks under a
                // sequential scan, so the next read of the same block would fetch it again.
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .weigher(|_, v: &Arc<Block>| v.bytes.len().try_into().unwrap_or(u32::MAX))
                .build(),
            disk,
        })
    }
}

impl Client {
    /// The chunk servers as the metadata server sees them now.
    pub async fn list_servers(&self) -> Result<Vec<ChunkServerInfo>> {
        Ok(self.servers(true).await?.to_vec())
    }

    /// The chunk servers, fetched from the metadata server at most every few seconds.
    pub(crate) async fn servers(&self, refresh: bool) -> Result<Arc<Vec<ChunkServerInfo>>> {
        if !refresh
            && let Some((at, list)) = self.blocks.servers.lock().expect("servers lock").as_ref()
            && at.elapsed() < SERVER_LIST_TTL
        {
            return Ok(list.clone());
        }
        let list = match self.call(MetaRequest::ListServers).await? {
            MetaResponse::Servers(s) => Arc::new(s),
            other => return Err(unexpected(other)),
        };
        *self.blocks.servers.lock().expect("servers lock") = Some((Instant::now(), list.clone()));
        Ok(list)
    }

    async fn rpc(&self, id: ServerId) -> Result<Arc<RpcClient>> {
        let servers = self.servers(false).await?;
        let servers = match servers.iter().any(|s| s.id == id) {
            true => servers,
            false => self.servers(true).await?,
        };
        let Some(info) = servers.iter().find(|s| s.id == id) else {
            return Err(ClientError::new(ErrorCode::Io, format!("chunk server {id} is not registered")));
        };
        if let Some(rpc) = self.blocks.rpcs.get(&id)
            && rpc.addr() == info.addr
        {
            return Ok(rpc.clone());
        }
        let rpc = Arc::new(RpcClient::new(
            self.blocks.endpoint.clone(),
            &info.addr,
            cairn_net::CHUNK_SERVER_NAME,
            self.blocks.timeout,
        ));
        self.blocks.rpcs.insert(id, rpc.clone());
        Ok(rpc)
    }

    async fn chunk_call(&self, id: ServerId, req: &ChunkRequest, payload: Bytes) -> Result<(ChunkResponse, Vec<u8>)> {
        let rpc = self.rpc(id).await?;
        self.stats.count("chunk", req.into());
        Ok(rpc.call_with(req, payload).await?)
    }

    /// A fresh slice id, reserved from the metadata server in batches.
    pub(crate) async fn next_slice_id(&self) -> Result<SliceId> {
        {
            let mut ids = self.blocks.slice_ids.lock().expect("slice id lock");
            if ids.0 < ids.1 {
                ids.0 += 1;
                return Ok(ids.0 - 1);
            }
        }
        let first = match self.call(MetaRequest::AllocSlices { count: SLICE_ID_BATCH }).await? {
            MetaResponse::SliceIds { first } => first,
            other => return Err(unexpected(other)),
        };
        let mut ids = self.blocks.slice_ids.lock().expect("slice id lock");
        *ids = (first + 1, first + SLICE_ID_BATCH);
        Ok(first)
    }

    /// Stores a slice's bytes as blocks on `replication` servers; returns the servers used.
    /// Takes the buffer by value and drops it once encoded, so a slice in flight is held in
    /// memory once, not twice.
    pub(crate) async fn store_slice(&self, slice: SliceId, data: Vec<u8>, sync: bool) -> Result<Vec<ServerId>> {
        let bs = self.volume.block_size as usize;
        let len = data.len() as u64;
        let written = (len <= CACHE_WRITTEN_BYTES).then(|| data.clone());
        let codec = self.codec();
        let encode = move || -> Vec<(BlockKey, Bytes)> {
            let blocks = data.chunks(bs).enumerate();
            blocks
                .map(|(i, part)| (BlockKey { slice, index: i as u32 }, codec.encode(block_id(slice, i), part).into()))
                .collect()
        };
        let encoded = codec_work(len, encode).await.map_err(|e| ClientError::new(ErrorCode::Io, e.to_string()))?;
        let mut last_err = None;
        // Servers that failed this slice: the retries place it on the others.
        let mut failed: Vec<ServerId> = Vec::new();
        for attempt in 0..3 {
            let servers: Vec<_> =
                self.servers(attempt > 0).await?.iter().filter(|s| !failed.contains(&s.id)).cloned().collect();
            let alive = servers.iter().filter(|s| s.alive).count();
            let chosen = cairn_proto::placement::place(&servers, slice, self.copies(alive), len, &[]);
            if chosen.is_empty() {
                let code = if alive == 0 && failed.is_empty() { ErrorCode::Io } else { ErrorCode::NoSpace };
                let e = ClientError::new(code, "no live chunk server has room for the data");
                return Err(last_err.unwrap_or(e));
            }
            let puts = chosen.iter().map(|&id| {
                let encoded = &encoded;
                async move {
                    for (key, block) in encoded {
                        self.chunk_call(id, &ChunkRequest::Put { key: *key, sync }, block.clone())
                            .await
                            .map_err(|e| (id, e))?;
                    }
                    Ok::<_, (ServerId, ClientError)>(())
                }
            });
            let errors: Vec<_> = futures::future::join_all(puts).await.into_iter().filter_map(|r| r.err()).collect();
            let Some((_, e)) = errors.first() else {
                if let Some(data) = &written {
                    self.cache_written(slice, data).await;
                }
                return Ok(chosen);
            };
            if ![ErrorCode::NoSpace, ErrorCode::Io, ErrorCode::TimedOut].contains(&e.code) {
                return Err(e.clone());
            }
            warn!(slice, "storing a slice failed, retrying on other servers: {e}");
            last_err = Some(e.clone());
            failed.extend(errors.iter().map(|(id, _)| *id));
        }
        Err(last_err.unwrap_or_else(|| ClientError::new(ErrorCode::Io, "could not store data")))
    }

    /// How many copies of a slice to store while `alive` chunk servers are live.
    fn copies(&self, alive: usize) -> usize {
        (self.volume.replication as usize).min(alive).max(1)
    }

    /// Puts the plain bytes of a slice this client just stored into the block cache, when the
    /// slice is small (see [`CACHE_WRITTEN_BYTES`]).
    async fn cache_written(&self, slice: SliceId, data: &[u8]) {
        if data.len() as u64 > CACHE_WRITTEN_BYTES {
            return;
        }
        for (i, part) in data.chunks(self.volume.block_size as usize).enumerate() {
            let block = Arc::new(Block { bytes: part.to_vec(), start: 0 });
            self.blocks.cache.insert((BlockKey { slice, index: i as u32 }, None), block).await;
        }
    }

    /// Stores small slices (each at most one block, without sync) on `replication` servers
    /// each, the blocks bound for one server in one `PutMany`: the slices of a run of random
    /// writes, a request per slice otherwise. Returns each slice's servers, in order. A slice
    /// whose request failed is stored again alone by [`Client::store_slice`], which retries
    /// on other servers.
    pub(crate) async fn store_small_slices(&self, slices: Vec<(SliceId, Vec<u8>)>) -> Result<Vec<Vec<ServerId>>> {
        let servers = self.servers(false).await?;
        let want = self.copies(servers.iter().filter(|s| s.alive).count());
        let (codec, bytes) = (self.codec(), slices.iter().map(|(_, d)| d.len() as u64).sum::<u64>());
        let encode = move || {
            let encoded: Vec<Bytes> =
                slices.iter().map(|(slice, data)| codec.encode(block_id(*slice, 0), data).into()).collect();
            (slices, encoded)
        };
        let (slices, encoded) =
            codec_work(bytes, encode).await.map_err(|e| ClientError::new(ErrorCode::Io, e.to_string()))?;
        let mut chosen = Vec::with_capacity(slices.len());
        let mut per_server: std::collections::HashMap<ServerId, Vec<(usize, BlockKey, Bytes)>> = Default::default();
        for (i, ((slice, data), block)) in slices.iter().zip(encoded).enumerate() {
            let place = cairn_proto::placement::place(&servers, *slice, want, data.len() as u64, &[]);
            for id in &place {
                per_server.entry(*id).or_default().push((i, BlockKey { slice: *slice, index: 0 }, block.clone()));
            }
            chosen.push(place);
        }
        let puts = per_server.into_iter().map(|(id, blocks)| async move {
            let keys = blocks.iter().map(|(_, key, b)| (*key, b.len() as u32)).collect();
            let mut payload = Vec::with_capacity(blocks.iter().map(|(_, _, b)| b.len()).sum());
            blocks.iter().for_each(|(_, _, b)| payload.extend_from_slice(b));
            let put = self.chunk_call(id, &ChunkRequest::PutMany { blocks: keys, sync: false }, payload.into()).await;
            if let Err(e) = &put {
                warn!(server = id, "storing a batch of small slices failed, storing them alone: {e}");
            }
            (blocks.into_iter().map(|(i, ..)| i).collect::<Vec<_>>(), put.is_ok())
        });
        let mut failed = vec![false; slices.len()];
        for (which, ok) in futures::future::join_all(puts).await {
            which.into_iter().for_each(|i| failed[i] |= !ok);
        }
        for (i, (slice, data)) in slices.into_iter().enumerate() {
            if failed[i] || chosen[i].is_empty() {
                chosen[i] = self.store_slice(slice, data, false).await?;
            } else {
                self.cache_written(slice, &data).await;
            }
        }
        Ok(chosen)
    }

    /// Makes blocks written earlier without sync durable on their servers. A server that
    /// cannot be reached (timed out, or declared dead since) does not fail the call when
    /// every block it was to sync is durable on another copy: the repair loop replaces the
    /// missing copy once the server is declared dead, so one lost server does not make
    /// every fsync fail.
    pub(crate) async fn sync_blocks(&self, blocks: Vec<(ServerId, BlockKey)>) -> Result<()> {
        let mut per_server: std::collections::HashMap<ServerId, Vec<BlockKey>> = Default::default();
        for (s, k) in blocks {
            per_server.entry(s).or_default().push(k);
        }
        let calls = per_server.into_iter().map(|(id, keys)| async move {
            let r = self.chunk_call(id, &ChunkRequest::Sync { keys: keys.clone() }, Bytes::new()).await;
            (id, keys, r)
        });
        let results = futures::future::join_all(calls).await;
        let synced: std::collections::HashSet<BlockKey> =
            results.iter().filter(|r| r.2.is_ok()).flat_map(|r| r.1.iter().copied()).collect();
        for (id, keys, r) in results {
            let Err(e) = r else { continue };
            let gone =
                e.code == ErrorCode::TimedOut || !self.servers(true).await?.iter().any(|s| s.id == id && s.alive);
            if !(gone && keys.iter().all(|k| synced.contains(k))) {
                return Err(e);
            }
            warn!(server = id, "fsync: a chunk server is unreachable; the data is durable on the other copies: {e}");
        }
        Ok(())
    }

    /// The decoded bytes of a block, from the cache, the disk cache or the first replica that
    /// has a good copy.
    pub(crate) async fn block(&self, key: BlockKey, servers: &[ServerId]) -> Result<Arc<Block>> {
        self.blocks
            .cache
            .try_get_with((key, None), async move {
                if let Some(disk) = &self.blocks.disk
                    && let Some(bytes) = disk.get(key).await
                {
                    self.stats.count("disk", "Get");
                    match self.decode(key, bytes).await {
                        Ok(block) => return Ok(Arc::new(block)),
                        Err(e) => {
                            warn!(?key, "a block in the disk cache failed verification: {e}");
                            disk.remove(key);
                        }
                    }
                }
                Ok(Arc::new(self.fetch_from_replicas(key, servers, None).await?.0))
            })
            .await
            .map_err(|e: Arc<ClientError>| (*e).clone())
    }

    /// Frame `frame` of a block and the offset of its first byte in the block: what a small
    /// read fetches, 32 KiB instead of the whole block. From the cache when there, whole or as
    /// that frame; a replica holding the block in a format without frames sends it whole,
    /// and it is cached whole. With a disk cache, which keeps whole blocks, whole blocks are
    /// read.
    pub(crate) async fn frame(&self, key: BlockKey, frame: u32, servers: &[ServerId]) -> Result<(Arc<Block>, usize)> {
        let base = frame as usize * cairn_block::FRAME;
        if let Some(piece) = self.blocks.cache.get(&(key, Some(frame))).await {
            return Ok((piece, base));
        }
        if self.blocks.disk.is_some() || self.blocks.cache.contains_key(&(key, None)) {
            return Ok((self.block(key, servers).await?, 0));
        }
        let (piece, whole) = self.fetch_from_replicas(key, servers, Some(frame)).await?;
        let piece = Arc::new(piece);
        self.blocks.cache.insert((key, (!whole).then_some(frame)), piece.clone()).await;
        Ok((piece, if whole { 0 } else { base }))
    }

    /// Asks the replicas of block `key` in turn, live ones first and spread by slice, for the
    /// block or its frame `frame`, until one answers with bytes that decode; whether what came
    /// is the whole block. A whole block goes to the disk cache too. A block that fails
    /// verification everywhere is `EIO`, never wrong bytes.
    async fn fetch_from_replicas(
        &self,
        key: BlockKey,
        servers: &[ServerId],
        frame: Option<u32>,
    ) -> Result<(Block, bool)> {
        let req = match frame {
            Some(frame) => ChunkRequest::GetFrame { key, frame },
            None => ChunkRequest::Get { key },
        };
        let mut servers = servers.to_vec();
        if servers.len() > 1
            && let Ok(list) = self.servers(false).await
        {
            let (mut up, down): (Vec<ServerId>, Vec<ServerId>) =
                servers.iter().partition(|id| list.iter().any(|s| s.id == **id && s.alive));
            let spread = key.slice as usize % up.len().max(1);
            up.rotate_left(spread);
            servers = up.into_iter().chain(down).collect();
        }
        let mut last = ClientError::new(ErrorCode::Io, format!("block {key:?} has no replica"));
        for &id in &servers {
            match self.chunk_call(id, &req, Bytes::new()).await {
                Ok((resp, bytes)) => match self.decode_answer(key, frame, resp, bytes).await {
                    Ok(done) => return Ok(done),
                    Err(e) => {
                        error!(server = id, ?key, "block failed verification: {e}");
                        last = ClientError::new(ErrorCode::Corrupt, e.to_string());
                    }
                },
                Err(e) => {
                    if e.code == ErrorCode::Corrupt {
                        error!(server = id, ?key, "chunk server reports a corrupt block: {}", e.message);
                    } else {
                        warn!(server = id, ?key, "reading a block failed: {}", e.message);
                    }
                    last = e;
                }
            }
        }
        Err(last)
    }

    /// Decodes a chunk server's answer for block `key` or its frame `frame` (see
    /// [`Client::fetch_from_replicas`]).
    async fn decode_answer(
        &self,
        key: BlockKey,
        frame: Option<u32>,
        resp: ChunkResponse,
        bytes: Vec<u8>,
    ) -> std::result::Result<(Block, bool), cairn_block::BlockError> {
        if let (Some(frame), ChunkResponse::Frame) = (frame, resp) {
            return Ok((self.decode_frame(key, frame, bytes).await?, false));
        }
        // The decoder consumes its bytes: keep a copy for the disk cache.
        let keep = self.blocks.disk.as_ref().map(|_| bytes.clone());
        let block = self.decode(key, bytes).await?;
        if let (Some(disk), Some(bytes)) = (&self.blocks.disk, keep) {
            disk.put(key, bytes);
        }
        Ok((block, true))
    }

    /// Verifies and decodes a fetched block.
    async fn decode(&self, key: BlockKey, bytes: Vec<u8>) -> std::result::Result<Block, cairn_block::BlockError> {
        let id = block_id(key.slice, key.index as usize);
        self.decode_with(key, bytes, move |codec, bytes| codec.decode_owned(id, bytes)).await
    }

    /// Verifies and decodes a fetched frame (header, table and the frame).
    async fn decode_frame(
        &self,
        key: BlockKey,
        frame: u32,
        bytes: Vec<u8>,
    ) -> std::result::Result<Block, cairn_block::BlockError> {
        let id = block_id(key.slice, key.index as usize);
        self.decode_with(key, bytes, move |codec, bytes| codec.decode_frame(id, bytes, frame as usize)).await
    }

    /// Runs `decode` on fetched bytes with the volume keys (fetched again first when the bytes
    /// name a key this client lacks), off the network thread when they are large.
    async fn decode_with(
        &self,
        key: BlockKey,
        bytes: Vec<u8>,
        decode: impl FnOnce(&cairn_block::Codec, Vec<u8>) -> std::result::Result<(Vec<u8>, usize), cairn_block::BlockError>
        + Send
        + 'static,
    ) -> std::result::Result<Block, cairn_block::BlockError> {
        if let Some(id) = cairn_block::key_id(&bytes)
            && !self.codec().has_key(id)
            && let Err(e) = self.refresh_codec().await
        {
            warn!(?key, "cannot fetch the volume keys again: {}", e.message);
        }
        let (codec, bytes_len) = (self.codec(), bytes.len() as u64);
        let decode = move || {
            let (bytes, start) = decode(&codec, bytes)?;
            Ok(Block { bytes, start })
        };
        codec_work(bytes_len, decode).await.unwrap_or_else(|e| {
            error!(?key, "the block decoder failed: {e}");
            Err(cairn_block::BlockError::Authentication)
        })
    }
}
