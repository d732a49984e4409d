//! Simulation tests: the core with str0m viewers, a scripted FFmpeg and a virtual clock. The
//! harness checks the core's invariants after every step.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::format::Codec;
use whep_core::ffmpeg::Rendition;
use whep_core::sim::{self, Arrival, SimWorld};
use whep_core::whep::Method;
use whep_core::{
    CloseReason, Event, PrimePacing, StreamConfig, StreamId, StreamStatus, VideoCodec,
};

const SEC: Duration = Duration::from_secs(1);

fn supervised() -> StreamConfig {
    StreamConfig::supervised(vec![
        "-re".into(),
        "-f".into(),
        "lavfi".into(),
        "-i".into(),
        "testsrc2".into(),
    ])
}

fn left(w: &SimWorld, reason: CloseReason) -> usize {
    w.events
        .iter()
        .filter(|(_, e)| matches!(e, Event::ViewerLeft { reason: r, .. } if *r == reason))
        .count()
}

/// A world with one external stream and one viewer that has received more than `packets`
/// video packets.
fn playing(packets: u64) -> (SimWorld, StreamId, usize) {
    let mut w = SimWorld::new(sim::config());
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    let (v, r) = w.join(&demo);
    assert_eq!(r.code(), 201);
    w.drive_until(5 * SEC, |w| w.viewers[v].video_packets > packets);
    (w, demo, v)
}

/// Viewer `v` still receives video one second later.
fn assert_keeps_playing(w: &mut SimWorld, v: usize) {
    let before = w.viewers[v].video_packets;
    w.run_for(SEC);
    assert!(w.viewers[v].video_packets > before, "viewer {v} stopped receiving video");
}

/// Sequence numbers missing between the first and the last video packet viewer `v` received.
fn video_gaps(w: &SimWorld, v: usize) -> u64 {
    let seqs = &w.viewers[v].video_seqs;
    let (Some(first), Some(last)) = (seqs.first(), seqs.last()) else { return 0 };
    last - first + 1 - seqs.len() as u64
}

#[test]
fn one_viewer_receives_video_and_audio() {
    let mut w = SimWorld::new(sim::config());
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    let (v, resp) = w.join(&demo);
    assert_eq!(resp.code(), 201, "{}", String::from_utf8_lossy(&resp.body));
    w.drive_until(5 * SEC, |w| w.viewers[v].video_packets > 100 && w.viewers[v].audio_packets > 20);
    let viewer = &w.viewers[v];
    assert!(viewer.connected);
    assert_eq!(viewer.first_video_is_keyframe, Some(true), "video starts at a keyframe");
    assert!(viewer.first_video_seq.is_some_and(|s| s < 32_768), "first seq below 2^15");
    assert!(viewer.first_audio_seq.is_some_and(|s| s < 32_768));
    // No gaps: from the first received sequence number on, every packet arrived.
    assert_eq!(video_gaps(&w, v), 0, "video sequence numbers are contiguous");
    assert!(w.core.metrics().packets_forwarded > 120);
    assert!(w.events.iter().any(|(_, e)| matches!(e, Event::ViewerConnected { .. })));
}

fn fan_out(n: usize) {
    let mut w = SimWorld::new(sim::config());
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    let viewers: Vec<usize> = (0..n)
        .map(|_| {
            let (v, r) = w.join(&demo);
            assert_eq!(r.code(), 201);
            v
        })
        .collect();
    w.drive_until(10 * SEC, |w| {
        viewers
            .iter()
            .all(|&v| w.viewers[v].video_packets >= 60 && w.viewers[v].audio_packets >= 25)
    });
    assert_eq!(w.connected(&demo), n);
    for &v in &viewers {
        assert_eq!(w.viewers[v].first_video_is_keyframe, Some(true));
    }
}

#[test]
fn five_viewers_each_receive_video_and_audio() {
    fan_out(5);
}

#[test]
fn eight_viewers_each_receive_and_the_ninth_gets_503() {
    let mut w = SimWorld::new(sim::config());
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    let viewers: Vec<usize> = (0..8).map(|_| w.join(&demo).0).collect();
    let (_, ninth) = w.join(&demo);
    assert_eq!(ninth.code(), 503);
    assert!(ninth.header("retry-after").is_some());
    w.drive_until(10 * SEC, |w| {
        viewers
            .iter()
            .all(|&v| w.viewers[v].video_packets >= 60 && w.viewers[v].audio_packets >= 25)
    });
    assert_eq!(w.core.viewer_count(), 8);
}

#[test]
fn late_joiner_without_the_gop_cache_waits_for_the_next_keyframe() {
    let mut config = sim::config();
    config.gop_cache = false;
    let mut w = SimWorld::new(config);
    let demo = w.add_stream("demo", StreamConfig::external(), 60);
    w.run_for(SEC); // mid-GOP
    let (v, _) = w.join(&demo);
    w.drive_until(5 * SEC, |w| w.viewers[v].video_packets > 0);
    assert_eq!(w.viewers[v].first_video_is_keyframe, Some(true));
    assert!(w.viewers[v].audio_packets > 0, "audio started before video");
    assert_eq!(w.core.metrics().gop_primes, 0);
}

#[test]
fn late_joiner_starts_at_once_from_the_gop_cache_and_joins_live_without_a_seam() {
    let mut w = SimWorld::new(sim::config());
    // 60 frames at 30 fps: a keyframe every 2 s.
    let demo = w.add_stream("demo", StreamConfig::external(), 60);
    w.run_for(SEC); // mid-GOP
    let joined = w.now;
    let (v, _) = w.join(&demo);
    w.drive_until(5 * SEC, |w| w.viewers[v].video_packets > 0);
    let first = w.viewers[v].first_video_at.expect("video arrived");
    assert!(
        first - joined < Duration::from_millis(300),
        "first video {:?} after the POST: the cache was not used",
        first - joined
    );
    assert_eq!(w.viewers[v].first_video_is_keyframe, Some(true));
    assert_eq!(w.core.metrics().gop_primes, 1);
    // Into the next GOP and beyond: contiguous sequence numbers, timestamps never go back.
    w.run_for(3 * SEC);
    assert!(w.viewers[v].video_packets > 500, "{}", w.viewers[v].video_packets);
    assert_eq!(video_gaps(&w, v), 0, "the seam between cache and live lost packets");
    assert_eq!(w.viewers[v].video_ts_regressions, 0, "timestamps went backwards");
}

/// A world with a 2 s GOP (60 frames at 30 fps, the IDR 25 packets, P frames 7, about 268 kB/s
/// of video) whose cache is `into_gop` old, paced by `pacing`, and a viewer joining then that
/// records what it receives. Returns the world, the stream and the viewer.
fn paced_join(pacing: PrimePacing, into_gop: Duration) -> (SimWorld, StreamId, usize) {
    let mut config = sim::config();
    config.prime_pacing = Some(pacing);
    let mut w = SimWorld::new(config);
    let demo = w.add_stream("demo", StreamConfig::external(), 60);
    w.run_for(into_gop);
    let (v, r) = w.join(&demo);
    assert_eq!(r.code(), 201);
    w.viewers[v].record = true;
    (w, demo, v)
}

/// Drives until the viewer has video and its prime backlog is gone; returns the largest
/// backlog seen (checked after every step) and when it emptied.
fn drive_until_primed(w: &mut SimWorld, v: usize, max: Duration) -> (usize, Instant) {
    let mut most = 0;
    w.drive_until(max, |w| {
        most = most.max(w.core.prime_backlog());
        w.viewers[v].video_packets > 0 && w.core.prime_backlog() == 0
    });
    (most, w.now)
}

/// Checks that `arrivals` conform to a token bucket of `rate` bytes/s and `depth` bytes that
/// starts full: no interval carries more than `depth + rate × interval`.
fn assert_within_budget(arrivals: &[Arrival], rate: f64, depth: f64) {
    let Some(first) = arrivals.first() else { return };
    let (mut tokens, mut last) = (depth, first.at);
    for a in arrivals {
        tokens = (tokens + (a.at - last).as_secs_f64() * rate).min(depth);
        last = a.at;
        tokens -= a.bytes as f64;
        assert!(
            tokens >= -1.0,
            "over budget by {:.0} B at {:?} after the first packet (seq {})",
            -tokens,
            a.at - first.at,
            a.seq
        );
    }
}

#[test]
fn paced_prime_sends_the_keyframe_first_then_the_gop_within_the_budget_and_joins_live() {
    let pacing = PrimePacing { rate: 500_000, burst: 16 * 1024, max_pending: 2048 };
    // Joining 1.9 s into the GOP: about 420 packets (460 kB) cached.
    let (mut w, demo, v) = paced_join(pacing, Duration::from_millis(1900));
    let joined = w.now;
    let (_, drained) = drive_until_primed(&mut w, v, 5 * SEC);
    let arrivals = w.viewers[v].arrivals.clone();
    let first = arrivals.first().expect("video arrived");

    // The keyframe first, whole, at once, and well within 300 ms of the POST.
    assert!(first.keyframe_start, "video starts with the keyframe");
    assert!(first.at - joined < Duration::from_millis(300), "first video {:?}", first.at - joined);
    let keyframe: Vec<&Arrival> =
        arrivals.iter().take_while(|a| a.timestamp == first.timestamp).collect();
    assert_eq!(keyframe.len(), 25, "STAP-A (SPS, PPS) and the 24 IDR fragments lead");
    assert!(keyframe.iter().all(|a| a.at == first.at), "the keyframe is not paced");
    let keyframe_bytes: usize = keyframe.iter().map(|a| a.bytes).sum();
    assert!(keyframe_bytes as u64 > pacing.burst, "this keyframe is larger than the burst");

    // Then the rest of the GOP, and the live video queued behind it, within the budget: the
    // bucket's depth is the burst, or the keyframe when that is larger (it leaves regardless
    // and is repaid first). Live video after the backlog emptied is not paced.
    let paced: Vec<Arrival> =
        arrivals.iter().copied().filter(|a| a.at <= drained + w.latency).collect();
    assert_within_budget(
        &paced,
        pacing.rate as f64,
        keyframe_bytes.max(pacing.burst as usize) as f64,
    );
    let paced_bytes: usize = paced.iter().map(|a| a.bytes).sum();
    let took = (paced.last().expect("paced").at - first.at).as_secs_f64();
    // All but the burst at the rate (a keyframe beyond the burst is repaid first).
    let expect = (paced_bytes as u64 - pacing.burst) as f64 / pacing.rate as f64;
    assert!(took >= expect - 0.005, "{paced_bytes} B in {took:.3} s: faster than the rate");
    assert!(took <= expect + 0.02, "{paced_bytes} B in {took:.3} s: slower than the rate");

    // The seam: primed frames sit 1 ms (90 ticks) apart, live ones 33 ms (3000). The first
    // live frame came through the queue while the backlog drained, right after the last
    // primed packet: no gap, no reordering, timestamps forward.
    let seam = paced
        .windows(2)
        .position(|p| p[1].timestamp.wrapping_sub(p[0].timestamp) == 3000)
        .expect("live video was queued behind the primed GOP");
    assert_eq!(paced[seam + 1].seq, paced[seam].seq + 1);
    assert!(paced.len() > seam + 2, "live video queued behind the primed GOP");
    assert!(paced.windows(2).all(|p| p[1].seq == p[0].seq + 1), "paced packets in order");

    // Caught up: from then on the viewer gets each frame as the source sends it.
    w.run_for(SEC);
    let viewer = &w.viewers[v];
    assert_eq!(viewer.last_video_ts, Some(w.sources[&demo].last_video_ts()), "not caught up");
    assert_eq!(video_gaps(&w, v), 0, "the seam between cache and live lost packets");
    assert_eq!(viewer.video_ts_regressions, 0, "timestamps went backwards");
    assert_eq!(w.core.metrics().gop_primes, 1);
    assert_eq!(w.core.metrics().prime_backlogs_dropped, 0);
    eprintln!(
        "paced prime: keyframe ({keyframe_bytes} B) {:?} after the POST, {paced_bytes} B paced \
         over {took:.3} s (expected {expect:.3} s at {} B/s), caught up {:?} after the POST",
        first.at - joined,
        pacing.rate,
        drained - joined
    );
}

