//! Configuration of the core and of each stream.

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use str0m::config::CryptoProvider;

use crate::ffmpeg::EgressConfig;
use crate::pacer::PrimePacing;
use crate::ratelimit::RateLimits;

/// Configuration of a [`Core`](crate::Core). Every field has a sensible default.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Seed of the CSPRNG (ChaCha20) that draws session ids, ETags and ICE credentials.
    ///
    /// The runtime fills it from the operating system's entropy; tests fix it.
    pub rng_seed: [u8; 32],
    /// Host candidates advertised in every answer: the address(es) of the shared viewer socket
    /// as viewers reach it (the public address behind a 1:1 NAT). At least one is needed for a
    /// viewer to connect; the core rejects offers with 503 when the list is empty.
    pub host_candidates: Vec<SocketAddr>,
    /// STUN servers (IP and port; a runtime resolves names) the core asks, from the viewer
    /// socket, for the address viewers reach that socket at behind a NAT that forwards its
    /// port ([`crate::stun`]): once learned, that address is advertised as one more host
    /// candidate to new sessions and ICE restarts, and asked again every
    /// [`stun_interval`](Self::stun_interval). Empty: no discovery (the default).
    pub stun_servers: Vec<SocketAddr>,
    /// How often the public address is asked again once known (it may change with a new
    /// lease or a router's reboot); at least 1 s. Failures are retried sooner (1 s doubling).
    pub stun_interval: Duration,
    /// Passive TCP host candidates (ICE-TCP, RFC 6544) advertised in every answer next to the
    /// UDP ones, with a lower priority so that UDP wins where it works: the address(es) of the
    /// runtime's TCP listener as viewers reach it. Empty: no ICE over TCP.
    pub tcp_candidates: Vec<SocketAddr>,
    /// Most TCP connections open at once ([`Input::TcpOpened`](crate::Input::TcpOpened));
    /// beyond, a new one is closed at once.
    pub max_tcp_connections: usize,
    /// A TCP connection whose first STUN check has not named a viewer after this long is
    /// closed.
    pub tcp_bind_timeout: Duration,
    /// Loopback ports from which each started stream takes a block of
    /// `4 + 2 × max_renditions`: its ingest pair (video V, audio V+1), the ports its FFmpeg
    /// sends from (V+2, V+3), and for each further video rendition `k` its ingest port and the
    /// port FFmpeg sends it from (V+4+2k, V+5+2k). Ingest accepts a supervised stream's
    /// datagrams from its sending ports alone, so that no other local process can inject media
    /// (see [`PortPair::video_source`](crate::PortPair::video_source)).
    ///
    /// Keep it outside the kernel's ephemeral port range (Linux: 32768–60999): a socket another
    /// program binds to port 0 can otherwise take a port FFmpeg must send from, and that start
    /// of FFmpeg fails. The default, 20000–20999, is below it.
    pub ingest_ports: RangeInclusive<u16>,
    /// Most further video renditions a stream may carry besides its H264 one
    /// ([`EgressConfig::renditions`](crate::ffmpeg::EgressConfig::renditions)); sizes every
    /// stream's port block.
    pub max_renditions: u8,
    /// How long a pair whose bind failed is skipped before it is tried again.
    pub bind_quarantine: Duration,
    /// Most viewers of one stream (the seed's per-stream cap).
    pub max_viewers_per_stream: usize,
    /// Most viewers in total.
    pub max_viewers_total: usize,
    /// Path prefix of the WHEP routes, without a trailing slash (the seed used `/api/v3/whep`).
    pub whep_prefix: String,
    /// This node's tag in a fleet behind a load balancer: session URLs become
    /// `{prefix}/{stream}/{node}.{session}`, so that a balancer routes every request on a
    /// session back to its node by the path alone (no sticky cookie); a request naming another
    /// node's tag finds no session here (404). Letters, digits and `-`, at most 32. `None`:
    /// `{prefix}/{stream}/{session}`.
    pub node_id: Option<String>,
    /// This node's public origin (`https://n1.example.org`, `http://192.0.2.11:8080`; checked
    /// by [`public_origin`]): session URLs become absolute, `{origin}{prefix}/{stream}/...`, so
    /// that a client sends PATCH and DELETE straight to this node whatever balanced its POST (a
    /// TCP or TLS-passthrough balancer, DNS round robin: nothing that routes by path). A page
    /// on another origin then needs [`cors_origin`](Self::cors_origin) to allow it. `None`:
    /// relative session URLs.
    pub public_url: Option<String>,
    /// Value of `Access-Control-Allow-Origin` on every response.
    pub cors_origin: String,
    /// Accepted bearer tokens (`Authorization: Bearer` or `?token=`). Empty, with
    /// [`auth`](Self::auth) configuring nothing either, means no authentication.
    pub bearer_tokens: Vec<String>,
    /// JWT verification and the external HTTP callback (see [`crate::auth`]); the default
    /// configures neither.
    pub auth: crate::auth::AuthConfig,
    /// STUN/TURN servers announced with `Link: <..>; rel="ice-server"` on 201 and on
    /// non-preflight OPTIONS.
    pub ice_servers: Vec<IceServer>,
    /// How long the TURN credentials made for an [`IceServer`] with a
    /// [`secret`](IceServer::secret) stay valid after the request they answer (TURN REST,
    /// [`crate::turn`]). Keep it above the viewing time expected: a TURN server that checks the
    /// expiry on allocation refreshes too ends a relay whose credential has expired, and the
    /// viewer must then start a new session.
    pub turn_credential_ttl: Duration,
    /// Enforce `If-Match` on PATCH: 428 when it is missing, 412 when it does not match.
    /// Off by default because common players send none.
    pub strict_if_match: bool,
    /// Largest accepted request body (an SDP offer or fragment); larger gives 413.
    pub max_body_bytes: usize,
    /// Seconds announced in `Retry-After` when a cap is reached.
    pub retry_after_secs: u32,
    /// A viewer that has not connected (ICE + DTLS) this long after its POST is closed.
    pub connect_timeout: Duration,
    /// A viewer that sent no ICE connectivity check (a STUN request carrying its session's
    /// credentials) this long after its POST is closed, well before
    /// [`connect_timeout`](Self::connect_timeout): a player sends its first check as soon as it
    /// has the answer (Chromium within milliseconds, one round trip on a slow path), so a
    /// session without one holds a viewer seat for nothing. At least `connect_timeout` turns
    /// it off.
    pub first_check_timeout: Duration,
    /// Sessions that have not connected yet which one client address (IPv6: its /64) may hold
    /// at once; a POST beyond gets 429. With [`first_check_timeout`](Self::first_check_timeout)
    /// this keeps one client from holding a stream's seats with POSTs that never start ICE.
    /// Requests without a client address are not counted. `0` turns the limit off.
    pub max_unconnected_per_client: usize,
    /// Remote ICE candidates a session may hold, from its offer and its trickle PATCHes
    /// together (an ICE restart starts the count again). str0m keeps every remote candidate
    /// and scans them on each one added, so without a bound one session's candidates would
    /// make each PATCH slower and stall the loop for every viewer. An offer with more gets
    /// 422, as does a PATCH that would bring the session beyond it (nothing of it is applied).
    pub max_remote_candidates: usize,
    /// Source addresses a session learns from its ICE checks (per ICE generation). Each one is
    /// a demultiplexing entry here and a peer-reflexive candidate in str0m; a check from yet
    /// another address beyond this is dropped and counted
    /// ([`Metrics::addresses_refused`](crate::Metrics::addresses_refused)). A player sends
    /// checks from each of its interfaces and from each new NAT binding; an ICE restart
    /// starts the count again.
    pub max_viewer_addresses: usize,
    /// A viewer from which no datagram arrived for this long is closed (consent freshness,
    /// RFC 7675 uses 30 s).
    pub inactivity_timeout: Duration,
    /// A viewer whose ICE agent reports `Disconnected` and does not recover within this
    /// grace period is closed.
    pub disconnect_grace: Duration,
    /// Packets of video kept per viewer for retransmission on NACK, at most. Each slot costs
    /// about 420 bytes of str0m packet metadata per viewer (payloads are shared between
    /// viewers), and a viewer started from the GOP cache fills all of them at once, so this is
    /// the largest part of a viewer's memory that a setting controls: 64 is about 26 KiB. It
    /// also bounds how far back a NACK can be repaired: 64 packets are about 300 ms of a 2 Mbit/s
    /// stream, 150 ms at 4 Mbit/s. A NACK for an older packet goes unanswered and the player
    /// waits for, or asks for, a keyframe.
    pub rtx_cache_packets: usize,
    /// How long a sent video packet stays available for retransmission, at most. Without a
    /// burst the cache grows only as far as this much video needs, up to `rtx_cache_packets`.
    /// Zero turns retransmission off.
    pub rtx_cache_age: Duration,
    /// Video packets kept for retransmission while a viewer is started from the GOP cache
    /// ([`CoreConfig::gop_cache`]), until [`rtx_cache_age`](Self::rtx_cache_age) after its last
    /// cached packet went out; then back to `rtx_cache_packets`. The cached GOP goes out
    /// faster than live (8 Mbit/s by default), so 64 packets would be gone within ~80 ms: a
    /// fragment of the starting keyframe lost on a path with a longer round trip could not be
    /// repaired, and the picture would wait for FFmpeg's next keyframe. 256 packets cover a
    /// ~300 ms round trip at that rate; a joining viewer holds ~80 KiB more for a second or
    /// two. At most `rtx_cache_packets` turns this off.
    pub rtx_cache_prime_packets: usize,
    /// Most of a viewer's video bytes that may be retransmissions, over the last half second
    /// to second (15 % by default, after an allowance of 24 KiB). Beyond it, retransmissions
    /// are dropped and the viewer's retransmission cache is off for a second, so a viewer that
    /// NACKs without end (otherwise up to the whole cache per NACK) costs neither bandwidth nor
    /// encryption. The core counts this from the datagrams' clear-text SSRCs, a few counters
    /// per viewer (str0m's own cap would keep an entry per packet sent in the last second,
    /// about 24 KiB a viewer). `None` lifts the bound.
    pub rtx_ratio_cap: Option<f32>,
    /// Keep each stream's video since its last keyframe and start every new viewer with it
    /// (timestamps compressed so the player catches up to live), so that the first picture does
    /// not wait up to a GOP for FFmpeg's next keyframe. Bounded to 1024 packets and 1 MiB.
    pub gop_cache: bool,
    /// How fast a new viewer gets the cached GOP; `None` writes it at once (one burst of up to
    /// 1 MiB). See [`PrimePacing`].
    pub prime_pacing: Option<PrimePacing>,
    /// A viewer's keyframe request (PLI or FIR) is answered from the GOP cache
    /// ([`CoreConfig::gop_cache`]) at most once per this interval: FFmpeg cannot make a keyframe on
    /// request, so the viewer gets the cached keyframe and the frames since, again, at the end
    /// of the frame being received, with its sequence numbers continuing and the frames' RTP
    /// timestamps placed before the next live frame's, paced like a join
    /// ([`CoreConfig::prime_pacing`]). A lost keyframe then costs about a round trip instead of
    /// the rest of the GOP. Each answer costs up to the cached GOP's bytes (half a GOP on
    /// average); requests within the interval are counted and left unanswered (the viewer
    /// repeats them). `None`: requests are only counted, as before.
    pub cached_keyframe_interval: Option<Duration>,
    /// How long what a viewer's receiver reports taught about its path is kept after it left
    /// (10 minutes by default; by the address its media went to, IPv6 by /64, at most 4096
    /// paths): a viewer that was moved down the bitrate ladder or paced leaves its rung and pace,
    /// and the next session from that address starts on that rung, paced, its first GOP
    /// included, instead of at full rate into a link that cannot carry it (a player reconnecting,
    /// a page reloaded). A viewer that played unpaced for 10 s or more clears it. `None` learns
    /// nothing.
    pub path_memory: Option<Duration>,
    /// Request rate limits per client address and global (429 with `Retry-After` beyond).
    pub rate_limits: RateLimits,
    /// Admission control: while the loop driving this core reports (through
    /// [`Core::set_load`](crate::Core::set_load)) that it is busy at least this share of
    /// its time, new viewers are refused with 503 and `Retry-After`, so that the viewers
    /// already watching keep their packets and their ICE consent checks. Admission resumes
    /// once the load falls below 85 % of this. `1.0` or more turns the check off.
    pub max_load: f64,
    /// Supervision of FFmpeg processes the core spawns.
    pub process: ProcessConfig,
    /// The cryptography of every viewer's str0m `Rtc`: its DTLS endpoint, SRTP, the STUN
    /// HMAC and the certificate fingerprint, and the certificate the core makes at start
    /// (`dtls_provider.generate_certificate`). [`dtls::provider`](crate::dtls::provider) by
    /// default: aws-lc-rs with dimpl's DTLS, which accepts only ECDSA client certificates. An
    /// embedder passes another to change the DTLS implementation without the core knowing it
    /// (`whep-server`'s `openssl-dtls` feature: OpenSSL's DTLS 1.2, which also accepts RSA
    /// client certificates; `whepd --dtls openssl`). Each shard's core may share one.
    pub crypto: Arc<CryptoProvider>,
}

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            rng_seed: [0; 32],
            host_candidates: Vec::new(),
            stun_servers: Vec::new(),
            stun_interval: Duration::from_secs(30),
            tcp_candidates: Vec::new(),
            max_tcp_connections: 256,
            tcp_bind_timeout: Duration::from_secs(10),
            ingest_ports: 20_000..=20_999,
            max_renditions: 2,
            bind_quarantine: Duration::from_secs(30),
            max_viewers_per_stream: 8,
            max_viewers_total: 64,
            whep_prefix: "/whep".into(),
            node_id: None,
            public_url: None,
            cors_origin: "*".into(),
            bearer_tokens: Vec::new(),
            auth: crate::auth::AuthConfig::default(),
            ice_servers: Vec::new(),
            turn_credential_ttl: Duration::from_secs(12 * 3600),
            strict_if_match: false,
            max_body_bytes: 64 * 1024,
            retry_after_secs: 5,
            connect_timeout: Duration::from_secs(20),
            first_check_timeout: Duration::from_secs(5),
            max_unconnected_per_client: 4,
            max_remote_candidates: 32,
            max_viewer_addresses: 8,
            inactivity_timeout: Duration::from_secs(30),
            disconnect_grace: Duration::from_secs(5),
            rtx_cache_packets: 64,
            rtx_cache_age: Duration::from_secs(1),
            rtx_cache_prime_packets: 256,
            rtx_ratio_cap: Some(0.15),
            gop_cache: true,
            prime_pacing: Some(PrimePacing::default()),
            cached_keyframe_interval: Some(Duration::from_secs(1)),
            path_memory: Some(Duration::from_secs(600)),
            rate_limits: RateLimits::default(),
            max_load: 0.9,
            process: ProcessConfig::default(),
            crypto: crate::dtls::provider(),
        }
    }
}

