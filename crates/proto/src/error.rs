//! The closed set of errors that cross the wire, and their one mapping to errno.

use serde::{Deserialize, Serialize};

/// Every failure a peer can report. Mapped to errno in exactly one place, [`ErrorCode::errno`].
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    NotFound,
    Exists,
    NotDir,
    IsDir,
    NotEmpty,
    Access,
    Perm,
    Invalid,
    NameTooLong,
    NoSpace,
    Io,
    TimedOut,
    NoData,
    Range,
    TooBig,
    CrossDevice,
    NotSupported,
    FileTooBig,
    Busy,
    Loop,
    NoDevice,
    /// Stored data failed its checksum.
    Corrupt,
    /// The request could not be decoded or broke a protocol limit.
    BadRequest,
    /// The peer is not allowed to make this request.
    Unauthorized,
    /// Peers speak different protocol versions or name another volume.
    Mismatch,
    /// A write lease was lost (its holder did not answer a recall in time, and another client
    /// may have written since): the writes buffered under it are refused.
    LeaseLost,
    /// A lock is held by another owner (`F_SETLK`, `LOCK_NB`), or a wait for it ran out.
    WouldBlock,
    /// Waiting for a lock would deadlock: the holder waits, directly or not, for the asker.
    Deadlock,
    /// A blocked call was interrupted by a signal; produced by the client, never sent.
    Interrupted,
    /// The metadata server restarted moments ago and gives clients time to reclaim the locks
    /// they held before granting new ones; the client asks again shortly, never reports it.
    Grace,
}

impl ErrorCode {
    /// The errno a POSIX caller sees for this error.
    pub fn errno(self) -> i32 {
        match self {
            ErrorCode::NotFound => libc::ENOENT,
            ErrorCode::Exists => libc::EEXIST,
            ErrorCode::NotDir => libc::ENOTDIR,
            ErrorCode::IsDir => libc::EISDIR,
            ErrorCode::NotEmpty => libc::ENOTEMPTY,
            ErrorCode::Access => libc::EACCES,
            ErrorCode::Perm => libc::EPERM,
            ErrorCode::Invalid => libc::EINVAL,
            ErrorCode::NameTooLong => libc::ENAMETOOLONG,
            ErrorCode::NoSpace => libc::ENOSPC,
            ErrorCode::Io | ErrorCode::Corrupt | ErrorCode::BadRequest | ErrorCode::LeaseLost => libc::EIO,
            ErrorCode::TimedOut => libc::ETIMEDOUT,
            ErrorCode::NoData => libc::ENODATA,
            ErrorCode::Range => libc::ERANGE,
            ErrorCode::TooBig => libc::E2BIG,
            ErrorCode::CrossDevice => libc::EXDEV,
            ErrorCode::NotSupported => libc::EOPNOTSUPP,
            ErrorCode::FileTooBig => libc::EFBIG,
            ErrorCode::Busy => libc::EBUSY,
            ErrorCode::Loop => libc::ELOOP,
            ErrorCode::NoDevice => libc::ENODEV,
            ErrorCode::Unauthorized => libc::EACCES,
            ErrorCode::Mismatch => libc::EPROTO,
            ErrorCode::WouldBlock | ErrorCode::Grace => libc::EAGAIN,
            ErrorCode::Deadlock => libc::EDEADLK,
            ErrorCode::Interrupted => libc::EINTR,
        }
    }

    /// The code for an OS error number seen on a server (e.g. ENOSPC while writing a block).
    pub fn from_errno(errno: i32) -> ErrorCode {
        match errno {
            libc::ENOENT => ErrorCode::NotFound,
            libc::EEXIST => ErrorCode::Exists,
            libc::ENOSPC | libc::EDQUOT => ErrorCode::NoSpace,
            libc::EACCES => ErrorCode::Access,
            libc::EPERM => ErrorCode::Perm,
            libc::EINVAL => ErrorCode::Invalid,
            libc::ETIMEDOUT => ErrorCode::TimedOut,
            _ => ErrorCode::Io,
        }
    }
}

/// An error as sent over the wire: a code for programs and a message for people.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
}

impl WireError {
    /// Shorthand constructor.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> WireError {
        WireError { code, message: message.into() }
    }
}

impl From<ErrorCode> for WireError {
    fn from(code: ErrorCode) -> WireError {
        WireError { code, message: String::new() }
    }
}
