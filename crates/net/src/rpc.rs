//! Request/response over QUIC: one bidirectional stream per call, postcard header + raw payload.

use crate::NetError;
use bytes::Bytes;
use cairn_proto::frame::{self, FrameError, PREFIX_LEN};
use cairn_proto::{ErrorCode, WireError};
use serde::{Serialize, de::DeserializeOwned};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{debug, warn};

/// How long a server waits for the rest of a request whose stream has opened.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The next [`Peer::conn_id`]. Not quinn's `stable_id`, which is the connection's address
/// and comes back once the connection is freed: servers remember ended connections (their
/// locks must not be granted again), so a new one must never inherit an old one's id.
static NEXT_CONN_ID: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);

/// A caller as seen by a server: one QUIC connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Unique per connection for the lifetime of the server process.
    pub conn_id: usize,
    pub remote: SocketAddr,
    /// The peer's certificate is a client's (valid for [`crate::CLIENT_NAME`]), not a
    /// server's: only clients may be given the volume keys.
    pub is_client: bool,
    conn: quinn::Connection,
}

impl Peer {
    /// Whether the connection has ended (closed by either side or timed out).
    pub fn is_closed(&self) -> bool {
        self.conn.close_reason().is_some()
    }

    /// Calls the peer back over its own connection (the metadata server recalling a lease);
    /// the peer answers with the handler it gave [`RpcClient::set_callbacks`]. At most
    /// `timeout`.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, NetError> {
        let addr = self.remote.to_string();
        let head = frame::encode_head(req, 0).map_err(|source| NetError::Frame { addr: addr.clone(), source })?;
        match tokio::time::timeout(timeout, exchange(&self.conn, &addr, &head, &Bytes::new())).await {
            Ok(Ok((resp, _))) => Ok(resp),
            Ok(Err(Attempt::Unsent(e) | Attempt::Failed(e))) => Err(e),
            Err(_) => Err(NetError::Timeout { addr, secs: timeout.as_secs_f64() }),
        }
    }
}

/// Starts answering the calls a server makes back over a new connection.
type OnConnect = Arc<dyn Fn(quinn::Connection) + Send + Sync>;

/// A connection to one server that reconnects when the server comes back.
pub struct RpcClient {
    endpoint: quinn::Endpoint,
    addr: String,
    server_name: String,
    timeout: Duration,
    conn: Mutex<Option<quinn::Connection>>,
    connecting: tokio::sync::Mutex<()>,
    on_connect: std::sync::OnceLock<OnConnect>,
    /// Set by [`RpcClient::close`]: no connection is made again, so a background task still
    /// running in a closing client (a session renewal) cannot reopen the session it ended.
    closed: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for RpcClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcClient").field("addr", &self.addr).finish()
    }
}

impl RpcClient {
    /// A client for the server at `addr` (`host:port`) whose certificate names `server_name`.
    /// Nothing is sent until the first call.
    pub fn new(endpoint: quinn::Endpoint, addr: &str, server_name: &str, timeout: Duration) -> RpcClient {
        RpcClient {
            endpoint,
            addr: addr.to_string(),
            server_name: server_name.to_string(),
            timeout,
            conn: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            on_connect: std::sync::OnceLock::new(),
            closed: Default::default(),
        }
    }

    /// Answers the calls the server makes back over this client's connections with
    /// `handler` (its `disconnected` runs when a connection ends: what the server granted on
    /// it is void then). Applies to the current connection and every later one; set once.
    pub fn set_callbacks<Req, Resp, H>(&self, handler: Arc<H>)
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
        H: Handler<Req, Resp>,
    {
        let on_connect: OnConnect = Arc::new(move |conn| {
            tokio::spawn(serve_connection(conn, handler.clone()));
        });
        if self.on_connect.set(on_connect.clone()).is_ok()
            && let Some(conn) = self.live_connection()
        {
            on_connect(conn);
        }
    }

