//! The volume key file: 32-byte ChaCha20-Poly1305 keys back to back, oldest first. A key's
//! id is its position, so appending a key (rotation) never renumbers the others, and the file
//! `cairn format` wrote before rotation existed (one key) is key 0.

use crate::ConfigError;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Bytes per key.
pub const KEY_LEN: usize = 32;

/// Reads every key of a key file, as `(id, key)`, oldest first.
pub fn load_keys(path: &Path) -> Result<Vec<(u16, [u8; KEY_LEN])>, ConfigError> {
    let bytes = std::fs::read(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    if bytes.is_empty() || bytes.len() % KEY_LEN != 0 || bytes.len() / KEY_LEN > usize::from(u16::MAX) {
        return Err(ConfigError::BadKeyFile { path: path.into(), len: bytes.len() });
    }
    Ok(bytes.chunks(KEY_LEN).enumerate().map(|(i, k)| (i as u16, k.try_into().expect("32 bytes"))).collect())
}

/// Appends `key` to the key file (created, mode 0600, if missing) and returns its id.
pub fn append_key(path: &Path, key: &[u8; KEY_LEN]) -> Result<u16, ConfigError> {
    let count = match std::fs::metadata(path) {
        Ok(_) => load_keys(path)?.len(),
        Err(_) => 0,
    };
    let write = |source| ConfigError::Write { path: path.into(), source };
    let mut f = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path).map_err(write)?;
    f.write_all(key).and_then(|_| f.sync_all()).map_err(write)?;
    Ok(count as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_numbered_by_position_and_appending_keeps_old_ids() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("volume.key");
        assert_eq!(append_key(&path, &[1; KEY_LEN]).unwrap(), 0);
        assert_eq!(append_key(&path, &[2; KEY_LEN]).unwrap(), 1);
        assert_eq!(load_keys(&path).unwrap(), vec![(0, [1; KEY_LEN]), (1, [2; KEY_LEN])]);
        std::fs::write(&path, [0u8; 33]).unwrap();
        assert!(matches!(load_keys(&path), Err(ConfigError::BadKeyFile { len: 33, .. })));
    }
}
