//! `whepd`'s command line and configuration file, shared by every runtime's binary: flags
//! (clap) over a TOML file over defaults, turned into [`Launch`]. No IO: the file is read
//! through a closure the runtime passes.
//!
//! The lines a runtime prints on stdout for people and scripts are here too
//! ([`listening_line`], [`watch_line`]), so that every binary prints the same.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

use crate::app::{AdminPolicy, AuthSettings, RoutesConfig, ServerConfig, StreamSpec, TcpListen};
use crate::auth::{HttpUrl, JwtSources};
use crate::dtls::Dtls;
use crate::outbound::Client;
use crate::tls::TlsFiles;
use whep_core::auth::{HttpAuth, JwtRefresh};
use whep_core::ratelimit::{Rate, RateLimits, RateSetting};
use whep_core::{CoreConfig, IceServer, PrimePacing};

/// A WHEP egress server: FFmpeg in, browsers out.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// TOML configuration file (flags override it).
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// HTTP listen address; `[::]` is IPv6 and IPv4 [default: [::]:8080, or 0.0.0.0:8080
    /// without IPv6].
    #[arg(long)]
    http: Option<SocketAddr>,
    /// Serve HTTPS: the certificate chain (PEM, leaf first), re-read on SIGHUP; needs --tls-key.
    #[arg(long, value_name = "PEM")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert, re-read with it on SIGHUP.
    #[arg(long, value_name = "PEM")]
    tls_key: Option<PathBuf>,
    /// WebRTC UDP address shared by all viewers; `[::]` is IPv6 and IPv4 [default: [::]:3478,
    /// or 0.0.0.0:3478 without IPv6].
    #[arg(long)]
    udp: Option<SocketAddr>,
    /// Address advertised to viewers as a host candidate (repeat; e.g. the public address of a
    /// 1:1 NAT; IPv6 as `[2001:db8::1]:3478`) [default: the UDP address, or loopback + the
    /// default route's address of each family].
    #[arg(long = "candidate")]
    candidates: Vec<SocketAddr>,
    /// STUN server asked, from the UDP socket, for the address viewers reach it at behind a
    /// NAT that forwards its port (Docker `-p 3478:3478/udp`), `HOST[:PORT]` (repeat: the next
    /// is asked when one fails); the address learned is advertised next to the candidates.
    #[arg(long = "stun-server", value_name = "HOST:PORT")]
    stun_servers: Vec<String>,
    /// Seconds between two STUN checks of that address once known [default: 30].
    #[arg(long, value_name = "N")]
    stun_interval_secs: Option<u64>,
    /// Ingest port range for FFmpeg's RTP, `FIRST-LAST`, outside the kernel's ephemeral ports
    /// [default: 20000-20999].
    #[arg(long)]
    ingest_ports: Option<String>,
    /// Most viewers per stream [default: 8].
    #[arg(long)]
    max_viewers: Option<usize>,
    /// Most viewers in total [default: 64].
    #[arg(long)]
    max_viewers_total: Option<usize>,
    /// Access-Control-Allow-Origin [default: *].
    #[arg(long)]
    cors_origin: Option<String>,
    /// Bearer token viewers must present (repeat; none = open).
    #[arg(long = "token")]
    tokens: Vec<String>,
    /// Bearer token of the admin API (none = admin API disabled).
    #[arg(long)]
    admin_token: Option<String>,
    /// POST viewer joined/left and stream up/down events as JSON to this URL
    /// (`http[s]://host[:port]/path`).
    #[arg(long, value_name = "URL")]
    webhook_url: Option<String>,
    /// A file holding the key that signs webhook deliveries (Standard Webhooks: `whsec_` and
    /// base64, 24 to 64 bytes); without it deliveries are unsigned.
    #[arg(long, value_name = "PATH")]
    webhook_secret_file: Option<PathBuf>,
    /// Directory whose files streams added over the admin API may play (`file`; repeat)
    /// [default: none, `file` refused over the API].
    #[arg(long = "media-dir", value_name = "DIR")]
    media_dirs: Vec<String>,
    /// Let the admin API pass raw FFmpeg `args` and `lavfi` graphs: FFmpeg's full power, files
    /// included, to whoever holds the admin token.
    #[arg(long)]
    admin_raw_ffmpeg: bool,
    /// STUN/TURN server announced to viewers, `URL[,USERNAME,CREDENTIAL]` (repeat).
    #[arg(long = "ice-server")]
    ice_servers: Vec<String>,
    /// Shared secret of the TURN servers given without a credential (TURN REST, coturn's
    /// `static-auth-secret`): each answer carries a user name and password of its own that
    /// expire after --turn-ttl-secs. Prefer `turn_secret` in the configuration file: a
    /// command line is visible to every local user.
    #[arg(long, value_name = "SECRET")]
    turn_secret: Option<String>,
    /// Lifetime of those TURN credentials, in seconds [default: 43200 (12 h)].
    #[arg(long, value_name = "N")]
    turn_ttl_secs: Option<u64>,
    /// Path prefix of the WHEP routes [default: /whep].
    #[arg(long)]
    whep_prefix: Option<String>,
    /// FFmpeg program [default: ffmpeg].
    #[arg(long)]
    ffmpeg: Option<String>,
    /// This node's tag behind a load balancer: session URLs become
    /// `{prefix}/{stream}/{tag}.{session}` so the balancer routes them back here by path
    /// (letters, digits, `-`; see deploy/).
    #[arg(long, value_name = "TAG")]
    node_id: Option<String>,
    /// This node's own public origin (`https://n1.example.org`): session URLs become absolute,
    /// so that clients send PATCH and DELETE straight here whatever balanced the POST (a TCP or
    /// TLS-passthrough balancer, DNS round robin).
    #[arg(long, value_name = "URL")]
    public_url: Option<String>,
    /// On SIGTERM, first drain: refuse new viewers (503 + Retry-After, `/ready` 503) and keep
    /// the current ones for up to this many seconds (or until they have all left), then close
    /// them and exit; a second signal exits at once [default: 0, close at once].
    #[arg(long, value_name = "SECS")]
    drain_secs: Option<u64>,
    /// A stream fed from a URL or file, `NAME=URL`, transcoded to H264 + Opus (repeat; use the
    /// configuration file for copy mode and other options).
    #[arg(long = "stream")]
    streams: Vec<String>,
    /// Do not start the demo stream when no stream is configured.
    #[arg(long)]
    no_demo: bool,
    /// Do not keep each stream's last GOP for new viewers (they then wait for FFmpeg's next
    /// keyframe).
    #[arg(long)]
    no_gop_cache: bool,
    /// Rate at which a new viewer gets the cached GOP after its keyframe, in kbit/s of RTP
    /// payload; 0 = all at once [default: 8000]. Must exceed the stream's bitrate.
    #[arg(long, value_name = "KBIT/S")]
    prime_kbps: Option<u64>,
    /// Answer a viewer's keyframe request (PLI/FIR) with the cached GOP at most once per this
    /// many milliseconds per viewer; 0 = never (requests only counted) [default: 1000].
    #[arg(long, value_name = "MS")]
    cached_keyframe_ms: Option<u64>,
    /// Remember for this many seconds the bitrate rung a paced viewer's path carried, and
    /// start the next session from its address there, paced; 0 = learn nothing [default: 600].
    #[arg(long, value_name = "SECS")]
    path_memory_secs: Option<u64>,
    /// POSTs (new sessions) per second one client address may send, `RATE[:BURST]`; 0 = no
    /// limit [default: 5:20]. Beyond it: 429 with Retry-After.
    #[arg(long, value_name = "RATE[:BURST]")]
    post_rate: Option<RateSetting>,
    /// POSTs per second from all clients together, `RATE[:BURST]`; 0 = no limit
    /// [default: 100:200].
    #[arg(long, value_name = "RATE[:BURST]")]
    post_rate_global: Option<RateSetting>,
    /// Other WHEP requests (PATCH, DELETE, GET, OPTIONS) per second per client address,
    /// `RATE[:BURST]`; 0 = no limit [default: 50:100].
    #[arg(long, value_name = "RATE[:BURST]")]
    request_rate: Option<RateSetting>,
    /// Sessions still connecting (no ICE and DTLS yet) one client address may hold; 0 = no
    /// limit [default: 4]. Beyond it: 429 with Retry-After.
    #[arg(long, value_name = "N")]
    max_unconnected: Option<usize>,
    /// Engine loops ("shards"), each on its own thread with its own viewer socket on the next
    /// UDP port (shard i on the UDP port + i): viewers spread over CPU cores [default: 1].
    #[arg(long, value_name = "N")]
    shards: Option<usize>,
    /// Refuse new viewers (503 + Retry-After) while the engine loop spends at least this share
    /// of its time forwarding, 0.1-1.0; 1 = never [default: 0.9]. Protects the viewers already served.
    #[arg(long, value_name = "SHARE")]
    max_load: Option<f64>,
    /// Send one datagram per system call instead of batching each viewer's datagrams with UDP
    /// segmentation offload (GSO); for comparison and for NICs that mishandle GSO.
    #[arg(long)]
    no_gso: bool,
    /// ICE-TCP listener for viewers that cannot use UDP (RFC 6544 passive candidates, advertised
    /// below the UDP ones) [default: the UDP address, same port number].
    #[arg(long, value_name = "ADDR", conflicts_with = "no_tcp")]
    tcp: Option<SocketAddr>,
    /// No ICE-TCP listener: viewers need UDP.
    #[arg(long)]
    no_tcp: bool,
    /// KiB a TCP viewer's send queue holds; beyond, whole frames are dropped and its video
    /// restarts at a keyframe [default: 128].
    #[arg(long, value_name = "KIB")]
    tcp_queue_kib: Option<usize>,
    /// The viewers' DTLS: `dimpl` (str0m's, ECDSA client certificates only) or `openssl`
    /// (OpenSSL's DTLS 1.2, also RSA client certificates such as GStreamer's; needs the cargo
    /// feature `openssl-dtls`, on in whepd's default build) [default: dimpl].
    #[arg(long, value_name = "dimpl|openssl")]
    dtls: Option<Dtls>,
    /// Ask this authorisation server (`http://` or `https://` URL) before answering a viewer's POST: a JSON
    /// POST like MediaMTX's `authMethod: http`; 2xx allows, 401/403 refuse, anything else 503.
    #[arg(long, value_name = "URL")]
    auth_http_url: Option<String>,
    /// Sign the authorisation server's requests as the webhook's are (Standard Webhooks
    /// headers) with the `whsec_` key in this file.
    #[arg(long, value_name = "PATH")]
    auth_http_secret_file: Option<PathBuf>,
    /// How long the authorisation server may take; then the viewer gets 503 [default: 2000].
    #[arg(long, value_name = "MS")]
    auth_http_timeout_ms: Option<u64>,
    /// Reuse the authorisation server's decision for the same stream, token and client address
    /// for this long; 0 = ask every time [default: 60].
    #[arg(long, value_name = "SECS")]
    auth_cache_secs: Option<u64>,
    /// Requests waiting for the authorisation server at most; beyond, 503 [default: 64].
    #[arg(long, value_name = "N")]
    auth_max_pending: Option<usize>,
    /// Accept HS256 JWTs signed with this secret (prefer --jwt-secret-file: a command line is
    /// visible to every local user).
    #[arg(long, value_name = "SECRET")]
    jwt_secret: Option<String>,
    /// Accept HS256 JWTs signed with the secret in this file (trailing newline ignored).
    #[arg(long, value_name = "FILE")]
    jwt_secret_file: Option<PathBuf>,
    /// Accept RS256/ES256 (and HS256 `oct`) JWTs signed with the keys of this JWKS file
    /// (repeat).
    #[arg(long = "jwks-file", value_name = "FILE")]
    jwks_files: Vec<PathBuf>,
    /// Accept JWTs signed with the keys of this JWKS (`http[s]://` URL), fetched at start and
    /// every --jwks-refresh-secs.
    #[arg(long, value_name = "URL")]
    jwks_url: Option<String>,
    /// How often the JWKS URL is fetched again [default: 300].
    #[arg(long, value_name = "SECS")]
    jwks_refresh_secs: Option<u64>,
    /// Clock skew allowed on a JWT's exp and nbf [default: 30].
    #[arg(long, value_name = "SECS")]
    jwt_leeway_secs: Option<u64>,
    /// A JWT must carry this `iss` (set it when the keys sign tokens of other issuers too).
    #[arg(long, value_name = "ISSUER")]
    jwt_issuer: Option<String>,
    /// A JWT's `aud` must name this audience (set it when the issuer makes tokens for other
    /// services too).
    #[arg(long, value_name = "AUDIENCE")]
    jwt_audience: Option<String>,
    /// Trust the CA certificates in this PEM file, besides the system's roots, for the
    /// `https://` URLs whepd calls (--auth-http-url, --jwks-url, --webhook-url).
    #[arg(long, value_name = "PEM")]
    outbound_ca_file: Option<PathBuf>,
}

