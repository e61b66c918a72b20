//! Cairn's transport: QUIC (`quinn`) with mutual TLS (`rustls`) against a private cluster CA.
//!
//! One long-lived connection per peer, one bidirectional stream per request. Every call has a
//! deadline, so a lost server turns into an error instead of a hung mount.

mod error;
pub mod pki;
mod rpc;
mod tls;
mod udp;

/// Request and answer payloads: shared, so a block sent to several servers is never copied.
pub use bytes::Bytes;
pub use error::NetError;
pub use rpc::{Handler, Peer, RpcClient, serve};
pub use tls::{Identity, client_endpoint, server_endpoint};

/// TLS server name of the metadata server in its certificate.
pub const META_SERVER_NAME: &str = "meta.cairn";
/// TLS server name of every chunk server in its certificate.
pub const CHUNK_SERVER_NAME: &str = "chunk.cairn";
/// Name in every client's certificate: what tells a client from a server.
pub const CLIENT_NAME: &str = "client.cairn";
