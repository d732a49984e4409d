//! `whepd`, the standalone server: command line, configuration file, signals.
//!
//! With no configuration it starts a demo stream (an FFmpeg test pattern with a tone) and
//! prints the URL of its player page. The `whepd` binary is [`main`]; it lives in the library so
//! that other binaries (the end-to-end suite's) run exactly the same server.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::{ServerConfig, Whep};
use clap::Parser;
use serde::Deserialize;
use tracing::{error, info};
use whep_core::app::{AppConfig, StreamSpec};
use whep_core::{Config, IceServer};

/// A WHEP egress server: FFmpeg in, browsers out.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// TOML configuration file (flags override it).
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// HTTP listen address [default: 0.0.0.0:8080].
    #[arg(long)]
    http: Option<SocketAddr>,
    /// WebRTC UDP address shared by all viewers [default: 0.0.0.0:3478].
    #[arg(long)]
    udp: Option<SocketAddr>,
    /// Address advertised to viewers as a host candidate (repeat; e.g. the public address of a
    /// 1:1 NAT) [default: the UDP address, or loopback + the default route's address].
    #[arg(long = "candidate")]
    candidates: Vec<SocketAddr>,
    /// Ingest port range for FFmpeg's RTP, `FIRST-LAST` [default: 40000-40999].
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
    /// STUN/TURN server announced to viewers, `URL[,USERNAME,CREDENTIAL]` (repeat).
    #[arg(long = "ice-server")]
    ice_servers: Vec<String>,
    /// Path prefix of the WHEP routes [default: /whep].
    #[arg(long)]
    whep_prefix: Option<String>,
    /// FFmpeg program [default: ffmpeg].
    #[arg(long)]
    ffmpeg: Option<String>,
    /// A stream fed from a URL or file, `NAME=URL`, transcoded to H264 + Opus (repeat; use the
    /// configuration file for copy mode and other options).
    #[arg(long = "stream")]
    streams: Vec<String>,
    /// Do not start the demo stream when no stream is configured.
    #[arg(long)]
    no_demo: bool,
}

/// The configuration file. Every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FileConfig {
    http: Option<SocketAddr>,
    udp: Option<SocketAddr>,
    candidates: Vec<SocketAddr>,
    ingest_ports: Option<String>,
    max_viewers_per_stream: Option<usize>,
    max_viewers_total: Option<usize>,
    cors_origin: Option<String>,
    bearer_tokens: Vec<String>,
    admin_token: Option<String>,
    ice_servers: Vec<IceServerFile>,
    whep_prefix: Option<String>,
    ffmpeg: Option<String>,
    strict_if_match: Option<bool>,
    connect_timeout_secs: Option<u64>,
    inactivity_timeout_secs: Option<u64>,
    stale_timeout_secs: Option<u64>,
    stop_grace_secs: Option<u64>,
    streams: BTreeMap<String, StreamSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IceServerFile {
    url: String,
    username: Option<String>,
    credential: Option<String>,
}

struct Setup {
    server: ServerConfig,
    http: SocketAddr,
    streams: Vec<(String, StreamSpec)>,
}

fn setup(cli: Cli) -> Result<Setup, String> {
    let file: FileConfig = match &cli.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => FileConfig::default(),
    };
    let mut core = Config::default();
    if !cli.candidates.is_empty() {
        core.host_candidates = cli.candidates;
    } else {
        core.host_candidates = file.candidates;
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
            .map(|s| IceServer { url: s.url, username: s.username, credential: s.credential })
            .collect()
    } else {
        cli.ice_servers.iter().map(|s| parse_ice_server(s)).collect::<Result<_, _>>()?
    };
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
    core.strict_if_match = file.strict_if_match.unwrap_or(core.strict_if_match);
    let secs = Duration::from_secs;
    core.connect_timeout = file.connect_timeout_secs.map_or(core.connect_timeout, secs);
    core.inactivity_timeout = file.inactivity_timeout_secs.map_or(core.inactivity_timeout, secs);
    core.process.stale_timeout = file.stale_timeout_secs.map_or(core.process.stale_timeout, secs);
    core.process.stop_grace = file.stop_grace_secs.map_or(core.process.stop_grace, secs);

    let mut streams: Vec<(String, StreamSpec)> = file.streams.into_iter().collect();
    for s in &cli.streams {
        let (name, url) =
            s.split_once('=').ok_or_else(|| format!("--stream {s:?}: expected NAME=URL"))?;
        let spec = if std::path::Path::new(url).exists() {
            StreamSpec { file: Some(url.into()), transcode: Some(true), ..StreamSpec::default() }
        } else {
            StreamSpec { url: Some(url.into()), transcode: Some(true), ..StreamSpec::default() }
        };
        streams.push((name.into(), spec));
    }
    if streams.is_empty() && !cli.no_demo {
        streams.push(("demo".into(), StreamSpec::demo()));
    }
    for (name, spec) in &streams {
        spec.to_config().map_err(|e| format!("stream {name:?}: {e}"))?;
    }
    let server = ServerConfig {
        core,
        app: AppConfig { admin_token: cli.admin_token.or(file.admin_token) },
        udp_bind: cli.udp.or(file.udp).unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 3478))),
        ..ServerConfig::default()
    };
    let http = cli.http.or(file.http).unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8080)));
    Ok(Setup { server, http, streams })
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
    })
}