#[test]
fn paced_prime_backlog_is_bounded_and_a_viewer_that_falls_behind_restarts_at_a_keyframe() {
    // Slower than the stream itself (268 kB/s): the backlog can only grow.
    let pacing = PrimePacing { rate: 150_000, burst: 32 * 1024, max_pending: 400 };
    let (mut w, _, v) = paced_join(pacing, SEC);
    let mut most = 0;
    w.drive_until(5 * SEC, |w| {
        most = most.max(w.core.prime_backlog());
        w.core.metrics().prime_backlogs_dropped > 0
    });
    let dropped_at = w.now;
    assert_eq!(w.core.prime_backlog(), 0, "the backlog was dropped");
    assert!(most <= pacing.max_pending, "backlog reached {most}");
    assert!(most >= pacing.max_pending - 10, "backlog peaked at {most}, never near the cap");
    // Live from the next keyframe: no further drops, contiguous, forward.
    w.run_for(3 * SEC);
    let viewer = &w.viewers[v];
    // What was on the wire when the backlog was dropped arrives up to one latency later.
    let after: Vec<&Arrival> =
        viewer.arrivals.iter().filter(|a| a.at > dropped_at + w.latency).collect();
    assert!(after.len() > 300, "{} packets after the drop", after.len());
    assert!(after[0].keyframe_start, "video restarts at a keyframe");
    assert_eq!(w.core.metrics().prime_backlogs_dropped, 1);
    assert_eq!(w.core.prime_backlog(), 0);
    assert_eq!(video_gaps(&w, v), 0, "sequence numbers stay contiguous across the drop");
    assert_eq!(viewer.video_ts_regressions, 0, "timestamps went backwards");
    assert!(viewer.audio_packets > 150, "audio was never held back");
}

#[test]
fn unpaced_prime_sends_the_whole_cache_at_once() {
    let mut config = sim::config();
    config.prime_pacing = None;
    let mut w = SimWorld::new(config);
    let demo = w.add_stream("demo", StreamConfig::external(), 60);
    w.run_for(Duration::from_millis(1900));
    let (v, _) = w.join(&demo);
    w.viewers[v].record = true;
    w.drive_until(5 * SEC, |w| w.viewers[v].video_packets > 0);
    let arrivals = &w.viewers[v].arrivals;
    assert!(arrivals.len() > 400, "{} packets in the first instant", arrivals.len());
    assert!(arrivals.iter().all(|a| a.at == arrivals[0].at));
    assert_eq!(w.core.prime_backlog(), 0);
}

#[test]
fn stopping_a_stream_closes_viewers_first_then_releases_ports() {
    let mut w = SimWorld::new(sim::config());
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    let viewers: Vec<usize> = (0..5).map(|_| w.join(&demo).0).collect();
    w.drive_until(5 * SEC, |w| w.connected(&demo) == 5);
    assert_eq!(w.core.ports_in_use(), 1);
    let mark = w.events.len();
    w.core.stop_stream(&demo, w.now).unwrap_or_else(|e| panic!("{e}"));
    w.drain();
    assert_eq!(w.core.viewer_count(), 0);
    assert_eq!(w.core.ports_in_use(), 0);
    assert!(w.bound.is_empty(), "runtime told to release the ingest ports");
    let events = &w.events[mark..];
    let stopped = events.iter().position(|(_, e)| matches!(e, Event::StreamStopped { .. }));
    let last_left = events.iter().rposition(|(_, e)| matches!(e, Event::ViewerLeft { .. }));
    assert!(last_left < stopped, "viewers leave before the stream reports stopped");
    assert_eq!(left(&w, CloseReason::StreamStopped), 5);
    // The viewers saw the DTLS close.
    w.run_for(SEC);
    assert!(viewers.iter().all(|&v| w.viewers[v].closed));
    // POST now gets 404; starting again hands out a pair again.
    assert_eq!(w.join(&demo).1.code(), 404);
    w.core.start_stream(&demo, w.now).unwrap_or_else(|e| panic!("{e}"));
    w.drain();
    assert_eq!(w.core.ports_in_use(), 1);
    assert_eq!(w.core.stream(&demo).map(|s| s.state), Some(StreamStatus::Running));
}

#[test]
fn silent_viewer_is_reaped() {
    let mut w = SimWorld::new(sim::config());
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    let (a, _) = w.join(&demo);
    let (b, _) = w.join(&demo);
    w.drive_until(5 * SEC, |w| w.connected(&demo) == 2);
    w.viewers[a].silent = true;
    w.drive_until(40 * SEC, |w| w.core.viewer_count() == 1);
    assert!(w.viewers[b].video_packets > 0);
    let reaped = left(&w, CloseReason::Inactive) + left(&w, CloseReason::IceDisconnected);
    assert_eq!(reaped, 1);
    assert_keeps_playing(&mut w, b);
}

#[test]
fn viewer_that_never_connects_times_out() {
    let mut w = SimWorld::new(sim::config());
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    let (v, r) = w.join(&demo);
    assert_eq!(r.code(), 201);
    w.viewers[v].silent = true;
    w.run_for(w.core.config().connect_timeout + SEC);
    assert_eq!(w.core.viewer_count(), 0);
    assert_eq!(left(&w, CloseReason::ConnectTimeout), 1);
    assert_eq!(w.core.metrics().ice_failures, 1);
}

#[test]
fn delete_closes_the_viewer_and_it_sees_dtls_close() {
    let mut w = SimWorld::new(sim::config());
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    let (v, _) = w.join(&demo);
    w.drive_until(5 * SEC, |w| w.connected(&demo) == 1);
    assert_eq!(w.http(w.session_request(v, Method::Delete)).code(), 204);
    assert_eq!(w.http(w.session_request(v, Method::Delete)).code(), 204);
    assert_eq!(w.core.viewer_count(), 0);
    w.run_for(SEC);
    assert!(w.viewers[v].closed, "the viewer saw close_notify");
    assert_eq!(left(&w, CloseReason::Deleted), 1);
}

#[test]
fn ice_restart_keeps_media_flowing() {
    let (mut w, _, v) = playing(30);
    let etag = w.viewers[v].etag.clone().unwrap_or_default();
    let frag = w.viewer_ice_restart(v);
    let r = w.http(
        w.session_request(v, Method::Patch)
            .with_header("Content-Type", "application/trickle-ice-sdpfrag")
            .with_header("If-Match", "*")
            .with_body(frag),
    );
    assert_eq!(r.code(), 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("content-type"), Some("application/trickle-ice-sdpfrag"));
    let new_etag = r.header("etag").unwrap_or_default().to_owned();
    assert!(!new_etag.is_empty() && new_etag != etag, "a new ETag");
    let body = String::from_utf8_lossy(&r.body).into_owned();
    assert!(
        body.contains("a=ice-lite")
            && body.contains("a=ice-ufrag:")
            && body.contains("a=candidate:")
    );
    w.viewer_accept_restart(v, &body);
    let before = w.viewers[v].video_packets;
    w.drive_until(5 * SEC, |w| w.viewers[v].video_packets > before + 60);
    assert_eq!(w.core.viewer_count(), 1);
    // The old ETag no longer matches in strict mode; this world is lenient, so a stale
    // If-Match on a trickle PATCH still passes.
    let r = w.http(
        w.session_request(v, Method::Patch)
            .with_header("Content-Type", "application/trickle-ice-sdpfrag")
            .with_body("a=end-of-candidates\r\n"),
    );
    assert_eq!(r.code(), 204);
}

#[test]
fn lost_video_is_repaired_by_retransmission() {
    let (mut w, _, v) = playing(30);
    w.loss_every = 37;
    w.run_for(3 * SEC);
    w.loss_every = 0;
    w.run_for(SEC);
    assert!(w.lost > 10, "only {} datagrams lost", w.lost);
    let seqs = &w.viewers[v].video_seqs;
    let (Some(&first), Some(&last)) = (seqs.first(), seqs.last()) else {
        panic!("no video received");
    };
    let missing: Vec<u64> = (first..=last).filter(|s| !seqs.contains(s)).collect();
    assert!(missing.is_empty(), "not repaired: {missing:?}");
}

/// Video sequence numbers still missing 2 s after a viewer on an 80 ms round trip joined
/// mid-GOP while every fifth datagram to it was lost until 10 ms after it connected (50 ms
/// after the server did): fragments of the keyframe it starts with and of the cached GOP paced
/// behind it at 8 Mbit/s.
/// The prime's bucket is 16 KiB deep (the keyframe alone goes at once): the simulated player
/// (str0m) NACKs only within its last 100 packets, Chromium within 10 000.
fn primed_viewer_gaps(prime_cache: usize) -> (u64, u64) {
    let mut config = sim::config();
    config.rtx_cache_prime_packets = prime_cache;
    config.prime_pacing = Some(PrimePacing { burst: 16 * 1024, ..PrimePacing::default() });
    let mut w = SimWorld::new(config);
    w.latency = Duration::from_millis(40);
    let demo = w.add_stream("demo", StreamConfig::external(), 60);
    w.run_for(Duration::from_millis(1500));
    w.loss_every = 5;
    let (v, _) = w.join(&demo);
    w.drive_until(10 * SEC, |w| w.viewers[v].connected);
    w.run_for(Duration::from_millis(10));
    assert!(w.lost > 5, "only {} datagrams lost", w.lost);
    w.loss_every = 0;
    w.run_for(2 * SEC);
    assert_eq!(w.viewers[v].first_video_is_keyframe, Some(true));
    assert_eq!(w.core.metrics().gop_primes, 1);
    (video_gaps(&w, v), w.core.metrics().packets_retransmitted)
}

#[test]
fn lost_fragments_of_a_primed_keyframe_are_retransmitted() {
    // The steady 64-packet cache: the paced GOP pushes the keyframe out within ~40 ms, before
    // the NACKs come back.
    let (gaps, resent) = primed_viewer_gaps(whep_core::CoreConfig::default().rtx_cache_packets);
    assert!(gaps >= 5, "{gaps} packets missing: the test loses too little");
    assert_eq!(resent, 0, "a small cache still had them");
    // The prime's cache has every one of them. (The simulated player, a str0m receiver, still
    // misses 3 of the 9 although they were retransmitted after the loss had ended: its own
    // limits, not investigated further.)
    let (primed_gaps, resent) =
        primed_viewer_gaps(whep_core::CoreConfig::default().rtx_cache_prime_packets);
    assert!(resent >= gaps, "{resent} retransmitted for {gaps} lost");
    assert!(primed_gaps < gaps / 2, "{primed_gaps} of {gaps} still missing");
}

