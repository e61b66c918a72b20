//! Configuration files written by `cairn format` and read by `cairn meta`, `cairn chunk` and
//! `mount.cairn`. Keys are documented here and in docs/CONFIG.md; unknown keys are refused so
//! a typo never passes silently. Relative paths are resolved against the file's directory.

mod keys;
pub use keys::{KEY_LEN, append_key, load_keys};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use std::path::{Path, PathBuf};

/// Why a configuration file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a key file: {len} bytes, not a non-empty multiple of 32")]
    BadKeyFile { path: PathBuf, len: usize },
}

/// Credentials of one node: the cluster CA and this node's certificate and key (PEM files).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// Cluster CA certificate; peers must present a certificate it signed.
    pub ca: PathBuf,
    /// This node's certificate.
    pub cert: PathBuf,
    /// This node's private key (keep it readable by root only).
    pub key: PathBuf,
}

/// `meta.toml`: the metadata server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetaFile {
    /// UDP address to listen on for QUIC, e.g. "127.0.0.1:7700".
    pub listen: String,
    /// SQLite database file holding the namespace.
    pub database: PathBuf,
    /// Seconds of heartbeat silence after which a chunk server counts as dead.
    #[serde(default = "default_dead_after")]
    pub dead_after_secs: u64,
    /// The volume keys, 32 bytes each, newest last (see docs/KEYS.md). Only the metadata
    /// server reads it; clients get the keys from it over mutual TLS.
    #[serde(default = "default_key_file")]
    pub key_file: PathBuf,
    /// Seconds a slice stored on a chunk server that no file references there (left by a
    /// write that never committed, moved or repaired elsewhere while the server was away)
    /// is kept before reconciliation deletes it. Must exceed the time any write takes.
    #[serde(default = "default_orphan_grace")]
    pub orphan_grace_secs: u64,
    /// Seconds after a restart during which the metadata server grants only the locks that
    /// clients held before it (they reclaim them when they reconnect), if any lock may have
    /// been held when it stopped. Must exceed the time clients take to notice a restart and
    /// reconnect: their `timeout` mount option (10 s by default) and a second.
    #[serde(default = "default_lock_grace")]
    pub lock_grace_secs: u64,
    /// The rebalancer moves slices between live servers while the bytes they hold, scaled to
    /// equal capacity, differ by more than this many MiB; 0 turns it off.
    #[serde(default = "default_rebalance_threshold")]
    pub rebalance_threshold_mib: u64,
    /// TCP address serving Prometheus metrics over plain HTTP at `/metrics`, e.g.
    /// "127.0.0.1:9470"; unset serves none. Unauthenticated: keep it on a trusted network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
    pub tls: Tls,
}

/// `chunk-N.toml`: one chunk server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ChunkFile {
    /// Unique id of this server within the cluster (never reuse one for a different disk).
    pub id: u64,
    /// UDP address to listen on for QUIC.
    pub listen: String,
    /// Address clients use to reach this server; defaults to `listen`.
    #[serde(default)]
    pub advertise: Option<String>,
    /// Metadata server address to register with.
    pub meta: String,
    /// Directory that holds the blocks.
    pub data_dir: PathBuf,
    /// Milliseconds between heartbeats to the metadata server.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_ms: u64,
    /// Failure domain (host, rack, …): no two copies of a block go to servers of one zone.
    /// Defaults to a zone of its own per server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// MiB per second the background scrub reads to verify stored blocks; 0 turns it off.
    #[serde(default = "default_scrub_rate")]
    pub scrub_mib_per_sec: u64,
    /// Seconds from the start of one scrub pass over every block to the start of the next.
    #[serde(default = "default_scrub_interval")]
    pub scrub_interval_secs: u64,
    /// TCP address serving Prometheus metrics over plain HTTP at `/metrics`; unset serves
    /// none. Unauthenticated: keep it on a trusted network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
    pub tls: Tls,
}

