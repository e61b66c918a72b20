//! The block format: what a chunk server stores and a client decodes.
//!
//! A block is encoded once, by the writing client, and never changes afterwards. It is
//! compressed (zstd, unless that does not pay for this block) and encrypted
//! (ChaCha20-Poly1305 under a volume key) before it leaves the client, so chunk servers only
//! ever hold ciphertext. A CRC-32C over the stored bytes lets chunk servers check what they
//! store and scrub it without any key; the AEAD tag lets the client detect any change the CRC
//! could miss, including a valid block put in another block's place. Layout (little endian):
//!
//! ```text
//! offset size field
//!   0     4   magic "CBLK"
//!   4     1   format version (3, see `frames`; 2 is read; 1 is 2 with flags and key id 0)
//!   5     1   flags: bit 0 body is zstd-compressed, bit 1 body is encrypted
//!   6     2   key id: which volume key encrypted the body (0 when not encrypted)
//!   8     4   plain length (bytes after decoding)
//!  12     4   body length
//!  16     4   CRC-32C over bytes 0..16 and the body
//!  20     …   version 2 body: the (compressed) bytes; when encrypted, their ciphertext and a
//!             16-byte tag. Version 3: a frame table and frames (see `frames`), the CRC
//!             covering bytes 0..16 and the table.
//! ```
//!
//! Nonces: the 96-bit ChaCha20-Poly1305 nonce is the block's identity, slice id (64 bits) and
//! block index (32 bits; in version 3, 16 bits of index and 16 of frame number, see
//! [`BlockId`]). The metadata server hands out every slice id once (a durable counter), a
//! slice is written once and never changed, and a client encodes each of its blocks once
//! (retries resend the same bytes), so no nonce is used twice under one key. The header bytes
//! 0..16 are the associated data, so flags, key id and lengths are authenticated too.

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use std::borrow::Cow;
use std::cell::RefCell;

pub mod frames;
pub use frames::{FRAME, frame_part};

/// Magic bytes at the start of every block.
pub const MAGIC: &[u8; 4] = b"CBLK";
/// Current format version: framed (see `frames`).
pub const VERSION: u8 = 3;
/// The unframed format, still read.
const V2: u8 = 2;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 20;
/// Body flag: zstd-compressed.
pub const FLAG_ZSTD: u8 = 1;
/// Body flag: encrypted (ChaCha20-Poly1305).
pub const FLAG_ENCRYPTED: u8 = 2;
/// Bytes of a volume key.
pub const KEY_LEN: usize = 32;
/// Bytes of the authentication tag after an encrypted body.
pub const TAG_LEN: usize = 16;
/// Largest plain block accepted when decoding: a corrupt or forged length must not make the
/// decoder allocate gigabytes. Blocks are at most a chunk (64 MiB).
pub const MAX_PLAIN_LEN: usize = 64 << 20;

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
    #[error("block is encrypted with volume key {0}, which this client does not have")]
    UnknownKey(u16),
    #[error("block failed authentication (wrong key, or altered or misplaced data)")]
    Authentication,
    #[error("compressed body does not decode to the declared {0} bytes")]
    Decompress(usize),
}

/// A block's identity: the AEAD nonce, and what binds a block's bytes to its place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockId {
    pub slice: u64,
    pub index: u32,
}

impl BlockId {
    /// A version 2 block's nonce: slice ‖ index (32 bits).
    fn nonce(self) -> Nonce {
        let mut n = [0u8; NONCE_LEN];
        n[..8].copy_from_slice(&self.slice.to_le_bytes());
        n[8..].copy_from_slice(&self.index.to_le_bytes());
        Nonce::assume_unique_for_key(n)
    }

