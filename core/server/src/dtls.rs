//! Which DTLS implementation the viewers' str0m peers use: the choice behind `whepd --dtls`.
//!
//! The core takes its cryptography from its embedder
//! ([`CoreConfig::crypto`](whep_core::CoreConfig::crypto)) and knows no DTLS library itself.
//! [`Dtls::crypto`] builds the provider for each choice:
//!
//! - [`Dtls::Dimpl`] (the default): str0m 0.25's own, dimpl 0.9 over aws-lc-rs
//!   ([`whep_core::dtls::provider`]). It asks clients for an ECDSA certificate only, so a player
//!   whose certificate is RSA (GStreamer's webrtcbin) cannot connect.
//! - [`Dtls::Openssl`] (cargo feature `openssl-dtls`, on in the `whepd` binaries): OpenSSL's
//!   DTLS 1.2 from `str0m-openssl` 0.6 behind an adapter to str0m 0.25's traits
//!   (`OpensslDtls` in this module's `openssl` submodule). It accepts RSA and ECDSA client
//!   certificates alike (str0m checks the certificate against the offer's fingerprint either
//!   way). SRTP, the STUN HMAC and hashes stay aws-lc-rs's.
//!
//! The choice is per server, not per viewer: which certificate a client holds shows only after
//! the server's CertificateRequest went out.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::Deserialize;
use str0m::config::CryptoProvider;

#[cfg(feature = "openssl-dtls")]
mod openssl;
#[cfg(feature = "openssl-dtls")]
pub use openssl::OpensslDtls;

/// A DTLS implementation for the viewers' peers (`--dtls`, TOML `dtls`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtls {
    /// dimpl 0.9 over aws-lc-rs, str0m's default: DTLS 1.2, ECDSA client certificates only.
    #[default]
    Dimpl,
    /// OpenSSL's DTLS 1.2 (cargo feature `openssl-dtls`): RSA and ECDSA client certificates.
    Openssl,
}

impl Dtls {
    /// Whether this build has the implementation.
    pub fn available(self) -> bool {
        match self {
            Self::Dimpl => true,
            Self::Openssl => cfg!(feature = "openssl-dtls"),
        }
    }

    /// The crypto provider for [`CoreConfig::crypto`](whep_core::CoreConfig::crypto): one per
    /// process and choice, shared by every core (shard) that gets it. An error names the cargo
    /// feature when this build does not have the implementation.
    pub fn crypto(self) -> Result<Arc<CryptoProvider>, String> {
        match self {
            Self::Dimpl => Ok(whep_core::dtls::provider()),
            #[cfg(feature = "openssl-dtls")]
            Self::Openssl => Ok(openssl::provider()),
            #[cfg(not(feature = "openssl-dtls"))]
            Self::Openssl => Err("--dtls openssl: this build has no OpenSSL DTLS; build with \
                 the cargo feature `openssl-dtls` (on by default in whep-tokio and whep-smol; \
                 whep-server --features openssl-dtls for the blocking example), or use \
                 --dtls dimpl"
                .into()),
        }
    }
}

impl fmt::Display for Dtls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Dimpl => "dimpl",
            Self::Openssl => "openssl",
        })
    }
}

impl FromStr for Dtls {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "dimpl" => Ok(Self::Dimpl),
            "openssl" => Ok(Self::Openssl),
            _ => Err(format!("unknown DTLS implementation {s:?}: expected dimpl or openssl")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in [Dtls::Dimpl, Dtls::Openssl] {
            assert_eq!(d.to_string().parse::<Dtls>(), Ok(d));
        }
        assert!("rustls".parse::<Dtls>().is_err());
        assert_eq!(Dtls::default(), Dtls::Dimpl);
    }

    #[test]
    fn dimpl_is_the_cores_default_provider() {
        let crypto = Dtls::Dimpl.crypto().expect("dimpl is always built");
        assert!(Arc::ptr_eq(&crypto, &whep_core::dtls::provider()));
    }

    #[cfg(not(feature = "openssl-dtls"))]
    #[test]
    fn openssl_without_the_feature_is_a_clear_error() {
        assert!(!Dtls::Openssl.available());
        let e = Dtls::Openssl.crypto().expect_err("not built");
        assert!(e.contains("openssl-dtls") && e.contains("--dtls dimpl"), "{e}");
    }

    #[cfg(feature = "openssl-dtls")]
    #[test]
    fn openssl_replaces_the_dtls_alone() {
        assert!(Dtls::Openssl.available());
        let crypto = Dtls::Openssl.crypto().expect("built");
        assert!(Arc::ptr_eq(&crypto, &Dtls::Openssl.crypto().expect("built")), "one provider");
        let default = whep_core::dtls::provider();
        let dtls = format!("{:?}", crypto.dtls_provider);
        assert!(dtls.contains("OpensslDtls"), "{dtls}");
        assert_eq!(format!("{:?}", crypto.srtp_provider), format!("{:?}", default.srtp_provider));
        assert!(crypto.dtls_provider.generate_certificate().is_some());
    }
}
