//! OpenSSL's DTLS 1.2 behind str0m 0.25's DTLS traits, for players whose certificate is RSA.
//!
//! str0m 0.25 talks to DTLS through `str0m-proto` 0.8's `DtlsProvider` and `DtlsInstance`.
//! `str0m-openssl` 0.6.0, the newest published, implements the same two traits of `str0m-proto`
//! 0.7, whose types come from dimpl 0.7: an OpenSSL DTLS 1.2 endpoint
//! (`SslVerifyMode::PEER | FAIL_IF_NO_PEER_CERT` with a verify callback that accepts any
//! certificate, since str0m compares the certificate with the offer's fingerprint). The traits
//! have the same methods; only `send_application_data` returns `()` in 0.7 and the bytes taken
//! in 0.8. The types they carry (certificate, output, keying material, SRTP profile, protocol
//! version, error) have the same variants and fields in dimpl 0.7 and 0.9. [`OpensslDtls`]
//! converts between them, one value at a time, and adds nothing of its own to the protocol.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use str0m::config::CryptoProvider;
use str0m::crypto::CryptoError;
use str0m::crypto::dtls::{
    DtlsCert, DtlsImplError, DtlsInstance, DtlsOutput, DtlsProvider, DtlsVersion, KeyingMaterial,
    ProtocolVersion, SrtpProfile,
};
use str0m_proto07::crypto::dtls as old;
use tracing::debug;

/// The crypto provider of `--dtls openssl`: [`OpensslDtls`] for DTLS, the rest (SRTP, STUN
/// HMAC, hashes) the core's default, aws-lc-rs.
pub(super) fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    let provider = PROVIDER.get_or_init(|| {
        Arc::new(CryptoProvider {
            dtls_provider: &OpensslDtls,
            ..(*whep_core::dtls::provider()).clone()
        })
    });
    Arc::clone(provider)
}

/// A str0m 0.25 DTLS provider on OpenSSL's DTLS 1.2 (through `str0m-openssl` 0.6), which takes
/// RSA and ECDSA client certificates. Its certificate is OpenSSL's ECDSA P-256 one.
///
/// A server endpoint speaks DTLS 1.2 only: [`DtlsVersion::Dtls12`] (str0m's default) and
/// [`DtlsVersion::Auto`] get one; a client that offers DTLS 1.3 and 1.2 (browsers) gets 1.2, one
/// that offers only 1.3 is refused by OpenSSL. [`DtlsVersion::Dtls13`] is an error.
#[derive(Debug)]
pub struct OpensslDtls;

fn inner() -> &'static dyn old::DtlsProvider {
    static INNER: OnceLock<&'static dyn old::DtlsProvider> = OnceLock::new();
    *INNER.get_or_init(|| str0m_openssl::default_provider().dtls_provider)
}

impl DtlsProvider for OpensslDtls {
    fn generate_certificate(&self) -> Option<DtlsCert> {
        let cert = inner().generate_certificate()?;
        Some(DtlsCert { certificate: cert.certificate, private_key: cert.private_key })
    }

    fn new_dtls(
        &self,
        cert: &DtlsCert,
        now: Instant,
        version: DtlsVersion,
        mtu: Option<usize>,
    ) -> Result<Box<dyn DtlsInstance>, CryptoError> {
        match version {
            DtlsVersion::Dtls12 | DtlsVersion::Auto => {}
            v => {
                return Err(CryptoError::Other(format!(
                    "OpenSSL DTLS (--dtls openssl) speaks DTLS 1.2 only, not {v:?}"
                )));
            }
        }
        let cert = old::DtlsCert {
            certificate: cert.certificate.clone(),
            private_key: cert.private_key.clone(),
        };
        let endpoint = inner()
            .new_dtls(&cert, now, str0m_proto07::crypto::DtlsVersion::Dtls12, mtu)
            .map_err(|e| CryptoError::Other(format!("OpenSSL DTLS: {e}")))?;
        Ok(Box::new(Endpoint {
            inner: endpoint,
            last_timeout: now,
            started: false,
            connected: false,
            failed: false,
        }))
    }
}