impl CoreConfig {
    /// The host candidate a datagram from `source` was most likely sent to, for a runtime whose
    /// viewer socket is bound to a wildcard address and cannot read the destination of each
    /// datagram (`IP_PKTINFO`): a candidate with the source's own IP (a viewer on this host),
    /// else a loopback candidate for a loopback source, else the first candidate of the
    /// source's address family that is not loopback, else the first candidate.
    pub fn candidate_for(&self, source: SocketAddr) -> Option<SocketAddr> {
        pick_candidate(&self.host_candidates, source)
    }

    /// The TCP candidate a connection from `peer` accepted at `local` was made to: `local`
    /// itself when it is one, else as [`candidate_for`](Self::candidate_for) picks among
    /// [`tcp_candidates`](Self::tcp_candidates). `None` when there are none.
    pub fn tcp_candidate_for(&self, local: SocketAddr, peer: SocketAddr) -> Option<SocketAddr> {
        if self.tcp_candidates.contains(&local) {
            return Some(local);
        }
        pick_candidate(&self.tcp_candidates, peer)
    }
}

/// `addr` as the core compares addresses: an IPv4-mapped IPv6 address (`[::ffff:192.0.2.1]:5000`,
/// what a dual-stack socket bound to `[::]` reports for an IPv4 peer) as the IPv4 address it
/// maps (`192.0.2.1:5000`); any other address as it is. str0m matches a datagram to its
/// candidate pair by exact address, so the core turns every address it is handed
/// ([`Input::Datagram`](crate::Input::Datagram), [`Input::TcpOpened`](crate::Input::TcpOpened),
/// the configured candidates) into this form; a runtime sending to an IPv4 address from an
/// IPv6 socket maps it back ([`Ipv4Addr::to_ipv6_mapped`](std::net::Ipv4Addr::to_ipv6_mapped)).
pub fn canonical_addr(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

fn pick_candidate(c: &[SocketAddr], source: SocketAddr) -> Option<SocketAddr> {
    let source = canonical_addr(source);
    c.iter()
        .find(|c| c.ip() == source.ip())
        .or_else(|| {
            let lo = source.ip().is_loopback();
            c.iter().find(|c| c.ip().is_loopback() == lo && c.is_ipv4() == source.is_ipv4())
        })
        .or_else(|| c.iter().find(|c| !c.ip().is_loopback() && c.is_ipv4() == source.is_ipv4()))
        .or_else(|| c.first())
        .copied()
}

/// How the core supervises the FFmpeg processes it spawns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessConfig {
    /// Program to run, `ffmpeg` by default (looked up on `PATH` by the runtime).
    pub program: String,
    /// First restart delay after an unexpected exit; doubles per consecutive failure.
    pub restart_backoff_initial: Duration,
    /// Upper bound of the restart delay.
    pub restart_backoff_max: Duration,
    /// A process that ran at least this long resets the backoff.
    pub restart_backoff_reset: Duration,
    /// A running process that sent no RTP for this long is stopped and restarted.
    pub stale_timeout: Duration,
    /// Time between the polite stop (SIGTERM) and the forced kill (SIGKILL).
    pub stop_grace: Duration,
}

