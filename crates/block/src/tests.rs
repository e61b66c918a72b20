use super::*;
use proptest::prelude::*;

const ID: BlockId = BlockId { slice: 42, index: 3 };

fn key(b: u8) -> [u8; KEY_LEN] {
    [b; KEY_LEN]
}

/// The four ways a volume can store blocks: plain, zstd, encrypted, zstd + encrypted.
fn codecs() -> Vec<Codec> {
    let keys = [(1, key(7))];
    vec![
        Codec::plain(),
        Codec::new(3, &[], None).unwrap(),
        Codec::new(0, &keys, Some(1)).unwrap(),
        Codec::new(3, &keys, Some(1)).unwrap(),
    ]
}

fn compressible(len: usize) -> Vec<u8> {
    (0..len).map(|i| b"cairn block "[i % 12]).collect()
}

/// A block as format version 1 wrote it (no flags, no key).
fn v1_block(plain: &[u8]) -> Vec<u8> {
    let h = header(1, 0, 0, plain.len(), plain.len());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&h), plain);
    [&h[..], &crc.to_le_bytes(), plain].concat()
}

/// How many frames of a version 3 block are stored compressed.
fn compressed_frames(block: &[u8]) -> usize {
    let n = u32::from_le_bytes(block[8..12].try_into().unwrap()).div_ceil(FRAME as u32) as usize;
    (0..n).filter(|i| block[HEADER_LEN + i * frames::ENTRY_LEN + 3] & 0x80 != 0).count()
}

proptest! {
    #[test]
    fn round_trip_in_every_mode(plain in proptest::collection::vec(any::<u8>(), 0..70_000), repeat in any::<bool>()) {
        // Half the cases repeat a short pattern, so compression is taken, not only skipped.
        let plain = if repeat { compressible(plain.len()) } else { plain };
        for c in codecs() {
            let block = c.encode(ID, &plain);
            prop_assert_eq!(&c.decode(ID, &block).unwrap()[..], &plain[..]);
        }
    }

    #[test]
    fn any_flipped_bit_is_detected(plain in proptest::collection::vec(any::<u8>(), 1..5_000), at in any::<prop::sample::Index>(), bit in 0u8..8) {
        for c in codecs() {
            let mut block = c.encode(ID, &plain);
            let i = at.index(block.len());
            block[i] ^= 1 << bit;
            prop_assert!(c.decode(ID, &block).is_err(), "flip of bit {} at byte {} went unnoticed", bit, i);
        }
    }

    /// The decoder's fuzz test: arbitrary bytes, and arbitrary bodies behind a well-formed
    /// header with a correct CRC (so the AEAD and zstd paths see garbage too), never panic and
    /// never decode as data.
    #[test]
    fn garbage_never_decodes(body in proptest::collection::vec(any::<u8>(), 0..3_000), flags in 0u8..4, plain_len in 0usize..100_000) {
        let c = Codec::new(1, &[(0, key(9))], Some(0)).unwrap();
        let _ = c.decode(ID, &body);
        let h = header(V2, flags, 0, plain_len, body.len());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&h), &body);
        let forged = [&h[..], &crc.to_le_bytes(), &body].concat();
        // Only an unencrypted, uncompressed body of the declared length is valid data.
        if let Ok(plain) = c.decode(ID, &forged) {
            prop_assert!(flags == 0 && plain.len() == plain_len);
        }
        // The same for version 3, the table's checksum right whenever the body holds a table.
        let plain_len = plain_len % 200_000;
        let h = header(VERSION, flags & FLAG_ENCRYPTED, 0, plain_len, body.len());
        let table = &body[..frames::head_len(plain_len).saturating_sub(HEADER_LEN).min(body.len())];
        let crc = crc32c::crc32c_append(crc32c::crc32c(&h), table);
        let forged = [&h[..], &crc.to_le_bytes(), &body].concat();
        let _ = verify(&forged);
        let _ = frame_part(&forged, 0);
        let _ = c.decode_frame(ID, forged.clone(), 0);
        prop_assert!(c.decode(ID, &forged).is_err() || flags & FLAG_ENCRYPTED == 0);
    }
}

