//! Format version 3: a block cut into frames of [`FRAME`] plain bytes, each compressed,
//! sealed and checksummed on its own, so a small read fetches and decodes one frame instead
//! of the whole block (a random 4 KiB read of a 1 MiB block moved and decrypted 1 MiB).
//!
//! ```text
//! offset size  field
//!   0     20   header, as in version 2 (flags: bit 1 encrypted; bit 0 unused)
//!  20   24·n   frame table, n = ⌈plain length / FRAME⌉, per frame:
//!                u32 stored length, bit 31 set when the frame is zstd-compressed
//!                u32 CRC-32C of the stored frame
//!                16  AEAD tag (zeros when not encrypted)
//!   …          the stored frames, back to back
//! ```
//!
//! The header's CRC covers bytes 0..16 and the table, so a server checks the table, then only
//! the frames it serves. Tags live in the table, so the ciphertext of a block whose frames are
//! all stored as is decrypts in place into one contiguous plaintext. A frame's nonce is its
//! block's identity and its number (see [`BlockId`]); its associated data is header bytes
//! 0..16 and the frame's stored-length word, so neither the lengths nor the compression bit
//! can be changed unnoticed.

use crate::{BlockError, BlockId, Codec, FLAG_ENCRYPTED, HEADER_LEN, TAG_LEN, compress, decompress, header};
use ring::aead::{Aad, Tag};
use std::ops::Range;

/// Plain bytes per frame (the last frame of a block may be shorter).
pub const FRAME: usize = 32 << 10;
/// Bytes of one frame-table entry.
pub const ENTRY_LEN: usize = 8 + TAG_LEN;
/// Stored-length bit marking a zstd-compressed frame.
const ZSTD_BIT: u32 = 1 << 31;

/// One frame-table entry.
#[derive(Clone, Copy)]
struct Entry {
    /// The stored-length word as written (length and compression bit).
    word: u32,
    crc: u32,
    tag: [u8; TAG_LEN],
}

impl Entry {
    fn len(&self) -> usize {
        (self.word & !ZSTD_BIT) as usize
    }
    fn compressed(&self) -> bool {
        self.word & ZSTD_BIT != 0
    }
}

/// A version 3 block's header and frame table, checked against the header's CRC.
pub struct Frames {
    head: [u8; 16],
    plain_len: usize,
    entries: Vec<Entry>,
    /// Offset of each frame in the block, and the end of the last.
    offsets: Vec<usize>,
}

/// Number of frames of a block of `plain_len` bytes.
fn count(plain_len: usize) -> usize {
    plain_len.div_ceil(FRAME)
}

/// Bytes of header and table of a version 3 block of `plain_len` bytes.
pub fn head_len(plain_len: usize) -> usize {
    HEADER_LEN + ENTRY_LEN * count(plain_len)
}

impl Frames {
    /// Parses and checks the header and table at the start of `block` (a whole block, or its
    /// head and some frames); `block` must hold at least [`head_len`] bytes.
    pub fn parse(block: &[u8]) -> Result<Frames, BlockError> {
        let plain_len = crate::plain_len_v3(block)?;
        let head_len = head_len(plain_len);
        if block.len() < head_len {
            return Err(BlockError::Truncated(block.len()));
        }
        let stored = u32::from_le_bytes(block[16..20].try_into().expect("4 bytes"));
        let computed = crc32c::crc32c_append(crc32c::crc32c(&block[..16]), &block[HEADER_LEN..head_len]);
        if stored != computed {
            return Err(BlockError::Checksum { stored, computed });
        }
        let entries: Vec<Entry> = block[HEADER_LEN..head_len]
            .chunks_exact(ENTRY_LEN)
            .map(|e| Entry {
                word: u32::from_le_bytes(e[..4].try_into().expect("4 bytes")),
                crc: u32::from_le_bytes(e[4..8].try_into().expect("4 bytes")),
                tag: e[8..].try_into().expect("tag bytes"),
            })
            .collect();
        let mut offsets = Vec::with_capacity(entries.len() + 1);
        offsets.push(head_len);
        for e in &entries {
            offsets.push(offsets.last().expect("one offset") + e.len());
        }
        let declared = u32::from_le_bytes(block[12..16].try_into().expect("4 bytes")) as usize;
        let end = *offsets.last().expect("one offset");
        if end != HEADER_LEN + declared {
            return Err(BlockError::LengthMismatch { declared, actual: end - HEADER_LEN });
        }
        Ok(Frames { head: block[..16].try_into().expect("16 bytes"), plain_len, entries, offsets })
    }

