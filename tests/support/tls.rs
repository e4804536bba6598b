//! Throw-away certificates made at test time with rcgen: a CA and leaves it
//! signs, written as PEM files, and a rustls client configuration that trusts
//! only that CA. Nothing here is committed or reused across runs.
//!
//! ```ignore
//! let ca = TestCa::new();
//! let leaf = ca.leaf(&["localhost", "127.0.0.1"]);   // or "api.anthropic.com"
//! // leaf.cert_path / leaf.key_path -> `agentgate serve --tls-cert/--tls-key`
//! // ca.pem_path -> NODE_EXTRA_CA_CERTS, curl --cacert; ca.client_config() -> awc
//! ```

use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

pub struct TestCa {
    dir: tempfile::TempDir,
    cert: rcgen::Certificate,
    key: KeyPair,
    /// The CA certificate as PEM (for clients outside Rust).
    pub pem_path: PathBuf,
}

/// A leaf certificate and its key, as PEM files.
pub struct TestLeaf {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "agentgate test CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("self-signed CA");
        let dir = tempfile::tempdir().expect("cert dir");
        let pem_path = dir.path().join("ca.pem");
        std::fs::write(&pem_path, cert.pem()).expect("write ca.pem");
        TestCa {
            dir,
            cert,
            key,
            pem_path,
        }
    }

    /// A server certificate for `names` (DNS names or IP addresses), signed by this CA.
    pub fn leaf(&self, names: &[&str]) -> TestLeaf {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("leaf params");
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("sign leaf");
        let stem = names.first().map(String::as_str).unwrap_or("leaf");
        let cert_path = self.dir.path().join(format!("{stem}.crt"));
        let key_path = self.dir.path().join(format!("{stem}.key"));
        std::fs::write(&cert_path, cert.pem()).expect("write leaf cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write leaf key");
        TestLeaf {
            cert_path,
            key_path,
        }
    }

    /// A rustls client configuration trusting only this CA (ALPN http/1.1).
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.der().clone()).expect("add CA root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}