#[test]
fn encrypted_blocks_hide_their_bytes_and_bind_their_place() {
    let marker = b"CAIRN-MARKER-4f1c".repeat(100);
    let c = Codec::new(1, &[(1, key(7))], Some(1)).unwrap();
    let block = c.encode(ID, &marker);
    assert!(!block.windows(17).any(|w| w == &marker[..17]), "plaintext visible in an encrypted block");
    let compressed = zstd::bulk::compress(&marker, 1).unwrap();
    assert!(!block.windows(compressed.len()).any(|w| w == &compressed[..]), "compressed plaintext visible");
    assert_eq!((block[5], compressed_frames(&block)), (FLAG_ENCRYPTED, 1));
    // The same bytes presented as another block (a chunk server swapping files) fail.
    let elsewhere = BlockId { slice: ID.slice, index: ID.index + 1 };
    assert_eq!(c.decode(elsewhere, &block), Err(BlockError::Authentication));
    // A client with a different key, or no key of that id, gets an error, never bytes.
    let other = Codec::new(0, &[(1, key(8))], Some(1)).unwrap();
    assert_eq!(other.decode(ID, &block), Err(BlockError::Authentication));
    assert_eq!(Codec::plain().decode(ID, &block), Err(BlockError::UnknownKey(1)));
}

#[test]
fn rotated_keys_decode_old_blocks_and_encrypt_new_ones() {
    let old = Codec::new(0, &[(0, key(1))], Some(0)).unwrap();
    let rotated = Codec::new(0, &[(0, key(1)), (1, key(2))], Some(1)).unwrap();
    let before = old.encode(ID, b"written before the rotation");
    let after = rotated.encode(ID, b"written after the rotation");
    assert_eq!(u16::from_le_bytes([after[6], after[7]]), 1);
    assert_eq!(&rotated.decode(ID, &before).unwrap()[..], b"written before the rotation");
    assert_eq!(&rotated.decode(ID, &after).unwrap()[..], b"written after the rotation");
    assert!(Codec::new(0, &[(0, key(1))], Some(5)).is_err(), "encrypting with a missing key");
}

#[test]
fn compression_is_kept_only_when_it_pays() {
    let c = Codec::new(1, &[], None).unwrap();
    let text = compressible(1 << 20);
    let block = c.encode(ID, &text);
    assert_eq!(compressed_frames(&block), (1 << 20) / FRAME);
    assert!(block.len() < text.len() / 10);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let noise: Vec<u8> = (0..1 << 16)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect();
    let block = c.encode(ID, &noise);
    assert_eq!(compressed_frames(&block), 0, "incompressible data is stored as is");
    assert_eq!(block.len(), frames::head_len(noise.len()) + noise.len());
    // A big block is judged by its middle: noise there, text around it, stored as is.
    let mixed = [&text[..1 << 19], &noise[..], &text[..1 << 19]].concat();
    assert!(!worth_compressing(1, &mixed));
    assert!(worth_compressing(1, &text));
    // Noise over 200 of the 256 byte values shrinks by about 5%: not worth it, small or big.
    let marginal: Vec<u8> = (0..1 << 20).map(|i| (noise[i % noise.len()] % 200) ^ (i / noise.len()) as u8).collect();
    let saving = 1.0 - zstd::bulk::compress(&marginal, 1).unwrap().len() as f64 / marginal.len() as f64;
    assert!((0.02..0.125).contains(&saving), "the test data should shrink a little, not {saving}");
    assert_eq!(compressed_frames(&c.encode(ID, &marginal)), 0, "a 1 MiB block saving {saving:.3}");
    assert_eq!(compressed_frames(&c.encode(ID, &marginal[..1 << 16])), 0, "a 64 KiB block");
}