impl Default for ProcessConfig {
    fn default() -> Self {
        Self {
            program: "ffmpeg".into(),
            restart_backoff_initial: Duration::from_millis(500),
            restart_backoff_max: Duration::from_secs(30),
            restart_backoff_reset: Duration::from_secs(30),
            stale_timeout: Duration::from_secs(20),
            stop_grace: Duration::from_secs(5),
        }
    }
}

/// A STUN or TURN server announced to viewers.
#[derive(Clone, PartialEq, Eq)]
pub struct IceServer {
    /// `stun:host:port` or `turn:host:port?transport=udp`.
    pub url: String,
    /// TURN user name; with a [`secret`](Self::secret), the user part of the time-limited user
    /// name (`<expiry>:<username>`), the stream's id when `None`.
    pub username: Option<String>,
    /// TURN password (a long-lived one, sent to every viewer as it is).
    pub credential: Option<String>,
    /// The TURN server's shared secret (TURN REST; coturn's `static-auth-secret`): each answer
    /// then carries a user name and password of its own that expire after
    /// [`CoreConfig::turn_credential_ttl`] ([`crate::turn`]), and
    /// [`credential`](Self::credential) is not used.
    pub secret: Option<String>,
}

impl std::fmt::Debug for IceServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |s: &Option<String>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("IceServer")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("credential", &hidden(&self.credential))
            .field("secret", &hidden(&self.secret))
            .finish()
    }
}

