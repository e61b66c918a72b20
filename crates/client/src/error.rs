use cairn_net::NetError;
use cairn_proto::{ErrorCode, WireError};

/// A failed filesystem call; [`ClientError::errno`] is what the application sees.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ClientError {
    pub code: ErrorCode,
    pub message: String,
}

impl ClientError {
    /// Shorthand constructor.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ClientError {
        ClientError { code, message: message.into() }
    }

    /// The errno for this error (the one place codes become errno is `ErrorCode::errno`).
    pub fn errno(&self) -> i32 {
        self.code.errno()
    }

    /// Whether the call failed for want of an answer (a server unreachable or too slow), so
    /// that it may or may not have taken effect, and may succeed when tried again. An error
    /// the server answered with means nothing changed.
    pub(crate) fn unanswered(&self) -> bool {
        matches!(self.code, ErrorCode::Io | ErrorCode::TimedOut)
    }
}

impl From<NetError> for ClientError {
    fn from(e: NetError) -> ClientError {
        match e {
            NetError::Remote(WireError { code, message }) => ClientError { code, message },
            other => ClientError { code: other.code(), message: other.to_string() },
        }
    }
}

/// Result of a client call.
pub type Result<T> = std::result::Result<T, ClientError>;
