//! The interoperability matrix beyond the browsers (Chromium and Firefox are in `e2e.rs`):
//! GStreamer's webrtcbin (Debian's 1.22, max-bundle and max-compat) and aiortc (PyPI, H264 and
//! VP8-only offers) each decode 30 frames of the demo stream and some audio, against the tokio,
//! the smol and the blocking server. A GStreamer with its own RSA certificate fails against the
//! default DTLS (dimpl), and the server says why, and plays against `--dtls openssl`, against
//! which Chromium, Firefox and aiortc (ECDSA certificates) still play; one with
//! `bundle-policy=balanced` is told that BUNDLE is required.
//!
//! libnice (GStreamer's ICE) gathers no loopback candidate and pins its sockets to their
//! interface, so every player runs in a network namespace with a veth pair
//! ([`whep_e2e::netns`]) and the server listens (HTTP and WebRTC) on the pair's host end.

use std::time::Duration;

use whep_e2e::Server;
use whep_e2e::netns::Netns;
use whep_e2e::players::{self, Player};

const FRAMES: u32 = 30;
const TIMEOUT: Duration = Duration::from_secs(45);

/// The server flags of OpenSSL's DTLS.
const OPENSSL: &[&str] = &["--dtls", "openssl"];

/// A server on a fresh namespace's host end and the run of `player` on its demo stream from
/// inside.
fn play(bin: &str, player: Player) -> (players::Run, Server, Netns) {
    play_with(bin, player, &[])
}

/// [`play`] with these server flags.
fn play_with(bin: &str, player: Player, args: &[&str]) -> (players::Run, Server, Netns) {
    let ns = Netns::create().expect("network namespace (needs root)");
    let host = ns.host.to_string();
    let server = Server::start_with(bin, &format!("{host}:0"), &format!("{host}:0"), args);
    let url = format!("http://{}/whep/demo", server.http);
    let run = players::run(player, Some(ns.name()), &url, FRAMES, TIMEOUT);
    (run, server, ns)
}

/// `player` decodes the frames, in `codec`.
fn decodes(bin: &str, player: Player, codec: &str) {
    decodes_with(bin, player, codec, &[]);
}

/// [`decodes`] with these server flags; returns the server.
fn decodes_with(bin: &str, player: Player, codec: &str, args: &[&str]) -> Server {
    let (run, mut server, _ns) = play_with(bin, player, args);
    assert!(
        run.passed(),
        "{}: {}\nserver output:\n{}",
        player.name(),
        run.output(),
        server.output()
    );
    let frames = run.num("frames").unwrap_or(0.0);
    assert!(frames >= f64::from(FRAMES), "{}", run.output());
    assert_eq!(run.field("codec"), Some(codec), "{}", run.output());
    let ms = run.num("first_frame_ms");
    assert!(ms.is_some_and(|ms| ms > 0.0), "first_frame_ms missing: {}", run.output());
    eprintln!(
        "{}: first_frame_ms={} (POST to first decoded frame), codec={codec}, start to PASS {} ms",
        player.name(),
        run.field("first_frame_ms").unwrap_or("?"),
        run.started.elapsed().as_millis()
    );
    assert_eq!(server.metric("whep_viewers_joined_total"), Some(1.0), "{}", server.output());
    server
}

/// The server runs OpenSSL's DTLS (it says so at start) and no handshake failed.
fn assert_openssl_without_failures(server: &mut Server) {
    let line = server.wait_line(Duration::from_secs(5), |l| l.contains("viewers' DTLS: OpenSSL"));
    assert!(line.is_some(), "not on OpenSSL's DTLS:\n{}", server.output());
    assert!(!server.output().contains("DTLS handshake failed"), "{}", server.output());
}

/// GStreamer with its own RSA-2048 certificate (webrtcbin's, no ECDSA trick) plays against
/// `--dtls openssl`: OpenSSL's DTLS accepts the RSA certificate, str0m checks its fingerprint.
fn stock_gstreamer_decodes_with_openssl(bin: &str) {
    let mut server = decodes_with(bin, Player::GstStockCert, "H264", OPENSSL);
    assert_openssl_without_failures(&mut server);
}