/// Share of the video bytes a viewer got as retransmissions, after 4 s of losing every third
/// datagram (and resending into the same loss), with `cap`.
fn retransmitted_share(cap: Option<f32>) -> (f64, whep_core::Metrics) {
    let mut config = sim::config();
    config.rtx_ratio_cap = cap;
    let mut w = SimWorld::new(config);
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    let (v, _) = w.join(&demo);
    w.drive_until(5 * SEC, |w| w.viewers[v].video_packets > 30);
    w.loss_every = 3;
    w.run_for(4 * SEC);
    let m = w.core.metrics().clone();
    let share = m.bytes_retransmitted as f64 / (m.bytes_forwarded + m.bytes_retransmitted) as f64;
    (share, m)
}

#[test]
fn retransmissions_are_capped_at_their_share_of_a_viewers_video() {
    let (uncapped, m) = retransmitted_share(None);
    assert!(uncapped > 0.25, "a third lost, no cap: only {uncapped:.3} retransmitted");
    assert_eq!((m.retransmissions_dropped, m.retransmission_suspensions), (0, 0));

    let (capped, m) = retransmitted_share(Some(0.15));
    // The cap counts datagram bytes (headers, RTX and SRTP overhead included) against the
    // same, this share payload bytes: allow for the difference and the first allowance.
    assert!(capped < 0.2, "capped at 15 %: {capped:.3} retransmitted");
    assert!(m.packets_retransmitted > 20, "{m:?}");
    assert!(m.retransmission_suspensions > 0 && m.retransmissions_dropped > 0, "{m:?}");
}

#[test]
fn trickled_candidates_are_accepted_and_media_flows() {
    let mut w = SimWorld::new(sim::config());
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    let (v, _) = w.join(&demo);
    let cand = format!(
        "a=candidate:1 1 udp 2122260223 {} {} typ host\r\n",
        w.viewers[v].addr.ip(),
        w.viewers[v].addr.port()
    );
    let r = w.http(
        w.session_request(v, Method::Patch)
            .with_header("Content-Type", "application/trickle-ice-sdpfrag")
            .with_body(format!("a=mid:0\r\n{cand}a=end-of-candidates\r\n")),
    );
    assert_eq!(r.code(), 204);
    w.drive_until(5 * SEC, |w| w.viewers[v].video_packets > 30);
}

#[test]
fn supervised_stream_spawns_ffmpeg_with_the_output_legs() {
    let mut w = SimWorld::new(sim::config());
    let demo = w.add_stream("demo", supervised(), 30);
    let p = w.procs.get(&demo).cloned().unwrap_or_else(|| panic!("spawned"));
    let ports = w.bound[&demo];
    assert_eq!(&p.args[..3], ["-hide_banner", "-nostdin", "-loglevel"]);
    assert!(p.args.contains(&"testsrc2".to_owned()));
    let leg = |port: u16, from: u16| {
        format!("udp://127.0.0.1:{port}?pkt_size=1200&localaddr=127.0.0.1&localport={from}")
    };
    let video = leg(ports.video, ports.video_source());
    let audio = leg(ports.audio(), ports.audio_source());
    assert!(p.args.contains(&video) && p.args.last() == Some(&audio), "{:?}", p.args);
    assert_eq!(w.core.stream(&demo).and_then(|s| s.pid), Some(p.pid));
    let (v, _) = w.join(&demo);
    w.drive_until(5 * SEC, |w| w.viewers[v].video_packets > 30);
}

#[test]
fn external_stream_hands_out_arguments() {
    let mut w = SimWorld::new(sim::config());
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    let ready = w.events.iter().find_map(|(_, e)| match e {
        Event::StreamReady { args, ports, .. } => Some((args.clone(), *ports)),
        _ => None,
    });
    let (args, ports) = ready.unwrap_or_else(|| panic!("StreamReady"));
    let legs = whep_core::ffmpeg::split_legs(&args).unwrap_or_else(|| panic!("two legs"));
    let leg = |port: u16| {
        let from = port + 2;
        format!("udp://127.0.0.1:{port}?pkt_size=1200&localaddr=127.0.0.1&localport={from}")
    };
    assert_eq!(legs[0].address, leg(ports.video));
    assert_eq!(legs[1].address, leg(ports.video + 1));
    assert!(w.procs.is_empty(), "no process spawned for an external feed");
    assert_eq!(w.core.stream(&demo).map(|s| s.supervised), Some(false));
}

#[test]
fn ffmpeg_crash_closes_viewers_releases_ports_and_restarts() {
    let mut w = SimWorld::new(sim::config());
    let demo = w.add_stream("demo", supervised(), 30);
    let first_ports = w.bound[&demo];
    let (a, _) = w.join(&demo);
    let (b, _) = w.join(&demo);
    w.drive_until(5 * SEC, |w| w.connected(&demo) == 2);
    w.crash_process(&demo);
    assert_eq!(w.core.viewer_count(), 0, "viewers closed");
    assert_eq!(w.core.ports_in_use(), 0, "ports released");
    assert!(w.bound.is_empty());
    assert_eq!(left(&w, CloseReason::StreamRestarting), 2);
    assert_eq!(w.core.stream(&demo).map(|s| s.state), Some(StreamStatus::Backoff));
    // Restart after the backoff; a new viewer plays again.
    w.drive_until(5 * SEC, |w| w.procs.contains_key(&demo));
    assert_eq!(w.spawns, 2);
    assert_eq!(w.core.metrics().process_restarts, 1);
    assert_ne!(w.bound[&demo], first_ports, "a just-released pair is not reused at once");
    let (c, r) = w.join(&demo);
    assert_eq!(r.code(), 201);
    w.drive_until(5 * SEC, |w| w.viewers[c].video_packets > 30);
    let _ = (a, b);
}

#[test]
fn repeated_crashes_back_off_exponentially() {
    let mut w = SimWorld::new(sim::config());
    let demo = w.add_stream("demo", supervised(), 30);
    let mut delays = Vec::new();
    for _ in 0..4 {
        w.crash_process(&demo);
        let d = w.events.iter().rev().find_map(|(_, e)| match e {
            Event::ProcessExited { restart_in, .. } => *restart_in,
            _ => None,
        });
        delays.push(d.unwrap_or_default());
        w.drive_until(60 * SEC, |w| w.procs.contains_key(&demo));
    }
    assert_eq!(delays, [500, 1000, 2000, 4000].map(Duration::from_millis));
}

#[test]
fn missing_ffmpeg_is_reported_and_retried() {
    let mut w = SimWorld::new(sim::config());
    w.spawn_fails = true;
    let demo = w.add_stream("demo", supervised(), 30);
    let failed = w.events.iter().find_map(|(_, e)| match e {
        Event::StreamFailed { reason, retry_in, .. } => Some((reason.clone(), *retry_in)),
        _ => None,
    });
    let (reason, retry) = failed.unwrap_or_else(|| panic!("StreamFailed"));
    assert!(reason.contains("not found on PATH"), "{reason}");
    assert!(retry.is_some());
    assert_eq!(w.core.ports_in_use(), 0);
    w.spawn_fails = false;
    w.drive_until(5 * SEC, |w| w.procs.contains_key(&demo));
}

#[test]
fn stale_ffmpeg_is_restarted() {
    let mut w = SimWorld::new(sim::config());
    let demo = w.add_stream("demo", supervised(), 30);
    w.run_for(SEC);
    // The process keeps running but sends nothing.
    w.sources.remove(&demo);
    let stale = w.core.config().process.stale_timeout;
    w.drive_until(stale + 5 * SEC, |w| {
        w.events.iter().any(|(_, e)| matches!(e, Event::StreamStale { .. }))
    });
    w.drive_until(5 * SEC, |w| w.spawns == 2);
}

#[test]
fn ffmpeg_that_ignores_sigterm_is_killed() {
    let mut w = SimWorld::new(sim::config());
    w.exit_on_term = false;
    let demo = w.add_stream("demo", supervised(), 30);
    w.core.stop_stream(&demo, w.now).unwrap_or_else(|e| panic!("{e}"));
    w.drain();
    assert_eq!(w.core.stream(&demo).map(|s| s.state), Some(StreamStatus::Stopping));
    assert_eq!(w.core.ports_in_use(), 1, "ports stay until the process is gone");
    w.run_for(w.core.config().process.stop_grace + SEC);
    assert_eq!(w.kills, 1);
    assert_eq!(w.core.stream(&demo).map(|s| s.state), Some(StreamStatus::Stopped));
    assert_eq!(w.core.ports_in_use(), 0);
    assert!(w.procs.is_empty());
}

#[test]
fn bind_failure_moves_to_another_pair() {
    let mut w = SimWorld::new(sim::config());
    w.fail_bind.extend([40_000, 40_003]);
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    let block = whep_core::ports::PortPool::block(w.core.config().max_renditions);
    assert_eq!(w.bound[&demo].video, 40_000 + block);
    let (v, _) = w.join(&demo);
    w.drive_until(5 * SEC, |w| w.viewers[v].video_packets > 10);
}

#[test]
fn removing_a_stream_forgets_it() {
    let mut w = SimWorld::new(sim::config());
    let demo = w.add_stream("demo", supervised(), 30);
    let (_, r) = w.join(&demo);
    assert_eq!(r.code(), 201);
    w.core.remove_stream(&demo, w.now).unwrap_or_else(|e| panic!("{e}"));
    w.drain();
    assert!(w.core.stream(&demo).is_none());
    assert!(w.core.is_idle());
    assert!(w.procs.is_empty() && w.bound.is_empty());
}

#[test]
fn shutdown_leaves_nothing_behind() {
    let mut w = SimWorld::new(sim::config());
    let a = w.add_stream("a", supervised(), 30);
    let b = w.add_stream("b", StreamConfig::external(), 30);
    for s in [&a, &b, &a] {
        assert_eq!(w.join(s).1.code(), 201);
    }
    w.drive_until(5 * SEC, |w| w.connected(&a) == 2 && w.connected(&b) == 1);
    w.core.shutdown(w.now);
    w.drain();
    assert!(w.core.is_idle());
    assert!(w.procs.is_empty() && w.bound.is_empty());
    assert_eq!(left(&w, CloseReason::Shutdown), 3);
}

