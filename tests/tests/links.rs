//! Headless Chromium in a network namespace behind an impairing UDP relay (`whep_e2e::links`):
//! loss repaired by retransmission, NAT rebinding, and the namespace guard's cleanup. Each
//! browser run plays 10 s; the assertions are on counts, not on timings.

use std::sync::atomic::Ordering;
use std::time::Duration;

use whep_e2e::links::{self, Outcome, RunOptions};
use whep_e2e::netns::{self, Netns};
use whep_e2e::relay::{Impairment, Link, Relay};

const BIN: &str = env!("CARGO_BIN_EXE_whepd-tokio");
const MS: Duration = Duration::from_millis(1);
const S: Duration = Duration::from_secs(1);

fn describe(o: &Outcome) -> String {
    let lines: Vec<&str> = o.lines.iter().map(|(_, l)| l.as_str()).collect();
    format!(
        "verdict: {:?}\nrelay: {:?}\npage:\n{}\nserver:\n{}",
        o.verdict,
        o.relay,
        lines.join("\n"),
        o.server_log
    )
}

/// 1 % loss each way and a 50 ms round trip: the browser plays, sends NACKs, and gets
/// retransmissions (RTX) for them.
#[test]
fn loss_is_repaired_by_retransmission() {
    let ns = Netns::create().expect("network namespace (needs root)");
    let link = Link::symmetric(Impairment::none().delay(25 * MS).loss_percent(1.0)).seed(19);
    let o = links::run(BIN, &ns, link, &RunOptions::default(), |_, _| {});
    assert!(o.passed(), "{}", describe(&o));
    eprintln!("1 % loss, 50 ms RTT: {:?}", o.verdict);
    // The link did lose video: about 1 % of some 2000 datagrams.
    assert!(o.relay.down.lost > 0, "{}", describe(&o));
    let nacks = o.num("nackCount").unwrap_or(0.0);
    // Chromium has no `retransmittedPacketsReceived` for video; the relay counts the RTX
    // packets it delivered, by the payload type the page read from the answer.
    let rtx = o.rtx_delivered().unwrap_or(0);
    assert!(nacks > 0.0, "no NACK sent: {}", describe(&o));
    assert!(rtx > 0, "no retransmission reached the browser: {}", describe(&o));
    assert_eq!(whep_e2e::chromium::field(o.verdict.as_deref().unwrap_or(""), "rtx"), Some("1"));
}

/// The viewer's NAT rebinds while it plays: the relay's socket toward the server is replaced
/// by one on another port. The viewer should keep playing (the server follows the viewer's new
/// address, which ICE's checks from it reveal: `core/src/path.rs`). Before that fix: datagrams
/// to the old port for 8-13 s, playback back after ~13.6 s.
///
/// What the server controls is checked, not Chromium's timing: it moves the media with the
/// first check Chromium sends from the new port, and a connected Chromium checks every 2-3 s
/// (RFC 7675 allows up to 6 s), so the last datagram to the old port comes within 6 s of the
/// rebinding; from then on the picture is back within a GOP (2 s), so the 5 s after the move
/// decode at least 50 frames (150 at 30 fps). Measuring from the rebinding instead mixed the
/// browser's check interval in: 44 frames once, with the move 2.6 s after the rebinding.
#[test]
fn nat_rebinding_keeps_playing() {
    let ns = Netns::create().expect("network namespace (needs root)");
    // Long enough for 5 s after the latest move this test accepts.
    let opts = RunOptions { duration_s: 16, ..RunOptions::default() };
    let o = links::run(BIN, &ns, Link::default(), &opts, |relay, done| {
        // Rebind once the browser plays (some 500 datagrams toward it), not at a fixed time.
        while !done.load(Ordering::Relaxed) {
            if relay.stats().down.forwarded > 500 {
                relay.rebind();
                return;
            }
            std::thread::sleep(10 * MS);
        }
    });
    let at = o.relay.rebound_at.unwrap_or_else(|| panic!("never rebound: {}", describe(&o)));
    // The last datagram to the old port: the server's move (none: it moved before sending any).
    let moved = o.relay.last_stale_at.unwrap_or(at);
    let took = moved.saturating_duration_since(at);
    let after = moved + Duration::from_secs(5);
    let before = o.progress_at(moved, "framesDecoded").unwrap_or(0.0);
    let later = o.progress_at(after, "framesDecoded").unwrap_or(0.0);
    let frames = later - before;
    eprintln!(
        "NAT rebinding: media moved {took:?} after it ({} datagrams to the old port); {frames} \
         frames decoded in the 5 s after the move",
        o.relay.stale
    );
    assert!(took <= Duration::from_secs(6), "media to the old port for {took:?}: {}", describe(&o));
    assert!(
        o.last_progress().is_some_and(|t| t >= after),
        "the run ended before 5 s after the move: {}",
        describe(&o)
    );
    assert!(frames >= 50.0, "{frames} frames in the 5 s after the move: {}", describe(&o));
}

