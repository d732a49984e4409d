//! A server behind a masquerading router learns its public address from a real STUN server
//! (Debian's coturn, `--stun-only`) and advertises it (`--stun-server`): the set-up of a
//! server in Docker with `-p 3478:3478/udp`, or at home behind a port forward
//! ([`whep_e2e::nat::NatLab`]: the server and its FFmpeg in a namespace behind a router
//! namespace; coturn and the str0m viewer on the host outside; Chromium in a namespace
//! outside). Without `--stun-server` the answer names only the private address and loopback,
//! and the viewer outside does not connect; with it, the answer names the router's public
//! address, and str0m and Chromium play. With two shards each shard's socket learns its own
//! port; a STUN server that never answers is retried and warned about, and local viewers play.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use whep_e2e::nat::NatLab;
use whep_e2e::turn::Coturn;
use whep_e2e::viewer::Viewer;
use whep_e2e::{Server, chromium, udp_candidates};

/// The server inside the lab, its HTTP address set to the router's forwarded port.
/// Asserts that `viewer` connects and gets a keyframe, then closes it.
fn plays_then_leaves(viewer: Viewer, server: &mut Server) {
    assert!(
        viewer.wait_for(Duration::from_secs(15), |s| s.connected && s.keyframes >= 1),
        "{:?}\n{}",
        viewer.stats(),
        server.output()
    );
    viewer.close();
}

fn start_inside(lab: &NatLab, bin: &str, extra: &[&str]) -> Server {
    let http = format!("0.0.0.0:{}", whep_e2e::nat::HTTP_PORT);
    let udp = format!("0.0.0.0:{}", whep_e2e::nat::UDP_PORT);
    let mut server = Server::start_in(Some(&lab.inside), bin, &http, &udp, extra);
    server.http = lab.public_http();
    server
}

/// Without `--stun-server` a str0m viewer outside gets the private address and does not
/// connect; with it the server learns the router's public address from coturn, advertises
/// it, and the viewer plays.
fn str0m_viewer_needs_the_mapped_address(bin: &str) {
    let lab = NatLab::create().expect("namespaces and nftables (needs root)");
    let stun = Coturn::start_stun_only(lab.host).unwrap_or_else(|e| panic!("{e}"));
    let public = lab.public_udp().to_string();

    // Without discovery: loopback and the private address only.
    let mut server = start_inside(&lab, bin, &[]);
    let viewer = Viewer::connect(server.http, "/whep/demo", None)
        .unwrap_or_else(|e| panic!("{e:?}\n{}", server.output()));
    let offered = udp_candidates(viewer.answer());
    assert!(!offered.is_empty() && !offered.contains(&public), "{offered:?}");
    assert!(offered.contains(&format!("{}:3478", lab.private)), "{offered:?}");
    assert!(
        !viewer.wait_for(Duration::from_secs(6), |s| s.connected || s.video_packets > 0),
        "connected through the NAT to a private address? {:?}",
        viewer.stats()
    );
    viewer.close();
    assert!(server.terminate(Duration::from_secs(10)).is_some(), "{}", server.output());

    // With discovery.
    let stun_arg = stun.addr.to_string();
    let mut server = start_inside(&lab, bin, &["--stun-server", &stun_arg]);
    let learned = server.wait_line(Duration::from_secs(10), |l| {
        l.contains("STUN: the viewer socket is reached at")
    });
    assert!(
        learned.as_deref().is_some_and(|l| l.contains(&public)),
        "{learned:?}\n{}\ncoturn:\n{}",
        server.output(),
        stun.log()
    );
    let gauge = format!("whep_stun_mapped_address{{shard=\"0\",address=\"{public}\"}}");
    assert_eq!(server.metric(&gauge), Some(1.0), "{gauge}");
    assert_eq!(server.metric("whep_stun_failures_total"), Some(0.0));
    let viewer = Viewer::connect(server.http, "/whep/demo", None)
        .unwrap_or_else(|e| panic!("{e:?}\n{}", server.output()));
    let offered = udp_candidates(viewer.answer());
    assert!(offered.contains(&public), "{offered:?}");
    plays_then_leaves(viewer, &mut server);
}

