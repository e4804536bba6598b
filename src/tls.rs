//! TLS for `--tls-cert` / `--tls-key`: a rustls server configuration that
//! actix-http's acceptor (`HttpService::rustls_0_23`, see listener.rs) serves
//! HTTPS and `wss://` with.
//!
//! Only the ring crypto provider is compiled in (see Cargo.toml). actix-http
//! adds the `http/1.1` ALPN protocol itself.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

fn bad(path: &Path, what: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("{}: {what}", path.display()),
    )
}

/// Reads the PEM chain and key; every failure names the file and the reason.
pub fn server_config(cert: &Path, key: &Path) -> std::io::Result<ServerConfig> {
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(cert, format!("cannot read certificates: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(cert, format!("invalid PEM certificate: {e}")))?;
    if chain.is_empty() {
        return Err(bad(cert, "no CERTIFICATE block found"));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| bad(key, format!("no usable private key: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_no_client_auth()
        // Checks that the key belongs to the leaf certificate.
        .with_single_cert(chain, key_der)
        .map_err(|e| bad(cert, format!("certificate and key rejected: {e}")))
}
