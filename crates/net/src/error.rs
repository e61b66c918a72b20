use cairn_proto::{ErrorCode, WireError, frame::FrameError};

/// Why a call did not produce an answer from the peer's service logic.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The peer answered with an error.
    #[error("{0}")]
    Remote(WireError),
    #[error("request to {addr} timed out after {secs:.1}s")]
    Timeout { addr: String, secs: f64 },
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("connection to {addr} failed: {reason}")]
    Connection { addr: String, reason: String },
    #[error("bad frame from {addr}: {source}")]
    Frame { addr: String, source: FrameError },
    #[error("TLS setup: {0}")]
    Tls(String),
    /// The local UDP address could not be had: named, since a busy port is the usual cause.
    #[error("cannot listen on {addr}: {reason}")]
    Bind { addr: std::net::SocketAddr, reason: std::io::Error },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl NetError {
    /// The wire error code this failure is reported as (transport trouble is `Io` or `TimedOut`).
    pub fn code(&self) -> ErrorCode {
        match self {
            NetError::Remote(e) => e.code,
            NetError::Timeout { .. } => ErrorCode::TimedOut,
            _ => ErrorCode::Io,
        }
    }

    /// True if the peer could not be reached at all (worth trying another replica).
    pub fn is_transport(&self) -> bool {
        !matches!(self, NetError::Remote(_))
    }
}