/// Runs `whepd` with the process's arguments until Ctrl-C or SIGTERM.
pub fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,ffmpeg=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let setup = match setup(Cli::parse()) {
        Ok(s) => s,
        Err(e) => {
            error!("{e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(setup)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(setup: Setup) -> Result<(), String> {
    check_ffmpeg(&setup.server.core.process.program, !setup.streams.is_empty())?;
    let udp = setup.server.udp_bind;
    let whep = Whep::start(setup.server)
        .map_err(|e| format!("cannot bind the WebRTC UDP socket {udp}: {e}"))?;
    let listener = tokio::net::TcpListener::bind(setup.http)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", setup.http))?;
    let http = listener.local_addr().map_err(|e| e.to_string())?;
    let host =
        if http.ip().is_unspecified() { "127.0.0.1".to_owned() } else { http.ip().to_string() };
    // The lines a person (or a test) starting whepd needs, on stdout so scripts can read them.
    #[allow(clippy::print_stdout)]
    {
        println!(
            "whepd: listening on http://{host}:{} (WebRTC UDP {})",
            http.port(),
            whep.udp_addr()
        );
    }
    for (name, spec) in setup.streams {
        whep.add_stream(&name, spec).await.map_err(|e| format!("stream {name:?}: {e}"))?;
        let host =
            if http.ip().is_unspecified() { "127.0.0.1".to_owned() } else { http.ip().to_string() };
        let url = format!("http://{host}:{}/?stream={name}", http.port());
        info!(stream = %name, %url, "stream added");
        // The one line a person starting the demo needs; on stdout so scripts can read it.
        #[allow(clippy::print_stdout)]
        {
            println!("whepd: watch {name} at {url}");
        }
    }
    let shutdown = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    error!("cannot install the SIGTERM handler: {e}");
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => info!("Ctrl-C: shutting down"),
            _ = term.recv() => info!("SIGTERM: shutting down"),
        }
    };
    whep.serve(listener, shutdown).await.map_err(|e| e.to_string())?;
    whep.shutdown().await;
    Ok(())
}

/// Fails early, naming the fix, when FFmpeg is missing and a stream needs it.
fn check_ffmpeg(program: &str, needed: bool) -> Result<(), String> {
    if !needed {
        return Ok(());
    }
    match std::process::Command::new(program)
        .arg("-version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!(
            "FFmpeg (`{program}`) was not found on PATH. Install it (Debian/Ubuntu: `sudo apt-get \
             install ffmpeg`) or pass --ffmpeg /path/to/ffmpeg"
        )),
        Err(e) => Err(format!("cannot run FFmpeg (`{program}`): {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup_from(args: &[&str]) -> Result<Setup, String> {
        setup(
            Cli::try_parse_from(std::iter::once("whepd").chain(args.iter().copied()))
                .map_err(|e| e.to_string())?,
        )
    }

    #[test]
    fn no_configuration_is_the_demo() {
        let s = setup_from(&[]).expect("valid");
        assert_eq!(s.streams.len(), 1);
        assert_eq!(s.streams[0].0, "demo");
        assert_eq!(s.http, SocketAddr::from(([0, 0, 0, 0], 8080)));
        assert!(s.server.app.admin_token.is_none());
        assert!(setup_from(&["--no-demo"]).expect("valid").streams.is_empty());
    }

    #[test]
    fn flags_override_the_file() {
        let dir = std::env::temp_dir().join(format!("whepd-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("whepd.toml");
        std::fs::write(
            &path,
            r#"
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
"#,
        )
        .expect("write");
        let p = path.to_str().expect("utf-8");
        let s = setup_from(&["--config", p, "--max-viewers", "5", "--token", "b"]).expect("valid");
        assert_eq!(s.http, "127.0.0.1:9000".parse().expect("addr"));
        assert_eq!(s.server.core.max_viewers_per_stream, 5);
        assert_eq!(s.server.core.bearer_tokens, vec!["b".to_owned()]);
        assert_eq!(s.server.core.whep_prefix, "/api/v3/whep");
        assert_eq!(s.server.core.ice_servers.len(), 1);
        assert_eq!(s.server.app.admin_token.as_deref(), Some("file"));
        assert_eq!(s.streams.len(), 1, "a configured stream replaces the demo");
        assert_eq!(s.streams[0].1.max_viewers, Some(2));
        std::fs::write(&path, "htp = 1").expect("write");
        let err = setup_from(&["--config", p]).err().expect("unknown key refused");
        assert!(err.contains("htp"), "{err}");
        std::fs::write(&path, "[streams.x]\nurl = \"a\"\nfile = \"b\"\n").expect("write");
        let err = setup_from(&["--config", p]).err().expect("two sources refused");
        assert!(err.contains("stream \"x\""), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
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