    /// Parses a whole block: its table, and a length that matches it.
    fn parse_whole(block: &[u8]) -> Result<Frames, BlockError> {
        let frames = Frames::parse(block)?;
        let end = *frames.offsets.last().expect("one offset");
        if block.len() != end {
            return Err(BlockError::LengthMismatch { declared: end - HEADER_LEN, actual: block.len() - HEADER_LEN });
        }
        Ok(frames)
    }

    /// How many frames the block has.
    pub fn count(&self) -> usize {
        self.entries.len()
    }

    /// Where frame `i` lies in the whole block.
    pub fn extent(&self, i: usize) -> Option<Range<usize>> {
        (i < self.entries.len()).then(|| self.offsets[i]..self.offsets[i + 1])
    }

    /// Bytes of header and table.
    pub fn head_len(&self) -> usize {
        self.offsets[0]
    }

    /// Checks frame `i`'s stored bytes against its CRC.
    pub fn check(&self, i: usize, stored: &[u8]) -> Result<(), BlockError> {
        let e = &self.entries[i];
        if stored.len() != e.len() {
            return Err(BlockError::LengthMismatch { declared: e.len(), actual: stored.len() });
        }
        let computed = crc32c::crc32c(stored);
        if computed != e.crc {
            return Err(BlockError::Checksum { stored: e.crc, computed });
        }
        Ok(())
    }

    /// Plain bytes of frame `i`.
    fn plain_len(&self, i: usize) -> usize {
        FRAME.min(self.plain_len - i * FRAME)
    }

    /// Decrypts frame `i` in place (when the block is encrypted). Returns its plain bytes
    /// when the frame was compressed; `None` when they are `stored` itself.
    fn open(&self, codec: &Codec, id: BlockId, i: usize, stored: &mut [u8]) -> Result<Option<Vec<u8>>, BlockError> {
        let e = &self.entries[i];
        if self.head[5] & FLAG_ENCRYPTED != 0 {
            let key = codec.key(u16::from_le_bytes([self.head[6], self.head[7]]))?;
            key.open_in_place_separate_tag(id.frame_nonce(i), aad(&self.head, e.word), Tag::from(e.tag), stored, 0..)
                .map_err(|_| BlockError::Authentication)?;
        }
        let want = self.plain_len(i);
        if e.compressed() {
            let plain = decompress(stored, want).filter(|p| p.len() == want).ok_or(BlockError::Decompress(want))?;
            return Ok(Some(plain));
        }
        if stored.len() != want {
            return Err(BlockError::LengthMismatch { declared: want, actual: stored.len() });
        }
        Ok(None)
    }
}

/// A frame's associated data: the header's first 16 bytes and its stored-length word.
fn aad(head: &[u8; 16], word: u32) -> Aad<[u8; 20]> {
    let mut a = [0u8; 20];
    a[..16].copy_from_slice(head);
    a[16..].copy_from_slice(&word.to_le_bytes());
    Aad::from(a)
}