#[test]
fn garbage_on_ingest_and_viewer_socket_is_dropped() {
    let (mut w, demo, v) = playing(10);
    let port = w.bound[&demo].video;
    let rtcp_sr =
        [0x80, 200, 0, 6, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let junk: [&[u8]; 6] = [
        &[],
        &[0x80],
        &[0x40; 40],
        &rtcp_sr,
        &[0x80, 96, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1],
        &[0xff; 1500],
    ];
    for j in junk {
        w.ingest_raw(port, j);
        w.ingest_raw(1, j);
        w.datagram_raw("203.0.113.9:999".parse().unwrap_or_else(|_| unreachable!()), j);
        w.datagram_raw(w.viewers[v].addr, j);
    }
    let m = w.core.metrics();
    assert_eq!(m.ingest_rtcp, 1);
    assert!(m.ingest_dropped >= 9, "{m:?}");
    assert!(m.datagrams_dropped >= 6, "{m:?}");
    assert_keeps_playing(&mut w, v);
}

#[test]
fn source_restart_rebases_and_regates_video() {
    let (mut w, demo, v) = playing(40);
    // FFmpeg restarted behind our back: new SSRC, sequence numbers elsewhere.
    if let Some(s) = w.sources.get_mut(&demo) {
        *s = sim::Source::new(30, 0x2222_0000);
    }
    let before = w.viewers[v].video_packets;
    w.drive_until(5 * SEC, |w| w.viewers[v].video_packets > before + 60);
    assert!(
        video_gaps(&w, v) <= 2,
        "the viewer's sequence stays (nearly) contiguous across the restart"
    );
}

#[test]
fn keyframe_requests_are_counted() {
    let (mut w, _, v) = playing(10);
    w.viewer_request_keyframe(v);
    w.drive_until(2 * SEC, |w| w.core.metrics().keyframe_requests >= 1);
    assert!(w.events.iter().any(|(_, e)| matches!(e, Event::KeyframeRequested { .. })));
}

#[test]
fn stream_management_errors() {
    let mut w = SimWorld::new(sim::config());
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    assert!(w.core.add_stream(demo.clone(), StreamConfig::external()).is_err());
    assert!(w.core.start_stream(&demo, w.now).is_err(), "already started");
    let nope = StreamId::new("nope").unwrap_or_else(|| unreachable!());
    assert!(w.core.stop_stream(&nope, w.now).is_err());
    let mut bad = StreamConfig::external();
    bad.egress.video_map = "-evil".into();
    assert!(w.core.add_stream(nope, bad).is_err());
}

#[test]
fn port_exhaustion_is_an_error_not_a_panic() {
    let mut config = sim::config();
    // Two streams' blocks.
    let block = whep_core::ports::PortPool::block(config.max_renditions);
    config.ingest_ports = 40_000..=40_000 + 2 * block - 1;
    let mut w = SimWorld::new(config);
    w.add_stream("a", StreamConfig::external(), 30);
    w.add_stream("b", StreamConfig::external(), 30);
    let c = StreamId::new("c").unwrap_or_else(|| unreachable!());
    w.core.add_stream(c.clone(), StreamConfig::external()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(w.core.start_stream(&c, w.now), Err(whep_core::StreamError::NoPorts));
}

#[test]
fn oversized_ingest_packets_are_dropped_not_forwarded() {
    // Found by the `ingest` fuzz target: str0m panics on a payload that does not fit its
    // datagram buffer, so one large datagram on an ingest port used to crash the server.
    let (mut w, demo, v) = playing(30);
    let ports = w.bound[&demo];
    let rtp = |pt: u8, ssrc: u32, first: u8, len: usize| {
        let mut d = vec![0x80, pt, 0x12, 0x34, 0, 0, 0x10, 0];
        d.extend_from_slice(&ssrc.to_be_bytes());
        d.push(first);
        d.resize(12 + len, 0x5a);
        d
    };
    let big = whep_core::rtp::MAX_PAYLOAD + 1;
    let (dropped, forwarded) =
        (w.core.metrics().ingest_dropped, w.core.metrics().packets_forwarded);
    w.ingest_raw(ports.audio(), &rtp(111, 0x1111_0001, 0xfc, big));
    w.ingest_raw(ports.video, &rtp(96, 0x1111_0000, 0x67, big));
    w.ingest_raw(ports.audio(), &rtp(111, 0x1111_0001, 0xfc, 2100));
    assert_eq!(w.core.metrics().ingest_dropped, dropped + 3);
    assert_eq!(w.core.metrics().packets_forwarded, forwarded, "nothing oversized forwarded");
    w.ingest_raw(ports.audio(), &rtp(111, 0x1111_0001, 0xfc, whep_core::rtp::MAX_PAYLOAD));
    assert_eq!(w.core.metrics().packets_forwarded, forwarded + 1, "the largest allowed payload");
    assert_eq!(w.core.viewer_count(), 1);
    assert_keeps_playing(&mut w, v);
}

/// A batch of packets handed to the core before its outputs are drained (what a runtime does
/// with the packets it read in one wake-up) reaches every viewer whole and in order, also a
/// batch longer than a peer holds back before flushing on its own.
#[test]
fn a_batch_is_written_a_few_viewers_at_a_time_as_outputs_are_taken() {
    let n = 40;
    let (mut w, _, ports) = SimWorld::with_connected_viewers(n);
    let before: Vec<u64> = w.viewers.iter().map(|v| v.video_packets).collect();
    let forwarded = |w: &SimWorld| w.core.metrics().packets_forwarded;
    let base = forwarded(&w);
    let mut source = sim::Source::new(60, 0x0bad_cafe);
    let frame = source.video_frame();
    let total = (n * frame.len()) as u64;
    for pkt in &frame {
        w.core.handle_input(sim::from_ffmpeg(ports.video, pkt), w.now);
    }
    assert_eq!(forwarded(&w), base, "written before outputs were taken");
    // The first output: only the first few viewers have been written.
    assert!(matches!(w.core.poll_output(), Some(whep_core::Output::Transmit(_))));
    let first = forwarded(&w) - base;
    assert!(first > 0 && first < total / 4, "{first} of {total} written for one output");
    // Any other input finishes the batch first.
    w.core.handle_timeout(w.now);
    assert_eq!(forwarded(&w) - base, total);
    w.drain();
    w.run_for(Duration::from_millis(50));
    for (i, v) in w.viewers.iter().enumerate() {
        assert!(
            v.video_packets - before[i] >= frame.len() as u64 - 1,
            "viewer {i} missed the frame"
        );
    }
}

#[test]
fn a_batch_of_ingest_packets_reaches_every_viewer_whole() {
    let (mut w, _, ports) = SimWorld::with_connected_viewers(3);
    let before: Vec<u64> = w.viewers.iter().map(|v| v.video_packets).collect();
    let mut source = sim::Source::new(60, 0x0bad_cafe);
    let mut fed = 0u64;
    // Keyframes are long: several frames of one batch exceed the flush threshold (16); 150
    // packets exceed what the core holds back before writing (64). A timer in the middle of
    // the third batch must not reorder or lose what came before it.
    for (round, size) in [40, 150, 40].into_iter().enumerate() {
        let mut batch = Vec::new();
        while batch.len() < size {
            batch.extend(source.video_frame());
        }
        for (i, pkt) in batch.iter().enumerate() {
            w.core.handle_input(sim::from_ffmpeg(ports.video, pkt), w.now);
            if round == 2 && i == 20 {
                w.core.handle_timeout(w.now);
            }
        }
        fed += batch.len() as u64;
        w.drain();
        w.run_for(Duration::from_millis(50));
    }
    for (i, v) in w.viewers.iter().enumerate() {
        assert_eq!(v.video_packets - before[i], fed, "viewer {i} lost packets of a batch");
        let seqs: Vec<u64> = v.video_seqs.iter().copied().collect();
        assert!(seqs.windows(2).all(|p| p[1] == p[0] + 1), "viewer {i}: gaps");
    }
}

/// A sharded leader stamps the packets it mirrors to the other shards with their arrival on
/// the ingest port, as the runtime reported it (`Input::Ingest::arrived`), so that a follower's
/// egress latency includes the time the packet waited in the leader's socket; without it, or
/// with a time after `now`, the stamp is `now`.
#[test]
#[allow(clippy::disallowed_methods)] // the shard set's limiter needs a start before the world
fn a_leader_stamps_mirrored_packets_with_their_arrival() {
    use whep_core::shard::{Mirror, ShardMember};
    use whep_core::{Input, Output, RateLimits};
    use whep_server::shard::ShardSet;
    let config = sim::config();
    let now = Instant::now();
    let set = ShardSet::new(2, RateLimits::unlimited(), now);
    let mut w = SimWorld::in_shard(config, ShardMember { index: 0, set });
    let id = w.add_stream("s", StreamConfig::external(), 60);
    w.run_for(Duration::from_millis(200));
    let ports = w.bound[&id];
    let mut source = sim::Source::new(60, 0x5eed);
    let frame = source.video_frame();
    let stamp = |w: &mut SimWorld, arrived: Option<Instant>, pkt: &[u8]| {
        let source = sim::ffmpeg_source(ports.video);
        let input = Input::Ingest { port: ports.video, source, contents: pkt, arrived };
        w.core.handle_input(input, w.now);
        let mut stamps = Vec::new();
        while let Some(out) = w.core.poll_output() {
            if let Output::Mirror(Mirror::Packet(p)) = out {
                stamps.push(p.read_at());
            }
        }
        stamps
    };
    let earlier = w.now - Duration::from_millis(5);
    assert_eq!(stamp(&mut w, Some(earlier), &frame[0]), [earlier]);
    let now = w.now;
    assert_eq!(stamp(&mut w, None, &frame[1]), [now]);
    assert_eq!(stamp(&mut w, Some(now + Duration::from_secs(1)), &frame[2]), [now]);
}

fn ip(s: &str) -> std::net::IpAddr {
    s.parse().expect("an IP address")
}

/// A POST of Chromium 156's offer from `client`, with `extra` lines added to its video section.
fn post_from(w: &mut SimWorld, stream: &StreamId, client: std::net::IpAddr, extra: &str) -> u16 {
    let offer = include_str!("data/chromium-156-offer.sdp");
    let offer = offer.replacen("a=mid:0\r\n", &format!("a=mid:0\r\n{extra}"), 1);
    let req = whep_core::whep::WhepRequest::new(Method::Post, format!("/whep/{stream}"))
        .with_client(client)
        .with_header("Content-Type", "application/sdp")
        .with_body(offer);
    w.http(req).code()
}

#[test]
fn a_session_that_sends_no_ice_check_is_closed_early_and_a_slow_viewer_still_connects() {
    let mut w = SimWorld::new(sim::config());
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    let first_check = w.core.config().first_check_timeout;
    assert!(first_check < w.core.config().connect_timeout);
    // A POST from a player that never starts ICE.
    assert_eq!(post_from(&mut w, &demo, ip("192.0.2.9"), ""), 201);
    w.run_for(first_check - SEC);
    assert_eq!(w.core.viewer_count(), 1);
    w.run_for(2 * SEC);
    assert_eq!(w.core.viewer_count(), 0, "a session without a check holds its seat");
    assert_eq!(left(&w, CloseReason::ConnectTimeout), 1);
    assert_eq!(w.core.metrics().unchecked_sessions, 1);

    // A 300 ms round trip (and a DTLS handshake of several) still connects: the first check
    // gives the session the whole connect timeout.
    w.latency = Duration::from_millis(150);
    let (v, r) = w.join(&demo);
    assert_eq!(r.code(), 201);
    w.drive_until(first_check * 3, |w| w.viewers[v].video_packets > 30);
    assert!(w.viewers[v].video_packets > 30, "the slow viewer did not play");
    assert_eq!(w.core.metrics().unchecked_sessions, 1);
}

#[test]
fn one_client_holds_a_few_unconnected_sessions_at_most() {
    let mut w = SimWorld::new(sim::config());
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    let cap = w.core.config().max_unconnected_per_client;
    // IPv6 clients count by their /64.
    let squatters = ["2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff::9"];
    let codes: Vec<u16> =
        (0..cap + 2).map(|i| post_from(&mut w, &demo, ip(squatters[i % 3]), "")).collect();
    assert_eq!(codes.iter().filter(|c| **c == 201).count(), cap, "{codes:?}");
    assert_eq!(codes.iter().filter(|c| **c == 429).count(), 2, "{codes:?}");
    let refused = w.core.metrics().rejections.get("too_many_unconnected").copied();
    assert_eq!(refused, Some(2));
    // Another address is not affected: the stream (cap 8) still has seats.
    assert_eq!(post_from(&mut w, &demo, ip("2001:db8:1:3::1"), ""), 201);
    // None of them sends a check: reaped after the first-check timeout, then welcome again.
    w.run_for(w.core.config().first_check_timeout + SEC);
    assert_eq!(w.core.viewer_count(), 0);
    assert_eq!(w.core.metrics().unchecked_sessions, cap as u64 + 1);
    assert_eq!(post_from(&mut w, &demo, ip(squatters[0]), ""), 201);
}

#[test]
fn remote_candidates_per_session_are_bounded() {
    let mut w = SimWorld::new(sim::config());
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    let cap = w.core.config().max_remote_candidates;
    let cand = |i: usize| {
        format!("a=candidate:{i} 1 udp 2122260223 10.9.{}.{} 9 typ host\r\n", i / 250, i % 250 + 1)
    };
    let client = ip("192.0.2.50");
    // An offer with more than a session may hold is refused before any work.
    let many: String = (0..=cap).map(cand).collect();
    assert_eq!(post_from(&mut w, &demo, client, &many), 422);
    let fits: String = (0..cap - 2).map(cand).collect();
    assert_eq!(post_from(&mut w, &demo, client, &fits), 201);

    let (v, _) = w.join(&demo);
    w.drive_until(5 * SEC, |w| w.viewers[v].video_packets > 30);
    let patch = |w: &mut SimWorld, body: String| {
        let req = w
            .session_request(v, Method::Patch)
            .with_header("Content-Type", "application/trickle-ice-sdpfrag")
            .with_body(body);
        w.http(req)
    };
    // A PATCH with more than the whole bound is refused, whatever the session holds.
    let r = patch(&mut w, format!("a=mid:0\r\n{}", (0..=cap).map(cand).collect::<String>()));
    assert_eq!(r.code(), 422);
    assert!(String::from_utf8_lossy(&r.body).contains(&format!("at most {cap}")));
    // One at a time up to the bound (the offer had one), then refused, and nothing of a refused
    // PATCH applies.
    for i in 0..cap - 1 {
        assert_eq!(patch(&mut w, format!("a=mid:0\r\n{}", cand(1000 + i))).code(), 204, "{i}");
    }
    assert_eq!(patch(&mut w, format!("a=mid:0\r\n{}", cand(2000))).code(), 422);
    let refused = w.core.metrics().rejections.get("too_many_candidates").copied();
    assert_eq!(refused, Some(3));
    // An ICE restart starts the count again.
    let frag = w.viewer_ice_restart(v);
    let r = patch(&mut w, frag);
    assert_eq!(r.code(), 200, "{}", String::from_utf8_lossy(&r.body));
    let frag = String::from_utf8_lossy(&r.body).into_owned();
    w.viewer_accept_restart(v, &frag);
    assert_eq!(patch(&mut w, format!("a=mid:0\r\n{}", cand(3000))).code(), 204);
    assert_keeps_playing(&mut w, v);
}

#[test]
fn checks_from_more_source_addresses_than_a_session_may_have_are_dropped() {
    let (mut w, _demo, v) = playing(30);
    let cap = w.core.config().max_viewer_addresses;
    let ufrag = w.viewers[v].rtc.direct_api().local_ice_credentials().ufrag;
    let answer = w.viewers[v].answer.clone();
    let spoofed = 200u16;
    for port in 0..spoofed {
        let check = sim::binding_request(&answer, &ufrag, u64::from(port));
        w.datagram_raw(SocketAddr::from(([10, 77, 0, 1], 20_000 + port)), &check);
    }
    // The viewer's own address is one; the rest of the bound went to the first spoofed ones.
    let refused = w.core.metrics().addresses_refused;
    assert_eq!(refused, u64::from(spoofed) - (cap as u64 - 1));
    assert_keeps_playing(&mut w, v);
}

/// An IDR-starting H264 RTP packet of SSRC `ssrc`, as another process could send it.
fn injected(seq: u16, ssrc: u32) -> Vec<u8> {
    let mut p = vec![0x80, 96];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&u32::from(seq).wrapping_mul(3000).to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend_from_slice(&[0x65; 200]);
    p
}

#[test]
fn a_supervised_streams_ingest_takes_datagrams_from_its_ffmpeg_alone() {
    let mut w = SimWorld::new(sim::config());
    let demo = w.add_stream("demo", supervised(), 30);
    w.run_for(Duration::from_millis(100));
    let (v, _) = w.join(&demo);
    w.drive_until(5 * SEC, |w| w.viewers[v].video_packets > 30);
    let ports = w.bound[&demo];
    let forwarded = w.core.metrics().packets_forwarded;
    // Another local process, and one that guessed FFmpeg's port on another address.
    let intruders = [
        SocketAddr::from(([127, 0, 0, 1], 50_000)),
        SocketAddr::from(([192, 0, 2, 7], ports.video_source())),
    ];
    for seq in 0..100u16 {
        w.ingest_from(intruders[usize::from(seq % 2)], ports.video, &injected(seq, 0xbad));
    }
    w.ingest_from(intruders[0], ports.audio(), &injected(0, 0xbad));
    assert_eq!(w.core.metrics().ingest_rejected, 101);
    assert_eq!(w.core.metrics().packets_forwarded, forwarded, "an injected packet was forwarded");
    assert_keeps_playing(&mut w, v);
    assert_eq!(video_gaps(&w, v), 0);
}

#[test]
fn an_external_feed_takes_its_first_sender_until_that_one_falls_silent() {
    let mut w = SimWorld::new(sim::config());
    let ext = w.add_stream("ext", StreamConfig::external(), 30);
    let (v, _) = w.join(&ext);
    w.drive_until(5 * SEC, |w| w.viewers[v].video_packets > 30);
    let ports = w.bound[&ext];
    let other = SocketAddr::from(([127, 0, 0, 1], 50_001));
    for seq in 0..10u16 {
        w.ingest_from(other, ports.video, &injected(seq, 0xbad));
    }
    assert_eq!(w.core.metrics().ingest_rejected, 10);
    // The feed stops (the application's FFmpeg restarts from another port): after a short
    // silence the new sender is taken, and only it.
    w.sources.remove(&ext);
    w.run_for(3 * SEC);
    let received = w.viewers[v].video_packets;
    for seq in 0..10u16 {
        w.ingest_from(other, ports.video, &injected(seq, 0x600d));
    }
    w.ingest_from(sim::ffmpeg_source(ports.video), ports.video, &injected(11, 0xbad));
    assert_eq!(w.core.metrics().ingest_rejected, 11);
    w.run_for(Duration::from_millis(200));
    assert!(w.viewers[v].video_packets > received, "the new sender's video did not play");
}

/// A leader and a follower shard of one server, the leader's mirror output handed to the
/// follower as the driver does.
#[allow(clippy::disallowed_methods)] // the shard set's limiter needs a start before the worlds
fn two_shards() -> (SimWorld, SimWorld) {
    use whep_core::RateLimits;
    use whep_core::shard::ShardMember;
    use whep_server::shard::ShardSet;
    let set = ShardSet::new(2, RateLimits::unlimited(), Instant::now());
    let shard =
        |index: u8| SimWorld::in_shard(sim::config(), ShardMember { index, set: set.clone() });
    (shard(0), shard(1))
}

/// Runs both shards for `d`, in steps, the leader's mirror messages delivered in between.
fn run_shards(leader: &mut SimWorld, follower: &mut SimWorld, d: Duration) {
    let step = Duration::from_millis(20);
    for _ in 0..(d.as_millis() / step.as_millis()).max(1) {
        leader.run_for(step);
        pump(leader, follower);
        follower.run_for(step);
    }
}

fn pump(leader: &mut SimWorld, follower: &mut SimWorld) {
    for m in std::mem::take(&mut leader.mirrors) {
        follower.core.mirror(m, follower.now);
        follower.drain();
    }
}

/// Every shard behaves as one when the leader's FFmpeg dies: the viewers of each are closed
/// (the stream restarts), and those that come back play again.
#[test]
fn an_ffmpeg_crash_closes_the_viewers_of_every_shard() {
    let (mut l, mut f) = two_shards();
    let id = l.add_stream("s", supervised(), 30);
    run_shards(&mut l, &mut f, Duration::from_millis(200));
    let (a, _) = l.join(&id);
    let (b, r) = f.join(&id);
    assert_eq!(r.code(), 201, "{}", String::from_utf8_lossy(&r.body));
    run_shards(&mut l, &mut f, 2 * SEC);
    assert!(l.viewers[a].video_packets > 30 && f.viewers[b].video_packets > 30);
    l.crash_process(&id);
    pump(&mut l, &mut f);
    assert_eq!(l.core.viewer_count(), 0);
    assert_eq!(f.core.viewer_count(), 0, "the follower kept its viewer");
    assert_eq!(left(&f, CloseReason::StreamRestarting), 1);
    run_shards(&mut l, &mut f, 2 * SEC);
    let (c, r) = f.join(&id);
    assert_eq!(r.code(), 201);
    run_shards(&mut l, &mut f, 2 * SEC);
    assert!(f.viewers[c].video_packets > 30, "no video on the follower after the restart");
}

/// An FFmpeg that cannot start closes the viewers that joined meanwhile, on every shard.
#[test]
fn a_failed_start_closes_the_viewers_of_every_shard() {
    let (mut l, mut f) = two_shards();
    l.spawn_fails = true;
    let id = l.add_stream("s", supervised(), 30);
    pump(&mut l, &mut f);
    run_shards(&mut l, &mut f, Duration::from_millis(20));
    let before = left(&f, CloseReason::StreamRestarting);
    // Viewers may join a stream in backoff (it is starting); the next failed start closes them.
    let (_, r) = f.join(&id);
    assert_eq!(r.code(), 201);
    run_shards(&mut l, &mut f, 3 * SEC);
    assert_eq!(f.core.viewer_count(), 0, "the follower kept a viewer of a stream that failed");
    assert!(left(&f, CloseReason::StreamRestarting) > before);
}

/// An external stream whose ports cannot be bound is stopped, and no shard takes viewers for
/// it any more.
#[test]
fn an_external_stream_that_cannot_bind_is_refused_on_every_shard() {
    let (mut l, mut f) = two_shards();
    l.fail_bind.extend(40_000..=40_099);
    let id = l.add_stream("x", StreamConfig::external(), 30);
    run_shards(&mut l, &mut f, 2 * SEC);
    let state = l.core.stream(&id).map(|s| s.state);
    assert_eq!(state, Some(StreamStatus::Stopped), "the leader gave up binding");
    let (_, r) = l.join(&id);
    assert_eq!(r.code(), 404);
    let (_, r) = f.join(&id);
    assert_eq!(r.code(), 404, "the follower still takes viewers for a stopped stream");
}

/// POSTs `offer` to `stream`; the status, and the answer's first video format as
/// `(payload type, rtpmap, fmtp)`.
fn first_video_format(w: &mut SimWorld, stream: &StreamId, offer: String) -> (u16, String) {
    let req = whep_core::whep::WhepRequest::new(Method::Post, format!("/whep/{stream}"))
        .with_header("Content-Type", "application/sdp")
        .with_body(offer);
    let r = w.http(req);
    let body = String::from_utf8_lossy(&r.body).into_owned();
    let pt = body
        .lines()
        .find(|l| l.starts_with("m=video"))
        .and_then(|l| l.split_whitespace().nth(3))
        .unwrap_or_default()
        .to_owned();
    let attr = |name: &str| {
        let prefix = format!("a={name}:{pt} ");
        body.lines().find_map(|l| l.strip_prefix(prefix.as_str())).unwrap_or_default().to_owned()
    };
    (r.code(), format!("{pt} {} {}", attr("rtpmap"), attr("fmtp")))
}

/// RFC 6184: an H264 format without `profile-level-id` is Baseline (42000a), which decodes a
/// constrained-baseline stream: such an offer is answered, not refused with 406.
#[test]
fn h264_without_profile_level_id_is_baseline() {
    let mut w = SimWorld::new(sim::config());
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    let offer = include_str!("data/chromium-156-offer.sdp");
    let bare: String = offer
        .lines()
        .filter(|l| !l.contains("profile-level-id=") || !l.contains("packetization-mode=1"))
        .map(|l| format!("{l}\r\n"))
        .collect::<String>()
        .replace(
            "a=rtcp-fb:102 nack pli\r\n",
            "a=rtcp-fb:102 nack pli\r\na=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1\r\n",
        );
    // 102 is now the one H264 format with packetization-mode 1, and it has no profile-level-id.
    assert_eq!(bare.matches("packetization-mode=1").count(), 1, "{bare}");
    let (code, format) = first_video_format(&mut w, &demo, bare);
    assert_eq!(code, 201, "{format}");
    assert!(format.starts_with("102 H264/90000"), "{format}");
    assert!(format.contains("packetization-mode=1"), "{format}");
}

/// Safari offers constrained high (`640c1f`) first and constrained baseline (`42e01f`) second,
/// each in both packetization modes: a constrained-baseline stream goes out on the baseline
/// type with packetization mode 1, whatever the order; a High stream on `640c1f`.
#[test]
fn a_safari_offer_gets_the_constrained_baseline_type() {
    use whep_core::H264Profile;
    use whep_core::sdp::{check_offer, choose_h264};
    let offer = include_str!("data/safari-like-offer.sdp");
    let summary = check_offer(offer.as_bytes()).expect("Safari's offer passes the policy");
    let pts: Vec<u8> = summary.h264.iter().map(|h| h.pt).collect();
    assert_eq!(pts, [96, 98], "packetization-mode 1 types, in offer order");
    assert_eq!(choose_h264(&summary.h264, H264Profile::ConstrainedBaseline), Some(98));
    assert_eq!(choose_h264(&summary.h264, H264Profile::High), Some(96));
    assert_eq!(summary.opus, [111]);

    let mut w = SimWorld::new(sim::config());
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    let req = whep_core::whep::WhepRequest::new(Method::Post, "/whep/demo")
        .with_header("Content-Type", "application/sdp")
        .with_body(offer);
    let r = w.http(req);
    assert_eq!(r.code(), 201, "{}", String::from_utf8_lossy(&r.body));
    let answer = String::from_utf8_lossy(&r.body);
    let video = answer.lines().find(|l| l.starts_with("m=video")).unwrap_or_default();
    assert!(video.split_whitespace().skip(3).any(|pt| pt == "98"), "{video}");
    assert_eq!(w.core.stream(&demo).map(|s| s.viewers), Some(1));
}

/// RFC 8843: GStreamer's webrtcbin with `max-bundle` offers its second section as
/// `m=audio 0 … a=bundle-only`, part of the bundle; it is answered like any other. An offer
/// without BUNDLE gets a 400 that says BUNDLE is required.
#[test]
fn bundle_only_sections_are_answered_and_bundle_is_required() {
    let mut w = SimWorld::new(sim::config());
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    let offer = include_str!("data/chromium-156-offer.sdp");
    let at = offer.find("m=audio 9 ").expect("audio section");
    let (video, audio) = offer.split_at(at);
    let audio = audio.replacen("m=audio 9 ", "m=audio 0 ", 1).replacen(
        "a=mid:1\r\n",
        "a=mid:1\r\na=bundle-only\r\n",
        1,
    );
    let post = |w: &mut SimWorld, body: String| {
        let req = whep_core::whep::WhepRequest::new(Method::Post, "/whep/demo")
            .with_header("Content-Type", "application/sdp")
            .with_body(body);
        let r = w.http(req);
        (r.code(), String::from_utf8_lossy(&r.body).into_owned())
    };
    let (code, body) = post(&mut w, format!("{video}{audio}"));
    assert_eq!(code, 201, "{body}");
    assert!(body.contains("m=audio 9 ") || body.contains("m=audio "), "{body}");
    let unbundled = offer.replace("a=group:BUNDLE 0 1\r\n", "");
    let (code, body) = post(&mut w, unbundled);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("BUNDLE"), "{body}");
    assert_eq!(w.core.stream(&demo).map(|s| s.viewers), Some(1));
}

/// The answer says what the server sends and nothing it was not offered: the chosen H264 type
/// and its RTX, Opus; feedback and `a=extmap-allow-mixed` only as offered; `a=rtcp-rsize` kept.
#[test]
fn the_answer_lists_only_what_is_sent_and_what_was_offered() {
    let mut w = SimWorld::new(sim::config());
    let _demo = w.add_stream("demo", StreamConfig::external(), 30);
    let offer = include_str!("data/chromium-156-offer.sdp");
    let post = |w: &mut SimWorld, body: &str| {
        let req = whep_core::whep::WhepRequest::new(Method::Post, "/whep/demo")
            .with_header("Content-Type", "application/sdp")
            .with_body(body.to_owned());
        let r = w.http(req);
        assert_eq!(r.code(), 201, "{}", String::from_utf8_lossy(&r.body));
        String::from_utf8_lossy(&r.body).into_owned()
    };
    let m_line = |answer: &str, kind: &str| {
        answer.lines().find(|l| l.starts_with(kind)).unwrap_or_default().to_owned()
    };
    let answer = post(&mut w, offer);
    // Constrained baseline, packetization mode 1: 108 and its RTX 109; Opus 111.
    assert_eq!(m_line(&answer, "m=video"), "m=video 9 UDP/TLS/RTP/SAVPF 108 109");
    assert_eq!(m_line(&answer, "m=audio"), "m=audio 9 UDP/TLS/RTP/SAVPF 111");
    assert!(!answer.contains("a=rtpmap:102 "), "{answer}");
    assert!(answer.contains("a=fmtp:109 apt=108"), "{answer}");
    assert!(answer.contains("a=rtcp-fb:108 nack pli"), "{answer}");
    assert!(answer.contains("a=rtcp-rsize"), "offered rtcp-rsize is kept: {answer}");
    assert!(answer.contains("a=extmap-allow-mixed"), "offered, so kept");

    // A player that offers neither REMB nor mixed extensions (Firefox, aiortc) is not told of
    // them.
    let plain: String = offer
        .lines()
        .filter(|l| !l.contains("goog-remb") && !l.contains("extmap-allow-mixed"))
        .map(|l| format!("{l}\r\n"))
        .collect();
    let answer = post(&mut w, &plain);
    assert!(!answer.contains("goog-remb") && !answer.contains("extmap-allow-mixed"), "{answer}");
    assert!(answer.contains("a=rtcp-fb:108 nack"), "{answer}");
}

/// A world with a 2 s GOP (60 frames) and `config`, and a recording viewer that plays live
/// 0.7 s into a GOP (the next keyframe from FFmpeg is 1.3 s away).
fn playing_mid_gop(config: whep_core::CoreConfig) -> (SimWorld, usize) {
    let mut w = SimWorld::new(config);
    let demo = w.add_stream("demo", StreamConfig::external(), 60);
    let (v, r) = w.join(&demo);
    assert_eq!(r.code(), 201);
    w.viewers[v].record = true;
    w.drive_until(5 * SEC, |w| w.viewers[v].video_packets > 0 && w.core.prime_backlog() == 0);
    // The last keyframe the viewer got, then 0.7 s on.
    let keyframes =
        |w: &SimWorld| w.viewers[v].arrivals.iter().filter(|a| a.keyframe_start).count();
    let seen = keyframes(&w);
    w.drive_until(3 * SEC, |w| keyframes(w) > seen);
    w.run_for(Duration::from_millis(700));
    (w, v)
}

/// When viewer `v` next starts a keyframe after `since`, driving at most `max`.
fn next_keyframe(w: &mut SimWorld, v: usize, since: Instant, max: Duration) -> Option<Instant> {
    let at = |w: &SimWorld| {
        w.viewers[v].arrivals.iter().find(|a| a.keyframe_start && a.at > since).map(|a| a.at)
    };
    w.drive_until(max, |w| at(w).is_some());
    at(w)
}

#[test]
fn a_keyframe_request_is_answered_from_the_gop_cache_with_sequence_and_timestamps_continuing() {
    let (mut w, v) = playing_mid_gop(sim::config());
    let asked = w.now;
    w.viewer_request_keyframe(v);
    let got = next_keyframe(&mut w, v, asked, 2 * SEC).expect("a keyframe arrived");
    // A round trip and a frame, not the 1.3 s to FFmpeg's next keyframe.
    assert!(got - asked < Duration::from_millis(200), "keyframe {:?} after the PLI", got - asked);
    assert_eq!(w.core.metrics().cached_keyframes, 1);
    // The replayed keyframe comes after the last frame the viewer had, in timestamp as in
    // sequence number (a player would merge or drop a frame with an old timestamp).
    let arrivals = &w.viewers[v].arrivals;
    let k = arrivals.iter().position(|a| a.at == got && a.keyframe_start).expect("keyframe");
    let (before, kf) = (arrivals[k - 1], arrivals[k]);
    assert_eq!(kf.seq, before.seq + 1);
    assert!((kf.timestamp.wrapping_sub(before.timestamp) as i32) > 0, "{before:?} then {kf:?}");

    // Rate limited per viewer: another request within the interval is counted, not answered;
    // one after it is.
    w.run_for(Duration::from_millis(100));
    w.viewer_request_keyframe(v);
    w.drive_until(SEC / 2, |w| w.core.metrics().keyframe_requests >= 2);
    w.run_for(Duration::from_millis(300));
    assert_eq!(w.core.metrics().cached_keyframes, 1, "answered within the interval");
    w.run_for((got + SEC).saturating_duration_since(w.now));
    w.viewer_request_keyframe(v);
    w.drive_until(SEC, |w| w.core.metrics().cached_keyframes == 2);

    // Through FFmpeg's next keyframe and on: no hole in the viewer's sequence numbers, no
    // timestamp going back (the replayed frames sit between the live ones).
    w.run_for(3 * SEC);
    assert_eq!(video_gaps(&w, v), 0, "a replay left a hole in the sequence numbers");
    assert_eq!(w.viewers[v].video_ts_regressions, 0, "timestamps went backwards");
    assert_eq!(w.core.prime_backlog(), 0);
}

#[test]
fn without_cached_keyframes_a_request_waits_for_ffmpegs_next_keyframe() {
    let mut config = sim::config();
    config.cached_keyframe_interval = None;
    let (mut w, v) = playing_mid_gop(config);
    let asked = w.now;
    w.viewer_request_keyframe(v);
    let got = next_keyframe(&mut w, v, asked, 3 * SEC).expect("FFmpeg's keyframe arrived");
    assert!(got - asked > SEC, "keyframe {:?} after the PLI", got - asked);
    assert_eq!(w.core.metrics().cached_keyframes, 0);
    assert!(w.core.metrics().keyframe_requests >= 1);
}

#[test]
fn a_keyframe_request_answered_at_once_without_pacing_keeps_the_sequence_whole() {
    let mut config = sim::config();
    config.prime_pacing = None;
    let (mut w, v) = playing_mid_gop(config);
    let asked = w.now;
    w.viewer_request_keyframe(v);
    let got = next_keyframe(&mut w, v, asked, 2 * SEC).expect("a keyframe arrived");
    assert!(got - asked < Duration::from_millis(200), "keyframe {:?} after the PLI", got - asked);
    w.run_for(3 * SEC);
    assert_eq!(video_gaps(&w, v), 0);
    assert_eq!(w.viewers[v].video_ts_regressions, 0);
}

#[test]
fn a_viewers_first_dtls_is_answered_on_its_checked_pair_without_waiting_for_its_nomination() {
    let mut w = SimWorld::new(sim::config());
    w.latency = Duration::from_millis(75); // 150 ms round trip
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    // As Chromium: DTLS right after the first check succeeds, USE-CANDIDATE only later.
    w.hold_nomination = Some(w.now + 3 * SEC);
    let joined = w.now;
    let (v, r) = w.join(&demo);
    assert_eq!(r.code(), 201);
    w.drive_until(5 * SEC, |w| w.viewers[v].video_packets > 0);
    let first = w.viewers[v].first_video_at.expect("video arrived");
    // Check (1 RTT), DTLS (2 RTTs), video: well under the 3 s the nomination was held.
    assert!(first - joined < SEC, "first video {:?} after the POST", first - joined);
    assert_eq!(w.core.metrics().early_nominations, 1);
    assert_keeps_playing(&mut w, v);
}

#[test]
fn after_a_nat_rebinding_media_follows_the_viewers_new_address() {
    let (mut w, _, v) = playing(10);
    let old = w.viewers[v].addr;
    let rebound = SocketAddr::new(old.ip(), old.port() + 1000);
    w.viewers[v].nat = Some(rebound);
    let at = w.now;
    let before = w.viewers[v].video_packets;
    w.drive_until(20 * SEC, |w| w.viewers[v].video_packets > before + 30);
    let back = w.now - at;
    assert!(w.viewers[v].video_packets > before + 30, "video never came back");
    assert_eq!(w.core.metrics().path_moves, 1);
    // str0m's viewer checks its pair every few seconds; the path moves with its next datagram.
    assert!(back < 6 * SEC, "video back {back:?} after the rebinding");
    assert_keeps_playing(&mut w, v);
}

#[test]
fn a_replayed_check_from_another_address_does_not_move_the_media() {
    let (mut w, _, v) = playing(10);
    w.run_for(3 * SEC);
    let check = w.last_check.clone().expect("the viewer checked");
    // The viewer goes quiet (its path looks dead), and an attacker replays its check.
    w.viewers[v].silent = true;
    w.run_for(2 * SEC);
    let attacker: SocketAddr = "203.0.113.9:4000".parse().expect("addr");
    for _ in 0..3 {
        w.datagram_raw(attacker, &check);
        w.run_for(SEC / 10);
    }
    assert_eq!(w.core.metrics().path_moves, 0, "a replay moved the media");
    w.viewers[v].silent = false;
    assert_keeps_playing(&mut w, v);
}

/// An external stream with a VP8 rendition next to its H264.
fn with_vp8_rendition(w: &mut SimWorld) -> StreamId {
    let mut config = StreamConfig::external();
    config.egress.renditions.push(Rendition::new(VideoCodec::Vp8, 800));
    w.add_stream("demo", config, 30)
}

#[test]
fn a_viewer_without_h264_gets_the_vp8_rendition_and_an_h264_viewer_keeps_h264() {
    let mut w = SimWorld::new(sim::config());
    let demo = with_vp8_rendition(&mut w);
    assert_eq!(w.renditions.get(&demo), Some(&1), "the rendition's port is bound");
    let (vp8, r) = w.join_with(&demo, &[Codec::Vp8]);
    assert_eq!(r.code(), 201, "{}", String::from_utf8_lossy(&r.body));
    let answer = String::from_utf8_lossy(&r.body).into_owned();
    assert!(answer.contains("VP8/90000") && !answer.contains("H264"), "{answer}");
    let (h264, r) = w.join(&demo);
    assert_eq!(r.code(), 201);
    w.drive_until(5 * SEC, |w| {
        w.viewers[vp8].video_packets > 60 && w.viewers[h264].video_packets > 100
    });
    assert_eq!(w.viewers[vp8].video_codec, Some(Codec::Vp8));
    assert_eq!(w.viewers[vp8].first_video_is_keyframe, Some(true), "VP8 starts at a key frame");
    assert_eq!(w.viewers[h264].video_codec, Some(Codec::H264));
    assert!(w.viewers[vp8].audio_packets > 10 && w.viewers[h264].audio_packets > 10);
    assert_eq!(video_gaps(&w, vp8), 0);
    // A late VP8 joiner starts at once from the rendition's own GOP cache.
    w.run_for(SEC / 2);
    let joined = w.now;
    let (late, _) = w.join_with(&demo, &[Codec::Vp8]);
    w.drive_until(5 * SEC, |w| w.viewers[late].video_packets > 0);
    let first = w.viewers[late].first_video_at.expect("video");
    assert!(first - joined < Duration::from_millis(300), "{:?}", first - joined);
    assert_eq!(w.viewers[late].first_video_is_keyframe, Some(true));
}

#[test]
fn an_offer_without_a_codec_of_the_stream_gets_406_naming_what_it_sends() {
    let mut w = SimWorld::new(sim::config());
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    let (_, r) = w.join_with(&demo, &[Codec::Vp8]);
    assert_eq!(r.code(), 406);
    let body = String::from_utf8_lossy(&r.body).into_owned();
    assert!(body.contains("missing H264 (packetization-mode=1)"), "{body}");
    let mut w = SimWorld::new(sim::config());
    let mut config = StreamConfig::external();
    config.egress.renditions = vec![Rendition::new(VideoCodec::Vp8, 800); 3];
    let err = w.core.add_stream(StreamId::new("many").expect("id"), config);
    assert!(err.is_err(), "more renditions than max_renditions");
}

#[test]
fn a_lossy_viewer_moves_down_the_ladder_at_a_keyframe_and_back_up_when_clean() {
    let mut w = SimWorld::new(sim::config());
    let mut config = StreamConfig::external();
    config.egress.video_bitrate_kbps = Some(1500);
    config.egress.renditions.push(Rendition::new(VideoCodec::H264, 400));
    let demo = w.add_stream("demo", config, 30);
    let (v, r) = w.join(&demo);
    assert_eq!(r.code(), 201);
    w.viewers[v].record = true;
    let on =
        |w: &SimWorld, k: usize| w.core.stream(&demo).map(|s| s.renditions[k].viewers) == Some(1);
    w.drive_until(5 * SEC, |w| w.viewers[v].video_packets > 100);
    assert!(on(&w, 0), "starts on the top rung");
    // A fifth of what the server sends is lost: the receiver reports say so.
    w.loss_every = 5;
    w.drive_until(8 * SEC, |w| w.core.metrics().rendition_switches >= 1);
    assert_eq!(w.core.metrics().rendition_switches, 1, "moved down");
    assert!(on(&w, 1), "on the 400 kbit/s rung");
    // Clean again: back up once the ceiling its loss measured has aged (30 s).
    w.loss_every = 0;
    // Reports in flight may still be lossy: one more step down puts it on keyframes only,
    // and the first clean step up then resumes full video before the next moves it up.
    w.drive_until(60 * SEC, |w| w.core.metrics().rendition_switches >= 2);
    assert!(on(&w, 0), "back on the top rung");
    assert_keeps_playing(&mut w, v);
    // The renditions' RTP clocks have other origins, rebased at each switch: every new packet
    // (not a retransmission, which keeps its sequence number) has a timestamp at least as late
    // as all before it.
    let (mut seq, mut ts) = (None::<u64>, None::<u32>);
    for a in &w.viewers[v].arrivals {
        if seq.is_some_and(|s| a.seq <= s) {
            continue; // repaired
        }
        if let Some(t) = ts {
            let d = a.timestamp.wrapping_sub(t) as i32;
            assert!(d >= 0, "{a:?} after timestamp {t}");
        }
        (seq, ts) = (Some(a.seq), Some(a.timestamp));
    }
}

#[test]
fn a_viewer_without_a_second_rung_stays_put_whatever_it_loses() {
    let mut w = SimWorld::new(sim::config());
    let mut config = StreamConfig::external();
    config.egress.renditions.push(Rendition::new(VideoCodec::Vp8, 400));
    let demo = w.add_stream("demo", config, 30);
    let (v, _) = w.join(&demo);
    w.drive_until(5 * SEC, |w| w.viewers[v].video_packets > 100);
    w.loss_every = 5;
    w.run_for(6 * SEC);
    assert_eq!(w.core.metrics().rendition_switches, 0, "VP8 is not a rung of the H264 ladder");
}

#[test]
fn after_a_path_move_the_picture_restarts_from_the_gop_cache() {
    let (mut w, _, v) = playing(10);
    w.viewers[v].record = true;
    let old = w.viewers[v].addr;
    w.viewers[v].nat = Some(SocketAddr::new(old.ip(), old.port() + 1000));
    w.drive_until(20 * SEC, |w| w.core.metrics().path_moves == 1);
    let moved = w.now;
    w.drive_until(SEC, |w| w.core.metrics().cached_keyframes >= 1);
    assert_eq!(w.core.metrics().cached_keyframes, 1, "no keyframe from the cache after the move");
    w.run_for(SEC / 2);
    let first = w.viewers[v].arrivals.iter().find(|a| a.at >= moved && a.keyframe_start);
    let n = w.viewers[v].arrivals.iter().filter(|a| a.at >= moved).count();
    assert!(first.is_some_and(|a| a.at - moved < Duration::from_millis(100)), "{first:?} {n}");
}

#[test]
fn a_lossy_viewer_without_a_lower_rung_gets_keyframes_only_then_full_video_when_clean() {
    let mut w = SimWorld::new(sim::config());
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    let (v, _) = w.join(&demo);
    w.viewers[v].record = true;
    w.drive_until(5 * SEC, |w| w.viewers[v].video_packets > 100);
    w.loss_every = 4;
    w.drive_until(8 * SEC, |w| w.core.metrics().keyframes_only >= 1);
    assert_eq!(w.core.metrics().keyframes_only, 1, "put on keyframes only");
    // Two seconds of it: only keyframe frames arrive (each starts with a keyframe start).
    w.run_for(SEC / 10);
    let from = w.now;
    w.run_for(2 * SEC);
    let during: Vec<Arrival> =
        w.viewers[v].arrivals.iter().filter(|a| a.at >= from).copied().collect();
    let keyframe_ts: std::collections::BTreeSet<u32> =
        during.iter().filter(|a| a.keyframe_start).map(|a| a.timestamp).collect();
    assert!(!keyframe_ts.is_empty(), "keyframes still come");
    assert!(
        during.iter().all(|a| keyframe_ts.contains(&a.timestamp)),
        "a frame that is not a keyframe went out"
    );
    // Clean again: full video from a keyframe on.
    w.loss_every = 0;
    w.run_for(12 * SEC);
    let before = w.viewers[v].video_packets;
    w.run_for(SEC);
    assert!(
        w.viewers[v].video_packets - before > 150,
        "full video did not resume: {}",
        w.viewers[v].video_packets - before
    );
}

#[test]
fn a_lossy_viewers_video_is_paced_keyframes_spread_not_burst() {
    let mut w = SimWorld::new(sim::config());
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    let (v, _) = w.join(&demo);
    w.viewers[v].record = true;
    w.drive_until(5 * SEC, |w| w.viewers[v].video_packets > 100);
    // Two GOPs at line rate: a keyframe's packets arrive together.
    w.run_for(2 * SEC);
    let spread = |w: &SimWorld, from: Instant| -> Vec<(Duration, usize)> {
        // Each keyframe after `from`: how long its packets took to arrive, and its bytes.
        let a: Vec<&Arrival> = w.viewers[v].arrivals.iter().filter(|a| a.at >= from).collect();
        let mut out = Vec::new();
        let mut seen = None;
        for (i, k) in a.iter().enumerate().filter(|(_, a)| a.keyframe_start) {
            if seen.replace(k.timestamp) == Some(k.timestamp) {
                continue; // the IDR after its SPS and PPS
            }
            let frame: Vec<&&Arrival> =
                a[i..].iter().take_while(|x| x.timestamp == k.timestamp).collect();
            if let Some(last) = frame.last() {
                out.push((last.at - k.at, frame.iter().map(|x| x.bytes).sum()));
            }
        }
        out
    };
    let start = w.now - 2 * SEC;
    let bytes: usize =
        w.viewers[v].arrivals.iter().filter(|a| a.at >= start).map(|a| a.bytes).sum();
    let rate = bytes as f64 / 2.0;
    let before = spread(&w, start);
    assert!(before.iter().all(|(d, _)| *d < Duration::from_millis(5)), "{before:?}");
    // Loss (enough that retransmissions do not hide it from the receiver reports): from then
    // on the video is paced.
    w.loss_every = 4;
    w.drive_until(8 * SEC, |w| w.core.metrics().paced_viewers >= 1);
    assert_eq!(w.core.metrics().paced_viewers, 1);
    w.loss_every = 0;
    // (What went out with the news of the loss was not paced yet.)
    w.run_for(SEC / 10);
    let paced_from = w.now;
    w.run_for(6 * SEC);
    let after = spread(&w, paced_from);
    assert!(after.len() >= 2, "{after:?}");
    // At twice the stream's rate, a keyframe of K bytes takes about K / (2 × rate), less the
    // bucket's 20 ms.
    for (d, k) in &after {
        let expect = Duration::from_secs_f64((*k as f64 / (2.0 * rate) - 0.02).max(0.0) / 2.0);
        assert!(*d >= expect, "keyframe of {k} B in {d:?} (rate {rate} B/s): {after:?}");
    }
    assert!(after.iter().any(|(d, _)| *d > Duration::from_millis(10)), "{after:?}");
    assert_keeps_playing(&mut w, v);
}

#[test]
fn a_move_down_starts_at_once_from_the_lower_rungs_cache_not_at_its_next_keyframe() {
    let mut w = SimWorld::new(sim::config());
    let mut config = StreamConfig::external();
    config.egress.video_bitrate_kbps = Some(1500);
    config.egress.renditions.push(Rendition::new(VideoCodec::H264, 400));
    // Keyframes every 10 s: waiting for the next one would leave the viewer's picture broken
    // for seconds.
    let demo = w.add_stream("demo", config, 300);
    let (v, _) = w.join(&demo);
    w.viewers[v].record = true;
    w.drive_until(8 * SEC, |w| w.viewers[v].video_packets > 100);
    w.loss_every = 4;
    let lossy = w.now;
    w.drive_until(12 * SEC, |w| w.core.metrics().rendition_switches >= 1);
    let switched = w.now;
    // Two lossy reports, then the move: not the rest of the GOP.
    assert!(switched - lossy < 4 * SEC, "moved {:?} after the loss began", switched - lossy);
    w.loss_every = 0;
    w.run_for(SEC / 2);
    let keyframe = w.viewers[v].arrivals.iter().find(|a| a.at >= switched && a.keyframe_start);
    assert!(
        keyframe.is_some_and(|a| a.at - switched < Duration::from_millis(300)),
        "no keyframe of the lower rung soon after the move: {keyframe:?}"
    );
    assert_eq!(w.core.stream(&demo).map(|s| s.renditions[1].viewers), Some(1));
    assert_keeps_playing(&mut w, v);
}

/// Bytes viewer `v` received within `window` of its first video packet.
fn first_video_bytes(w: &SimWorld, v: usize, window: Duration) -> usize {
    let a = &w.viewers[v].arrivals;
    let Some(first) = a.first().map(|a| a.at) else { return 0 };
    a.iter().filter(|a| a.at < first + window).map(|a| a.bytes).sum()
}

/// A viewer whose reports moved it down a rung leaves; the next session from its address (a
/// reloaded page, a player reconnecting) starts on that rung, paced from its first packet (its
/// GOP prime too), not at full rate into a link that could not carry it; another address
/// starts on the top rung at the prime's usual pace.
fn a_session_from_an_address_whose_last_moved_down(
    memory: Option<Duration>,
) -> (SimWorld, usize, usize, StreamId) {
    let mut config = sim::config();
    config.path_memory = memory;
    let mut w = SimWorld::new(config);
    let mut stream = StreamConfig::external();
    stream.egress.video_bitrate_kbps = Some(1500);
    stream.egress.renditions.push(Rendition::new(VideoCodec::H264, 400));
    let demo = w.add_stream("demo", stream, 60);
    let addr: SocketAddr = "10.9.0.1:5000".parse().expect("addr");
    let (v, _) = w.join_from(&demo, addr);
    w.drive_until(8 * SEC, |w| w.viewers[v].video_packets > 100);
    w.loss_every = 4;
    w.drive_until(12 * SEC, |w| w.core.metrics().rendition_switches >= 1);
    w.loss_every = 0;
    w.run_for(SEC);
    assert_eq!(w.http(w.session_request(v, Method::Delete)).code(), 204);
    // Into the next GOP, so that its cache holds a second of video.
    w.run_for(SEC);
    let (again, _) = w.join_from(&demo, "10.9.0.1:6000".parse().expect("addr"));
    w.viewers[again].record = true;
    let (other, _) = w.join(&demo);
    w.viewers[other].record = true;
    w.drive_until(5 * SEC, |w| {
        w.viewers[again].video_packets > 0 && w.viewers[other].video_packets > 0
    });
    w.run_for(SEC);
    (w, again, other, demo)
}

#[test]
fn a_session_from_an_address_whose_last_moved_down_starts_on_that_rung_paced() {
    let (mut w, again, other, demo) =
        a_session_from_an_address_whose_last_moved_down(Some(Duration::from_secs(600)));
    assert_eq!(w.core.metrics().known_path_starts, 1);
    let viewers = |w: &SimWorld, k: usize| w.core.stream(&demo).map(|s| s.renditions[k].viewers);
    assert_eq!((viewers(&w, 0), viewers(&w, 1)), (Some(1), Some(1)), "one on each rung");
    let paced = first_video_bytes(&w, again, Duration::from_millis(200));
    let unpaced = first_video_bytes(&w, other, Duration::from_millis(200));
    eprintln!("first 200 ms: {paced} B paced on the known rung, {unpaced} B for a new address");
    // 400 kbit/s paced at twice its rate: about 20 kB in 200 ms; the usual prime sends the
    // keyframe and 64 KiB at once.
    assert!(paced < 30_000 && paced * 2 < unpaced, "{paced} B in the first 200 ms, {unpaced} B");
    assert_keeps_playing(&mut w, again);
    assert_keeps_playing(&mut w, other);
}

#[test]
fn without_path_memory_every_session_starts_on_the_top_rung() {
    let (w, _, _, demo) = a_session_from_an_address_whose_last_moved_down(None);
    assert_eq!(w.core.metrics().known_path_starts, 0);
    assert_eq!(w.core.stream(&demo).map(|s| s.renditions[0].viewers), Some(2));
}

/// A viewer moved down because its path lost a quarter of what it was sent stays down while
/// that measurement is fresh (a move up needs more than the path then delivered: it would only
/// lose again, freezing the picture each time), and tries again once it has aged.
#[test]
fn after_heavy_loss_a_move_up_waits_until_the_paths_ceiling_has_aged() {
    let mut w = SimWorld::new(sim::config());
    let mut config = StreamConfig::external();
    config.egress.video_bitrate_kbps = Some(1500);
    config.egress.renditions.push(Rendition::new(VideoCodec::H264, 400));
    let demo = w.add_stream("demo", config, 60);
    let (v, _) = w.join(&demo);
    w.drive_until(8 * SEC, |w| w.viewers[v].video_packets > 100);
    w.loss_every = 4;
    w.drive_until(12 * SEC, |w| w.core.metrics().rendition_switches >= 1);
    w.loss_every = 0;
    let down = w.now;
    let on = |w: &SimWorld, k: usize| w.core.stream(&demo).map(|s| s.renditions[k].viewers);
    assert_eq!(on(&w, 1), Some(1));
    // Clean for 25 s: without the ceiling it would move up after 10 s.
    w.run_for(25 * SEC);
    assert_eq!(on(&w, 1), Some(1), "moved up into the path that lost");
    assert_eq!(w.core.metrics().rendition_switches, 1);
    w.drive_until(30 * SEC, |w| on(w, 0) == Some(1));
    assert_eq!(on(&w, 0), Some(1), "never tried the upper rung again");
    assert!(w.now - down >= Duration::from_secs(30), "up after {:?}", w.now - down);
    assert_keeps_playing(&mut w, v);
}

/// On the lowest rung and lossy still, a viewer gets keyframes only; clean again, it gets full
/// video back at the next keyframe, even while the path's ceiling holds a move up back.
#[test]
fn keyframes_only_on_the_lowest_rung_ends_when_clean_whatever_the_ceiling() {
    let mut w = SimWorld::new(sim::config());
    let mut config = StreamConfig::external();
    config.egress.video_bitrate_kbps = Some(1500);
    config.egress.renditions.push(Rendition::new(VideoCodec::H264, 400));
    let demo = w.add_stream("demo", config, 30);
    let (v, _) = w.join(&demo);
    w.drive_until(8 * SEC, |w| w.viewers[v].video_packets > 100);
    w.loss_every = 3;
    w.drive_until(20 * SEC, |w| w.core.metrics().keyframes_only >= 1);
    assert_eq!(w.core.metrics().keyframes_only, 1, "keyframes only on the lowest rung");
    w.loss_every = 0;
    // Clean: full video again within the clean time and a GOP or two, long before the ceiling
    // (30 s) lets it move up.
    w.run_for(15 * SEC);
    let before = w.viewers[v].video_packets;
    w.run_for(SEC);
    let per_second = w.viewers[v].video_packets - before;
    assert!(per_second > 60, "still keyframes only: {per_second} packets in a second");
    let on = |w: &SimWorld, k: usize| w.core.stream(&demo).map(|s| s.renditions[k].viewers);
    assert_eq!(on(&w, 1), Some(1), "on the lower rung still");
}