impl IceServer {
    /// A server announced with its URL alone (STUN, or a TURN server that needs no password).
    pub fn new(url: impl Into<String>) -> Self {
        Self { url: url.into(), username: None, credential: None, secret: None }
    }

    /// Renders the server as one `Link` header value (RFC 8288, WHEP "STUN/TURN"), with its
    /// long-lived user name and password if it has them; see [`link_value_at`](Self::link_value_at)
    /// for a server with a [`secret`](Self::secret).
    pub fn link_value(&self) -> String {
        self.link_with(self.username.as_deref(), self.credential.as_deref())
    }

    /// The `Link` header value for an answer given at `wall_time` to a viewer of stream
    /// `stream`: with a [`secret`](Self::secret), a user name and password made for it that
    /// expire `ttl` later; `None` when the server has a secret but the time is unknown.
    pub fn link_value_at(
        &self,
        wall_time: Option<SystemTime>,
        ttl: Duration,
        stream: &str,
    ) -> Option<String> {
        let Some(secret) = &self.secret else { return Some(self.link_value()) };
        let user = self.username.as_deref().unwrap_or(stream);
        let c = crate::turn::RestCredential::new(secret, user, wall_time?, ttl);
        Some(self.link_with(Some(&c.username), Some(&c.credential)))
    }

