//! The interoperability matrix beyond the browsers (Chromium and Firefox are in `e2e.rs`):
//! GStreamer's webrtcbin (Debian's 1.22, max-bundle and max-compat) and aiortc (PyPI, H264 and
//! VP8-only offers) each decode 30 frames of the demo stream and some audio, against the tokio,
//! the smol and the blocking server. A GStreamer with its own RSA certificate fails, and the
//! server says why; one with `bundle-policy=balanced` is told that BUNDLE is required.
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

/// A server on a fresh namespace's host end and the run of `player` on its demo stream from
/// inside.
fn play(bin: &str, player: Player) -> (players::Run, Server, Netns) {
    let ns = Netns::create().expect("network namespace (needs root)");
    let host = ns.host.to_string();
    let server = Server::start_with(bin, &format!("{host}:0"), &format!("{host}:0"), &[]);
    let url = format!("http://{}/whep/demo", server.http);
    let run = players::run(player, Some(ns.name()), &url, FRAMES, TIMEOUT);
    (run, server, ns)
}

/// `player` decodes the frames, in `codec`.
fn decodes(bin: &str, player: Player, codec: &str) {
    let (run, mut server, _ns) = play(bin, player);
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
}

/// GStreamer with the RSA-2048 certificate webrtcbin makes: the server's DTLS (dimpl) asks for
/// an ECDSA one, GStreamer sends none, the handshake ends with a fatal alert, the player fails
/// at once (not at a timeout), and the server logs one WARN naming the cause and closes the
/// session.
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