/// One OpenSSL DTLS endpoint behind str0m 0.25's trait.
struct Endpoint {
    inner: Box<dyn old::DtlsInstance>,
    /// The last timeout the endpoint asked for: the answer to an output dimpl 0.9 has no
    /// counterpart of (dimpl 0.7's output enum is non-exhaustive; 0.7.6 has none such).
    last_timeout: Instant,
    /// Its role is set (`set_active`): str0m-openssl's endpoint cannot be driven before.
    started: bool,
    /// The handshake is done (the endpoint said `Connected`).
    connected: bool,
    /// A datagram failed: the handshake (or the session) is over. `str0m-openssl` 0.6 leaves
    /// its endpoint without a state after a failed handshake and panics on the next datagram
    /// ("inner_mut on empty dtls state"), which str0m would hand it: from here on the adapter
    /// refuses datagrams and data itself. Its queued alert still goes out.
    failed: bool,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpensslEndpoint").finish_non_exhaustive()
    }
}

impl DtlsInstance for Endpoint {
    fn set_active(&mut self, active: bool) {
        self.inner.set_active(active);
        self.started = true;
    }

    fn handle_packet(&mut self, packet: &[u8]) -> Result<(), DtlsImplError> {
        if self.failed {
            return Err(DtlsImplError::ConnectionClosed);
        }
        self.inner.handle_packet(packet).map_err(|e| {
            self.failed = true;
            error(e)
        })
    }

    fn poll_output<'a>(&mut self, buf: &'a mut [u8]) -> DtlsOutput<'a> {
        match self.inner.poll_output(buf) {
            old::DtlsOutput::Packet(p) => DtlsOutput::Packet(p),
            old::DtlsOutput::BufferTooSmall { needed } => DtlsOutput::BufferTooSmall { needed },
            old::DtlsOutput::Timeout(t) => {
                self.last_timeout = t;
                DtlsOutput::Timeout(t)
            }
            old::DtlsOutput::Connected => {
                self.connected = true;
                DtlsOutput::Connected
            }
            old::DtlsOutput::PeerCert(der) => DtlsOutput::PeerCert(der),
            old::DtlsOutput::KeyingMaterial(km, profile) => {
                DtlsOutput::KeyingMaterial(KeyingMaterial::new(&km), srtp_profile(profile))
            }
            old::DtlsOutput::ApplicationData(data) => DtlsOutput::ApplicationData(data),
            old::DtlsOutput::CloseNotify => DtlsOutput::CloseNotify,
            _ => DtlsOutput::Timeout(self.last_timeout),
        }
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), DtlsImplError> {
        if self.started && !self.connected && !self.failed {
            // str0m-openssl's timeout only reports "in 500 ms" while handshaking; OpenSSL sends
            // a lost flight again only when it is next driven, and it is driven only by a
            // datagram. An empty one drives it: OpenSSL finds no record, checks its own
            // retransmission timer (1 s, doubling) and sends its last flight again when it
            // expired. Without it a lost flight waits for the client's timer.
            if let Err(e) = self.inner.handle_packet(&[]) {
                self.failed = true;
                return Err(error(e));
            }
        }
        self.inner.handle_timeout(now).map_err(error)
    }

    fn send_application_data(&mut self, data: &[u8]) -> Result<usize, DtlsImplError> {
        if self.failed {
            return Err(DtlsImplError::ConnectionClosed);
        }
        // 0.7's endpoint takes all of it (queued until the handshake is done) or fails.
        self.inner.send_application_data(data).map(|()| data.len()).map_err(error)
    }

    fn is_active(&self) -> bool {
        self.inner.is_active()
    }

    fn protocol_version(&self) -> Option<ProtocolVersion> {
        // OpenSSL's endpoint (without dimpl) is DTLS 1.2 whenever it has a version.
        self.inner.protocol_version().map(|_| ProtocolVersion::DTLS1_2)
    }

    fn is_closing(&self) -> bool {
        self.failed || self.inner.is_closing()
    }

    fn is_closed(&self) -> bool {
        self.failed || self.inner.is_closed()
    }

    fn close(&mut self) -> Result<(), DtlsImplError> {
        self.inner.close().map_err(error)
    }
}

fn srtp_profile(p: old::SrtpProfile) -> SrtpProfile {
    match p {
        old::SrtpProfile::AES128_CM_SHA1_80 => SrtpProfile::AES128_CM_SHA1_80,
        old::SrtpProfile::AEAD_AES_128_GCM => SrtpProfile::AEAD_AES_128_GCM,
        _ => SrtpProfile::AEAD_AES_256_GCM,
    }
}