    fn link_with(&self, username: Option<&str>, credential: Option<&str>) -> String {
        let mut v = format!("<{}>; rel=\"ice-server\"", self.url);
        if let Some(u) = username {
            v.push_str(&format!("; username=\"{}\"", quote_escape(u)));
        }
        if let Some(c) = credential {
            v.push_str(&format!(
                "; credential=\"{}\"; credential-type=\"password\"",
                quote_escape(c)
            ));
        }
        v
    }
}

fn quote_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// The codec of a stream's video rendition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VideoCodec {
    /// H264 (RFC 6184), in the stream's [`H264Profile`].
    H264,
    /// VP8 (RFC 7741): what every WebRTC browser decodes, Firefox without OpenH264 among them.
    Vp8,
}

impl VideoCodec {
    /// The codec's name as SDP writes it (`a=rtpmap`).
    pub fn name(self) -> &'static str {
        match self {
            Self::H264 => "H264",
            Self::Vp8 => "VP8",
        }
    }
}

impl std::fmt::Display for VideoCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Which H264 profile a stream carries; decides which offered payload type a viewer gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum H264Profile {
    /// Constrained baseline (`42e0xx`, what `-profile:v baseline` in libx264 produces).
    #[default]
    ConstrainedBaseline,
    /// Baseline (`4200xx`).
    Baseline,
    /// Main (`4d00xx`).
    Main,
    /// High (`6400xx`).
    High,
}