    /// Closes the connection, telling the server at once (instead of letting it find out at
    /// the idle timeout), and waits briefly for that to be sent: a client that exits should
    /// not leave the server holding its leases.
    pub async fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::Release);
        // Under the dialing lock: a connection being made now is closed too.
        let _guard = self.connecting.lock().await;
        if let Some(conn) = self.live_connection() {
            conn.close(0u32.into(), b"closing");
            let _ = tokio::time::timeout(Duration::from_millis(500), self.endpoint.wait_idle()).await;
        }
    }

    /// The server address this client talks to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends `req` without a payload and waits for the answer (see [`RpcClient::call_with`]).
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(&self, req: &Req) -> Result<(Resp, Vec<u8>), NetError> {
        self.call_with(req, Bytes::new()).await
    }

    /// Sends `req` with `payload` and waits for the answer, at most the configured deadline.
    pub async fn call_with<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        req: &Req,
        payload: Bytes,
    ) -> Result<(Resp, Vec<u8>), NetError> {
        let head = frame::encode_head(req, payload.len())
            .map_err(|source| NetError::Frame { addr: self.addr.clone(), source })?;
        let work = async {
            // One retry on a fresh connection when the cached one turns out to be dead (for
            // example after the server restarted): the request was never processed then.
            let mut attempt = 0;
            loop {
                let conn = self.connection().await?;
                match exchange(&conn, &self.addr, &head, &payload).await {
                    Err(Attempt::Unsent(e)) if attempt == 0 => {
                        debug!(addr = %self.addr, "retrying on a new connection: {e}");
                        self.forget(&conn);
                        attempt += 1;
                    }
                    Err(Attempt::Unsent(e)) | Err(Attempt::Failed(e)) => {
                        if e.is_transport() {
                            self.forget(&conn);
                        }
                        return Err(e);
                    }
                    Ok(v) => return Ok(v),
                }
            }
        };
        // A peer that sends nothing at all during a timed-out call is gone, or restarted and
        // ignores this connection: dial again next time instead of waiting for the idle timeout.
        let heard = self.live_connection().map(|c| (c.stats().udp_rx.datagrams, c));
        match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r,
            Err(_) => {
                if let Some((before, conn)) = heard
                    && conn.stats().udp_rx.datagrams == before
                {
                    debug!(addr = %self.addr, "peer silent for {:?}, reconnecting", self.timeout);
                    self.forget(&conn);
                    // Closed too, so that a peer that is still there drops at once what it
                    // held for this client (its locks, its leases) instead of keeping it on
                    // a connection nobody uses.
                    conn.close(0u32.into(), b"unresponsive");
                }
                Err(NetError::Timeout { addr: self.addr.clone(), secs: self.timeout.as_secs_f64() })
            }
        }
    }

    /// Transport statistics of the current connection (datagrams, path MTU, losses), if any:
    /// what to look at when bulk transfers are slower than the link.
    pub fn connection_stats(&self) -> Option<quinn::ConnectionStats> {
        self.live_connection().map(|c| c.stats())
    }

    fn forget(&self, conn: &quinn::Connection) {
        let mut guard = self.conn.lock().expect("conn lock");
        if guard.as_ref().map(|c| c.stable_id()) == Some(conn.stable_id()) {
            *guard = None;
        }
    }

    async fn connection(&self) -> Result<quinn::Connection, NetError> {
        if let Some(c) = self.live_connection() {
            return Ok(c);
        }
        let _guard = self.connecting.lock().await;
        if let Some(c) = self.live_connection() {
            return Ok(c);
        }
        let connect_err = |reason: String| NetError::Connect { addr: self.addr.clone(), reason };
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(connect_err("the connection was closed by this client".into()));
        }
        let sockaddr = tokio::net::lookup_host(&self.addr)
            .await
            .map_err(|e| connect_err(e.to_string()))?
            .next()
            .ok_or_else(|| connect_err("address resolves to nothing".into()))?;
        let conn = self
            .endpoint
            .connect(sockaddr, &self.server_name)
            .map_err(|e| connect_err(e.to_string()))?
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        *self.conn.lock().expect("conn lock") = Some(conn.clone());
        if let Some(on_connect) = self.on_connect.get() {
            on_connect(conn.clone());
        }
        Ok(conn)
    }

    fn live_connection(&self) -> Option<quinn::Connection> {
        let guard = self.conn.lock().expect("conn lock");
        guard.as_ref().filter(|c| c.close_reason().is_none()).cloned()
    }
}