/// The configuration file. Every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FileConfig {
    http: Option<SocketAddr>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    udp: Option<SocketAddr>,
    /// `"off"`, or the listener's address.
    tcp: Option<String>,
    tcp_queue_kib: Option<usize>,
    candidates: Vec<SocketAddr>,
    stun_servers: Vec<String>,
    stun_interval_secs: Option<u64>,
    ingest_ports: Option<String>,
    max_viewers_per_stream: Option<usize>,
    max_viewers_total: Option<usize>,
    cors_origin: Option<String>,
    bearer_tokens: Vec<String>,
    admin_token: Option<String>,
    webhook_url: Option<String>,
    webhook_secret_file: Option<PathBuf>,
    media_dirs: Vec<String>,
    admin_raw_ffmpeg: Option<bool>,
    ice_servers: Vec<IceServerFile>,
    turn_secret: Option<String>,
    turn_ttl_secs: Option<u64>,
    whep_prefix: Option<String>,
    ffmpeg: Option<String>,
    node_id: Option<String>,
    public_url: Option<String>,
    drain_secs: Option<u64>,
    strict_if_match: Option<bool>,
    gop_cache: Option<bool>,
    prime_kbps: Option<u64>,
    prime_burst_kib: Option<u64>,
    prime_max_pending: Option<usize>,
    cached_keyframe_ms: Option<u64>,
    path_memory_secs: Option<u64>,
    post_rate: Option<String>,
    post_rate_global: Option<String>,
    request_rate: Option<String>,
    max_unconnected_per_client: Option<usize>,
    max_remote_candidates: Option<usize>,
    max_viewer_addresses: Option<usize>,
    first_check_timeout_secs: Option<u64>,
    max_load: Option<f64>,
    shards: Option<usize>,
    connect_timeout_secs: Option<u64>,
    inactivity_timeout_secs: Option<u64>,
    stale_timeout_secs: Option<u64>,
    stop_grace_secs: Option<u64>,
    dtls: Option<Dtls>,
    auth_http_url: Option<String>,
    auth_http_secret_file: Option<PathBuf>,
    auth_http_timeout_ms: Option<u64>,
    auth_cache_secs: Option<u64>,
    auth_max_pending: Option<usize>,
    jwt_secret: Option<String>,
    jwt_secret_file: Option<PathBuf>,
    jwks_files: Vec<PathBuf>,
    jwks_url: Option<String>,
    jwks_refresh_secs: Option<u64>,
    jwt_leeway_secs: Option<u64>,
    jwt_issuer: Option<String>,
    jwt_audience: Option<String>,
    outbound_ca_file: Option<PathBuf>,
    streams: BTreeMap<String, StreamSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IceServerFile {
    url: String,
    username: Option<String>,
    credential: Option<String>,
    secret: Option<String>,
}

/// What the command line and the configuration file say, ready for a runtime to start: the
/// engine's configuration, the HTTP address and the streams to add at start.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The engine's configuration (core, routes, viewer socket, shards).
    pub server: ServerConfig,
    /// HTTP listen address.
    pub http: SocketAddr,
    /// The certificate and key to serve HTTPS with on it; `None` = plain HTTP.
    pub tls: Option<TlsFiles>,
    /// The streams to add at start, in order.
    pub streams: Vec<(String, StreamSpec)>,
}

