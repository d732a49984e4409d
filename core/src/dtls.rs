//! str0m's DTLS backend with its configuration built once.
//!
//! str0m's aws-lc-rs provider builds a fresh dimpl `Config` for every `Rtc`, and dimpl
//! validates the crypto provider on every build: key exchanges in every group, a signature
//! check, hash and AEAD test vectors. That self-test was about a fifth of the server's CPU
//! during a burst of setups (perf, 150 viewers joining). [`CachedDtls`] runs it once, on the
//! first viewer, and shares the `Config` (the same settings str0m uses: no server cookie, since
//! ICE already checked the address; its MTU) with every DTLS instance after that.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use str0m::crypto::dtls::{
    DtlsCert, DtlsImplError, DtlsInstance, DtlsOutput, DtlsProvider, DtlsVersion, ProtocolVersion,
};
use str0m::crypto::{CryptoError, CryptoProvider};

/// What a DTLS failure most likely means for the player, when its error text (str0m's
/// `RtcError` display, which carries dimpl's) names a known cause.
///
/// dimpl 0.9, str0m 0.25's DTLS, asks the client for an ECDSA certificate only (its
/// CertificateRequest lists `ecdsa_sign` alone) and verifies only ECDSA signatures. A client
/// whose certificate is RSA (GStreamer 1.22's webrtcbin makes an RSA-2048 one) then sends an
/// empty certificate list, dimpl answers with a fatal `handshake_failure` alert and fails with
/// "no client certificate received"; a client that sends its RSA certificate anyway fails on
/// the missing EC parameters. The fix is on the server: another DTLS implementation through
/// [`CoreConfig::crypto`](crate::CoreConfig::crypto), such as OpenSSL's, which `whepd` runs with
/// `--dtls openssl` (`whep-server`'s `openssl-dtls` feature); see docs/operating.md, "GStreamer's
/// certificate". The hint is for dimpl's errors and names that option.
pub fn failure_hint(error: &str) -> Option<&'static str> {
    const RSA: &str = "the client's DTLS certificate is probably RSA, which this server's DTLS \
                       (dimpl 0.9 under str0m 0.25) does not accept; run the server with \
                       `--dtls openssl` (OpenSSL's DTLS accepts RSA and ECDSA), or give the \
                       client an ECDSA (P-256) certificate";
    let error = error.to_ascii_lowercase();
    ["no client certificate received", "missing ec curve parameter", "invalid subject public key"]
        .iter()
        .any(|cause| error.contains(cause))
        .then_some(RSA)
}

/// str0m's default crypto provider (aws-lc-rs) with [`CachedDtls`] for DTLS, one for the
/// process: pass it to `RtcConfig::set_crypto_provider` for any str0m peer (the core's
/// viewers, the simulation's and `whep-load`'s players).
pub fn provider() -> Arc<CryptoProvider> {
    static DTLS: CachedDtls = CachedDtls { config: OnceLock::new() };
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    let provider = PROVIDER.get_or_init(|| {
        Arc::new(CryptoProvider { dtls_provider: &DTLS, ..str0m::crypto::from_feature_flags() })
    });
    Arc::clone(provider)
}

/// A DTLS provider that builds (and validates) its dimpl configuration once per MTU it is
/// asked for first; other MTUs get a fresh one, as str0m's own provider does for all.
#[derive(Debug)]
pub struct CachedDtls {
    config: OnceLock<(Option<usize>, Arc<dimpl::Config>)>,
}

