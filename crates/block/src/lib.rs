//! The block format: what a chunk server stores and a client decodes.
//!
//! A block is encoded once by the writing client and never changes afterwards, so a checksum
//! computed at encode time protects it end to end: on the wire, on the chunk server's disk and
//! in any cache. Layout (little endian):
//!
//! ```text
//! offset size field
//!   0     4   magic "CBLK"
//!   4     1   format version (1)
//!   5     1   flags (bit 0: zstd, bit 1: encrypted; both reserved, 0 in version 1)
//!   6     2   reserved, 0
//!   8     4   plain length (bytes after decoding)
//!  12     4   body length
//!  16     4   CRC-32C over bytes 0..16 and the body
//!  20     …   body
//! ```

/// Magic bytes at the start of every block.
pub const MAGIC: &[u8; 4] = b"CBLK";
/// Current format version.
pub const VERSION: u8 = 1;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 20;

/// Why a stored block could not be decoded. Every variant means "do not trust these bytes".
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlockError {
    #[error("block is {0} bytes, shorter than its header")]
    Truncated(usize),
    #[error("bad magic")]
    BadMagic,
    #[error("unsupported block format version {0} or flags {1:#x}")]
    Unsupported(u8, u8),
    #[error("body length {declared} does not match the {actual} bytes present")]
    LengthMismatch { declared: usize, actual: usize },
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum { stored: u32, computed: u32 },
}

/// Encodes plain bytes into a stored block.
pub fn encode(plain: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + plain.len());
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(0);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(plain.len() as u32).to_le_bytes());
    out.extend_from_slice(&(plain.len() as u32).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[..16]), plain);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(plain);
    out
}

/// Checks a stored block's header and checksum without decoding it (what chunk servers do).
pub fn verify(block: &[u8]) -> Result<(), BlockError> {
    if block.len() < HEADER_LEN {
        return Err(BlockError::Truncated(block.len()));
    }
    if &block[0..4] != MAGIC {
        return Err(BlockError::BadMagic);
    }
    if block[4] != VERSION || block[5] != 0 {
        return Err(BlockError::Unsupported(block[4], block[5]));
    }
    let declared = u32::from_le_bytes(block[12..16].try_into().expect("4 bytes")) as usize;
    let actual = block.len() - HEADER_LEN;
    if declared != actual {
        return Err(BlockError::LengthMismatch { declared, actual });
    }
    let stored = u32::from_le_bytes(block[16..20].try_into().expect("4 bytes"));
    let computed = crc32c::crc32c_append(crc32c::crc32c(&block[..16]), &block[HEADER_LEN..]);
    if stored != computed {
        return Err(BlockError::Checksum { stored, computed });
    }
    Ok(())
}

/// Verifies a stored block and returns its plain bytes (borrowed: no copy).
pub fn decode(block: &[u8]) -> Result<&[u8], BlockError> {
    verify(block)?;
    let plain_len = u32::from_le_bytes(block[8..12].try_into().expect("4 bytes")) as usize;
    let body = &block[HEADER_LEN..];
    if plain_len != body.len() {
        return Err(BlockError::LengthMismatch { declared: plain_len, actual: body.len() });
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for len in [0usize, 1, 4095, 4096, 1 << 20] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            assert_eq!(decode(&encode(&plain)).unwrap(), &plain[..]);
        }
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let block = encode(b"the quick brown fox jumps over the lazy dog");
        for i in 0..block.len() {
            let mut bad = block.clone();
            bad[i] ^= 0x01;
            assert!(decode(&bad).is_err(), "flip at byte {i} went unnoticed");
        }
        assert!(decode(&block[..block.len() - 1]).is_err());
        assert_eq!(decode(&block[..3]), Err(BlockError::Truncated(3)));
    }
}