/// GStreamer with the RSA-2048 certificate webrtcbin makes, against the default DTLS: the
/// server's DTLS (dimpl) asks for an ECDSA one, GStreamer sends none, the handshake ends with a
/// fatal alert, the player fails at once (not at a timeout), and the server logs one WARN naming
/// the cause and the fix (`--dtls openssl`) and closes the session.
fn rsa_certificate_is_refused_clearly(bin: &str) {
    let (run, mut server, _ns) = play(bin, Player::GstStockCert);
    let verdict = run.verdict.as_deref().unwrap_or_else(|e| panic!("{e}\n{}", run.output()));
    assert!(verdict.starts_with("[WHEP] FAIL"), "{}", run.output());
    assert!(
        !verdict.contains("timeout"),
        "the DTLS failure should end the run at once: {}",
        run.output()
    );
    let warn = server
        .wait_line(Duration::from_secs(10), |l| l.contains("WARN") && l.contains("DTLS handshake"))
        .unwrap_or_else(|| panic!("no WARN about DTLS:\n{}", server.output()));
    assert!(
        warn.contains("RSA") && warn.contains("ECDSA") && warn.contains("no client certificate"),
        "{warn}"
    );
    assert!(warn.contains("--dtls openssl"), "the WARN names the server's fix: {warn}");
    let closed = whep_e2e::wait_until(Duration::from_secs(5), || {
        server.metric("whep_viewers_current") == Some(0.0)
    });
    assert!(closed, "the failed session is still open:\n{}", server.output());
    let warns = server.output().lines().filter(|l| l.contains("DTLS handshake failed")).count();
    assert_eq!(warns, 1, "one WARN per failed session:\n{}", server.output());
}

macro_rules! matrix {
    ($name:ident, $bin:expr) => {
        mod $name {
            use super::*;

            #[test]
            fn gstreamer_max_bundle_decodes() {
                decodes($bin, Player::Gst("max-bundle"), "H264");
            }

            #[test]
            fn gstreamer_max_compat_decodes() {
                decodes($bin, Player::Gst("max-compat"), "H264");
            }

            #[test]
            fn aiortc_decodes_h264() {
                decodes($bin, Player::Aiortc("h264"), "H264");
            }

            #[test]
            fn aiortc_vp8_only_gets_the_vp8_rendition() {
                decodes($bin, Player::Aiortc("vp8"), "VP8");
            }
        }
    };
}

matrix!(tokio, env!("CARGO_BIN_EXE_whepd-tokio"));
matrix!(smol, env!("CARGO_BIN_EXE_whepd-smol-e2e"));
matrix!(blocking, env!("CARGO_BIN_EXE_whepd-blocking"));

#[test]
fn gstreamer_rsa_certificate_is_refused_clearly() {
    rsa_certificate_is_refused_clearly(env!("CARGO_BIN_EXE_whepd-tokio"));
}

/// GStreamer with `bundle-policy=balanced` offers no BUNDLE group: the POST gets a 400 that
/// says BUNDLE is required and which policies give it, and the player reports that reason.
#[test]
fn gstreamer_balanced_is_told_bundle_is_required() {
    let (run, mut server, _ns) = play(env!("CARGO_BIN_EXE_whepd-tokio"), Player::Gst("balanced"));
    let verdict = run.verdict.as_deref().unwrap_or_else(|e| panic!("{e}\n{}", run.output()));
    assert!(verdict.starts_with("[WHEP] FAIL"), "{}", run.output());
    assert!(
        verdict.contains(": 400 ") && verdict.contains("BUNDLE is required"),
        "{}\nserver output:\n{}",
        run.output(),
        server.output()
    );
}

/// `--dtls openssl`: stock GStreamer (RSA) plays on tokio and smol; Chromium, Firefox and aiortc
/// (ECDSA certificates, DTLS 1.2 with OpenSSL as server) still play on tokio, str0m viewers on
/// all three runtimes.
mod openssl {
    use std::time::Instant;

