//! TURN-relayed viewers: headless Chromium that may only use a relay (`relay=1` on the player
//! page, `iceTransportPolicy: "relay"`) plays the demo stream through a real TURN server
//! (Debian's coturn, [`whep_e2e::turn::Coturn`]), reached over UDP and over TCP. The server
//! announces the TURN server in its `Link` headers with time-limited credentials (TURN REST:
//! a secret shared with coturn, never the page's); the page asks for them with an OPTIONS
//! before its offer.
//!
//! Chromium runs in a network namespace ([`whep_e2e::netns`]); coturn and the server listen on
//! the namespace's host end, so the relay reaches the server's candidate on that address.

use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use whep_e2e::netns::Netns;
use whep_e2e::turn::Coturn;
use whep_e2e::{Server, chromium};

const SECRET: &str = "e2e-turn-secret";
const TTL_SECS: u64 = 600;

/// The `username` and `credential` parameters of a `Link` header value.
fn link_param<'a>(link: &'a str, name: &str) -> Option<&'a str> {
    let start = link.find(&format!("; {name}=\""))? + name.len() + 4;
    let rest = &link[start..];
    Some(&rest[..rest.find('"')?])
}

/// `base64(HMAC-SHA1(secret, username))`, computed by `openssl`, apart from the server's code.
fn openssl_credential(secret: &str, username: &str) -> String {
    let script = "printf '%s' \"$1\" | openssl dgst -sha1 -hmac \"$2\" -binary | base64";
    let out = Command::new("sh")
        .args(["-c", script, "sh", username, secret])
        .stdin(Stdio::null())
        .output()
        .expect("openssl");
    assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Chromium with `relay=1` plays through coturn reached over `transport` (udp or tcp).
fn chromium_plays_through_turn_udp(bin: &str) {
    chromium_plays_through_turn(bin, "udp");
}

fn chromium_plays_through_turn_tcp(bin: &str) {
    chromium_plays_through_turn(bin, "tcp");
}

fn chromium_plays_through_turn(bin: &str, transport: &str) {
    let ns = Netns::create().expect("network namespace (needs root)");
    let host = ns.host.to_string();
    let turn = Coturn::start(ns.host, SECRET).unwrap_or_else(|e| panic!("{e}"));
    let url = format!("turn:{}?transport={transport}", turn.addr);
    let ttl = TTL_SECS.to_string();
    let mut server = Server::start_with(
        bin,
        &format!("{host}:0"),
        &format!("{host}:0"),
        &["--ice-server", &url, "--turn-secret", SECRET, "--turn-ttl-secs", &ttl],
    );

    // The credentials the page gets: made for this request, expiring TTL_SECS later.
    let asked = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let r = server.request("OPTIONS", "/whep/demo", &[], b"");
    assert_eq!(r.status, 204, "{}", r.text());
    let links = r.header_all("link");
    assert_eq!(links.len(), 1, "{links:?}");
    let link = links[0];
    assert!(link.starts_with(&format!("<{url}>; rel=\"ice-server\"")), "{link}");
    assert!(!link.contains(SECRET), "{link}");
    let username = link_param(link, "username").unwrap_or_else(|| panic!("{link}"));
    let credential = link_param(link, "credential").unwrap_or_else(|| panic!("{link}"));
    let (expiry, user) = username.split_once(':').unwrap_or_else(|| panic!("{username}"));
    assert_eq!(user, "demo", "{username}");
    let expiry: u64 = expiry.parse().unwrap_or_else(|_| panic!("{username}"));
    let lifetime = expiry.saturating_sub(asked.as_secs());
    assert!((TTL_SECS - 5..=TTL_SECS + 1).contains(&lifetime), "expires in {lifetime} s");
    assert_eq!(credential, openssl_credential(SECRET, username), "{link}");

    let page = format!("http://{}/?stream=demo&test=1&frames=30&timeout=30&relay=1", server.http);
    let verdict = chromium::run_page_in(Some(ns.name()), &page, Duration::from_secs(45))
        .verdict
        .unwrap_or_else(|e| {
            panic!("{e}\nserver output:\n{}\ncoturn:\n{}", server.output(), turn.log())
        });
    assert!(
        verdict.contains("[WHEP] PASS"),
        "{verdict}\nserver output:\n{}\ncoturn:\n{}",
        server.output(),
        turn.log()
    );
    assert_eq!(chromium::field(&verdict, "localType"), Some("relay"), "{verdict}");
    assert_eq!(chromium::field(&verdict, "relayProtocol"), Some(transport), "{verdict}");
    assert_eq!(chromium::field(&verdict, "iceServers"), Some("1"), "{verdict}");
    let frames = chromium::number(&verdict, "framesDecoded").unwrap_or(0.0);
    assert!(frames >= 30.0, "{verdict}");
    // coturn allocated the relay for the page's time-limited user name and relayed to the
    // server's candidate.
    let log = turn.log();
    assert!(
        log.lines().any(|l| l.contains(":demo>") && l.contains("ALLOCATE processed, success")),
        "no allocation in coturn's log:\n{log}"
    );
    eprintln!(
        "chromium over TURN/{transport}: firstFrameMs={} (POST to first decoded frame), pair={}",
        chromium::field(&verdict, "firstFrameMs").unwrap_or("?"),
        chromium::field(&verdict, "pair").unwrap_or("?"),
    );
    assert_eq!(server.metric("whep_viewers_joined_total"), Some(1.0));
}

/// A page that insists on a relay does not play when the TURN server refuses its credentials
/// (the server's secret is not coturn's), and coturn allocates nothing: the relay tests above
/// can fail.
fn wrong_turn_secret_does_not_play(bin: &str) {
    let ns = Netns::create().expect("network namespace (needs root)");
    let host = ns.host.to_string();
    let turn = Coturn::start(ns.host, "another-secret").unwrap_or_else(|e| panic!("{e}"));
    let url = format!("turn:{}?transport=udp", turn.addr);
    let mut server = Server::start_with(
        bin,
        &format!("{host}:0"),
        &format!("{host}:0"),
        &["--ice-server", &url, "--turn-secret", SECRET],
    );
    let page = format!("http://{}/?stream=demo&test=1&frames=30&timeout=12&relay=1", server.http);
    let verdict = chromium::run_page_in(Some(ns.name()), &page, Duration::from_secs(30)).verdict;
    let verdict = verdict.unwrap_or_else(|e| e);
    assert!(!verdict.contains("[WHEP] PASS"), "{verdict}\n{}", server.output());
    assert!(!turn.log().contains("ALLOCATE processed, success"), "{}", turn.log());
}

whep_e2e::runtime_suite!(
    chromium_plays_through_turn_udp,
    chromium_plays_through_turn_tcp,
    wrong_turn_secret_does_not_play,
);
