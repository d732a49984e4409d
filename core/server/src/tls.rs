//! HTTPS: the certificate and key the HTTP listener serves, loaded from PEM files into a rustls
//! configuration (rustls on the aws-lc backend str0m already builds), in a cell that a reload
//! swaps without touching connections already made.
//!
//! [`Tls`] is what the runtimes' `serve_tls` take. Each new connection reads the current
//! configuration once, for its handshake; [`Tls::reload`] (whepd calls it on SIGHUP) re-reads
//! the files and, when they are good, has every later connection use them. Connections already
//! open, and every viewer (their media is UDP, not HTTP), are untouched. A bad file keeps the
//! previous certificate and logs an error. [`Tls::reload_if_changed`], which whepd calls every
//! [`WATCH_INTERVAL`], does the same once the files have changed and then stayed unchanged for
//! one interval (so that a renewal caught half-written is not loaded).

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tracing::{error, info};

/// The rustls version the runtimes serve with, for an application that builds its own
/// [`rustls::ServerConfig`] for [`Tls::new`].
pub use rustls;

/// How often whepd looks at the certificate and key files for a change
/// ([`Tls::reload_if_changed`]).
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// The certificate chain and private key files (PEM) of `--tls-cert` and `--tls-key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first (e.g. Let's Encrypt's `fullchain.pem`).
    pub cert: PathBuf,
    /// The leaf's private key: PKCS#8, PKCS#1 (RSA) or SEC1 (EC) (e.g. `privkey.pem`).
    pub key: PathBuf,
}

/// Why a certificate and key could not be loaded.
#[derive(Debug)]
pub enum TlsError {
    /// The files hold no usable certificate chain or private key; the message says which file
    /// and why.
    Files(String),
    /// rustls refused the pair: the key does not match the certificate, or its algorithm is
    /// not supported.
    Rustls(String),
    /// [`Tls::reload`] on a configuration that was not loaded from files.
    NoFiles,
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Files(msg) | Self::Rustls(msg) => f.write_str(msg),
            Self::NoFiles => f.write_str("the TLS configuration was not loaded from files"),
        }
    }
}

impl std::error::Error for TlsError {}

/// The TLS configuration new connections are served with: a cheap handle, cloned into every
/// listener; [`Tls::reload`] or [`Tls::set`] on any clone changes it for all.
#[derive(Clone)]
pub struct Tls {
    inner: Arc<Inner>,
}

struct Inner {
    files: Option<TlsFiles>,
    current: RwLock<Arc<rustls::ServerConfig>>,
    stamps: Mutex<Stamps>,
}

/// What the files looked like (modification time, size, inode; `None` when unreadable), cert
/// then key: when last loaded, and at the last look.
#[derive(Debug, Default)]
struct Stamps {
    loaded: [Option<Stamp>; 2],
    seen: [Option<Stamp>; 2],
}

type Stamp = (Option<std::time::SystemTime>, u64, u64);

fn stamps(files: &TlsFiles) -> [Option<Stamp>; 2] {
    [&files.cert, &files.key].map(|path| {
        // Follows symbolic links: Let's Encrypt's `live/` names link to the current files.
        let meta = std::fs::metadata(path).ok()?;
        Some((meta.modified().ok(), meta.len(), meta.ino()))
    })
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls").field("files", &self.inner.files).finish_non_exhaustive()
    }
}

impl Tls {
    /// Loads `files` (logging which certificate is in use), to be re-read by [`Tls::reload`].
    pub fn from_files(files: TlsFiles) -> Result<Self, TlsError> {
        let now = stamps(&files);
        let config = server_config(&files)?;
        let current = RwLock::new(Arc::new(config));
        let stamps = Mutex::new(Stamps { loaded: now, seen: now });
        Ok(Self { inner: Arc::new(Inner { files: Some(files), current, stamps }) })
    }

