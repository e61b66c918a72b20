//! Building quinn endpoints that require certificates from the cluster CA on both sides.

use crate::NetError;
use cairn_proto::ALPN;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// A node's credentials: the cluster CA it trusts and its own certificate and key.
#[derive(Debug)]
pub struct Identity {
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity { ca: self.ca.clone(), chain: self.chain.clone(), key: self.key.clone_key() }
    }
}

fn tls_err(e: impl std::fmt::Display) -> NetError {
    NetError::Tls(e.to_string())
}

impl Identity {
    /// Loads PEM files: the CA certificate, this node's certificate and its private key.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Identity, NetError> {
        let read_certs = |p: &Path| -> Result<Vec<CertificateDer<'static>>, NetError> {
            let certs = CertificateDer::pem_file_iter(p)
                .map_err(|e| NetError::Tls(format!("{}: {e}", p.display())))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| NetError::Tls(format!("{}: {e}", p.display())))?;
            if certs.is_empty() {
                return Err(NetError::Tls(format!("{}: no certificate found", p.display())));
            }
            Ok(certs)
        };
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| NetError::Tls(format!("{}: {e}", key.display())))?;
        Ok(Identity { ca: read_certs(ca)?, chain: read_certs(cert)?, key })
    }

    /// Builds an identity from PEM strings (tests, and `cairn format` before files exist).
    pub fn from_pem(ca: &str, cert: &str, key: &str) -> Result<Identity, NetError> {
        let certs =
            |s: &str| CertificateDer::pem_slice_iter(s.as_bytes()).collect::<Result<Vec<_>, _>>().map_err(tls_err);
        Ok(Identity {
            ca: certs(ca)?,
            chain: certs(cert)?,
            key: PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(tls_err)?,
        })
    }

    fn roots(&self) -> Result<rustls::RootCertStore, NetError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in &self.ca {
            roots.add(c.clone()).map_err(tls_err)?;
        }
        Ok(roots)
    }
}

/// *ring* with AES-128-GCM preferred: every byte of file data crosses QUIC encrypted once per
/// replica, and AES-128 does 10 rounds to AES-256's 14 for the same 128-bit-secure AEAD
/// (block contents are encrypted end to end with ChaCha20-Poly1305 besides).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::{cipher_suite, default_provider};
    let mut p = default_provider();
    p.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// Largest UDP payload: MTU discovery probes up to it, so loopback and jumbo-frame links carry
/// far fewer packets per block while ordinary 1500-byte paths settle at their own size.
const MAX_UDP_PAYLOAD: u16 = 65_527;
/// Bytes of stream data a peer may send on one connection before the application reads them;
/// the UDP receive buffer is sized to hold as much (see `udp::bind`).
pub(crate) const RECEIVE_WINDOW: u32 = 32 << 20;

/// Bytes a connection may have in flight before its first ACK (see `transport`).
const INITIAL_WINDOW: u64 = 16 << 20;

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    // Losses of large datagrams in congestion look like a black hole to quinn: it then falls
    // back to 1,200-byte datagrams and by default probes again only a minute later, while
    // every block costs 50 times the datagrams (see `udp`). Probe again soon.
    mtu.upper_bound(MAX_UDP_PAYLOAD).black_hole_cooldown(Duration::from_secs(1));
    t.mtu_discovery_config(Some(mtu));
    // Start with a window that holds a few whole blocks. The default (about ten 1,200-byte
    // datagrams) is less than one datagram once MTU discovery reaches 64 KiB on loopback or
    // jumbo frames, so every response above ~100 KiB waited for delayed ACKs (25 ms each):
    // a 145 KiB readdir page took 90 ms instead of 5.
    let mut cc = quinn::congestion::CubicConfig::default();
    cc.initial_window(INITIAL_WINDOW);
    t.congestion_controller_factory(Arc::new(cc));
    // Ask the peer to delay an acknowledgement at most 1 ms (not 25). An RPC connection is
    // idle most of the time, so its congestion window rarely grows, and after a loss (or a
    // shrink at persistent congestion) it can hold only a datagram or two: a multi-datagram
    // answer then advanced one delayed ACK at a time. A 1,024-entry readdirplus page took
    // about 90 ms instead of 10, and a cold `ls -l` of 10,000 files 1.3 s instead of 0.4.
    // Every second packet is acknowledged at once, as RFC 9000 recommends: acknowledging
    // each one (threshold 0, used until the losses of `udp` were found) cost a datagram and a
    // wake-up per request and per answer. Three alternating rounds on a local cluster, 0
    // against 1: 1 GiB writes 422–513 against 491–591 MiB/s, mkdir+rmdir 1,147–1,260 against
    // 1,262–1,295 pairs/s, cold `ls -l` the same.
    let mut acks = quinn::AckFrequencyConfig::default();
    acks.ack_eliciting_threshold(1u32.into()).max_ack_delay(Some(Duration::from_millis(1)));
    t.ack_frequency_config(Some(acks));
    t.max_concurrent_bidi_streams(4096u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window((8u32 << 20).into())
        .receive_window(RECEIVE_WINDOW.into())
        .send_window(16 << 20)
        .keep_alive_interval(Some(Duration::from_secs(2)))
        .max_idle_timeout(Some(Duration::from_secs(20).try_into().expect("valid idle timeout")));
    Arc::new(t)
}

/// A server endpoint on `addr` that only accepts peers with a certificate from the cluster CA.
pub fn server_endpoint(identity: &Identity, addr: SocketAddr) -> Result<quinn::Endpoint, NetError> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(identity.roots()?), provider())
        .build()
        .map_err(tls_err)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(tls_err)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = QuicServerConfig::try_from(tls).map_err(tls_err)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport());
    endpoint(Some(config), addr)
}

/// A UDP socket with large buffers (see `udp`) wrapped in a quinn endpoint.
fn endpoint(server: Option<quinn::ServerConfig>, addr: SocketAddr) -> Result<quinn::Endpoint, NetError> {
    let socket = crate::udp::bind(addr).map_err(|reason| NetError::Bind { addr, reason })?;
    let mut config = quinn::EndpointConfig::default();
    config.max_udp_payload_size(MAX_UDP_PAYLOAD).map_err(tls_err)?;
    let runtime = quinn::default_runtime().ok_or_else(|| NetError::Tls("no async runtime".into()))?;
    let socket = Arc::new(crate::udp::BoundedBatches(runtime.wrap_udp_socket(socket)?));
    Ok(quinn::Endpoint::new_with_abstract_socket(config, server, socket, runtime)?)
}

/// A client endpoint presenting this node's certificate and trusting only the cluster CA.
pub fn client_endpoint(identity: &Identity) -> Result<quinn::Endpoint, NetError> {
    let tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_root_certificates(identity.roots()?)
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(tls_err)?;
    let mut tls = tls;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(tls_err)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport());
    let mut endpoint = endpoint(None, "0.0.0.0:0".parse().expect("valid addr"))?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// Whether the peer of `conn` presented a certificate valid for `name` (its chain was already
/// verified against the cluster CA when the connection was accepted).
pub(crate) fn peer_is_named(conn: &quinn::Connection, name: &str) -> bool {
    let Some(certs) = conn.peer_identity().and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok()) else {
        return false;
    };
    let (Some(cert), Ok(name)) = (certs.first(), rustls::pki_types::ServerName::try_from(name)) else {
        return false;
    };
    webpki::EndEntityCert::try_from(cert).is_ok_and(|c| c.verify_is_valid_for_subject_name(&name).is_ok())
}