impl Codec {
    /// Encodes `plain` as a version 3 block (see the module doc).
    pub(crate) fn encode_frames(&self, id: BlockId, plain: &[u8]) -> Vec<u8> {
        let try_zstd = self.level != 0 && crate::worth_compressing(self.level, plain);
        let n = count(plain.len());
        let head_len = head_len(plain.len());
        let mut out = Vec::with_capacity(head_len + plain.len());
        out.resize(head_len, 0);
        let mut words = Vec::with_capacity(n);
        for part in plain.chunks(FRAME) {
            let compressed = try_zstd.then(|| compress(self.level, part)).flatten();
            match compressed.filter(|c| crate::saves_enough(c.len(), part.len())) {
                Some(c) => {
                    out.extend_from_slice(&c);
                    words.push(c.len() as u32 | ZSTD_BIT);
                }
                None => {
                    out.extend_from_slice(part);
                    words.push(part.len() as u32);
                }
            }
        }
        let flags = if self.current.is_some() { FLAG_ENCRYPTED } else { 0 };
        let head = header(crate::VERSION, flags, self.current.unwrap_or(0), plain.len(), out.len() - HEADER_LEN);
        out[..16].copy_from_slice(&head);
        let mut at = head_len;
        for (i, word) in words.into_iter().enumerate() {
            let stored = at..at + (word & !ZSTD_BIT) as usize;
            let mut tag = [0u8; TAG_LEN];
            if let Some(key_id) = self.current {
                let key = self.key(key_id).expect("checked in Codec::new");
                let sealed = key
                    .seal_in_place_separate_tag(id.frame_nonce(i), aad(&head, word), &mut out[stored.clone()])
                    .expect("a frame is far below the AEAD's size limit");
                tag.copy_from_slice(sealed.as_ref());
            }
            let crc = crc32c::crc32c(&out[stored.clone()]);
            let entry = HEADER_LEN + i * ENTRY_LEN;
            out[entry..entry + 4].copy_from_slice(&word.to_le_bytes());
            out[entry + 4..entry + 8].copy_from_slice(&crc.to_le_bytes());
            out[entry + 8..entry + ENTRY_LEN].copy_from_slice(&tag);
            at = stored.end;
        }
        let crc = crc32c::crc32c_append(crc32c::crc32c(&head), &out[HEADER_LEN..head_len]);
        out[16..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes a whole version 3 block the caller owns: plain bytes are `buf[start..]` of the
    /// returned buffer (the block's own, decrypted in place, unless a frame was compressed).
    pub(crate) fn decode_frames(&self, id: BlockId, mut block: Vec<u8>) -> Result<(Vec<u8>, usize), BlockError> {
        let frames = Frames::parse_whole(&block)?;
        let mut copied: Option<Vec<u8>> = None;
        for i in 0..frames.count() {
            let range = frames.extent(i).expect("frame in range");
            frames.check(i, &block[range.clone()])?;
            let plain = frames.open(self, id, i, &mut block[range.clone()])?;
            if copied.is_none() && plain.is_some() {
                // The first compressed frame: from here on plain bytes are assembled apart.
                let mut out = Vec::with_capacity(frames.plain_len);
                out.extend_from_slice(&block[frames.head_len()..range.start]);
                copied = Some(out);
            }
            if let Some(out) = &mut copied {
                out.extend_from_slice(plain.as_deref().unwrap_or(&block[range]));
            }
        }
        match copied {
            Some(out) => Ok((out, 0)),
            None => Ok((block, frames.head_len())),
        }
    }

    /// Decodes frame `frame` of a version 3 block from `part`: the block's header and table
    /// followed by that frame's stored bytes (what a chunk server's `GetFrame` returns).
    /// Plain bytes are `buf[start..]` of the returned buffer.
    pub fn decode_frame(&self, id: BlockId, mut part: Vec<u8>, frame: usize) -> Result<(Vec<u8>, usize), BlockError> {
        let frames = Frames::parse(&part)?;
        if frame >= frames.count() {
            return Err(BlockError::LengthMismatch { declared: frames.count(), actual: frame });
        }
        let head_len = frames.head_len();
        frames.check(frame, &part[head_len..])?;
        match frames.open(self, id, frame, &mut part[head_len..])? {
            Some(plain) => Ok((plain, 0)),
            None => Ok((part, head_len)),
        }
    }
}

/// For a block starting with `start` (at least its 20-byte header): the bytes of header and
/// table to read before cutting out a frame, or `None` for a block of an earlier version,
/// which has no frames and is served whole.
pub fn table_end(start: &[u8]) -> Result<Option<usize>, BlockError> {
    match start.get(4) {
        Some(&crate::VERSION) => Ok(Some(head_len(crate::plain_len_v3(start)?))),
        _ => crate::known_header(start).map(|_| None),
    }
}

/// A frame's stored bytes cut from a whole block, behind the block's header and table: what
/// a chunk server returns for one frame; `None` when the block has no frame `frame`. Checks
/// the table and the frame's CRC.
pub fn frame_part(block: &[u8], frame: usize) -> Result<Option<Vec<u8>>, BlockError> {
    let frames = Frames::parse(block)?;
    let Some(range) = frames.extent(frame) else { return Ok(None) };
    let stored = block.get(range).ok_or(BlockError::Truncated(block.len()))?;
    frames.check(frame, stored)?;
    Ok(Some([&block[..frames.head_len()], stored].concat()))
}

/// Checks a whole version 3 block: its table, then every frame's CRC.
pub(crate) fn verify_frames(block: &[u8]) -> Result<(), BlockError> {
    let frames = Frames::parse_whole(block)?;
    (0..frames.count()).try_for_each(|i| frames.check(i, &block[frames.extent(i).expect("frame in range")]))
}