    /// Serves an application's own rustls configuration (its ALPN list should offer
    /// `http/1.1`, the only protocol served); [`Tls::set`] replaces it.
    pub fn new(config: Arc<rustls::ServerConfig>) -> Self {
        let (current, stamps) = (RwLock::new(config), Mutex::default());
        Self { inner: Arc::new(Inner { files: None, current, stamps }) }
    }

    /// The configuration for a connection being accepted now.
    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        Arc::clone(&self.inner.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Serves `config` to every connection accepted from now on.
    pub fn set(&self, config: Arc<rustls::ServerConfig>) {
        *self.inner.current.write().unwrap_or_else(PoisonError::into_inner) = config;
    }

    /// The files this configuration was loaded from, if it was.
    pub fn files(&self) -> Option<&TlsFiles> {
        self.inner.files.as_ref()
    }

    /// Re-reads the certificate and key files: when they are good, connections accepted from
    /// now on use them (logged at INFO); when not, the previous certificate stays and the
    /// reason is logged at ERROR and returned.
    pub fn reload(&self) -> Result<(), TlsError> {
        let Some(files) = &self.inner.files else {
            return Err(TlsError::NoFiles);
        };
        let now = stamps(files);
        *self.inner.stamps.lock().unwrap_or_else(PoisonError::into_inner) =
            Stamps { loaded: now, seen: now };
        match server_config(files) {
            Ok(config) => {
                self.set(Arc::new(config));
                Ok(())
            }
            Err(e) => {
                error!(error = %e, "TLS certificate not reloaded, still serving the previous one");
                Err(e)
            }
        }
    }
}

impl Tls {
    /// [`Tls::reload`] when the files changed (modification time, size or inode) since they
    /// were last loaded and have not changed since the previous call; `None` when nothing was
    /// done. Call it every [`WATCH_INTERVAL`] or so: a change is loaded one to two intervals
    /// after it, and one whose files are still being written waits until they settle.
    pub fn reload_if_changed(&self) -> Option<Result<(), TlsError>> {
        let files = self.inner.files.as_ref()?;
        let now = stamps(files);
        {
            let mut stamps = self.inner.stamps.lock().unwrap_or_else(PoisonError::into_inner);
            let settled = now == stamps.seen;
            stamps.seen = now;
            if !settled || now == stamps.loaded {
                return None;
            }
        }
        info!(cert = %files.cert.display(), "TLS certificate files changed: reloading");
        Some(self.reload())
    }
}

/// Builds the rustls server configuration of `files`: HTTP/1.1 (ALPN `http/1.1`), TLS 1.2 and
/// 1.3, aws-lc's safe defaults, no client certificates. rustls checks that the key belongs to
/// the leaf certificate.
pub fn server_config(files: &TlsFiles) -> Result<rustls::ServerConfig, TlsError> {
    let certs = read_certs(&files.cert)?;
    let key = read_key(&files.key)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(format!("TLS protocol versions: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs.clone(), key)
        .map_err(|e| {
            let why = match e {
                rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                    "the private key does not belong to the certificate".to_owned()
                }
                e => e.to_string(),
            };
            TlsError::Rustls(format!(
                "TLS certificate {} with key {}: {why}",
                files.cert.display(),
                files.key.display()
            ))
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let leaf = certs.first().and_then(|c| LeafSummary::parse(c));
    info!(
        cert = %files.cert.display(),
        key = %files.key.display(),
        chain = certs.len(),
        subject = leaf.as_ref().map_or("?", |l| l.common_name.as_str()),
        not_after = leaf.as_ref().map_or("?", |l| l.not_after.as_str()),
        "TLS certificate loaded"
    );
    Ok(config)
}

/// What the log says of a leaf certificate: its subject's common name and when it expires.
#[derive(Debug, PartialEq, Eq)]
struct LeafSummary {
    /// The subject's CN (empty when it has none).
    common_name: String,
    /// `notAfter` as `YYYY-MM-DD HH:MM:SS UTC`.
    not_after: String,
}

impl LeafSummary {
    /// Reads the subject CN and `notAfter` from an X.509 certificate (DER) that rustls
    /// accepted: `Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
    /// serial, signature, issuer, validity SEQUENCE { notBefore, notAfter }, subject, .. } .. }`.
    /// `None` for anything else; only the log line depends on it.
    fn parse(der: &[u8]) -> Option<Self> {
        let (0x30, cert, _) = tlv(der)? else { return None };
        let (0x30, tbs, _) = tlv(cert)? else { return None };
        let (tag, _, mut rest) = tlv(tbs)?;
        if tag == 0xa0 {
            rest = tlv(rest)?.2; // the version came first; skip the serial number
        }
        let (_, _, rest) = tlv(rest)?; // signature algorithm
        let (_, _, rest) = tlv(rest)?; // issuer
        let (0x30, validity, rest) = tlv(rest)? else { return None };
        let (0x30, subject, _) = tlv(rest)? else { return None };
        let (_, _, validity) = tlv(validity)?; // notBefore
        let (tag, not_after, _) = tlv(validity)?;
        Some(Self { common_name: common_name(subject)?, not_after: time(tag, not_after)? })
    }
}

/// One DER element of `input`: its tag, contents and what follows it.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let (bytes, rest) = rest.split_at_checked(usize::from(first & 0x7f))?;
        if bytes.is_empty() || bytes.len() > 4 {
            return None;
        }
        (bytes.iter().fold(0, |len, &b| (len << 8) | usize::from(b)), rest)
    };
    let (contents, rest) = rest.split_at_checked(len)?;
    Some((tag, contents, rest))
}

/// The CN of a `Name` (a SEQUENCE of SETs of `{ type OID, value }`); empty when none.
fn common_name(mut name: &[u8]) -> Option<String> {
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    while !name.is_empty() {
        let (_, set, rest) = tlv(name)?;
        name = rest;
        let (_, attribute, _) = tlv(set)?;
        let (0x06, oid, value) = tlv(attribute)? else { return None };
        if oid == CN {
            return Some(String::from_utf8_lossy(tlv(value)?.1).into_owned());
        }
    }
    Some(String::new())
}

/// A UTCTime (tag 23, `YYMMDDHHMMSSZ`, years 1950-2049) or GeneralizedTime (tag 24,
/// `YYYYMMDDHHMMSSZ`) as `YYYY-MM-DD HH:MM:SS UTC`.
fn time(tag: u8, value: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(value).ok()?;
    let digits = text.strip_suffix('Z')?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let full = match (tag, digits.len()) {
        (23, 12) => format!("{}{digits}", if digits < "50" { "20" } else { "19" }),
        (24, 14) => digits.to_owned(),
        _ => return None,
    };
    let f = |r: std::ops::Range<usize>| full.get(r);
    Some(format!(
        "{}-{}-{} {}:{}:{} UTC",
        f(0..4)?,
        f(4..6)?,
        f(6..8)?,
        f(8..10)?,
        f(10..12)?,
        f(12..14)?
    ))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |e: &dyn fmt::Display| {
        TlsError::Files(format!("TLS certificate file {}: {e}", path.display()))
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(&e))?;
    if certs.is_empty() {
        return Err(bad(&"no CERTIFICATE in it"));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| TlsError::Files(format!("TLS key file {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn missing() -> TlsFiles {
        TlsFiles { cert: "/nonexistent/cert.pem".into(), key: "/nonexistent/key.pem".into() }
    }

    #[test]
    fn missing_files_are_named() {
        let e = Tls::from_files(missing()).expect_err("no files");
        assert!(e.to_string().contains("/nonexistent/cert.pem"), "{e}");
    }

    #[test]
    fn a_file_without_certificates_is_refused() {
        let dir = std::env::temp_dir().join(format!("whep-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let cert = dir.join("cert.pem");
        std::fs::write(&cert, "not a certificate\n").expect("write");
        let files = TlsFiles { cert, key: dir.join("key.pem") };
        let e = server_config(&files).expect_err("no certificate");
        assert!(e.to_string().contains("no CERTIFICATE"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `openssl req -x509 -subj "/O=Example/CN=live.example.org" -days 3650` (P-256).
    const CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBrjCCAVWgAwIBAgIUP+S4JCB2Dr8temq/5zhSXRrdzhwwCgYIKoZIzj0EAwIw
LTEQMA4GA1UECgwHRXhhbXBsZTEZMBcGA1UEAwwQbGl2ZS5leGFtcGxlLm9yZzAe
Fw0yNjEyMDMwNzA3MTZaFw0zNjExMzAwNzA3MTZaMC0xEDAOBgNVBAoMB0V4YW1w
bGUxGTAXBgNVBAMMEGxpdmUuZXhhbXBsZS5vcmcwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAASCnu9lZIjRARdYyKB9HeOwCj6lxfKH4TVD7N0HoKwEYVE8uwHzKfLl
s42t85/EvwCX6QViruPfSi0SGTDfjms9o1MwUTAdBgNVHQ4EFgQUn8dUI2jxKayB
jvlgvtF0YIIJSfYwHwYDVR0jBBgwFoAUn8dUI2jxKayBjvlgvtF0YIIJSfYwDwYD
VR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNHADBEAiAiIDuW2L/2rovAppQeTXGS
uhPKWerqxTh5kD8/L0ejgwIgeg7XIMmSP5fmTI8IdrYUrebJN1rmTAM5Hf2Pu4/w
I1c=
-----END CERTIFICATE-----
";

    #[test]
    fn the_log_names_the_subject_and_expiry() {
        let der = CertificateDer::from_pem_slice(CERT.as_bytes()).expect("PEM");
        let leaf = LeafSummary::parse(&der).expect("parsed");
        assert_eq!(leaf.common_name, "live.example.org");
        assert_eq!(leaf.not_after, "2036-11-30 07:07:16 UTC");
        // Truncated or garbled input is no summary, never a panic.
        for cut in 0..der.len() {
            let _ = LeafSummary::parse(&der[..cut]);
        }
        assert_eq!(LeafSummary::parse(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(time(23, b"991231235959Z").as_deref(), Some("1999-12-31 23:59:59 UTC"));
        assert_eq!(time(24, b"20500101000000Z").as_deref(), Some("2050-01-01 00:00:00 UTC"));
    }

    #[test]
    fn a_change_is_reloaded_once_settled() {
        let dir = std::env::temp_dir().join(format!("whep-tls-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let files = TlsFiles { cert: dir.join("cert.pem"), key: dir.join("key.pem") };
        std::fs::write(&files.cert, CERT).expect("write");
        std::fs::write(&files.key, "key").expect("write");
        let tls = Tls {
            inner: Arc::new(Inner {
                current: RwLock::new(Arc::new(unusable_config())),
                stamps: Mutex::new(Stamps { loaded: stamps(&files), seen: stamps(&files) }),
                files: Some(files.clone()),
            }),
        };
        assert!(tls.reload_if_changed().is_none(), "nothing changed");
        std::fs::write(&files.key, "another key").expect("write");
        assert!(tls.reload_if_changed().is_none(), "not settled yet");
        let tried = tls.reload_if_changed().expect("settled: reloaded");
        assert!(tried.is_err(), "the key is no key");
        assert!(tls.reload_if_changed().is_none(), "tried once per change");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn unusable_config() -> rustls::ServerConfig {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(rustls::server::ResolvesServerCertUsingSni::new()))
    }

    #[test]
    fn reload_without_files_is_an_error() {
        let tls = Tls::new(Arc::new(unusable_config()));
        assert!(matches!(tls.reload(), Err(TlsError::NoFiles)));
    }
}