    /// A version 3 frame's nonce: slice ‖ index (16 bits) ‖ frame number with bit 15 set
    /// (16 bits). The set bit keeps it apart from every version 2 nonce, whose index never
    /// reaches 2^16 (a slice lies within a 64 MiB chunk, cut in blocks of 1 MiB: 64 at most),
    /// and a block has at most 2,048 frames ([`MAX_PLAIN_LEN`] / [`FRAME`]).
    fn frame_nonce(self, frame: usize) -> Nonce {
        let index = u16::try_from(self.index).expect("a slice has fewer than 2^16 blocks");
        let mut n = [0u8; NONCE_LEN];
        n[..8].copy_from_slice(&self.slice.to_le_bytes());
        n[8..10].copy_from_slice(&index.to_le_bytes());
        n[10..].copy_from_slice(&(frame as u16 | 0x8000).to_le_bytes());
        Nonce::assume_unique_for_key(n)
    }
}

/// How a client encodes the blocks it writes, and the keys it can decode with.
pub struct Codec {
    /// zstd level; 0 stores bodies uncompressed.
    level: i32,
    /// Volume keys by id.
    keys: Vec<(u16, LessSafeKey)>,
    /// The key new blocks are encrypted with; `None` stores them in the clear.
    current: Option<u16>,
}

impl Codec {
    /// A codec that compresses at zstd `level` (0: off) and, when `encrypt_with` names one of
    /// `keys`, encrypts under it. Every key stays usable for decoding.
    pub fn new(level: i32, keys: &[(u16, [u8; KEY_LEN])], encrypt_with: Option<u16>) -> Result<Codec, BlockError> {
        let keys: Vec<_> = keys
            .iter()
            .map(|(id, k)| (*id, LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, k).expect("32-byte key"))))
            .collect();
        if let Some(id) = encrypt_with
            && !keys.iter().any(|(k, _)| *k == id)
        {
            return Err(BlockError::UnknownKey(id));
        }
        Ok(Codec { level, keys, current: encrypt_with })
    }

    /// Neither compression nor encryption (tests, and volumes formatted without them).
    pub fn plain() -> Codec {
        Codec { level: 0, keys: Vec::new(), current: None }
    }

    /// Whether this codec holds volume key `id`.
    pub fn has_key(&self, id: u16) -> bool {
        self.keys.iter().any(|(k, _)| *k == id)
    }

    pub(crate) fn key(&self, id: u16) -> Result<&LessSafeKey, BlockError> {
        self.keys.iter().find(|(k, _)| *k == id).map(|(_, k)| k).ok_or(BlockError::UnknownKey(id))
    }

    /// Encodes plain bytes into a stored block (format version 3, in frames). Compression is
    /// kept only for frames it shrinks by at least 1/8 ([`MIN_SAVING`]); a big block whose
    /// middle 64 KiB does not shrink that much is not even tried.
    pub fn encode(&self, id: BlockId, plain: &[u8]) -> Vec<u8> {
        self.encode_frames(id, plain)
    }

    /// Encodes a version 2 block, as clients did before frames (tests of old blocks).
    #[cfg(test)]
    fn encode_v2(&self, id: BlockId, plain: &[u8]) -> Vec<u8> {
        let compressed = (self.level != 0 && worth_compressing(self.level, plain))
            .then(|| compress(self.level, plain))
            .flatten()
            .filter(|c| saves_enough(c.len(), plain.len()));
        let (encrypted, tag_len) = match self.current {
            Some(_) => (FLAG_ENCRYPTED, TAG_LEN),
            None => (0, 0),
        };
        let flags = encrypted | if compressed.is_some() { FLAG_ZSTD } else { 0 };
        let body = compressed.as_deref().unwrap_or(plain);
        // One buffer: header, body (sealed in place), tag.
        let mut out = Vec::with_capacity(HEADER_LEN + body.len() + tag_len);
        out.extend_from_slice(&[0; HEADER_LEN]);
        out.extend_from_slice(body);
        let header = header(V2, flags, self.current.unwrap_or(0), plain.len(), body.len() + tag_len);
        out[..16].copy_from_slice(&header);
        if let Some(key_id) = self.current {
            let key = self.key(key_id).expect("checked in Codec::new");
            let tag = key
                .seal_in_place_separate_tag(id.nonce(), Aad::from(header), &mut out[HEADER_LEN..])
                .expect("a block is far below the AEAD's size limit");
            out.extend_from_slice(tag.as_ref());
        }
        let crc = crc32c::crc32c_append(crc32c::crc32c(&header), &out[HEADER_LEN..]);
        out[16..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Verifies a stored block and returns its plain bytes: borrowed when the body is stored
    /// as is, decoded otherwise. `id` must be the identity the block was written under.
    pub fn decode<'a>(&self, id: BlockId, block: &'a [u8]) -> Result<Cow<'a, [u8]>, BlockError> {
        if block.get(4) != Some(&VERSION) && checked(block)?.flags == 0 {
            return Ok(Cow::Borrowed(&block[HEADER_LEN..]));
        }
        let (mut buf, start) = self.decode_owned(id, block.to_vec())?;
        buf.drain(..start);
        Ok(Cow::Owned(buf))
    }

    /// Like [`Codec::decode`] on a block the caller owns, without copying it: the body is
    /// decrypted in place, and the plain bytes are `buf[start..]` of the returned buffer
    /// (a new buffer only when the body was compressed).
    pub fn decode_owned(&self, id: BlockId, mut block: Vec<u8>) -> Result<(Vec<u8>, usize), BlockError> {
        if block.get(4) == Some(&VERSION) {
            return self.decode_frames(id, block);
        }
        let h = checked(&block)?;
        let mut body_end = block.len();
        if h.flags & FLAG_ENCRYPTED != 0 {
            let key = self.key(h.key_id)?;
            let aad: [u8; 16] = block[..16].try_into().expect("16 header bytes");
            let plain = key
                .open_in_place(id.nonce(), Aad::from(aad), &mut block[HEADER_LEN..])
                .map_err(|_| BlockError::Authentication)?;
            body_end = HEADER_LEN + plain.len();
        }
        let body = &block[HEADER_LEN..body_end];
        if h.flags & FLAG_ZSTD != 0 {
            let plain = decompress(body, h.plain_len).ok_or(BlockError::Decompress(h.plain_len))?;
            if plain.len() != h.plain_len {
                return Err(BlockError::Decompress(h.plain_len));
            }
            return Ok((plain, 0));
        }
        if body.len() != h.plain_len {
            return Err(BlockError::LengthMismatch { declared: h.plain_len, actual: body.len() });
        }
        block.truncate(body_end);
        Ok((block, HEADER_LEN))
    }
}

