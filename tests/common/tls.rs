//! Certificates for TLS tests, made fresh per test (rcgen) and written as PEM files: a CA, a
//! server certificate it signed for `localhost` and 127.0.0.1, a client certificate it signed,
//! and a client certificate nobody trusts.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub rogue_cert: PathBuf,
    pub rogue_key: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        let write = |name: &str, pem: String| {
            let path = dir.join(name);
            std::fs::write(&path, pem).unwrap();
            path
        };
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca = write("ca.pem", ca_params.self_signed(&ca_key).unwrap().pem());
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |names: Vec<String>| {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(names)
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (cert, key) = leaf(vec!["localhost".into(), "127.0.0.1".into()]);
        let (server_cert, server_key) = (write("server.pem", cert), write("server.key", key));
        let (cert, key) = leaf(vec!["client".into()]);
        let (client_cert, client_key) = (write("client.pem", cert), write("client.key", key));
        let rogue_key = KeyPair::generate().unwrap();
        let rogue = CertificateParams::new(vec!["client".to_string()])
            .unwrap()
            .self_signed(&rogue_key)
            .unwrap();
        Pki {
            ca,
            server_cert,
            server_key,
            client_cert,
            client_key,
            rogue_cert: write("rogue.pem", rogue.pem()),
            rogue_key: write("rogue.key", rogue_key.serialize_pem()),
        }
    }

    /// `hedf serve` arguments for TLS with this server certificate.
    pub fn serve_args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.server_cert.display().to_string(),
            "--tls-key".into(),
            self.server_key.display().to_string(),
        ]
    }
}