/// A 20 s outage: the server closes the silent session, and the
/// player page (retry=1) ends its own after 10 s disconnected, says so, and plays again in a new
/// session once the link is back; it passes only when the new session has decoded its frames.
#[test]
fn page_reconnects_after_an_outage_that_closed_its_session() {
    let ns = Netns::create().expect("network namespace (needs root)");
    let link = Link::symmetric(Impairment::none().outage(6 * S, 20 * S));
    let opts = RunOptions {
        duration_s: 35,
        page_params: "&retry=1&reconnects=1".into(),
        ..RunOptions::default()
    };
    let o = links::run(BIN, &ns, link, &opts, |_, _| {});
    assert!(o.passed(), "{}", describe(&o));
    let reconnects = o.num("reconnects").unwrap_or(0.0);
    assert!(reconnects >= 1.0, "{}", describe(&o));
    let said = o.lines.iter().any(|(_, l)| l.contains("[WHEP] RECONNECT"));
    assert!(said, "the page did not say it reconnects: {}", describe(&o));
    eprintln!(
        "outage 20 s: reconnects={reconnects}, lastEnd={}",
        whep_e2e::chromium::field(o.verdict.as_deref().unwrap_or(""), "lastEnd").unwrap_or("?")
    );
}

/// The namespace guard removes its namespace and veth pair (`ip netns list` and the host's
/// interfaces before and after), and kills what runs inside, also when the test panics; the
/// address of a relay bound on its host end goes with it.
#[test]
fn namespace_guard_leaves_nothing_behind() {
    let before = (netns::list(), netns::host_interfaces());
    let made = std::sync::Mutex::new(None);
    let result = std::panic::catch_unwind(|| {
        let ns = Netns::create().expect("network namespace (needs root)");
        let relay = Relay::bind(std::net::IpAddr::V4(ns.host)).expect("relay on the veth");
        let mut sleeper =
            ns.command("sleep").arg("60").spawn().expect("a process inside the namespace");
        let pid = sleeper.id();
        std::thread::spawn(move || sleeper.wait());
        assert!(!before.0.contains(&ns.name().to_owned()));
        assert!(netns::list().contains(&ns.name().to_owned()));
        assert!(netns::host_interfaces().contains(&ns.host_interface().to_owned()));
        *made.lock().expect("lock") =
            Some((ns.name().to_owned(), ns.host_interface().to_owned(), relay.front(), pid));
        panic!("a test failing with the namespace up");
    });
    assert!(result.is_err());
    let (name, host_if, front, pid) =
        made.into_inner().expect("lock").expect("the namespace was made");
    assert!(!netns::list().contains(&name), "{name} left behind: {:?}", netns::list());
    assert!(!netns::host_interfaces().contains(&host_if), "{host_if} left behind");
    // The address went with the interface: nothing can bind it any more.
    assert!(std::net::UdpSocket::bind(front).is_err(), "{front} is still a local address");
    assert!(
        whep_e2e::wait_until(Duration::from_secs(5), || !whep_e2e::process_alive(pid)),
        "the process inside the namespace survived it"
    );
}
