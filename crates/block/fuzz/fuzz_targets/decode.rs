//! Feeds arbitrary bytes to the block decoder, as a chunk server's disk or a hostile chunk
//! server could: decoding must never panic, and must fail unless the input is a well-formed
//! block. Run: `cd crates/block/fuzz && cargo +nightly fuzz run decode`.
#![no_main]

use cairn_block::{BlockId, Codec, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let id = BlockId { slice: 7, index: 1 };
    let codec = Codec::new(1, &[(0, [3; 32]), (1, [4; 32])], Some(1)).expect("key 1 exists");
    // The input as it is: anything that decodes must carry a valid header and CRC.
    if let Ok(plain) = codec.decode(id, data) {
        assert!(plain.len() <= cairn_block::MAX_PLAIN_LEN);
        assert!(cairn_block::verify(data).is_ok());
    }
    // The input with a well-formed header (magic, version, body length, CRC), flags, key id
    // and plain length as given: this reaches the AEAD and zstd decoders with garbage.
    if data.len() >= HEADER_LEN {
        let mut forged = data.to_vec();
        forged[..4].copy_from_slice(cairn_block::MAGIC);
        forged[4] = cairn_block::VERSION;
        forged[5] &= cairn_block::FLAG_ZSTD | cairn_block::FLAG_ENCRYPTED;
        let body_len = (forged.len() - HEADER_LEN) as u32;
        forged[12..16].copy_from_slice(&body_len.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&forged[..16]), &forged[HEADER_LEN..]);
        forged[16..20].copy_from_slice(&crc.to_le_bytes());
        if let Ok(plain) = codec.decode(id, &forged) {
            // Without a valid tag, only unencrypted bodies can decode.
            assert!(forged[5] & cairn_block::FLAG_ENCRYPTED == 0);
            assert!(plain.len() <= cairn_block::MAX_PLAIN_LEN);
        }
    }
    // Whatever the input, encoding it round-trips.
    let block = codec.encode(id, data);
    assert_eq!(&codec.decode(id, &block).expect("own block decodes")[..], data);
});