/// Why the command line was not turned into [`Launch`].
#[derive(Debug)]
pub enum CliError {
    /// clap's own outcome: `--help`, `--version` or a usage error. Call `exit()` on it.
    Clap(clap::Error),
    /// A bad value, file or stream; the message says which.
    Invalid(String),
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Clap(e) => e.fmt(f),
            Self::Invalid(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for CliError {}

/// The client of the outgoing calls: `--outbound-ca-file` over the file's, checked to hold
/// certificates.
fn outbound_client(
    cli: &Cli,
    file: &FileConfig,
    read_file: &mut impl FnMut(&Path) -> std::io::Result<String>,
) -> Result<Client, String> {
    let Some(path) = cli.outbound_ca_file.as_ref().or(file.outbound_ca_file.as_ref()) else {
        return Ok(Client::default());
    };
    let pem = read_file(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    crate::outbound::pem_certificates(pem.as_bytes())
        .map_err(|e| format!("--outbound-ca-file {}: {e}", path.display()))?;
    Ok(Client::with_ca_file(path.clone()))
}

/// The authorisation settings of the flags over the file: the core's part goes into `core`.
fn auth_settings(
    core: &mut CoreConfig,
    cli: &Cli,
    file: &FileConfig,
    client: &Client,
    read_file: &mut impl FnMut(&Path) -> std::io::Result<String>,
) -> Result<AuthSettings, String> {
    let mut read = |p: &Path| read_file(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    let mut settings = AuthSettings::default();
    if let Some(url) = cli.auth_http_url.as_ref().or(file.auth_http_url.as_ref()) {
        let url = HttpUrl::parse(url).map_err(|e| format!("--auth-http-url {e}"))?;
        let url = url.with_client(client.clone());
        let ms = cli.auth_http_timeout_ms.or(file.auth_http_timeout_ms).unwrap_or(2000);
        if ms == 0 {
            return Err("--auth-http-timeout-ms must be at least 1".into());
        }
        let max_pending = cli.auth_max_pending.or(file.auth_max_pending).unwrap_or(64);
        core.auth.http = Some(HttpAuth {
            timeout: Duration::from_millis(ms),
            cache_ttl: Duration::from_secs(
                cli.auth_cache_secs.or(file.auth_cache_secs).unwrap_or(60),
            ),
            max_pending: max_pending.max(1),
        });
        settings.http_url = Some(url);
    }
    let secret_file = cli.auth_http_secret_file.as_ref().or(file.auth_http_secret_file.as_ref());
    if let Some(path) = secret_file {
        if settings.http_url.is_none() {
            return Err("auth_http_secret_file needs auth_http_url".into());
        }
        let secret = crate::webhook::WebhookSecret::parse(&read(path)?)
            .map_err(|e| format!("--auth-http-secret-file {}: {e}", path.display()))?;
        settings.http_secret = Some(secret);
    }
    let mut jwt = JwtSources {
        jwks_refresh: Duration::from_secs(
            cli.jwks_refresh_secs.or(file.jwks_refresh_secs).unwrap_or(300).max(1),
        ),
        ..JwtSources::default()
    };
    let secret = match (&cli.jwt_secret, &cli.jwt_secret_file) {
        (Some(s), _) => Some(s.clone()),
        (None, Some(f)) => Some(read(f)?.trim_end_matches(['\n', '\r']).to_owned()),
        (None, None) => match (&file.jwt_secret, &file.jwt_secret_file) {
            (Some(s), _) => Some(s.clone()),
            (None, Some(f)) => Some(read(f)?.trim_end_matches(['\n', '\r']).to_owned()),
            (None, None) => None,
        },
    };
    if let Some(s) = secret {
        if s.len() < 32 {
            return Err("the JWT secret must be at least 32 bytes (HS256 needs 256 bits)".into());
        }
        jwt.hs256_secret = Some(s.into_bytes());
    }
    let files = if cli.jwks_files.is_empty() { &file.jwks_files } else { &cli.jwks_files };
    for f in files {
        jwt.jwks_files.push(read(f)?.into_bytes());
    }
    if let Some(url) = cli.jwks_url.as_ref().or(file.jwks_url.as_ref()) {
        let url = HttpUrl::parse(url).map_err(|e| format!("--jwks-url {e}"))?;
        jwt.jwks_url = Some(url.with_client(client.clone()));
    }
    if jwt.hs256_secret.is_some() || !jwt.jwks_files.is_empty() || jwt.jwks_url.is_some() {
        let keys = jwt.keys(None).map_err(|e| format!("JWT keys: {e}"))?;
        if keys.is_empty() && jwt.jwks_url.is_none() {
            return Err("JWT keys: the JWKS files hold no usable key (RSA, EC P-256 or oct)".into());
        }
        core.auth.jwt = Some(keys);
        // A token of a key the URL published since the last fetch waits for a fetch now.
        core.auth.jwt_refresh = jwt
            .jwks_url
            .is_some()
            .then(|| JwtRefresh { min_interval: jwt.jwks_min_interval, ..JwtRefresh::default() });
        core.auth.leeway =
            Duration::from_secs(cli.jwt_leeway_secs.or(file.jwt_leeway_secs).unwrap_or(30));
        core.auth.jwt_issuer = cli.jwt_issuer.clone().or_else(|| file.jwt_issuer.clone());
        core.auth.jwt_audience = cli.jwt_audience.clone().or_else(|| file.jwt_audience.clone());
        let empty = |v: &Option<String>| v.as_deref().is_some_and(|v| v.trim().is_empty());
        if empty(&core.auth.jwt_issuer) || empty(&core.auth.jwt_audience) {
            return Err("jwt_issuer and jwt_audience, when given, must not be empty".into());
        }
        settings.jwt = Some(jwt);
    } else if [&cli.jwt_issuer, &cli.jwt_audience, &file.jwt_issuer, &file.jwt_audience]
        .iter()
        .any(|v| v.is_some())
    {
        return Err("jwt_issuer and jwt_audience need JWT keys (--jwt-secret-file, --jwks-file \
                    or --jwks-url)"
            .into());
    }
    Ok(settings)
}

/// Parses `whepd`'s arguments (the first is the program name). The configuration file named
/// by `--config` is read with `read_file`, so that this module does no IO.
pub fn parse<I, T>(
    args: I,
    read_file: impl FnMut(&Path) -> std::io::Result<String>,
) -> Result<Launch, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = Cli::try_parse_from(args).map_err(CliError::Clap)?;
    settings(cli, read_file).map_err(CliError::Invalid)
}

fn settings(
    cli: Cli,
    mut read_file: impl FnMut(&Path) -> std::io::Result<String>,
) -> Result<Launch, String> {
    let file: FileConfig = match &cli.config {
        Some(path) => {
            let text =
                read_file(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => FileConfig::default(),
    };
    let mut core = CoreConfig::default();
    let outbound = outbound_client(&cli, &file, &mut read_file)?;
    let auth = auth_settings(&mut core, &cli, &file, &outbound, &mut read_file)?;
    if !cli.candidates.is_empty() {
        core.host_candidates = cli.candidates;
    } else {
        core.host_candidates = file.candidates;
    }
    let udp_bind =
        cli.udp.or(file.udp).unwrap_or_else(|| SocketAddr::from((Ipv6Addr::UNSPECIFIED, 3478)));
    let stun = if cli.stun_servers.is_empty() { file.stun_servers } else { cli.stun_servers };
    for server in &stun {
        core.stun_servers.extend(resolve_stun_server(server, udp_bind)?);
    }
    if let Some(secs) = cli.stun_interval_secs.or(file.stun_interval_secs) {
        if secs == 0 {
            return Err("--stun-interval-secs must be at least 1".into());
        }
        core.stun_interval = Duration::from_secs(secs);
    }
    if let Some(range) = cli.ingest_ports.or(file.ingest_ports) {
        core.ingest_ports = parse_range(&range)?;
    }
    if let Some(n) = cli.max_viewers.or(file.max_viewers_per_stream) {
        core.max_viewers_per_stream = n;
    }
    if let Some(n) = cli.max_viewers_total.or(file.max_viewers_total) {
        core.max_viewers_total = n;
    }
    if let Some(origin) = cli.cors_origin.or(file.cors_origin) {
        core.cors_origin = origin;
    }
    core.bearer_tokens = if cli.tokens.is_empty() { file.bearer_tokens } else { cli.tokens };
    core.ice_servers = if cli.ice_servers.is_empty() {
        file.ice_servers
            .into_iter()
            .map(|s| IceServer {
                url: s.url,
                username: s.username,
                credential: s.credential,
                secret: s.secret,
            })
            .collect()
    } else {
        cli.ice_servers.iter().map(|s| parse_ice_server(s)).collect::<Result<_, _>>()?
    };
    if let Some(secret) = cli.turn_secret.or(file.turn_secret) {
        let turn = |s: &IceServer| s.url.starts_with("turn:") || s.url.starts_with("turns:");
        let mut used = false;
        for server in core.ice_servers.iter_mut().filter(|s| turn(s) && s.credential.is_none()) {
            server.secret.get_or_insert_with(|| secret.clone());
            used = true;
        }
        if !used {
            return Err("--turn-secret: no TURN server (turn: or turns:) without a credential \
                        to use it for"
                .into());
        }
    }
    if let Some(secs) = cli.turn_ttl_secs.or(file.turn_ttl_secs) {
        if secs == 0 {
            return Err("--turn-ttl-secs must be at least 1".into());
        }
        core.turn_credential_ttl = Duration::from_secs(secs);
    }
    if let Some(prefix) = cli.whep_prefix.or(file.whep_prefix) {
        let prefix = prefix.trim_end_matches('/').to_owned();
        let plain = prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b"/-_.~".contains(&b));
        if !prefix.starts_with('/') || !plain {
            return Err(format!(
                "whep prefix {prefix:?} must start with / and hold only letters, digits and /-_.~"
            ));
        }
        core.whep_prefix = prefix;
    }
    if let Some(ffmpeg) = cli.ffmpeg.or(file.ffmpeg) {
        core.process.program = ffmpeg;
    }
    if let Some(tag) = cli.node_id.or(file.node_id) {
        if !whep_core::valid_node_id(&tag) {
            return Err(format!("node id {tag:?}: 1 to 32 letters, digits and -"));
        }
        core.node_id = Some(tag);
    }
    if let Some(url) = cli.public_url.or(file.public_url) {
        core.public_url = Some(whep_core::public_origin(&url)?);
    }
    let drain_timeout = Duration::from_secs(cli.drain_secs.or(file.drain_secs).unwrap_or(0));
    core.strict_if_match = file.strict_if_match.unwrap_or(core.strict_if_match);
    core.gop_cache = !cli.no_gop_cache && file.gop_cache.unwrap_or(core.gop_cache);
    let mut pacing = core.prime_pacing.unwrap_or_default();
    pacing.burst = file.prime_burst_kib.map_or(pacing.burst, |k| k.saturating_mul(1024));
    pacing.max_pending = file.prime_max_pending.unwrap_or(pacing.max_pending);
    core.prime_pacing = match cli.prime_kbps.or(file.prime_kbps) {
        Some(0) => None,
        Some(kbps) => Some(PrimePacing { rate: kbps.saturating_mul(1000) / 8, ..pacing }),
        None => core.prime_pacing.map(|_| pacing),
    };
    core.cached_keyframe_interval = match cli.cached_keyframe_ms.or(file.cached_keyframe_ms) {
        Some(0) => None,
        Some(ms) => Some(Duration::from_millis(ms)),
        None => core.cached_keyframe_interval,
    };
    core.path_memory = match cli.path_memory_secs.or(file.path_memory_secs) {
        Some(0) => None,
        Some(secs) => Some(Duration::from_secs(secs)),
        None => core.path_memory,
    };
    let rate =
        |flag: Option<RateSetting>, file: Option<String>, default: Option<Rate>| match (flag, file)
        {
            (Some(RateSetting(r)), _) => Ok(r),
            (None, Some(text)) => text.parse::<RateSetting>().map(|RateSetting(r)| r),
            (None, None) => Ok(default),
        };
    let limits = core.rate_limits;
    core.rate_limits = RateLimits {
        post_per_client: rate(cli.post_rate, file.post_rate, limits.post_per_client)?,
        post_global: rate(cli.post_rate_global, file.post_rate_global, limits.post_global)?,
        requests_per_client: rate(cli.request_rate, file.request_rate, limits.requests_per_client)?,
    };
    if let Some(max) = cli.max_load.or(file.max_load) {
        if !(0.1..=1.0).contains(&max) {
            return Err(format!(
                "max load {max} must be between 0.1 and 1 (1 = no admission control)"
            ));
        }
        core.max_load = max;
    }
    core.max_unconnected_per_client = cli
        .max_unconnected
        .or(file.max_unconnected_per_client)
        .unwrap_or(core.max_unconnected_per_client);
    core.max_remote_candidates = file.max_remote_candidates.unwrap_or(core.max_remote_candidates);
    core.max_viewer_addresses = file.max_viewer_addresses.unwrap_or(core.max_viewer_addresses);
    if core.max_remote_candidates == 0 || core.max_viewer_addresses == 0 {
        return Err("max_remote_candidates and max_viewer_addresses must be at least 1".into());
    }
    let secs = Duration::from_secs;
    core.first_check_timeout = file.first_check_timeout_secs.map_or(core.first_check_timeout, secs);
    core.connect_timeout = file.connect_timeout_secs.map_or(core.connect_timeout, secs);
    core.inactivity_timeout = file.inactivity_timeout_secs.map_or(core.inactivity_timeout, secs);
    core.process.stale_timeout = file.stale_timeout_secs.map_or(core.process.stale_timeout, secs);
    core.process.stop_grace = file.stop_grace_secs.map_or(core.process.stop_grace, secs);
    let dtls = cli.dtls.or(file.dtls).unwrap_or_default();
    core.crypto = dtls.crypto()?;
    if dtls == Dtls::Openssl {
        tracing::info!(%dtls, "viewers' DTLS: OpenSSL's DTLS 1.2, RSA and ECDSA client certificates");
    }

    let mut streams: Vec<(String, StreamSpec)> = file.streams.into_iter().collect();
    for s in &cli.streams {
        let (name, url) =
            s.split_once('=').ok_or_else(|| format!("--stream {s:?}: expected NAME=URL"))?;
        // FFmpeg's `-i` takes URLs and paths alike; a path without a scheme is played as a
        // looping file in real time.
        let spec = if url.contains("://") {
            StreamSpec { url: Some(url.into()), transcode: Some(true), ..StreamSpec::default() }
        } else {
            StreamSpec { file: Some(url.into()), transcode: Some(true), ..StreamSpec::default() }
        };
        streams.push((name.into(), spec));
    }
    if streams.is_empty() && !cli.no_demo {
        streams.push(("demo".into(), StreamSpec::demo()));
    }
    let shards = cli.shards.or(file.shards).unwrap_or(1);
    if !(1..=whep_core::shard::MAX_SHARDS).contains(&shards) {
        return Err(format!(
            "shards {shards} must be between 1 and {}",
            whep_core::shard::MAX_SHARDS
        ));
    }
    for (name, spec) in &streams {
        spec.to_config().map_err(|e| format!("stream {name:?}: {e}"))?;
    }
    let tls = tls_files(cli.tls_cert.or(file.tls_cert), cli.tls_key.or(file.tls_key))?;
    let media_dirs = if cli.media_dirs.is_empty() { file.media_dirs } else { cli.media_dirs };
    for dir in &media_dirs {
        crate::app::check_media_dir(dir)?;
    }
    let policy = AdminPolicy {
        media_dirs,
        raw_ffmpeg: cli.admin_raw_ffmpeg || file.admin_raw_ffmpeg.unwrap_or(false),
    };
    let tcp = if cli.no_tcp {
        TcpListen::Off
    } else if let Some(addr) = cli.tcp {
        TcpListen::At(addr)
    } else {
        match file.tcp.as_deref().map(str::trim) {
            None => TcpListen::SameAsUdp,
            Some("off" | "false" | "no") => TcpListen::Off,
            Some(a) => TcpListen::At(
                a.parse().map_err(|_| format!("tcp = {a:?}: expected an address or \"off\""))?,
            ),
        }
    };
    let tcp_queue_kib = cli.tcp_queue_kib.or(file.tcp_queue_kib).unwrap_or(128);
    if !(4..=65_536).contains(&tcp_queue_kib) {
        return Err(format!("tcp_queue_kib {tcp_queue_kib}: expected 4 to 65536"));
    }
    let webhook_url = match cli.webhook_url.or(file.webhook_url) {
        Some(url) => Some(
            HttpUrl::parse(&url)
                .map_err(|e| format!("--webhook-url {e}"))?
                .with_client(outbound.clone()),
        ),
        None => None,
    };
    let webhook_secret = match cli.webhook_secret_file.or(file.webhook_secret_file) {
        Some(path) => {
            let text = read_file(&path)
                .map_err(|e| format!("--webhook-secret-file {}: {e}", path.display()))?;
            let secret = crate::webhook::WebhookSecret::parse(&text)
                .map_err(|e| format!("--webhook-secret-file {}: {e}", path.display()))?;
            if webhook_url.is_none() {
                return Err("webhook_secret_file needs webhook_url".into());
            }
            Some(secret)
        }
        None => None,
    };
    Ok(Launch {
        server: ServerConfig {
            tcp,
            tcp_queue_bytes: tcp_queue_kib * 1024,
            core,
            routes: RoutesConfig {
                admin_token: cli.admin_token.or(file.admin_token),
                policy,
                webhook_url,
                webhook_secret,
                webhook: None,
            },
            udp_bind,
            udp_gso: !cli.no_gso,
            shards,
            drain_timeout,
            auth,
            ..ServerConfig::default()
        },
        http: cli
            .http
            .or(file.http)
            .unwrap_or_else(|| SocketAddr::from((Ipv6Addr::UNSPECIFIED, 8080))),
        tls,
        streams,
    })
}

fn tls_files(cert: Option<PathBuf>, key: Option<PathBuf>) -> Result<Option<TlsFiles>, String> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(TlsFiles { cert, key })),
        (None, None) => Ok(None),
        (Some(_), None) => Err("--tls-cert (tls_cert) needs --tls-key (tls_key)".into()),
        (None, Some(_)) => Err("--tls-key (tls_key) needs --tls-cert (tls_cert)".into()),
    }
}

/// The addresses of a STUN server given as `HOST[:PORT]` (or `stun:HOST[:PORT]`; port 3478 by
/// default), a name resolved now, of the UDP socket's address family.
fn resolve_stun_server(s: &str, udp: SocketAddr) -> Result<Vec<SocketAddr>, String> {
    use std::net::ToSocketAddrs;
    let text = s.trim();
    let host = text.strip_prefix("stun:").unwrap_or(text);
    let bad = || format!("--stun-server {s:?}: expected HOST[:PORT] or IP[:PORT]");
    let all: Vec<SocketAddr> = if let Ok(a) = host.parse::<SocketAddr>() {
        vec![a]
    } else if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        vec![SocketAddr::new(ip, 3478)]
    } else {
        let (name, port) = match host.split_once(':') {
            Some((name, port)) => (name, port.parse::<u16>().map_err(|_| bad())?),
            None => (host, 3478),
        };
        if name.is_empty() || name.contains(['[', ']', ':', '/', ' ']) {
            return Err(bad());
        }
        (name, port).to_socket_addrs().map_err(|e| format!("--stun-server {s:?}: {e}"))?.collect()
    };
    let usable: Vec<SocketAddr> = if udp.is_ipv6() && udp.ip().is_unspecified() {
        // A dual-stack socket (`[::]`) reaches both families: the IPv4 addresses first, what
        // a NAT in front of the server maps; one family, so that failing over to the next
        // server does not flip the advertised address between families.
        let (v4, v6): (Vec<SocketAddr>, Vec<SocketAddr>) = all.iter().partition(|a| a.is_ipv4());
        if v4.is_empty() { v6 } else { v4 }
    } else {
        all.iter().copied().filter(|a| a.is_ipv4() == udp.is_ipv4()).collect()
    };
    if usable.is_empty() {
        let family = if udp.is_ipv4() { "IPv4" } else { "IPv6" };
        return Err(format!(
            "--stun-server {s:?}: no {family} address (the UDP socket is {udp}); found {all:?}"
        ));
    }
    Ok(usable)
}

