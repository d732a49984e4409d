//! `whepd` on tokio: the command line and configuration of [`whep_server::cli`], signals, and a
//! clean shutdown.
//!
//! With no configuration it starts a demo stream (an FFmpeg test pattern with a tone) and
//! prints the URL of its player page. The `whepd` binary is [`main`]; it lives in the library so
//! that other binaries (the end-to-end suite's) run exactly the same server.

use std::process::ExitCode;

use tracing::{error, info};
use whep_server::cli::{self, CliError, Launch};

use crate::{Tls, Whep};

/// Runs `whepd` with the process's arguments until Ctrl-C or SIGTERM.
pub fn main() -> ExitCode {
    cli::init_logging();
    let launch = match cli::parse(std::env::args_os(), |p| std::fs::read_to_string(p)) {
        Ok(s) => s,
        Err(CliError::Clap(e)) => e.exit(),
        Err(CliError::Invalid(e)) => {
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
    match runtime.block_on(run(launch)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(launch: Launch) -> Result<(), String> {
    crate::check_program(&launch.server.core.process.program, !launch.streams.is_empty())?;
    whep_server::warn_ingest_overlap(&launch.server.core.ingest_ports);
    let Launch { server, http: http_addr, tls, streams } = launch;
    let drain = server.drain_timeout;
    let tls = tls.map(Tls::from_files).transpose().map_err(|e| e.to_string())?;
    let udp = server.udp_bind;
    let whep =
        Whep::start(server).map_err(|e| format!("cannot bind the WebRTC UDP socket {udp}: {e}"))?;
    // `[::]` is dual-stack (IPv4 too), or IPv4 alone on a host without IPv6.
    let listener = whep_server::os::bind_tcp(http_addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .and_then(tokio::net::TcpListener::from_std)
        .map_err(|e| format!("cannot listen on {http_addr}: {e}"))?;
    let http = listener.local_addr().map_err(|e| e.to_string())?;
    // The lines a person (or a test) starting whepd needs, on stdout so scripts can read them.
    #[allow(clippy::print_stdout)]
    {
        println!("{}", scheme(cli::listening_line(http, whep.udp_addr()), tls.is_some()));
    }
    for (name, spec) in streams {
        whep.add_stream(&name, spec).await.map_err(|e| format!("stream {name:?}: {e}"))?;
        let url = scheme(cli::player_url(http, &name), tls.is_some());
        info!(stream = %name, %url, "stream added");
        #[allow(clippy::print_stdout)]
        {
            println!("{}", scheme(cli::watch_line(http, &name), tls.is_some()));
        }
    }
    let drainer = whep.clone();
    let shutdown = async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
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
        if drain.is_zero() {
            return;
        }
        // HTTP goes on meanwhile: sessions answer, `/ready` says draining.
        info!(secs = drain.as_secs(), "draining: no new viewers, current ones kept");
        tokio::select! {
            left = drainer.drain(drain, tokio::time::sleep) => {
                info!(viewers = left, "drained; closing the viewers left");
            }
            _ = tokio::signal::ctrl_c() => info!("Ctrl-C: not waiting for the drain"),
            _ = term.recv() => info!("SIGTERM: not waiting for the drain"),
        }
    };
    match tls {
        Some(tls) => {
            reload_on_sighup(tls.clone())?;
            whep.serve_tls(listener, tls, shutdown).await
        }
        None => whep.serve(listener, shutdown).await,
    }
    .map_err(|e| e.to_string())?;
    whep.shutdown().await;
    Ok(())
}

fn scheme(line: String, tls: bool) -> String {
    if tls { cli::over_tls(&line) } else { line }
}

/// Re-reads the certificate on every SIGHUP, and when its files change, for connections
/// accepted after it.
fn reload_on_sighup(tls: Tls) -> Result<(), String> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup())
        .map_err(|e| format!("cannot install the SIGHUP handler: {e}"))?;
    tokio::spawn(async move {
        let mut watch = tokio::time::interval(whep_server::tls::WATCH_INTERVAL);
        watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let tls = tls.clone();
            // File reads, off the runtime's threads; the outcome is logged by `reload`.
            tokio::select! {
                hup = hup.recv() => {
                    if hup.is_none() {
                        return;
                    }
                    info!("SIGHUP: reloading the TLS certificate");
                    let _ = tokio::task::spawn_blocking(move || tls.reload()).await;
                }
                _ = watch.tick() => {
                    let _ = tokio::task::spawn_blocking(move || tls.reload_if_changed()).await;
                }
            }
        }
    });
    Ok(())
}