/// Whether `tag` can be a [`CoreConfig::node_id`]: 1 to 32 ASCII letters, digits and `-`.
pub fn valid_node_id(tag: &str) -> bool {
    (1..=32).contains(&tag.len()) && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// `url` as a [`CoreConfig::public_url`]: `http://` or `https://`, then a host (a DNS name in
/// ASCII, an IPv4 address or a bracketed IPv6 one) with an optional port, and nothing after it
/// but an optional `/`. Returns the origin with its scheme in lower case and no trailing `/`.
///
/// # Errors
///
/// What is wrong with `url`, in a sentence.
pub fn public_origin(url: &str) -> Result<String, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("public URL {url:?}: expected http:// or https://"))?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return Err(format!("public URL {url:?}: expected http:// or https://"));
    }
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (addr, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("public URL {url:?}: unclosed [ of an IPv6 address"))?;
            if addr.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(format!("public URL {url:?}: {addr:?} is not an IPv6 address"));
            }
            match after {
                "" => (addr, None),
                _ => (addr, Some(after.strip_prefix(':').unwrap_or(after))),
            }
        }
        None => match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    let host_ok = authority.starts_with('[')
        || (!host.is_empty()
            && host.len() <= 253
            && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-'));
    if !host_ok {
        return Err(format!(
            "public URL {url:?}: expected scheme://host[:port] with nothing after it \
             (letters, digits, . and - in the host; an IPv6 address in [])"
        ));
    }
    if let Some(port) = port
        && (!port.bytes().all(|b| b.is_ascii_digit()) || !matches!(port.parse::<u16>(), Ok(1..)))
    {
        return Err(format!("public URL {url:?}: port {port:?} is not 1 to 65535"));
    }
    Ok(format!("{scheme}://{authority}"))
}