/// Headless Chromium outside plays the demo from the server behind the router, through the
/// address the server learned from coturn.
fn chromium_plays_behind_nat(bin: &str) {
    let lab = NatLab::create().expect("namespaces and nftables (needs root)");
    let stun = Coturn::start_stun_only(lab.host).unwrap_or_else(|e| panic!("{e}"));
    let stun_arg = stun.addr.to_string();
    let mut server = start_inside(&lab, bin, &["--stun-server", &stun_arg]);
    assert!(
        server
            .wait_line(Duration::from_secs(10), |l| l.contains("STUN: the viewer socket is"))
            .is_some(),
        "{}",
        server.output()
    );
    let page = format!("http://{}/?stream=demo&test=1&frames=30&timeout=30", server.http);
    let verdict = chromium::run_page_in(Some(&lab.viewer), &page, Duration::from_secs(45))
        .verdict
        .unwrap_or_else(|e| panic!("{e}\nserver output:\n{}", server.output()));
    assert!(verdict.contains("[WHEP] PASS"), "{verdict}\nserver output:\n{}", server.output());
    let ms = chromium::number(&verdict, "firstFrameMs");
    assert!(ms.is_some_and(|ms| ms > 0.0), "firstFrameMs missing: {verdict}");
    eprintln!(
        "chromium behind NAT: firstFrameMs={} (POST to first decoded frame)",
        chromium::field(&verdict, "firstFrameMs").unwrap_or("?")
    );
}

/// A STUN server that never answers (a UDP socket the test reads): the requests come from the
/// viewer socket's own port, are retransmitted with one transaction id, the server warns that
/// viewers get its local candidates only, counts the failure, and a viewer on loopback plays.
fn silent_stun_server_is_warned_about(bin: &str) {
    let silent = UdpSocket::bind("127.0.0.1:0").expect("UDP socket");
    silent.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let at = silent.local_addr().expect("address").to_string();
    let mut server = Server::start(bin, &["--stun-server", &at]);
    let mut buf = [0u8; 1500];
    let mut tids = Vec::new();
    for _ in 0..2 {
        let (n, from) = silent.recv_from(&mut buf).expect("a binding request");
        assert_eq!(from.port(), server.udp.port(), "sent from the viewer socket");
        assert_eq!((n, &buf[..2], &buf[4..8]), (20, &[0, 1][..], &[0x21, 0x12, 0xa4, 0x42][..]));
        tids.push(buf[8..20].to_vec());
    }
    assert_eq!(tids[0], tids[1], "a retransmission keeps its transaction id");
    let warned = server.wait_line(Duration::from_secs(15), |l| {
        l.contains("WARN") && l.contains("did not answer") && l.contains("local candidates only")
    });
    assert!(warned.is_some(), "{}", server.output());
    assert_eq!(server.metric("whep_stun_failures_total"), Some(1.0));
    let viewer = Viewer::connect(server.http, "/whep/demo", None)
        .unwrap_or_else(|e| panic!("{e:?}\n{}", server.output()));
    plays_then_leaves(viewer, &mut server);
}

/// With two shards, each shard's socket (port 3478 + i) learns its own mapping, and a viewer
/// plays through whichever shard answers its POST.
fn each_shard_learns_its_own_mapping(bin: &str) {
    let lab = NatLab::create().expect("namespaces and nftables (needs root)");
    let stun = Coturn::start_stun_only(lab.host).unwrap_or_else(|e| panic!("{e}"));
    let stun_arg = stun.addr.to_string();
    let mut server = start_inside(&lab, bin, &["--stun-server", &stun_arg, "--shards", "2"]);
    let gauge = |i: u16| {
        let addr = SocketAddr::new(lab.public.into(), whep_e2e::nat::UDP_PORT + i);
        format!("whep_stun_mapped_address{{shard=\"{i}\",address=\"{addr}\"}}")
    };
    let both = whep_e2e::wait_until(Duration::from_secs(10), || {
        server.metric(&gauge(0)) == Some(1.0) && server.metric(&gauge(1)) == Some(1.0)
    });
    assert!(both, "{}\n{}", server.request("GET", "/metrics", &[], b"").text(), server.output());
    for _ in 0..2 {
        let viewer = Viewer::connect(server.http, "/whep/demo", None)
            .unwrap_or_else(|e| panic!("{e:?}\n{}", server.output()));
        let offered = udp_candidates(viewer.answer());
        assert!(
            (0..2).any(|i| offered.contains(&format!("{}:{}", lab.public, 3478 + i))),
            "{offered:?}"
        );
        plays_then_leaves(viewer, &mut server);
    }
}

whep_e2e::runtime_suite!(
    str0m_viewer_needs_the_mapped_address,
    silent_stun_server_is_warned_about,
    chromium_plays_behind_nat,
);

/// `--shards` is not in the blocking example.
mod sharded {
    use super::each_shard_learns_its_own_mapping;
    whep_e2e::runtime_suite!([tokio, smol] each_shard_learns_its_own_mapping);
}