    use whep_e2e::viewer::Viewer;
    use whep_e2e::{chromium, firefox};

    use super::*;

    const TOKIO: &str = env!("CARGO_BIN_EXE_whepd-tokio");

    #[test]
    fn stock_gstreamer_rsa_decodes_on_tokio() {
        stock_gstreamer_decodes_with_openssl(TOKIO);
    }

    #[test]
    fn stock_gstreamer_rsa_decodes_on_smol() {
        stock_gstreamer_decodes_with_openssl(env!("CARGO_BIN_EXE_whepd-smol-e2e"));
    }

    #[test]
    fn aiortc_decodes_h264() {
        let mut server = decodes_with(TOKIO, Player::Aiortc("h264"), "H264", OPENSSL);
        assert_openssl_without_failures(&mut server);
    }

    /// A page verdict passed with 30 decoded frames and audio in `codec`.
    fn assert_page_played(verdict: &str, codec: &str, server: &mut Server, started: Instant) {
        assert!(verdict.contains("[WHEP] PASS"), "{verdict}\nserver output:\n{}", server.output());
        let num = |k| chromium::field(verdict, k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        assert!(num("framesDecoded") >= 30 && num("audioPackets") > 0, "{verdict}");
        let got = chromium::field(verdict, "codec").map(str::to_ascii_lowercase);
        assert_eq!(got.as_deref(), Some(codec), "{verdict}");
        eprintln!(
            "--dtls openssl: firstFrameMs={} codec={codec}, browser start to PASS {} ms",
            chromium::field(verdict, "firstFrameMs").unwrap_or("?"),
            started.elapsed().as_millis()
        );
        assert_eq!(server.metric("whep_viewers_joined_total"), Some(1.0));
        assert_openssl_without_failures(server);
    }

    /// str0m viewers (dimpl as DTLS client) play from every runtime's server, three at once.
    #[test]
    fn str0m_viewers_play_on_every_runtime() {
        for bin in
            [TOKIO, env!("CARGO_BIN_EXE_whepd-smol-e2e"), env!("CARGO_BIN_EXE_whepd-blocking")]
        {
            let mut server = Server::start(bin, OPENSSL);
            let viewers: Vec<Viewer> = (0..3)
                .map(|_| {
                    Viewer::connect(server.http, "/whep/demo", None)
                        .unwrap_or_else(|e| panic!("{bin}: viewer: {e}"))
                })
                .collect();
            for v in &viewers {
                let played = v.wait_for(Duration::from_secs(25), |s| {
                    s.video_packets >= 100 && s.audio_packets >= 20
                });
                assert!(played, "{bin}: {:?}\n{}", v.stats(), server.output());
            }
            assert_eq!(server.metric("whep_viewers_joined_total"), Some(3.0));
            assert_openssl_without_failures(&mut server);
        }
    }

    #[test]
    fn chromium_plays() {
        let mut server = Server::start(TOKIO, OPENSSL);
        let url = format!("http://{}/?stream=demo&test=1&frames=30&timeout=30", server.http);
        let started = Instant::now();
        let verdict = chromium::run_page(&url, Duration::from_secs(45))
            .unwrap_or_else(|e| panic!("{e}\nserver output:\n{}", server.output()));
        assert_page_played(&verdict, "video/h264", &mut server, started);
    }

    #[test]
    fn firefox_plays() {
        let ns = Netns::create().expect("network namespace (needs root)");
        let host = ns.host.to_string();
        let mut server =
            Server::start_with(TOKIO, &format!("{host}:0"), &format!("{host}:0"), OPENSSL);
        let url = format!("http://{}/?stream=demo&test=1&frames=30&timeout=30", server.http);
        let started = Instant::now();
        let verdict = firefox::run_page_in(Some(ns.name()), &url, Duration::from_secs(45))
            .unwrap_or_else(|e| panic!("{e}\nserver output:\n{}", server.output()));
        assert_page_played(&verdict, "video/vp8", &mut server, started);
    }
}
