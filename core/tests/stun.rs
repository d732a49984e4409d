//! The viewer socket's public address learned from a STUN server ([`whep_core::stun`]), in the
//! simulation: the core sits behind a NAT that forwards its port ([`SimStun`]); viewers outside
//! reach it only at the mapped address, which new answers advertise once learned.

use std::net::SocketAddr;
use std::time::Duration;

use whep_core::sim::{self, SimStun, SimWorld};
use whep_core::stun::{self, BindingResult};
use whep_core::whep::Method;
use whep_core::{CoreConfig, StreamConfig, StreamId};

const SEC: Duration = Duration::from_secs(1);

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

fn stun_server() -> SocketAddr {
    addr("198.51.100.1:3478")
}

fn mapped() -> SocketAddr {
    addr("203.0.113.7:3478")
}

/// A world behind the NAT; the core asks the STUN server when `discover`.
fn world(discover: bool) -> (SimWorld, StreamId) {
    let stun_servers = if discover { vec![stun_server()] } else { Vec::new() };
    let mut w = SimWorld::new(CoreConfig { stun_servers, ..sim::config() });
    w.stun = Some(SimStun::new(stun_server(), mapped()));
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    (w, demo)
}

/// The UDP candidate addresses of an SDP answer or fragment.
fn candidates(sdp: &str) -> Vec<SocketAddr> {
    sdp.lines()
        .filter_map(|l| l.trim().strip_prefix("a=candidate:"))
        .filter(|l| l.split(' ').nth(2).is_some_and(|p| p.eq_ignore_ascii_case("udp")))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            format!("{}:{}", f.get(4)?, f.get(5)?).parse().ok()
        })
        .collect()
}

/// Whether viewer `v` connects and gets video within 5 s.
fn plays(w: &mut SimWorld, v: usize) -> bool {
    for _ in 0..50 {
        if w.viewers[v].connected && w.viewers[v].video_packets > 30 {
            return true;
        }
        w.run_for(SEC / 10);
    }
    false
}

#[test]
fn the_mapped_address_is_learned_and_advertised() {
    let (mut w, demo) = world(true);
    w.run_for(SEC);
    assert_eq!(w.core.stun_mapped(), Some(mapped()));
    assert_eq!(w.stun.as_ref().map(|s| s.requests), Some(1));
    let (v, r) = w.join(&demo);
    assert_eq!(r.code(), 201);
    let answer = w.viewers[v].answer.clone();
    assert_eq!(candidates(&answer), [sim::SERVER, mapped()], "{answer}");
    assert!(plays(&mut w, v), "the viewer outside plays through the NAT");
    let m = w.core.metrics();
    assert_eq!((m.stun_failures, m.stun_mapped_changes), (0, 0));
    // Asked again after the interval (30 s), the answer unchanged.
    w.run_for(31 * SEC);
    assert_eq!(w.stun.as_ref().map(|s| s.requests), Some(2));
    assert_eq!(w.core.metrics().stun_mapped_changes, 0);
}

#[test]
fn without_discovery_the_viewer_outside_cannot_connect() {
    let (mut w, demo) = world(false);
    w.run_for(SEC);
    assert_eq!(w.core.stun_mapped(), None);
    assert_eq!(w.stun.as_ref().map(|s| s.requests), Some(0), "nothing asked");
    let (v, r) = w.join(&demo);
    assert_eq!(r.code(), 201);
    assert_eq!(candidates(&w.viewers[v].answer), [sim::SERVER]);
    assert!(!plays(&mut w, v));
}

#[test]
fn a_changed_address_goes_to_new_sessions() {
    let (mut w, demo) = world(true);
    w.run_for(SEC);
    let (first, _) = w.join(&demo);
    assert!(plays(&mut w, first));
    let moved = addr("203.0.113.99:40000");
    if let Some(s) = &mut w.stun {
        s.mapped = moved;
    }
    w.run_for(31 * SEC);
    assert_eq!(w.core.stun_mapped(), Some(moved));
    assert_eq!(w.core.metrics().stun_mapped_changes, 1);
    let (second, _) = w.join(&demo);
    let answer = w.viewers[second].answer.clone();
    assert_eq!(candidates(&answer), [sim::SERVER, moved], "{answer}");
    assert!(plays(&mut w, second));
    // The first session's answer stays as it was.
    assert_eq!(candidates(&w.viewers[first].answer), [sim::SERVER, mapped()]);
}

#[test]
fn an_ice_restart_gets_the_address_learned_since() {
    let (mut w, demo) = world(true);
    if let Some(s) = &mut w.stun {
        // A viewer inside the NAT, and a STUN server that answers only later.
        s.server_reachable = true;
        s.answers = false;
    }
    let (v, _) = w.join(&demo);
    assert_eq!(candidates(&w.viewers[v].answer), [sim::SERVER]);
    assert!(plays(&mut w, v));
    if let Some(s) = &mut w.stun {
        s.answers = true;
    }
    w.run_for(10 * SEC);
    assert_eq!(w.core.stun_mapped(), Some(mapped()));
    let frag = w.viewer_ice_restart(v);
    let r = w.http(
        w.session_request(v, Method::Patch)
            .with_header("Content-Type", "application/trickle-ice-sdpfrag")
            .with_header("If-Match", "*")
            .with_body(frag),
    );
    assert_eq!(r.code(), 200, "{}", String::from_utf8_lossy(&r.body));
    let restart = String::from_utf8_lossy(&r.body).into_owned();
    assert!(candidates(&restart).contains(&mapped()), "{restart}");
}