/// Sends one request on a new stream of `conn` and reads the answer.
async fn exchange<Resp: DeserializeOwned>(
    conn: &quinn::Connection,
    addr: &str,
    head: &[u8],
    payload: &Bytes,
) -> Result<(Resp, Vec<u8>), Attempt> {
    // quinn says only "connection lost" on a stream; add why (e.g. a refused certificate).
    let conn_err = |e: &dyn std::fmt::Display| {
        let mut reason = e.to_string();
        if let Some(why) = conn.close_reason().map(|w| w.to_string())
            && why != reason
        {
            reason = format!("{reason}: {why}");
        }
        NetError::Connection { addr: addr.to_string(), reason }
    };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| Attempt::Unsent(conn_err(&e)))?;
    if let Err(e) = send_frame(&mut send, head, payload.clone()).await {
        return Err(match e {
            quinn::WriteError::ConnectionLost(_) => Attempt::Unsent(conn_err(&e)),
            _ => Attempt::Failed(conn_err(&e)),
        });
    }
    let (header, payload) = read_frame(&mut recv).await.map_err(|e| {
        Attempt::Failed(match e {
            ReadError::Frame(source) => NetError::Frame { addr: addr.to_string(), source },
            ReadError::Stream(e) => conn_err(&e),
        })
    })?;
    let answer: Result<Resp, WireError> = frame::decode_header(&header)
        .map_err(|source| Attempt::Failed(NetError::Frame { addr: addr.to_string(), source }))?;
    match answer {
        Ok(resp) => Ok((resp, payload)),
        Err(e) => Err(Attempt::Failed(NetError::Remote(e))),
    }
}

/// Payloads up to this size are copied behind the header and sent with one write.
const COALESCE_MAX: usize = 64 << 10;

/// Writes a frame and ends the stream. A small frame goes out in one write, so the connection
/// driver (which may run on another thread) cannot send the header, payload and end of stream
/// in separate packets. A large payload is handed to quinn as it is, without a copy.
async fn send_frame(send: &mut quinn::SendStream, head: &[u8], payload: Bytes) -> Result<(), quinn::WriteError> {
    if payload.len() <= COALESCE_MAX {
        send.write_all(&[head, &payload].concat()).await?;
    } else {
        send.write_all(head).await?;
        send.write_chunk(payload).await?;
    }
    send.finish().map_err(|_| quinn::WriteError::ClosedStream)
}

enum Attempt {
    /// Failed before the server could have seen the request: safe to retry.
    Unsent(NetError),
    Failed(NetError),
}

enum ReadError {
    Frame(FrameError),
    Stream(quinn::ReadExactError),
}

async fn read_frame(recv: &mut quinn::RecvStream) -> Result<(Vec<u8>, Vec<u8>), ReadError> {
    let mut prefix = [0u8; PREFIX_LEN];
    recv.read_exact(&mut prefix).await.map_err(ReadError::Stream)?;
    let (h, p) = frame::decode_prefix(prefix).map_err(ReadError::Frame)?;
    let mut header = vec![0u8; h];
    recv.read_exact(&mut header).await.map_err(ReadError::Stream)?;
    // Append received chunks instead of zero-filling a buffer first: payloads are whole blocks.
    let mut payload = Vec::with_capacity(p);
    while payload.len() < p {
        match recv.read_chunk(p - payload.len(), true).await {
            Ok(Some(chunk)) => payload.extend_from_slice(&chunk.bytes),
            Ok(None) => return Err(ReadError::Stream(quinn::ReadExactError::FinishedEarly(payload.len()))),
            Err(e) => return Err(ReadError::Stream(quinn::ReadExactError::ReadError(e))),
        }
    }
    Ok((header, payload))
}

