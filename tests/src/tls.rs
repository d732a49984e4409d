//! Test certificates for HTTPS servers, made with the `openssl` command: a throw-away CA and
//! ECDSA P-256 server certificates it signs for `127.0.0.1`, in a temporary directory removed
//! on drop.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// A CA in a temporary directory, and the server certificates it issued.
#[derive(Debug)]
pub struct TestCa {
    dir: PathBuf,
}

/// A server certificate chain (leaf, then the CA) and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The chain: the leaf first, then the CA certificate.
    pub cert: PathBuf,
    /// The leaf's private key (PKCS#8).
    pub key: PathBuf,
    /// The leaf certificate alone.
    pub leaf: PathBuf,
}

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl: {e}"));
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl TestCa {
    /// Makes the CA (a P-256 key and a self-signed CA certificate valid for two days).
    ///
    /// # Panics
    ///
    /// When `openssl` is missing or fails.
    pub fn new(name: &str) -> Self {
        // Unique per CA: the tests of one binary run in parallel.
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("whep-e2e-tls-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key"], &dir);
        openssl(
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                "ca.key",
                "-sha256",
                "-days",
                "2",
                "-subj",
                "/CN=whep e2e CA",
                "-out",
                "ca.pem",
            ],
            &dir,
        );
        Self { dir }
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.dir.join("ca.pem")).expect("ca.pem")
    }

    /// Issues a server certificate for `127.0.0.1` with a fresh P-256 key, as `name.*`.
    ///
    /// # Panics
    ///
    /// When `openssl` fails.
    pub fn issue(&self, name: &str) -> Issued {
        self.issue_for(name, &[IpAddr::from([127, 0, 0, 1])])
    }

    /// [`issue`](Self::issue) for the addresses `ips` (a node behind a TLS-passthrough
    /// balancer is reached by the balancer's address and by its own).
    ///
    /// # Panics
    ///
    /// When `openssl` fails.
    pub fn issue_for(&self, name: &str, ips: &[IpAddr]) -> Issued {
        let dir = &self.dir;
        let names: Vec<String> = ips.iter().map(|ip| format!("IP:{ip}")).collect();
        let (key, csr, leaf, chain, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.leaf.pem"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        openssl(
            &["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", &key],
            dir,
        );
        openssl(&["req", "-new", "-key", &key, "-subj", &format!("/CN={name}"), "-out", &csr], dir);
        std::fs::write(
            dir.join(&ext),
            format!(
                "subjectAltName={}\nbasicConstraints=CA:FALSE\n\
                 keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
                names.join(",")
            ),
        )
        .expect("ext file");
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-sha256",
                "-extfile",
                &ext,
                "-out",
                &leaf,
            ],
            dir,
        );
        let mut pem = std::fs::read(dir.join(&leaf)).expect("leaf");
        pem.extend(self.ca_pem());
        std::fs::write(dir.join(&chain), pem).expect("chain");
        Issued { cert: dir.join(chain), key: dir.join(key), leaf: dir.join(leaf) }
    }

    /// A path in the CA's directory (for files a test writes itself).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Issued {
    /// A rustls server configuration serving this chain and key (aws-lc, TLS 1.2 and 1.3): for
    /// HTTPS servers in the tests that whepd calls (authorisation callback, JWKS, webhook).
    ///
    /// # Panics
    ///
    /// When the files do not load.
    pub fn server_config(&self) -> std::sync::Arc<rustls::ServerConfig> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let chain: Vec<_> = CertificateDer::pem_file_iter(&self.cert)
            .expect("chain file")
            .collect::<Result<_, _>>()
            .expect("chain");
        let key = PrivateKeyDer::from_pem_file(&self.key).expect("key");
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server config");
        std::sync::Arc::new(config)
    }

    /// The leaf certificate, DER (to compare with what a server presents).
    pub fn leaf_der(&self) -> Vec<u8> {
        let out = Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(&self.leaf)
            .output()
            .expect("openssl");
        assert!(out.status.success(), "openssl x509: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    }

    /// The base64 SHA-256 of the leaf's SubjectPublicKeyInfo: what Chromium's
    /// `--ignore-certificate-errors-spki-list` takes.
    pub fn spki_sha256(&self) -> String {
        let script = "openssl x509 -pubkey -noout -in \"$1\" | openssl pkey -pubin -outform DER \
                      | openssl dgst -sha256 -binary | base64";
        let out =
            Command::new("sh").args(["-c", script, "sh"]).arg(&self.leaf).output().expect("sh");
        assert!(out.status.success(), "spki hash: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