#[test]
fn garbage_and_unsolicited_responses_are_ignored() {
    let (mut w, demo) = world(true);
    if let Some(s) = &mut w.stun {
        s.answers = false;
    }
    w.run_for(SEC / 10);
    let request = w.stun.as_ref().and_then(|s| s.last_request.clone()).expect("a request");
    let tid: stun::TransactionId = request[8..20].try_into().expect("a transaction id");
    let bogus = addr("192.0.2.66:6666");
    let dropped = w.core.metrics().datagrams_dropped;
    // Another transaction id, the right one from another address, garbage and a request from
    // the server's address: none is taken, each goes on as any datagram (dropped).
    w.datagram_raw(stun_server(), &stun::binding_success(&[7; 12], bogus));
    w.datagram_raw(addr("198.51.100.2:3478"), &stun::binding_success(&tid, bogus));
    w.datagram_raw(stun_server(), b"\x01\x01\x00\x08garbage garbage garbage");
    w.datagram_raw(stun_server(), &stun::binding_request(&tid));
    let mut truncated = stun::binding_success(&tid, bogus);
    truncated.pop();
    w.datagram_raw(stun_server(), &truncated);
    assert_eq!(w.core.stun_mapped(), None);
    assert_eq!(w.core.metrics().datagrams_dropped, dropped + 5);
    // The answer to the request in flight is taken, once.
    let good = stun::binding_success(&tid, mapped());
    assert!(matches!(
        stun::parse_response(&good).map(|r| r.result),
        Some(BindingResult::Mapped(_))
    ));
    w.datagram_raw(stun_server(), &good);
    assert_eq!(w.core.stun_mapped(), Some(mapped()));
    w.datagram_raw(stun_server(), &stun::binding_success(&tid, bogus));
    assert_eq!(w.core.stun_mapped(), Some(mapped()), "a replay changes nothing");
    assert_eq!(w.core.metrics().datagrams_dropped, dropped + 6);
    let (v, _) = w.join(&demo);
    assert_eq!(candidates(&w.viewers[v].answer), [sim::SERVER, mapped()]);
}

#[test]
fn a_silent_server_is_retried_and_viewers_get_the_local_candidates_meanwhile() {
    let (mut w, demo) = world(true);
    if let Some(s) = &mut w.stun {
        s.answers = false;
    }
    // Sent at 0, 0.5, 1.5 and 3.5 s; failed at 7.5 s.
    w.run_for(7 * SEC);
    assert_eq!(w.stun.as_ref().map(|s| s.requests), Some(4));
    assert_eq!(w.core.metrics().stun_failures, 0);
    w.run_for(SEC);
    assert_eq!(w.core.metrics().stun_failures, 1);
    let (v, r) = w.join(&demo);
    assert_eq!(r.code(), 201, "the server works without the mapped address");
    assert_eq!(candidates(&w.viewers[v].answer), [sim::SERVER]);
    // The next transaction 1 s after the failure, then 2 s after the next: the server answers.
    w.run_for(SEC);
    assert_eq!(w.stun.as_ref().map(|s| s.requests), Some(5));
    if let Some(s) = &mut w.stun {
        s.answers = true;
    }
    w.run_for(2 * SEC);
    assert_eq!(w.core.stun_mapped(), Some(mapped()));
    assert_eq!(w.core.metrics().stun_failures, 1);
    // Shutdown stops asking.
    w.core.shutdown(w.now);
    let asked = w.stun.as_ref().map(|s| s.requests);
    w.run_for(60 * SEC);
    assert_eq!(w.stun.as_ref().map(|s| s.requests), asked);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

    /// Any bytes, and any mutation of a real response: the parser never panics, and what it
    /// reads re-encodes to itself.
    #[test]
    fn the_parser_takes_any_bytes(
        raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..96),
        flips in proptest::collection::vec((0usize..64, proptest::prelude::any::<u8>()), 0..4),
        v6 in proptest::prelude::any::<bool>(),
    ) {
        let mapped = if v6 { addr("[2001:db8::7]:40000") } else { mapped() };
        let mut real = stun::binding_success(&[9; 12], mapped);
        for (i, x) in flips {
            let n = real.len();
            real[i % n] ^= x;
        }
        for data in [raw, real] {
            if let Some(r) = stun::parse_response(&data)
                && let BindingResult::Mapped(a) = r.result
            {
                proptest::prop_assert!(!a.ip().is_unspecified() && a.port() != 0);
                let again = stun::parse_response(&stun::binding_success(&r.tid, a));
                proptest::prop_assert_eq!(again.map(|x| x.result), Some(r.result));
            }
        }
    }
}