impl CachedDtls {
    fn config(&self, mtu: Option<usize>) -> Result<Arc<dimpl::Config>, CryptoError> {
        let build = || {
            let mut builder = dimpl::Config::builder().use_server_cookie(false);
            if let Some(mtu) = mtu {
                builder = builder.mtu(mtu);
            }
            builder
                .build()
                .map(Arc::new)
                .map_err(|e| CryptoError::Other(format!("dimpl config creation failed: {e}")))
        };
        if let Some((cached_mtu, config)) = self.config.get() {
            return if *cached_mtu == mtu { Ok(Arc::clone(config)) } else { build() };
        }
        let config = build()?;
        // A racing first build (shards) is as good as ours.
        let (cached_mtu, cached) = self.config.get_or_init(|| (mtu, Arc::clone(&config)));
        Ok(if *cached_mtu == mtu { Arc::clone(cached) } else { config })
    }
}

impl DtlsProvider for CachedDtls {
    fn generate_certificate(&self) -> Option<DtlsCert> {
        str0m::crypto::from_feature_flags().dtls_provider.generate_certificate()
    }

    fn new_dtls(
        &self,
        cert: &DtlsCert,
        now: Instant,
        dtls_version: DtlsVersion,
        mtu: Option<usize>,
    ) -> Result<Box<dyn DtlsInstance>, CryptoError> {
        let config = self.config(mtu)?;
        let dtls = match dtls_version {
            DtlsVersion::Dtls12 => dimpl::Dtls::new_12(config, cert.clone(), now),
            DtlsVersion::Dtls13 => dimpl::Dtls::new_13(config, cert.clone(), now),
            DtlsVersion::Auto => dimpl::Dtls::new_auto(config, cert.clone(), now),
            v => return Err(CryptoError::Other(format!("unsupported DTLS version: {v:?}"))),
        };
        Ok(Box::new(Instance(dtls)))
    }
}

/// One dimpl DTLS endpoint behind str0m's trait.
struct Instance(dimpl::Dtls);

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Instance")
    }
}

impl DtlsInstance for Instance {
    fn set_active(&mut self, active: bool) {
        self.0.set_active(active);
    }

    fn handle_packet(&mut self, packet: &[u8]) -> Result<(), DtlsImplError> {
        self.0.handle_packet(packet)
    }

    fn poll_output<'a>(&mut self, buf: &'a mut [u8]) -> DtlsOutput<'a> {
        self.0.poll_output(buf)
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), DtlsImplError> {
        self.0.handle_timeout(now)
    }

    fn send_application_data(&mut self, data: &[u8]) -> Result<usize, DtlsImplError> {
        self.0.send_application_data(data)
    }

    fn is_active(&self) -> bool {
        self.0.is_active()
    }

    fn protocol_version(&self) -> Option<ProtocolVersion> {
        self.0.protocol_version()
    }

    fn is_closing(&self) -> bool {
        self.0.is_closing()
    }

    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }

    fn close(&mut self) -> Result<(), DtlsImplError> {
        self.0.close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_rsa_client_certificate_gets_a_hint() {
        // str0m's text for dimpl's error when the client sent no (ECDSA) certificate.
        let hint = failure_hint("DTLS error: certificate error: no client certificate received")
            .expect("a hint");
        assert!(hint.contains("RSA") && hint.contains("ECDSA"), "{hint}");
        assert!(hint.contains("--dtls openssl"), "the hint names the fix: {hint}");
        assert!(
            failure_hint("DTLS error: crypto error: missing EC curve parameter in certificate")
                .is_some()
        );
        assert_eq!(failure_hint("DTLS error: timeout: handshake"), None);
        assert_eq!(failure_hint("DTLS error: unexpected message: UnexpectedEpoch"), None);
    }

    #[test]
    fn the_config_is_built_once_per_mtu() {
        let dtls = CachedDtls { config: OnceLock::new() };
        let a = dtls.config(Some(1200)).expect("config");
        let b = dtls.config(Some(1200)).expect("config");
        assert!(Arc::ptr_eq(&a, &b), "second build for the same MTU");
        let c = dtls.config(Some(1100)).expect("config");
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!((a.mtu(), c.mtu()), (1200, 1100));
        assert!(!a.use_server_cookie(), "ICE checked the address already");
    }
}
