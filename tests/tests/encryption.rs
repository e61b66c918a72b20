//! Chunk servers hold only ciphertext: file data is compressed and encrypted by the client
//! before it is stored, under keys the chunk servers never see; rotated keys keep old data
//! readable.

use cairn_tests::*;
use std::io::Write;
use std::path::{Path, PathBuf};

const MARKER: &[u8] = b"CAIRN-PLAINTEXT-MARKER-7d3e91";

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() { files_under(&p, out) } else { out.push(p) }
    }
}

/// Every file of every chunk server's data directory.
fn chunk_files(c: &Cluster) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(&c.data).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with("chunk-") && e.path().is_dir() {
            files_under(&e.path(), &mut out);
        }
    }
    assert!(!out.is_empty(), "no block files under {}", c.data.display());
    out
}

fn holds(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A file of 64 KiB records, each the marker followed by pseudo-random bytes: the marker
/// appears in the clear if stored as is, and zstd finds nothing to squeeze.
fn marked_noise() -> Vec<u8> {
    pattern(1, 32 << 16).chunks(1 << 16).flat_map(|record| [MARKER, &record[MARKER.len()..]].concat()).collect()
}

/// The marker and the file's text, compressed as the client would compress a block.
fn forbidden(text: &[u8]) -> Vec<Vec<u8>> {
    vec![MARKER.to_vec(), zstd::bulk::compress(text, 1).unwrap()[..64].to_vec()]
}

fn write_synced(path: &Path, data: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn chunk_servers_hold_only_ciphertext() {
    let c = Cluster::start(2);
    let text = MARKER.repeat(50_000);
    let noise = marked_noise();
    write_synced(&c.path("text"), &text);
    write_synced(&c.path("noise"), &noise);
    let files = chunk_files(&c);
    let mut stored = 0;
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        stored += bytes.len();
        for needle in forbidden(&text) {
            assert!(!holds(&bytes, &needle), "{} holds file data in the clear", f.display());
        }
    }
    // The text compressed well; the noise could not, and was still encrypted. One copy: the
    // local cluster's servers share one failure domain.
    assert!(stored < text.len() / 10 + noise.len() + 4096, "{stored} bytes stored");
    // A fresh client, with nothing cached, decodes both.
    let fresh = c.mount_again("fresh", "");
    assert!(std::fs::read(fresh.join("text")).unwrap() == text);
    assert!(std::fs::read(fresh.join("noise")).unwrap() == noise);
    umount_lazy(&fresh);
}

/// The control for the test above: without compression and encryption the same scan finds
/// the marker, so the scan does look at the stored data.
#[test]
fn an_unencrypted_volume_stores_data_in_the_clear() {
    let c = Cluster::start_with(1, &["--no-encryption", "--compression", "0"]);
    write_synced(&c.path("noise"), &marked_noise());
    let found = chunk_files(&c).iter().any(|f| holds(&std::fs::read(f).unwrap(), MARKER));
    assert!(found, "the marker must be visible when encryption is off");
}

#[test]
fn rotated_keys_encrypt_new_data_and_keep_old_data_readable() {
    let c = Cluster::start(1);
    write_synced(&c.path("old"), &MARKER.repeat(1000));
    let out = run(std::process::Command::new(bin("cairn")).arg("key-rotate").arg("--data").arg(&c.data));
    assert!(out.contains("added volume key 1"), "{out}");
    // A client mounted after the rotation writes under key 1 and reads data under key 0.
    let newer = c.mount_again("newer", "");
    write_synced(&newer.join("new"), &MARKER.repeat(2000));
    assert!(std::fs::read(newer.join("old")).unwrap() == MARKER.repeat(1000));
    let key_ids: Vec<u16> = stored_blocks_of(&c.data.join("chunk-1"))
        .iter()
        .map(StoredBlock::read)
        .filter(|b| b.len() >= 20 && &b[..4] == b"CBLK")
        .map(|b| u16::from_le_bytes([b[6], b[7]]))
        .collect();
    assert!(key_ids.contains(&0) && key_ids.contains(&1), "blocks under both keys expected: {key_ids:?}");
    // The client mounted before the rotation fetches the new key when it meets it.
    assert!(std::fs::read(c.path("new")).unwrap() == MARKER.repeat(2000));
    umount_lazy(&newer);
}