/// The header and CRC checks of a decode, and the plain length bound.
fn checked(block: &[u8]) -> Result<Header, BlockError> {
    let h = verify(block)?;
    if h.plain_len > MAX_PLAIN_LEN {
        return Err(BlockError::LengthMismatch { declared: h.plain_len, actual: MAX_PLAIN_LEN });
    }
    if h.flags == 0 && block.len() - HEADER_LEN != h.plain_len {
        return Err(BlockError::LengthMismatch { declared: h.plain_len, actual: block.len() - HEADER_LEN });
    }
    Ok(h)
}

/// Bytes of the sample that decides whether a big block is worth compressing.
const SAMPLE: usize = 64 << 10;

thread_local! {
    /// zstd contexts are reused per thread: a new one per block costs more than compressing
    /// a small block (allocating and faulting in its tables).
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

fn compress(level: i32, data: &[u8]) -> Option<Vec<u8>> {
    COMPRESSOR.with_borrow_mut(|c| {
        if c.as_ref().is_none_or(|(l, _)| *l != level) {
            *c = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        c.as_mut()?.1.compress(data).ok()
    })
}

fn decompress(data: &[u8], capacity: usize) -> Option<Vec<u8>> {
    DECOMPRESSOR.with_borrow_mut(|d| {
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new().ok()?);
        }
        d.as_mut()?.decompress(data, capacity).ok()
    })
}