/// `client.toml`: what `mount.cairn` needs besides the mount source.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClientFile {
    /// Seconds before a request to a server fails with ETIMEDOUT (mount option `timeout=`).
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// MiB of file data cached in memory.
    #[serde(default = "default_cache_mib")]
    pub cache_mib: u64,
    /// MiB of written data buffered or in flight before writers wait.
    #[serde(default = "default_write_buffer_mib")]
    pub write_buffer_mib: u64,
    /// MiB of blocks kept on local disk as the chunk servers store them (compressed and
    /// encrypted), which also outlive the mount; 0 (the default) keeps none.
    #[serde(default)]
    pub disk_cache_mib: u64,
    /// Directory of the on-disk block cache; needed when `disk_cache_mib` is set. A relative
    /// path is taken from the directory of this file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_cache_dir: Option<PathBuf>,
    pub tls: Tls,
}

fn default_key_file() -> PathBuf {
    "volume.key".into()
}
fn default_dead_after() -> u64 {
    5
}
fn default_orphan_grace() -> u64 {
    3600
}
fn default_lock_grace() -> u64 {
    15
}
fn default_rebalance_threshold() -> u64 {
    1024
}
fn default_scrub_rate() -> u64 {
    16
}
fn default_scrub_interval() -> u64 {
    7 * 24 * 3600
}
fn default_heartbeat() -> u64 {
    1000
}
fn default_timeout() -> u64 {
    10
}
fn default_cache_mib() -> u64 {
    64
}
fn default_write_buffer_mib() -> u64 {
    64
}

/// Reads and parses a configuration file, resolving relative TLS paths against its directory.
pub fn load<T: DeserializeOwned + HasTls>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    let mut value: T = toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.into(), source })?;
    // Resolve against the real file's directory, so a symlink to a config works.
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    if let Some(dir) = real.parent() {
        value.resolve_paths(dir);
    }
    Ok(value)
}

/// Writes a configuration file with a comment header.
pub fn save<T: Serialize>(path: &Path, header: &str, value: &T) -> Result<(), ConfigError> {
    let body = toml::to_string_pretty(value).expect("config structs always serialize");
    let text = format!("# {header}\n# Every key is described in docs/CONFIG.md.\n\n{body}");
    std::fs::write(path, text).map_err(|source| ConfigError::Write { path: path.into(), source })
}

/// Files that carry paths to resolve relative to their own location.
pub trait HasTls {
    /// Makes relative paths absolute under `dir`.
    fn resolve_paths(&mut self, dir: &Path);
}

fn resolve(dir: &Path, p: &mut PathBuf) {
    if p.is_relative() {
        *p = dir.join(&*p);
    }
}

impl Tls {
    fn resolve(&mut self, dir: &Path) {
        resolve(dir, &mut self.ca);
        resolve(dir, &mut self.cert);
        resolve(dir, &mut self.key);
    }
}

impl HasTls for MetaFile {
    fn resolve_paths(&mut self, dir: &Path) {
        self.tls.resolve(dir);
        resolve(dir, &mut self.database);
        resolve(dir, &mut self.key_file);
    }
}

impl HasTls for ChunkFile {
    fn resolve_paths(&mut self, dir: &Path) {
        self.tls.resolve(dir);
        resolve(dir, &mut self.data_dir);
    }
}

impl HasTls for ClientFile {
    fn resolve_paths(&mut self, dir: &Path) {
        self.tls.resolve(dir);
        if let Some(cache) = &mut self.disk_cache_dir
            && cache.is_relative()
        {
            *cache = dir.join(&*cache);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_resolves_paths_and_refuses_typos() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.toml");
        let tls = Tls { ca: "ca.pem".into(), cert: "client.pem".into(), key: "/abs/client.key".into() };
        save(
            &path,
            "test",
            &ClientFile {
                timeout_secs: 3,
                cache_mib: 1,
                write_buffer_mib: 2,
                disk_cache_mib: 0,
                disk_cache_dir: None,
                tls,
            },
        )
        .unwrap();
        let back: ClientFile = load(&path).unwrap();
        assert_eq!(back.tls.ca, dir.path().join("ca.pem"));
        assert_eq!(back.tls.key, PathBuf::from("/abs/client.key"));
        std::fs::write(&path, "timeout_secs = 3\ntimeuot = 4\n[tls]\nca='a'\ncert='b'\nkey='c'\n").unwrap();
        assert!(matches!(load::<ClientFile>(&path), Err(ConfigError::Parse { .. })));
    }
}