fn parse_range(s: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let (a, b) =
        s.split_once('-').ok_or_else(|| format!("port range {s:?}: expected FIRST-LAST"))?;
    let a: u16 = a.trim().parse().map_err(|_| format!("port range {s:?}: bad first port"))?;
    let b: u16 = b.trim().parse().map_err(|_| format!("port range {s:?}: bad last port"))?;
    if a == 0 || b <= a {
        return Err(format!("port range {s:?} must hold at least one pair of non-zero ports"));
    }
    Ok(a..=b)
}

fn parse_ice_server(s: &str) -> Result<IceServer, String> {
    let mut parts = s.split(',');
    let url = parts.next().unwrap_or_default().to_owned();
    if !(url.starts_with("stun:") || url.starts_with("turn:") || url.starts_with("turns:")) {
        return Err(format!("--ice-server {s:?}: URL must start with stun:, turn: or turns:"));
    }
    Ok(IceServer {
        url,
        username: parts.next().map(Into::into),
        credential: parts.next().map(Into::into),
        secret: None,
    })
}

/// The first line a server prints on stdout once it listens.
pub fn listening_line(http: SocketAddr, udp: SocketAddr) -> String {
    format!("whepd: listening on http://{} (WebRTC UDP {udp})", display_host(http))
}

/// The line a server prints on stdout per stream it starts with.
pub fn watch_line(http: SocketAddr, stream: &str) -> String {
    format!("whepd: watch {stream} at {}", player_url(http, stream))
}