#[test]
fn version_1_blocks_still_decode_and_chunk_servers_verify_without_keys() {
    let block = v1_block(b"an old block");
    assert_eq!(&Codec::plain().decode(ID, &block).unwrap()[..], b"an old block");
    let c = Codec::new(3, &[(1, key(7))], Some(1)).unwrap();
    assert_eq!(&c.decode(ID, &block).unwrap()[..], b"an old block");
    let new = c.encode(ID, &compressible(10_000));
    assert!(verify(&new).is_ok());
    assert_eq!(verify(&new[..3]).err(), Some(BlockError::Truncated(3)));
}

#[test]
fn oversized_lengths_are_refused_before_allocating() {
    let h = header(V2, FLAG_ZSTD, 0, u32::MAX as usize, 4);
    let body = [0u8; 4];
    let crc = crc32c::crc32c_append(crc32c::crc32c(&h), &body);
    let forged = [&h[..], &crc.to_le_bytes(), &body].concat();
    assert!(matches!(Codec::plain().decode(ID, &forged), Err(BlockError::LengthMismatch { .. })));
}

#[test]
fn version_2_blocks_still_decode_in_every_mode() {
    for plain in [compressible(300_000), b"short".to_vec(), Vec::new()] {
        for c in codecs() {
            let block = c.encode_v2(ID, &plain);
            assert_eq!(block[4], V2);
            assert!(verify(&block).is_ok());
            assert_eq!(&c.decode(ID, &block).unwrap()[..], &plain[..]);
            let (buf, start) = c.decode_owned(ID, block).unwrap();
            assert_eq!(&buf[start..], &plain[..]);
        }
    }
}

#[test]
fn each_frame_decodes_alone_from_the_part_a_server_cuts() {
    // Text then noise: some frames compressed, some stored as is; a short last frame.
    let noise: Vec<u8> = (0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let plain = [compressible(150_000), noise].concat();
    for c in codecs() {
        let block = c.encode(ID, &plain);
        let n = plain.len().div_ceil(FRAME);
        for (f, want) in plain.chunks(FRAME).enumerate() {
            let part = frame_part(&block, f).unwrap().unwrap();
            assert!(part.len() < block.len() / 2, "a frame part carries one frame");
            let (buf, start) = c.decode_frame(ID, part.clone(), f).unwrap();
            assert_eq!(&buf[start..], want, "frame {f}");
            // The part read as another frame, or as another block's, is refused.
            let other = (f + 1) % n;
            assert!(c.decode_frame(ID, part.clone(), other).is_err(), "frame {f} taken for {other}");
            if c.has_key(1) {
                let elsewhere = BlockId { slice: ID.slice, index: ID.index + 1 };
                assert_eq!(c.decode_frame(elsewhere, part.clone(), f), Err(BlockError::Authentication));
            }
            let mut flipped = part;
            let last = flipped.len() - 1;
            flipped[last] ^= 1;
            assert!(c.decode_frame(ID, flipped, f).is_err(), "a flipped byte in frame {f}");
        }
        assert_eq!(frame_part(&block, n), Ok(None), "no frame past the last");
    }
}

#[test]
fn the_compression_bit_is_authenticated() {
    // Re-checksummed after the change, as a chunk server could do: only the AEAD notices.
    let c = Codec::new(3, &[(1, key(7))], Some(1)).unwrap();
    let mut block = c.encode(ID, &compressible(10_000));
    assert_eq!(compressed_frames(&block), 1);
    block[HEADER_LEN + 3] ^= 0x80;
    let head_len = frames::head_len(10_000);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&block[..16]), &block[HEADER_LEN..head_len]);
    block[16..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    assert!(verify(&block).is_ok(), "the checksums hold");
    assert_eq!(c.decode(ID, &block), Err(BlockError::Authentication));
}

#[test]
fn frame_nonces_never_meet_block_nonces() {
    let id = BlockId { slice: 7, index: 2 };
    let v2: Vec<_> = (0..64).map(|i| BlockId { slice: 7, index: i }.nonce().as_ref().to_vec()).collect();
    let v3: Vec<_> = (0..2048).map(|f| id.frame_nonce(f).as_ref().to_vec()).collect();
    assert!(v3.iter().all(|n| !v2.contains(n)));
    let distinct: std::collections::HashSet<_> = v3.iter().collect();
    assert_eq!(distinct.len(), v3.len());
}