/// dimpl 0.7's error as dimpl 0.9's. `str0m-openssl`'s OpenSSL endpoint fails only with a
/// failed crypto operation (a refused handshake or a record that does not decrypt is
/// `Decrypt`, one that cannot be sealed `Encrypt`), which keeps its operation; anything else
/// keeps its text in the log and becomes a failed decryption, which str0m treats alike.
fn error(e: old::DtlsImplError) -> DtlsImplError {
    use dimpl::{CryptoError as New, CryptoOperation as Op};
    use old::{DtlsCryptoError as Old, DtlsCryptoOperation as OldOp};
    let op = match &e {
        old::DtlsImplError::CryptoError(Old::OperationFailed(op)) => match op {
            OldOp::Encrypt => Op::Encrypt,
            OldOp::Decrypt => Op::Decrypt,
            OldOp::Sign => Op::Sign,
            OldOp::VerifySignature => Op::VerifySignature,
            _ => Op::Decrypt,
        },
        old::DtlsImplError::ConnectionClosed => return DtlsImplError::ConnectionClosed,
        _ => Op::Decrypt,
    };
    debug!(error = %e, "OpenSSL DTLS");
    DtlsImplError::CryptoError(New::OperationFailed(op))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A dimpl DTLS client (active) and the adapter's OpenSSL server (passive), with their
    /// certificates.
    fn endpoints(
        now: Instant,
    ) -> (DtlsCert, DtlsCert, Box<dyn DtlsInstance>, Box<dyn DtlsInstance>) {
        let dimpl = whep_core::dtls::provider();
        let client_cert = dimpl.dtls_provider.generate_certificate().expect("client cert");
        let server_cert = OpensslDtls.generate_certificate().expect("server cert");
        let mut client = dimpl
            .dtls_provider
            .new_dtls(&client_cert, now, DtlsVersion::Dtls12, None)
            .expect("client");
        client.set_active(true);
        let mut server =
            OpensslDtls.new_dtls(&server_cert, now, DtlsVersion::Dtls12, None).expect("server");
        server.set_active(false);
        (client_cert, server_cert, client, server)
    }

    /// What one endpoint reported while the two talked.
    #[derive(Default)]
    struct Seen {
        connected: bool,
        peer_cert: Option<Vec<u8>>,
        keying: Option<(Vec<u8>, SrtpProfile)>,
        data: Vec<Vec<u8>>,
    }

    /// Takes `from`'s outputs: its datagrams (returned) and its events (into `seen`).
    fn drain(from: &mut dyn DtlsInstance, seen: &mut Seen) -> Vec<Vec<u8>> {
        let mut buf = vec![0; 2048];
        let mut packets = Vec::new();
        for _ in 0..64 {
            match from.poll_output(&mut buf) {
                DtlsOutput::Packet(p) => packets.push(p.to_vec()),
                DtlsOutput::Connected => seen.connected = true,
                DtlsOutput::PeerCert(der) => seen.peer_cert = Some(der.to_vec()),
                DtlsOutput::KeyingMaterial(km, profile) => {
                    seen.keying = Some((km.to_vec(), profile));
                }
                DtlsOutput::ApplicationData(d) => seen.data.push(d.to_vec()),
                _ => break,
            }
        }
        packets
    }

    /// A dimpl client (str0m's default, as Chromium's role) completes a handshake with the
    /// adapter as server: both connect, each sees the other's certificate, both export the same
    /// SRTP keys, and application data (SCTP's carrier) crosses both ways.
    #[test]
    fn a_dimpl_client_and_the_openssl_server_agree() {
        #![allow(clippy::disallowed_methods)] // a real clock for OpenSSL's timers
        let now = Instant::now();
        let (client_cert, server_cert, mut client, mut server) = endpoints(now);
        assert!(!server.is_active());
        client.handle_timeout(now).expect("client start");

        let (mut c, mut s) = (Seen::default(), Seen::default());
        for _ in 0..20 {
            for p in drain(client.as_mut(), &mut c) {
                server.handle_packet(&p).expect("server takes the client's flight");
            }
            for p in drain(server.as_mut(), &mut s) {
                client.handle_packet(&p).expect("client takes the server's flight");
            }
            if c.connected && s.connected && c.keying.is_some() && s.keying.is_some() {
                break;
            }
        }
        assert!(c.connected && s.connected, "client {} server {}", c.connected, s.connected);
        assert_eq!(s.peer_cert.as_deref(), Some(&client_cert.certificate[..]));
        assert_eq!(c.peer_cert.as_deref(), Some(&server_cert.certificate[..]));
        let (ck, sk) = (c.keying.take(), s.keying.take());
        assert!(ck.is_some() && ck == sk, "the same SRTP keys and profile");
        assert_eq!(server.protocol_version(), Some(ProtocolVersion::DTLS1_2));

        assert_eq!(server.send_application_data(b"to client").expect("send"), 9);
        for p in drain(server.as_mut(), &mut s) {
            client.handle_packet(&p).expect("record");
        }
        client.send_application_data(b"to server").expect("send");
        for p in drain(client.as_mut(), &mut c) {
            server.handle_packet(&p).expect("record");
        }
        drain(client.as_mut(), &mut c);
        drain(server.as_mut(), &mut s);
        assert_eq!(c.data, [b"to client".to_vec()]);
        assert_eq!(s.data, [b"to server".to_vec()]);
    }

    /// A DTLS record with a ClientHello whose body does not parse (session id longer than the
    /// message), as a hostile player (it has ICE credentials: it made the session) could send.
    fn broken_client_hello(seq: u8) -> Vec<u8> {
        let mut body = vec![0xfe, 0xfd];
        body.extend([7; 32]);
        body.push(0xff);
        let n = body.len() as u8;
        let mut handshake = vec![1, 0, 0, n, 0, 0, 0, 0, 0, 0, 0, n];
        handshake.extend(body);
        let mut record = vec![22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, seq, 0, handshake.len() as u8];
        record.extend(handshake);
        record
    }

    /// OpenSSL's endpoint in `str0m-openssl` 0.6 is left without a state by a failed handshake
    /// and panics on the next datagram; the adapter answers every later call itself, so that
    /// one player cannot stop the server.
    #[test]
    fn datagrams_after_a_failed_handshake_are_refused_without_a_panic() {
        #![allow(clippy::disallowed_methods)]
        let now = Instant::now();
        let cert = OpensslDtls.generate_certificate().expect("cert");
        let mut server = OpensslDtls.new_dtls(&cert, now, DtlsVersion::Dtls12, None).expect("ok");
        server.set_active(false);
        let mut failed = false;
        for seq in 0..4 {
            failed |= server.handle_packet(&broken_client_hello(seq)).is_err();
            drain(server.as_mut(), &mut Seen::default());
            server.handle_timeout(now).ok();
        }
        assert!(failed, "a broken ClientHello is an error");
        assert!(server.send_application_data(b"x").is_err());
        assert!(server.is_closed(), "a failed endpoint is closed");
        server.close().expect("closing a failed endpoint");
    }

    /// The server's first flight is lost: the server sends it again on its own timer (OpenSSL's
    /// first retransmission is a second later), without waiting for the client to repeat its
    /// ClientHello.
    #[test]
    fn a_lost_server_flight_is_sent_again_on_the_timer() {
        #![allow(clippy::disallowed_methods)]
        let now = Instant::now();
        let (_, _, mut client, mut server) = endpoints(now);
        client.handle_timeout(now).expect("client start");
        let mut s = Seen::default();
        for p in drain(client.as_mut(), &mut Seen::default()) {
            server.handle_packet(&p).expect("ClientHello");
        }
        let lost = drain(server.as_mut(), &mut s);
        assert!(!lost.is_empty(), "the server's first flight");
        std::thread::sleep(Duration::from_millis(1100));
        server.handle_timeout(Instant::now()).expect("timer");
        let again = drain(server.as_mut(), &mut s);
        assert!(!again.is_empty(), "nothing sent again after OpenSSL's retransmission timer");
        // The flight sent again completes the handshake.
        let mut c = Seen::default();
        let mut to_client = again;
        for _ in 0..20 {
            for p in to_client.drain(..) {
                client.handle_packet(&p).expect("client takes the server's flight");
            }
            for p in drain(client.as_mut(), &mut c) {
                server.handle_packet(&p).expect("server takes the client's flight");
            }
            to_client = drain(server.as_mut(), &mut s);
            if c.connected && s.connected {
                break;
            }
        }
        assert!(c.connected && s.connected, "client {} server {}", c.connected, s.connected);
    }

    #[test]
    fn dtls_1_3_alone_is_refused_at_once() {
        #![allow(clippy::disallowed_methods)]
        let cert = OpensslDtls.generate_certificate().expect("cert");
        let e = OpensslDtls
            .new_dtls(&cert, Instant::now(), DtlsVersion::Dtls13, None)
            .expect_err("1.2 only");
        assert!(e.to_string().contains("DTLS 1.2 only"), "{e}");
    }
}