/// The least share of a block compression must save to be kept (1/8, as ZFS requires). Less
/// is not worth it: zstd was the largest CPU cost of a client writing data that shrinks by
/// 5-10% (fio's buffers), more than encryption or the network, and every read of such a
/// block would pay for decompression too.
const MIN_SAVING: usize = 8;

fn saves_enough(compressed: usize, plain: usize) -> bool {
    compressed < plain - plain / MIN_SAVING
}

/// Whether a block may compress: small ones are simply tried; of a big one, the middle 64 KiB
/// must save [`MIN_SAVING`], so random or already compressed data costs a sample, not a block.
fn worth_compressing(level: i32, plain: &[u8]) -> bool {
    if plain.len() <= 4 * SAMPLE {
        return true;
    }
    let start = plain.len() / 2 - SAMPLE / 2;
    compress(level, &plain[start..start + SAMPLE]).is_some_and(|c| saves_enough(c.len(), SAMPLE))
}

/// The first 16 header bytes (the CRC follows them).
fn header(version: u8, flags: u8, key_id: u16, plain_len: usize, body_len: usize) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(MAGIC);
    h[4] = version;
    h[5] = flags;
    h[6..8].copy_from_slice(&key_id.to_le_bytes());
    h[8..12].copy_from_slice(&(plain_len as u32).to_le_bytes());
    h[12..16].copy_from_slice(&(body_len as u32).to_le_bytes());
    h
}

/// The key an encrypted block names in its header, read without verifying anything (to
/// fetch a key before decoding); `None` for blocks stored in the clear or too short.
pub fn key_id(block: &[u8]) -> Option<u16> {
    let encrypted = block.len() >= HEADER_LEN && block[5] & FLAG_ENCRYPTED != 0;
    encrypted.then(|| u16::from_le_bytes([block[6], block[7]]))
}

/// What [`verify`] read from a header.
pub struct Header {
    pub flags: u8,
    pub key_id: u16,
    pub plain_len: usize,
}

/// Checks a stored block's header and checksum without decoding it: what chunk servers do on
/// every write and read, with no key.
pub fn verify(block: &[u8]) -> Result<Header, BlockError> {
    let (version, header) = known_header(block)?;
    if version == VERSION {
        frames::verify_frames(block)?;
        return Ok(header);
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
    Ok(header)
}

/// The format version and header fields of a block of a known version and flags (nothing
/// checked past the first 20 bytes).
fn known_header(block: &[u8]) -> Result<(u8, Header), BlockError> {
    if block.len() < HEADER_LEN {
        return Err(BlockError::Truncated(block.len()));
    }
    if &block[0..4] != MAGIC {
        return Err(BlockError::BadMagic);
    }
    let (version, flags, key_id) = (block[4], block[5], u16::from_le_bytes([block[6], block[7]]));
    let keyed = flags & FLAG_ENCRYPTED != 0 || key_id == 0;
    let known = match version {
        1 => flags == 0 && key_id == 0,
        V2 => flags & !(FLAG_ZSTD | FLAG_ENCRYPTED) == 0 && keyed,
        VERSION => flags & !FLAG_ENCRYPTED == 0 && keyed,
        _ => false,
    };
    if !known {
        return Err(BlockError::Unsupported(version, flags));
    }
    let plain_len = u32::from_le_bytes(block[8..12].try_into().expect("4 bytes")) as usize;
    Ok((version, Header { flags, key_id, plain_len }))
}

/// The plain length of a version 3 block, from a header of known flags, within
/// [`MAX_PLAIN_LEN`].
fn plain_len_v3(block: &[u8]) -> Result<usize, BlockError> {
    let (version, h) = known_header(block)?;
    if version != VERSION {
        return Err(BlockError::Unsupported(version, h.flags));
    }
    if h.plain_len > MAX_PLAIN_LEN {
        return Err(BlockError::LengthMismatch { declared: h.plain_len, actual: MAX_PLAIN_LEN });
    }
    Ok(h.plain_len)
}

#[cfg(test)]
mod tests;
