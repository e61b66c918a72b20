use cairn_proto::{ErrorCode, WireError};

/// A failed metadata operation: a POSIX-level refusal or a storage failure.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("{0:?}: {1}")]
    Fs(ErrorCode, String),
    #[error("metadata database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("metadata migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl MetaError {
    /// Shorthand for a POSIX-level refusal.
    pub fn fs(code: ErrorCode, msg: impl Into<String>) -> MetaError {
        MetaError::Fs(code, msg.into())
    }
}

impl From<MetaError> for WireError {
    fn from(e: MetaError) -> WireError {
        match e {
            MetaError::Fs(code, message) => WireError { code, message },
            other => {
                tracing::error!("{other}");
                WireError::new(ErrorCode::Io, other.to_string())
            }
        }
    }
}

/// Result of a metadata operation.
pub type Result<T> = std::result::Result<T, MetaError>;