/// Where a stream's RTP comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Feed {
    /// The core asks the runtime to run FFmpeg with these input arguments (everything before
    /// the outputs, e.g. `["-re", "-f", "lavfi", "-i", "testsrc2"]`) followed by the WebRTC
    /// output legs, and supervises it: restart with backoff, stale detection, stop.
    Supervised {
        /// FFmpeg input arguments.
        input_args: Vec<String>,
    },
    /// The embedding application runs FFmpeg itself (the seed's hook model). The core only
    /// hands out the output arguments in [`Event::StreamReady`](crate::Event::StreamReady)
    /// and listens on the ports.
    External,
    /// A follower shard's copy of the leader's stream (see [`crate::shard`]): no ports, no
    /// process; packets and lifecycle come from the leader through
    /// [`Core::mirror`](crate::Core::mirror).
    Mirror,
}

/// Configuration of one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamConfig {
    /// Where the RTP comes from.
    pub feed: Feed,
    /// The WebRTC output legs (the seed's per-process WebRTC config).
    pub egress: EgressConfig,
    /// The H264 profile the stream carries.
    pub profile: H264Profile,
    /// Per-stream viewer cap; `None` uses [`CoreConfig::max_viewers_per_stream`].
    pub max_viewers: Option<usize>,
    /// On demand (MediaMTX's `sourceOnDemand`): a started stream waits idle, without ports or
    /// process, until its first viewer POSTs; its FFmpeg then starts (the POST is answered at
    /// once, media flows from FFmpeg's first keyframe) and is stopped this long after its last
    /// viewer left (`sourceOnDemandCloseAfter`), the stream idle again. Supervised feeds only
    /// (a follower shard's [`Feed::Mirror`] copy keeps it: see [`crate::shard`]); on a sharded
    /// server the viewers of every shard count. `None`: always on once started.
    pub on_demand: Option<Duration>,
}

impl StreamConfig {
    /// A stream fed by an FFmpeg that the core supervises.
    pub fn supervised(input_args: Vec<String>) -> Self {
        Self {
            feed: Feed::Supervised { input_args },
            egress: EgressConfig::default(),
            profile: H264Profile::default(),
            max_viewers: None,
            on_demand: None,
        }
    }