/// `line` (one of [`listening_line`], [`watch_line`], [`player_url`]) for a listener that
/// serves HTTPS: its first `http://` made `https://`.
pub fn over_tls(line: &str) -> String {
    line.replacen("http://", "https://", 1)
}

/// The player page URL of a stream.
pub fn player_url(http: SocketAddr, stream: &str) -> String {
    let id = percent_encoding::utf8_percent_encode(stream, percent_encoding::NON_ALPHANUMERIC);
    format!("http://{}/?stream={id}", display_host(http))
}

fn display_host(http: SocketAddr) -> SocketAddr {
    if http.ip().is_unspecified() { SocketAddr::from(([127, 0, 0, 1], http.port())) } else { http }
}

/// Logs to stderr through `tracing`, filtered by `RUST_LOG` (default `info,ffmpeg=warn`), in
/// colour only on a terminal. For the servers' `main`s.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,ffmpeg=warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// The message for a failed spawn of `program`, naming the fix when it is missing.
pub fn spawn_error(program: &str, e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => missing_ffmpeg(program),
        std::io::ErrorKind::PermissionDenied => format!("`{program}` is not executable: {e}"),
        _ => format!("could not run `{program}`: {e}"),
    }
}

/// The error for an FFmpeg program that is not on `PATH`, naming the fix.
pub fn missing_ffmpeg(program: &str) -> String {
    format!(
        "FFmpeg (`{program}`) was not found on PATH. Install it (Debian/Ubuntu: `sudo apt-get \
         install ffmpeg`) or pass --ffmpeg /path/to/ffmpeg"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stun_servers_resolve_to_the_udp_sockets_family() {
        let s = setup_from(&[
            "--stun-server",
            "198.51.100.1:3479",
            "--stun-server",
            "stun:198.51.100.2",
            "--stun-server",
            "localhost:3480",
            "--stun-interval-secs",
            "45",
        ])
        .expect("valid");
        let addrs: Vec<String> =
            s.server.core.stun_servers.iter().map(ToString::to_string).collect();
        assert_eq!(addrs, ["198.51.100.1:3479", "198.51.100.2:3478", "127.0.0.1:3480"]);
        assert_eq!(s.server.core.stun_interval, Duration::from_secs(45));
        assert!(setup_from(&[]).expect("valid").server.core.stun_servers.is_empty());
        let file = setup_with(&["--config", "w.toml"], "stun_servers = [\"198.51.100.3\"]\n")
            .expect("valid");
        assert_eq!(file.server.core.stun_servers, ["198.51.100.3:3478".parse().expect("addr")]);
        let v6 = setup_from(&["--udp", "0.0.0.0:3478", "--stun-server", "[2001:db8::1]:3478"])
            .expect_err("IPv4 socket");
        assert!(v6.contains("no IPv4 address"), "{v6}");
        // The default socket is dual-stack: both families may be asked.
        let dual = setup_from(&["--stun-server", "[2001:db8::1]:3478"]).expect("dual-stack");
        assert_eq!(dual.server.core.stun_servers, ["[2001:db8::1]:3478".parse().expect("addr")]);
        let v4only = setup_from(&["--udp", "[::1]:3478", "--stun-server", "198.51.100.1"]);
        assert!(v4only.is_err(), "an IPv6 address that is not [::] is IPv6 only");
        let ok6 = setup_from(&["--udp", "[::]:3478", "--stun-server", "[2001:db8::1]"]);
        assert_eq!(
            ok6.expect("valid").server.core.stun_servers,
            ["[2001:db8::1]:3478".parse().expect("addr")]
        );
        for bad in ["host:port", "a b:1", ""] {
            assert!(setup_from(&["--stun-server", bad]).is_err(), "{bad:?}");
        }
        assert!(setup_from(&["--stun-interval-secs", "0"]).is_err());
    }

    fn setup_from(args: &[&str]) -> Result<Launch, String> {
        setup_with(args, "")
    }

    fn setup_with(args: &[&str], file: &str) -> Result<Launch, String> {
        let file = file.to_owned();
        let read = move |p: &Path| {
            if p.starts_with("/nonexistent") {
                Err(std::io::Error::from(std::io::ErrorKind::NotFound))
            } else {
                Ok(file.clone())
            }
        };
        parse(std::iter::once("whepd").chain(args.iter().copied()), read).map_err(|e| e.to_string())
    }

    #[test]
    fn ice_tcp_is_on_next_to_udp_by_default_and_configurable() {
        let s = setup_from(&[]).expect("valid");
        assert_eq!(s.server.tcp, TcpListen::SameAsUdp);
        assert_eq!(s.server.tcp_queue_bytes, 128 * 1024);
        let s = setup_from(&["--no-tcp"]).expect("valid");
        assert_eq!(s.server.tcp, TcpListen::Off);
        let s = setup_from(&["--tcp", "0.0.0.0:443", "--tcp-queue-kib", "64"]).expect("valid");
        assert_eq!(s.server.tcp, TcpListen::At(SocketAddr::from(([0, 0, 0, 0], 443))));
        assert_eq!(s.server.tcp_queue_bytes, 64 * 1024);
        let file = "tcp = \"off\"\ntcp_queue_kib = 256\n";
        let s = setup_with(&["--config", "w.toml"], file).expect("valid");
        assert_eq!((s.server.tcp, s.server.tcp_queue_bytes), (TcpListen::Off, 256 * 1024));
        let s = setup_with(&["--config", "w.toml", "--tcp", "127.0.0.1:9"], file).expect("valid");
        assert_eq!(s.server.tcp, TcpListen::At(SocketAddr::from(([127, 0, 0, 1], 9))));
        assert!(setup_with(&["--config", "w.toml"], "tcp = \"nonsense\"").is_err());
        assert!(setup_from(&["--tcp-queue-kib", "1"]).is_err());
        assert!(setup_from(&["--tcp", "127.0.0.1:9", "--no-tcp"]).is_err());
    }

    #[test]
    fn ipv6_addresses_in_flags_and_file() {
        let s = setup_from(&[
            "--http",
            "[::1]:8080",
            "--udp",
            "[fd77:6::1]:3478",
            "--candidate",
            "[2001:db8::1]:3478",
            "--candidate",
            "192.0.2.1:3478",
        ])
        .expect("valid");
        assert_eq!(s.http.to_string(), "[::1]:8080");
        assert_eq!(s.server.udp_bind.to_string(), "[fd77:6::1]:3478");
        let c: Vec<String> = s.server.core.host_candidates.iter().map(|a| a.to_string()).collect();
        assert_eq!(c, ["[2001:db8::1]:3478", "192.0.2.1:3478"]);
        let file = "udp = \"[::]:3478\"\ncandidates = [\"[2001:db8::2]:3478\"]\n";
        let s = setup_with(&["--config", "w.toml"], file).expect("valid");
        assert_eq!(s.server.udp_bind.to_string(), "[::]:3478");
        assert_eq!(s.server.core.host_candidates[0].to_string(), "[2001:db8::2]:3478");
        assert!(setup_from(&["--candidate", "2001:db8::1:3478"]).is_err(), "IPv6 needs brackets");
        let http: SocketAddr = "[::]:8080".parse().expect("addr");
        assert_eq!(
            listening_line(http, "[::]:3478".parse().expect("addr")),
            "whepd: listening on http://127.0.0.1:8080 (WebRTC UDP [::]:3478)"
        );
        let v6: SocketAddr = "[fd77:6::1]:8080".parse().expect("addr");
        assert_eq!(player_url(v6, "demo"), "http://[fd77:6::1]:8080/?stream=demo");
    }

    #[test]
    fn no_configuration_is_the_demo() {
        let s = setup_from(&[]).expect("valid");
        assert_eq!(s.streams.len(), 1);
        assert_eq!(s.streams[0].0, "demo");
        // Dual-stack by default (IPv4 alone where the host has no IPv6, see `os::bind_tcp`).
        assert_eq!(s.http.to_string(), "[::]:8080");
        assert_eq!(s.server.udp_bind.to_string(), "[::]:3478");
        assert!(s.server.routes.admin_token.is_none());
        assert!(setup_from(&["--no-demo"]).expect("valid").streams.is_empty());
    }

    #[test]
    fn flags_override_the_file() {
        let file = r#"
http = "127.0.0.1:9000"
max_viewers_per_stream = 3
admin_token = "file"
whep_prefix = "/api/v3/whep/"
bearer_tokens = ["a"]
[[ice_servers]]
url = "stun:stun.example.org"
[streams.cam]
url = "rtsp://10.0.0.5/live"
max_viewers = 2
"#;
        let s = setup_with(&["--config", "w.toml", "--max-viewers", "5", "--token", "b"], file)
            .expect("valid");
        assert_eq!(s.http, "127.0.0.1:9000".parse().expect("addr"));
        assert_eq!(s.server.core.max_viewers_per_stream, 5);
        assert_eq!(s.server.core.bearer_tokens, vec!["b".to_owned()]);
        assert_eq!(s.server.core.whep_prefix, "/api/v3/whep");
        assert_eq!(s.server.core.ice_servers.len(), 1);
        assert_eq!(s.server.routes.admin_token.as_deref(), Some("file"));
        assert_eq!(s.streams.len(), 1, "a configured stream replaces the demo");
        assert_eq!(s.streams[0].1.max_viewers, Some(2));
        let err = setup_with(&["--config", "w.toml"], "htp = 1").expect_err("unknown key");
        assert!(err.contains("htp"), "{err}");
        let two = "[streams.x]\nurl = \"a\"\nfile = \"b\"\n";
        let err = setup_with(&["--config", "w.toml"], two).expect_err("two sources");
        assert!(err.contains("stream \"x\""), "{err}");
        let s = setup_from(&["--stream", "a=srt://h:1", "--stream", "b=/srv/x.mp4"]).expect("ok");
        assert!(s.streams[0].1.url.is_some() && s.streams[1].1.file.is_some());
    }

    #[test]
    fn auth_flags_and_file_configure_the_core_and_the_shell() {
        let s = setup_from(&[]).expect("valid");
        assert!(!s.server.core.auth.is_external() && s.server.auth.http_url.is_none());
        let s = setup_from(&[
            "--auth-http-url",
            "http://127.0.0.1:9000/auth",
            "--auth-http-timeout-ms",
            "750",
            "--auth-cache-secs",
            "0",
        ])
        .expect("valid");
        let http = s.server.core.auth.http.expect("callback configured");
        assert_eq!((http.timeout, http.cache_ttl), (Duration::from_millis(750), Duration::ZERO));
        assert_eq!(s.server.auth.http_url.map(|u| u.port), Some(9000));
        let s = setup_from(&["--auth-http-url", "https://auth/", "--webhook-url", "https://h/"])
            .expect("https accepted");
        let url = s.server.auth.http_url.expect("callback");
        assert_eq!((url.https, url.port, url.client.ca_file()), (true, 443, None));
        let e = setup_from(&["--auth-http-url", "ftp://auth/"]).expect_err("ftp refused");
        assert!(e.contains("http:// or https://"), "{e}");
        // A private CA for all three outgoing URLs, checked to hold a certificate.
        let ca = crate::outbound::tests::pem_of(
            rcgen::generate_simple_self_signed(vec!["ca".to_owned()]).expect("cert").cert.der(),
        );
        let args = [
            "--outbound-ca-file",
            "/ca.pem",
            "--auth-http-url",
            "https://a/",
            "--jwks-url",
            "https://j/",
            "--webhook-url",
            "https://w/",
        ];
        let s = setup_with(&args, &ca).expect("valid");
        let ca_file = Some(Path::new("/ca.pem"));
        assert_eq!(s.server.auth.http_url.expect("callback").client.ca_file(), ca_file);
        let jwks = s.server.auth.jwt.and_then(|j| j.jwks_url).expect("JWKS URL");
        assert_eq!(jwks.client.ca_file(), ca_file);
        let hook = s.server.routes.webhook_url.expect("webhook");
        assert_eq!(hook.client.ca_file(), ca_file);
        let e = setup_with(&args, "not PEM").expect_err("no certificate");
        assert!(e.contains("--outbound-ca-file /ca.pem: no PEM certificate"), "{e}");
        let file = "outbound_ca_file = \"/ca.pem\"\n";
        let e = setup_with(&["--config", "w.toml"], file).expect_err("the file's is read");
        assert!(e.contains("--outbound-ca-file /ca.pem"), "{e}");
        let e = setup_from(&["--jwt-secret", "short"]).expect_err("short secret");
        assert!(e.contains("32 bytes"), "{e}");

        // The file (the one closure reads the config and the secret file: the text is both).
        let file =
            "jwt_secret_file = \"/s\"\njwt_leeway_secs = 5\n# a secret of 32 bytes or more\n";
        let s = setup_with(&["--config", "w.toml"], file).expect("valid");
        assert_eq!(s.server.core.auth.leeway, Duration::from_secs(5));
        assert!(s.server.core.auth.jwt.is_some());
        // The flag, and the secret file's trailing newline is not part of the secret.
        let secret = "0123456789abcdef0123456789abcdef";
        let t = format!("{secret}\n");
        let s = setup_with(&["--jwt-secret-file", "/s"], &t).expect("valid");
        let keys = s.server.core.auth.jwt.expect("JWT configured");
        let token = whep_core::auth::testing::hs256(
            secret.as_bytes(),
            r#"{"alg":"HS256"}"#,
            r#"{"exp":4000000000,"whep":{"streams":["*"]}}"#,
        );
        let now = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        assert!(keys.verify(&token, now, Duration::ZERO).is_ok());
        let e = setup_with(&["--jwks-file", "/k"], "{\"keys\":[]}").expect_err("no key");
        assert!(e.contains("no usable key"), "{e}");
    }

    #[test]
    fn turn_secret_applies_to_turn_servers_without_a_password() {
        let s = setup_from(&[
            "--ice-server",
            "stun:stun.example.org",
            "--ice-server",
            "turn:turn.example.org:3478?transport=udp",
            "--ice-server",
            "turn:other.example.org,u,p",
            "--turn-secret",
            "s3",
            "--turn-ttl-secs",
            "600",
        ])
        .expect("valid");
        let servers = &s.server.core.ice_servers;
        assert_eq!(servers[0].secret, None, "STUN needs none");
        assert_eq!(servers[1].secret.as_deref(), Some("s3"));
        assert_eq!(servers[2].secret, None, "a server with a password keeps it");
        assert_eq!(s.server.core.turn_credential_ttl, Duration::from_secs(600));
        assert!(!format!("{servers:?}").contains("s3"), "Debug hides the secret");
        let err =
            setup_from(&["--ice-server", "stun:x", "--turn-secret", "s"]).expect_err("unused");
        assert!(err.contains("no TURN server"), "{err}");
        let file = r#"
turn_ttl_secs = 3600
[[ice_servers]]
url = "turn:turn.example.org:3478?transport=tcp"
secret = "f"
"#;
        let s = setup_with(&["--config", "w.toml"], file).expect("valid");
        assert_eq!(s.server.core.ice_servers[0].secret.as_deref(), Some("f"));
        assert_eq!(s.server.core.turn_credential_ttl, Duration::from_secs(3600));
        let zero = setup_from(&["--ice-server", "turn:t", "--turn-ttl-secs", "0"]);
        assert!(zero.expect_err("zero").contains("at least 1"));
    }

    #[test]
    fn jwt_issuer_and_audience() {
        let secret = "0123456789abcdef0123456789abcdef";
        let args =
            ["--jwt-secret-file", "/s", "--jwt-issuer", "https://idp/", "--jwt-audience", "whep"];
        let s = setup_with(&args, secret).expect("valid");
        assert_eq!(s.server.core.auth.jwt_issuer.as_deref(), Some("https://idp/"));
        assert_eq!(s.server.core.auth.jwt_audience.as_deref(), Some("whep"));
        let e = setup_from(&["--jwt-audience", "whep"]).expect_err("no keys");
        assert!(e.contains("need JWT keys"), "{e}");
        let e = setup_with(&["--jwt-secret-file", "/s", "--jwt-issuer", " "], secret);
        assert!(e.expect_err("empty").contains("must not be empty"));
        let s = setup_with(&["--jwt-secret-file", "/s"], secret).expect("valid");
        assert_eq!((s.server.core.auth.jwt_issuer, s.server.core.auth.jwt_audience), (None, None));
    }

    #[test]
    fn auth_callback_secret_from_a_file() {
        let key = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let args = ["--auth-http-url", "http://a/", "--auth-http-secret-file", "/k"];
        let s = setup_with(&args, key).expect("valid");
        assert_eq!(s.server.auth.http_secret, crate::webhook::WebhookSecret::parse(key).ok());
        let e = setup_with(&["--auth-http-secret-file", "/k"], key).expect_err("no URL");
        assert!(e.contains("needs auth_http_url"), "{e}");
        let e = setup_with(&args, "whsec_!").expect_err("bad key");
        assert!(e.contains("--auth-http-secret-file /k"), "{e}");
    }

    #[test]
    fn webhook_secret_from_a_file() {
        let key = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n";
        let args = ["--webhook-url", "http://h/", "--webhook-secret-file", "/s"];
        let s = setup_with(&args, key).expect("valid");
        let secret = s.server.routes.webhook_secret.expect("secret");
        assert_eq!(secret, crate::webhook::WebhookSecret::parse(key).expect("key"));
        let e = setup_with(&args, "whsec_c2hvcnQ=").expect_err("short");
        assert!(e.contains("--webhook-secret-file /s") && e.contains("24 to 64"), "{e}");
        let e = setup_with(&["--webhook-secret-file", "/s"], key).expect_err("no URL");
        assert!(e.contains("needs webhook_url"), "{e}");
        let e = setup_with(
            &["--webhook-url", "http://h/", "--webhook-secret-file", "/nonexistent"],
            key,
        );
        assert!(e.is_err());
        assert_eq!(
            setup_from(&["--webhook-url", "http://h/"]).expect("ok").server.routes.webhook_secret,
            None
        );
    }

    #[test]
    fn public_url_from_flag_and_file() {
        let s = setup_from(&["--public-url", "HTTPS://n1.example.org/"]).expect("valid");
        assert_eq!(s.server.core.public_url.as_deref(), Some("https://n1.example.org"));
        let s = setup_with(&["--config", "w.toml"], "public_url = \"http://192.0.2.11:8080\"\n")
            .expect("valid");
        assert_eq!(s.server.core.public_url.as_deref(), Some("http://192.0.2.11:8080"));
        let e = setup_from(&["--public-url", "https://n1.example.org/whep"]).err();
        assert!(e.is_some_and(|e| e.contains("nothing after it")));
        assert_eq!(setup_from(&[]).expect("valid").server.core.public_url, None);
    }

    #[test]
    fn node_id_and_drain_from_flag_and_file() {
        let s = setup_from(&["--node-id", "n-1", "--drain-secs", "30"]).expect("valid");
        assert_eq!(s.server.core.node_id.as_deref(), Some("n-1"));
        assert_eq!(s.server.drain_timeout, Duration::from_secs(30));
        let s = setup_with(&["--config", "w.toml"], "node_id = \"b2\"\ndrain_secs = 5\n")
            .expect("valid");
        assert_eq!(s.server.core.node_id.as_deref(), Some("b2"));
        assert_eq!(s.server.drain_timeout, Duration::from_secs(5));
        assert_eq!(setup_from(&[]).expect("valid").server.drain_timeout, Duration::ZERO);
        for bad in ["a.b", "", "a/b", &"x".repeat(33)] {
            assert!(setup_from(&["--node-id", bad]).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn max_load_from_flag_and_file() {
        assert_eq!(setup_from(&[]).expect("valid").server.core.max_load, 0.9);
        assert_eq!(setup_from(&["--max-load", "0.75"]).expect("valid").server.core.max_load, 0.75);
        let s = setup_with(&["--config", "w.toml"], "max_load = 1.0\n").expect("valid");
        assert_eq!(s.server.core.max_load, 1.0);
        let err = setup_from(&["--max-load", "2"]).expect_err("out of range");
        assert!(err.contains("between 0.1 and 1"), "{err}");
    }

    #[test]
    fn rate_limits_from_flags_and_file() {
        let s = setup_from(&[]).expect("valid");
        assert_eq!(s.server.core.rate_limits, RateLimits::default());
        let file = "post_rate = \"2:4\"\nrequest_rate = \"off\"\npost_rate_global = \"9\"\n";
        let s = setup_with(&["--config", "w.toml", "--post-rate-global", "0"], file).expect("ok");
        assert_eq!(
            s.server.core.rate_limits,
            RateLimits {
                post_per_client: Some(Rate::new(2, 4)),
                post_global: None,
                requests_per_client: None,
            }
        );
        let err = setup_from(&["--post-rate", "fast"]).expect_err("bad rate");
        assert!(err.contains("RATE[:BURST]"), "{err}");
        let err = setup_with(&["--config", "w.toml"], "post_rate = \"1:0\"").expect_err("bad");
        assert!(err.contains("RATE[:BURST]"), "{err}");
    }

    #[test]
    fn prime_pacing_from_flags_and_file() {
        let s = setup_from(&[]).expect("valid");
        assert_eq!(s.server.core.prime_pacing, Some(PrimePacing::default()));
        let file = "prime_kbps = 4000\nprime_burst_kib = 32\nprime_max_pending = 1500\n";
        let s = setup_with(&["--config", "w.toml"], file).expect("ok");
        assert_eq!(
            s.server.core.prime_pacing,
            Some(PrimePacing { rate: 500_000, burst: 32 * 1024, max_pending: 1500 })
        );
        let s = setup_with(&["--config", "w.toml", "--prime-kbps", "16000"], file).expect("ok");
        assert_eq!(
            s.server.core.prime_pacing.map(|p| (p.rate, p.burst)),
            Some((2_000_000, 32 * 1024))
        );
        assert_eq!(setup_from(&["--prime-kbps", "0"]).expect("ok").server.core.prime_pacing, None);
        let s = setup_from(&["--cached-keyframe-ms", "0"]).expect("ok");
        assert_eq!(s.server.core.cached_keyframe_interval, None);
        let s = setup_with(&["--config", "w.toml"], "cached_keyframe_ms = 250\n").expect("ok");
        assert_eq!(s.server.core.cached_keyframe_interval, Some(Duration::from_millis(250)));
        let s = setup_from(&["--path-memory-secs", "0"]).expect("ok");
        assert_eq!(s.server.core.path_memory, None);
        let s = setup_with(&["--config", "w.toml"], "path_memory_secs = 60\n").expect("ok");
        assert_eq!(s.server.core.path_memory, Some(Duration::from_secs(60)));
    }

    #[test]
    fn admin_policy_from_flags_and_file() {
        let s = setup_from(&[]).expect("valid");
        assert_eq!(s.server.routes.policy, AdminPolicy::default());
        let file = "media_dirs = [\"/srv/a\"]\nadmin_raw_ffmpeg = true\n";
        let s = setup_with(&["--config", "w.toml"], file).expect("valid");
        assert_eq!(
            s.server.routes.policy,
            AdminPolicy { media_dirs: vec!["/srv/a".into()], raw_ffmpeg: true }
        );
        let s = setup_with(
            &["--config", "w.toml", "--media-dir", "/m/1", "--media-dir", "/m/2/"],
            file,
        )
        .expect("valid");
        assert_eq!(s.server.routes.policy.media_dirs, ["/m/1", "/m/2/"]);
        assert!(
            setup_from(&["--admin-raw-ffmpeg"]).expect("valid").server.routes.policy.raw_ffmpeg
        );
        let err = setup_from(&["--media-dir", "media"]).expect_err("relative");
        assert!(err.contains("absolute"), "{err}");
        let err = setup_from(&["--media-dir", "/srv/../etc"]).expect_err("dot-dot");
        assert!(err.contains("absolute"), "{err}");
        // Configured streams keep full power: raw args and lavfi need no opt-in there.
        let raw = "[streams.r]\nargs = [\"-f\", \"lavfi\", \"-i\", \"testsrc2\"]\n";
        assert!(setup_with(&["--config", "w.toml"], raw).is_ok());
    }

    #[test]
    fn dtls_from_flag_and_file() {
        let dimpl = whep_core::dtls::provider();
        let s = setup_from(&[]).expect("valid");
        assert!(std::sync::Arc::ptr_eq(&s.server.core.crypto, &dimpl), "dimpl by default");
        let s = setup_from(&["--dtls", "dimpl"]).expect("valid");
        assert!(std::sync::Arc::ptr_eq(&s.server.core.crypto, &dimpl));
        let err = setup_from(&["--dtls", "rustls"]).expect_err("unknown");
        assert!(err.contains("dimpl or openssl"), "{err}");
        let err = setup_with(&["--config", "w.toml"], "dtls = \"boring\"\n").expect_err("bad");
        assert!(err.contains("dimpl") && err.contains("openssl"), "{err}");
        let openssl = setup_from(&["--dtls", "openssl"]);
        let file = setup_with(&["--config", "w.toml"], "dtls = \"openssl\"\n");
        let flag_over_file =
            setup_with(&["--config", "w.toml", "--dtls", "dimpl"], "dtls = \"openssl\"\n")
                .expect("valid");
        assert!(std::sync::Arc::ptr_eq(&flag_over_file.server.core.crypto, &dimpl));
        if Dtls::Openssl.available() {
            for s in [openssl, file] {
                let crypto = s.expect("valid").server.core.crypto;
                assert!(format!("{:?}", crypto.dtls_provider).contains("OpensslDtls"));
            }
        } else {
            for s in [openssl, file] {
                let err = s.expect_err("not built");
                assert!(err.contains("openssl-dtls"), "{err}");
            }
        }
    }

    #[test]
    fn output_lines() {
        let http = "0.0.0.0:8080".parse().expect("addr");
        let udp = "0.0.0.0:3478".parse().expect("addr");
        assert_eq!(
            listening_line(http, udp),
            "whepd: listening on http://127.0.0.1:8080 (WebRTC UDP 0.0.0.0:3478)"
        );
        assert_eq!(
            watch_line(http, "cam:1"),
            "whepd: watch cam:1 at http://127.0.0.1:8080/?stream=cam%3A1"
        );
    }

    #[test]
    fn tls_files_from_flags_and_file() {
        assert_eq!(setup_from(&[]).expect("valid").tls, None);
        let s = setup_from(&["--tls-cert", "c.pem", "--tls-key", "k.pem"]).expect("valid");
        let files = TlsFiles { cert: "c.pem".into(), key: "k.pem".into() };
        assert_eq!(s.tls.as_ref(), Some(&files));
        let file = "tls_cert = \"/etc/c.pem\"\ntls_key = \"/etc/k.pem\"\n";
        let s = setup_with(&["--config", "w.toml", "--tls-cert", "c.pem"], file).expect("ok");
        let files = TlsFiles { cert: "c.pem".into(), key: "/etc/k.pem".into() };
        assert_eq!(s.tls, Some(files), "a flag overrides the file");
        let err = setup_from(&["--tls-cert", "c.pem"]).expect_err("no key");
        assert!(err.contains("needs --tls-key"), "{err}");
        let err = setup_with(&["--config", "w.toml"], "tls_key = \"k\"").expect_err("no cert");
        assert!(err.contains("needs --tls-cert"), "{err}");
        let line = over_tls(&watch_line("127.0.0.1:8443".parse().expect("addr"), "demo"));
        assert_eq!(line, "whepd: watch demo at https://127.0.0.1:8443/?stream=demo");
    }

    #[test]
    fn bad_values_are_errors() {
        for (args, needle) in [
            (&["--ingest-ports", "5000"][..], "FIRST-LAST"),
            (&["--ingest-ports", "6000-5000"][..], "at least one pair"),
            (&["--ice-server", "http://x"][..], "stun:"),
            (&["--whep-prefix", "whep"][..], "must start with /"),
            (&["--whep-prefix", "/a\"b"][..], "must start with /"),
            (&["--stream", "novalue"][..], "NAME=URL"),
            (&["--config", "/nonexistent/whepd.toml"][..], "cannot read"),
        ] {
            let err = setup_from(args).err().unwrap_or_else(|| panic!("{args:?} accepted"));
            assert!(err.contains(needle), "{args:?}: {err}");
        }
        let ice = parse_ice_server("turn:t.example.org,user,pass").expect("valid");
        assert_eq!(
            (ice.username.as_deref(), ice.credential.as_deref()),
            (Some("user"), Some("pass"))
        );
        assert_eq!(parse_range("40000-40999").expect("valid"), 40000..=40999);
    }
}
