//! A block whose bytes changed on a chunk server's disk is an EIO and a log line, never wrong
//! bytes: the chunk server and the client both verify the block checksum.

use cairn_tests::*;
use std::io::Read;

#[test]
fn corrupted_block_reads_as_eio_never_wrong_bytes() {
    let c = Cluster::start(1);
    let data: Vec<u8> = (0..900_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(c.path("victim"), &data).unwrap();
    std::fs::File::open(c.path("victim")).unwrap().sync_all().unwrap();
    let blocks = stored_blocks_of(&c.data.join("chunk-1"));
    assert_eq!(blocks.len(), 1, "expected the file in one block: {blocks:?}");
    let mut bytes = blocks[0].read();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    blocks[0].overwrite(&bytes);

    // A fresh client has nothing cached, so it must fetch the damaged block.
    let fresh = c.mount_again("fresh", "");
    let mut f = std::fs::File::open(fresh.join("victim")).unwrap();
    let mut buf = Vec::new();
    let err = f.read_to_end(&mut buf).expect_err("a corrupted block must not be readable");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(buf.iter().zip(&data).all(|(a, b)| a == b), "bytes returned before the error must be right");
    let log = std::fs::read_to_string(c.data.join("logs/chunk-1.log")).unwrap();
    assert!(log.contains("corrupt"), "the chunk server must log the bad block:\n{log}");
    umount_lazy(&fresh);
}