    /// A stream fed by an FFmpeg the embedding application runs.
    pub fn external() -> Self {
        Self {
            feed: Feed::External,
            egress: EgressConfig::default(),
            profile: H264Profile::default(),
            max_viewers: None,
            on_demand: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_origins() {
        let ok = |u: &str| public_origin(u).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ok("https://n1.example.org"), "https://n1.example.org");
        assert_eq!(ok("HTTPS://n1.example.org:8443/"), "https://n1.example.org:8443");
        assert_eq!(ok("http://192.0.2.11:8080"), "http://192.0.2.11:8080");
        assert_eq!(ok("http://[2001:db8::7]:8080/"), "http://[2001:db8::7]:8080");
        assert_eq!(ok("http://[2001:db8::7]"), "http://[2001:db8::7]");
        for bad in [
            "n1.example.org",
            "ftp://n1.example.org",
            "https://",
            "https://n1.example.org/whep",
            "https://n1.example.org?x=1",
            "https://n1.example.org#f",
            "https://user@n1.example.org",
            "https://n1.example.org:0",
            "https://n1.example.org:65536",
            "https://n1.example.org:",
            "https://n1.example.org:80x",
            "https://2001:db8::7",
            "https://[2001:db8::7",
            "https://[nope]:80",
            "https://[2001:db8::7]x",
            "https://n1 example.org",
            "https://ex\u{e4}mple.org",
        ] {
            assert!(public_origin(bad).is_err(), "{bad:?} accepted");
        }
    }

    proptest::proptest! {
        /// Any string: an error or an origin that is its own canonical form; never a panic.
        #[test]
        fn public_origin_of_any_string(url in "\\PC{0,40}|https?://[a-z0-9.:\\[\\]/-]{0,30}") {
            if let Ok(origin) = public_origin(&url) {
                proptest::prop_assert_eq!(public_origin(&origin), Ok(origin.clone()));
                proptest::prop_assert!(!origin.ends_with('/'));
            }
        }
    }

    #[test]
    fn candidate_for_prefers_same_ip_then_scope_then_family() {
        let cfg = CoreConfig {
            host_candidates: vec![
                "127.0.0.1:3478".parse().expect("addr"),
                "192.0.2.7:3478".parse().expect("addr"),
                "[2001:db8::7]:3478".parse().expect("addr"),
            ],
            ..CoreConfig::default()
        };
        let pick = |s: &str| cfg.candidate_for(s.parse().expect("addr")).map(|a| a.to_string());
        assert_eq!(pick("127.0.0.1:5000").as_deref(), Some("127.0.0.1:3478"));
        assert_eq!(pick("192.0.2.7:5000").as_deref(), Some("192.0.2.7:3478"));
        assert_eq!(pick("198.51.100.1:5000").as_deref(), Some("192.0.2.7:3478"));
        assert_eq!(pick("[2001:db8::9]:5000").as_deref(), Some("[2001:db8::7]:3478"));
        assert_eq!(CoreConfig::default().candidate_for("127.0.0.1:1".parse().expect("addr")), None);
        // An IPv4 client seen by a dual-stack socket picks the IPv4 candidate.
        assert_eq!(pick("[::ffff:198.51.100.1]:5000").as_deref(), Some("192.0.2.7:3478"));
        assert_eq!(pick("[::ffff:127.0.0.1]:5000").as_deref(), Some("127.0.0.1:3478"));
    }

    #[test]
    fn link_values_carry_ipv6_turn_urls_as_given() {
        let server = IceServer {
            url: "turn:[2001:db8::9]:3478?transport=udp".into(),
            username: Some("u".into()),
            credential: Some("p".into()),
            secret: None,
        };
        assert_eq!(
            server.link_value(),
            "<turn:[2001:db8::9]:3478?transport=udp>; rel=\"ice-server\"; username=\"u\"; \
             credential=\"p\"; credential-type=\"password\""
        );
    }

    #[test]
    fn canonical_addresses_unmap_ipv4_only() {
        let c = |s: &str| canonical_addr(s.parse().expect("addr")).to_string();
        assert_eq!(c("[::ffff:192.0.2.1]:5000"), "192.0.2.1:5000");
        assert_eq!(c("192.0.2.1:5000"), "192.0.2.1:5000");
        assert_eq!(c("[2001:db8::1]:5000"), "[2001:db8::1]:5000");
        assert_eq!(c("[fd77:6::2]:9"), "[fd77:6::2]:9");
        // IPv4-compatible (deprecated, ::a.b.c.d) and loopback stay IPv6.
        assert_eq!(c("[::1]:9"), "[::1]:9");
        assert_eq!(c("[::c000:201]:9"), "[::c000:201]:9");
    }
}