/// Service logic behind [`serve`]: one call per request.
pub trait Handler<Req, Resp>: Send + Sync + 'static {
    /// Answers one request; the returned bytes go back as the response payload.
    fn handle(
        &self,
        peer: &Peer,
        req: Req,
        payload: Vec<u8>,
    ) -> impl Future<Output = Result<(Resp, Bytes), WireError>> + Send;

    /// Called once when a connection to a peer starts, before its first request.
    fn connected(&self, _peer: &Peer) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Called once when a peer's connection ends, for whatever reason.
    fn disconnected(&self, _peer: &Peer) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Accepts connections on `endpoint` and answers each stream with `handler` until the endpoint
/// is closed. Malformed or oversized requests get an error answer; other streams carry on.
pub async fn serve<Req, Resp, H>(endpoint: quinn::Endpoint, handler: Arc<H>)
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    H: Handler<Req, Resp>,
{
    while let Some(incoming) = endpoint.accept().await {
        let handler = handler.clone();
        tokio::spawn(async move {
            match incoming.await {
                Ok(conn) => serve_connection(conn, handler).await,
                Err(e) => warn!("refused a connection: {e}"),
            }
        });
    }
}

/// Answers each stream the peer opens on `conn` with `handler`, until the connection ends.
async fn serve_connection<Req, Resp, H>(conn: quinn::Connection, handler: Arc<H>)
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    H: Handler<Req, Resp>,
{
    let is_client = crate::tls::peer_is_named(&conn, crate::CLIENT_NAME);
    let conn_id = NEXT_CONN_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let peer = Peer { conn_id, remote: conn.remote_address(), is_client, conn: conn.clone() };
    debug!(?peer.remote, "peer connected");
    handler.connected(&peer).await;
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let handler = handler.clone();
                let peer = peer.clone();
                tokio::spawn(async move { answer(&*handler, &peer, send, recv).await });
            }
            Err(e) => {
                debug!(?peer.remote, "peer disconnected: {e}");
                break;
            }
        }
    }
    handler.disconnected(&peer).await;
}

async fn answer<Req, Resp, H>(handler: &H, peer: &Peer, mut send: quinn::SendStream, mut recv: quinn::RecvStream)
where
    Req: DeserializeOwned,
    Resp: Serialize,
    H: Handler<Req, Resp>,
{
    let result = match tokio::time::timeout(REQUEST_READ_TIMEOUT, read_frame(&mut recv)).await {
        Err(_) => Err(WireError::new(ErrorCode::BadRequest, "request not received in time")),
        // The caller finished its side before the frame was complete: it still reads answers.
        Ok(Err(ReadError::Stream(quinn::ReadExactError::FinishedEarly(_)))) => {
            warn!(?peer, "rejected request: {}", FrameError::Truncated);
            Err(WireError::new(ErrorCode::BadRequest, FrameError::Truncated.to_string()))
        }
        Ok(Err(ReadError::Stream(e))) => {
            debug!(?peer, "request stream failed: {e}");
            return;
        }
        Ok(Err(ReadError::Frame(e))) => {
            warn!(?peer, "rejected request: {e}");
            let _ = recv.stop(1u32.into());
            Err(WireError::new(ErrorCode::BadRequest, e.to_string()))
        }
        Ok(Ok((header, payload))) => match frame::decode_header::<Req>(&header) {
            Err(e) => {
                warn!(?peer, "rejected request: {e}");
                Err(WireError::new(ErrorCode::BadRequest, e.to_string()))
            }
            Ok(req) => handler.handle(peer, req, payload).await,
        },
    };
    let (head, payload) = match result {
        Ok((resp, payload)) => (frame::encode_head(&Ok::<Resp, WireError>(resp), payload.len()), payload),
        Err(e) => (frame::encode_head(&Err::<Resp, WireError>(e), 0), Bytes::new()),
    };
    let head = match head {
        Ok(h) => h,
        Err(e) => {
            warn!(?peer, "cannot encode answer: {e}");
            let err: Result<Resp, WireError> = Err(WireError::new(ErrorCode::Io, e.to_string()));
            match frame::encode_head(&err, 0) {
                Ok(h) => h,
                Err(_) => return,
            }
        }
    };
    if let Err(e) = send_frame(&mut send, &head, payload).await {
        debug!(?peer, "could not send answer: {e}");
    }
}
