//! Counters the core keeps; runtimes render them (e.g. as Prometheus text).

use std::collections::BTreeMap;

/// Monotonic counters since the core was created. Never labelled by session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metrics {
    /// HTTP requests by (route, method, status). Route is `endpoint`, `session` or `other`.
    pub requests: BTreeMap<(&'static str, String, u16), u64>,
    /// Rejected requests by [`Reject::reason`](crate::whep::Reject::reason).
    pub rejections: BTreeMap<&'static str, u64>,
    /// POSTs refused by the per-stream or total viewer cap.
    pub cap_rejections: u64,
    /// Viewers created by a POST.
    pub viewers_joined: u64,
    /// Viewers whose ICE and DTLS completed.
    pub viewers_connected: u64,
    /// Viewers removed, for any reason.
    pub viewers_left: u64,
    /// Viewers that never connected or whose ICE agent lost them.
    pub ice_failures: u64,
    /// Keyframe requests (PLI/FIR) received from viewers; FFmpeg cannot honour them.
    pub keyframe_requests: u64,
    /// Viewers started with the cached GOP instead of waiting for the next keyframe.
    pub gop_primes: u64,
    /// Restarts of supervised FFmpeg processes.
    pub process_restarts: u64,
    /// Datagrams from FFmpeg on ingest ports.
    pub ingest_packets: u64,
    /// RTCP from FFmpeg, dropped.
    pub ingest_rtcp: u64,
    /// Malformed or oversized datagrams, or datagrams on unknown ports, dropped.
    pub ingest_dropped: u64,
    /// Datagrams on the viewer socket.
    pub datagrams_in: u64,
    /// Viewer-socket datagrams that matched no viewer or were not WebRTC.
    pub datagrams_dropped: u64,
    /// RTP packets written to viewers (one per viewer per source packet).
    pub packets_forwarded: u64,
    /// Payload bytes written to viewers.
    pub bytes_forwarded: u64,
}
