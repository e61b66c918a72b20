//! Framing of one message on a QUIC stream: a postcard header plus an optional raw payload.
//!
//! `[u32 header_len][u32 payload_len][header bytes][payload bytes]`, little endian. Block data
//! travels as the raw payload so it is never copied through serde.

use serde::{Serialize, de::DeserializeOwned};

/// Largest encoded header accepted (names, xattr values and directory listings fit easily).
pub const MAX_HEADER: usize = 1 << 20;
/// Largest payload accepted: one block plus slack.
pub const MAX_PAYLOAD: usize = 17 << 20;
/// Bytes of the fixed prefix.
pub const PREFIX_LEN: usize = 8;

/// Why a frame could not be built or read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame header of {0} bytes exceeds the limit of {MAX_HEADER}")]
    HeaderTooLarge(usize),
    #[error("frame payload of {0} bytes exceeds the limit of {MAX_PAYLOAD}")]
    PayloadTooLarge(usize),
    #[error("frame is truncated")]
    Truncated,
    #[error("malformed message: {0}")]
    Decode(String),
}

/// Encodes the prefix and header for `msg` with a payload of `payload_len` bytes to follow.
pub fn encode_head<T: Serialize>(msg: &T, payload_len: usize) -> Result<Vec<u8>, FrameError> {
    let header = postcard::to_allocvec(msg).map_err(|e| FrameError::Decode(e.to_string()))?;
    if header.len() > MAX_HEADER {
        return Err(FrameError::HeaderTooLarge(header.len()));
    }
    if payload_len > MAX_PAYLOAD {
        return Err(FrameError::PayloadTooLarge(payload_len));
    }
    let mut out = Vec::with_capacity(PREFIX_LEN + header.len());
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&(payload_len as u32).to_le_bytes());
    out.extend_from_slice(&header);
    Ok(out)
}

/// Parses the fixed prefix into `(header_len, payload_len)`, enforcing the limits.
pub fn decode_prefix(prefix: [u8; PREFIX_LEN]) -> Result<(usize, usize), FrameError> {
    let header_len = u32::from_le_bytes(prefix[0..4].try_into().expect("4 bytes")) as usize;
    let payload_len = u32::from_le_bytes(prefix[4..8].try_into().expect("4 bytes")) as usize;
    if header_len > MAX_HEADER {
        return Err(FrameError::HeaderTooLarge(header_len));
    }
    if payload_len > MAX_PAYLOAD {
        return Err(FrameError::PayloadTooLarge(payload_len));
    }
    Ok((header_len, payload_len))
}

/// Decodes a header; trailing bytes are an error so garbage is never half-accepted.
pub fn decode_header<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FrameError> {
    let (msg, rest) = postcard::take_from_bytes(bytes).map_err(|e| FrameError::Decode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Decode(format!("{} trailing bytes", rest.len())));
    }
    Ok(msg)
}

/// Decodes a whole frame held in memory into `(header, payload)`.
pub fn decode_frame<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, &[u8]), FrameError> {
    if bytes.len() < PREFIX_LEN {
        return Err(FrameError::Truncated);
    }
    let (h, p) = decode_prefix(bytes[..PREFIX_LEN].try_into().expect("8 bytes"))?;
    if bytes.len() != PREFIX_LEN + h + p {
        return Err(FrameError::Truncated);
    }
    let header = decode_header(&bytes[PREFIX_LEN..PREFIX_LEN + h])?;
    Ok((header, &bytes[PREFIX_LEN + h..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::MetaRequest;

    #[test]
    fn round_trip_with_payload() {
        let req = MetaRequest::GetAttr { ino: 42 };
        let mut frame = encode_head(&req, 3).unwrap();
        frame.extend_from_slice(b"abc");
        let (back, payload): (MetaRequest, _) = decode_frame(&frame).unwrap();
        assert_eq!(back, req);
        assert_eq!(payload, b"abc");
    }

    #[test]
    fn rejects_oversized_and_garbage() {
        let mut prefix = [0u8; 8];
        prefix[0..4].copy_from_slice(&((MAX_HEADER + 1) as u32).to_le_bytes());
        assert!(matches!(decode_prefix(prefix), Err(FrameError::HeaderTooLarge(_))));
        prefix[0..4].copy_from_slice(&4u32.to_le_bytes());
        prefix[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode_prefix(prefix), Err(FrameError::PayloadTooLarge(_))));
        assert!(decode_header::<MetaRequest>(&[0xff, 0xff, 0xff, 0xff, 0xff]).is_err());
        let mut frame = encode_head(&MetaRequest::GetAttr { ino: 1 }, 0).unwrap();
        frame.push(0);
        assert!(decode_frame::<MetaRequest>(&frame).is_err());
    }
}
