//! Feeds arbitrary bytes to the block decoder, as a chunk server's disk or a hostile chunk
//! server could: decoding must never panic, and must fail unless the input is a well-formed
//! block. Run: `cd crates/block/fuzz && cargo +nightly fuzz run decode`.
#![no_main]

use cairn_block::{BlockId, Codec};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let id = BlockId { slice: 7, index: 1 };
    let codec = Codec::new(1, &[(0, [3; 32]), (1, [4; 32])], Some(1)).expect("key 1 exists");
    // Any input that decodes must be a block whose CRC, and tag if encrypted, check out.
    if let Ok(plain) = codec.decode(id, data) {
        assert!(plain.len() <= cairn_block::MAX_PLAIN_LEN);
        assert!(cairn_block::verify(data).is_ok());
    }
    // Re-encoding what came out must round-trip.
    let block = codec.encode(id, data);
    assert_eq!(&codec.decode(id, &block).expect("own block decodes")[..], data);
});
