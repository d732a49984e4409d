//! `whepd` on smol: the command line and configuration of [`whep_server::cli`], signals, and a
//! clean shutdown. The `whepd-smol` binary is [`main`].

use std::process::ExitCode;

use tracing::{error, info};
use whep_server::cli::{self, CliError, Launch};

use crate::{Tls, Whep};

/// Runs `whepd` on smol with the process's arguments until Ctrl-C or SIGTERM.
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
    // SIGTERM and SIGINT (and SIGHUP when serving HTTPS) are blocked here, before any thread
    // exists, so that every thread inherits the mask and only the waiter below receives them.
    let signals = match shutdown_signals(launch.tls.is_some()) {
        Ok(s) => s,
        Err(e) => {
            error!("cannot set up signal handling: {e}");
            return ExitCode::FAILURE;
        }
    };
    match smol::block_on(run(launch, signals)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn shutdown_signals(reload: bool) -> nix::Result<nix::sys::signal::SigSet> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    if reload {
        set.add(Signal::SIGHUP);
    }
    set.thread_block()?;
    Ok(set)
}

async fn run(launch: Launch, signals: nix::sys::signal::SigSet) -> Result<(), String> {
    crate::check_program(&launch.server.core.process.program, !launch.streams.is_empty())?;
    whep_server::warn_ingest_overlap(&launch.server.core.ingest_ports);
    let Launch { server, http: http_addr, tls, streams } = launch;
    let launch_drain = server.drain_timeout;
    let tls = tls.map(Tls::from_files).transpose().map_err(|e| e.to_string())?;
    let udp = server.udp_bind;
    let whep =
        Whep::start(server).map_err(|e| format!("cannot bind the WebRTC UDP socket {udp}: {e}"))?;
    // `[::]` is dual-stack (IPv4 too), or IPv4 alone on a host without IPv6.
    let listener = whep_server::os::bind_tcp(http_addr)
        .and_then(smol::net::TcpListener::try_from)
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
    let reload = tls.clone();
    if let Some(tls) = tls.clone() {
        // Reloads the certificate when its files change (and SIGHUP below, at once).
        smol::spawn(async move {
            loop {
                smol::Timer::after(whep_server::tls::WATCH_INTERVAL).await;
                let tls = tls.clone();
                let _ = smol::unblock(move || tls.reload_if_changed()).await;
            }
        })
        .detach();
    }
    let drain = launch_drain;
    let drainer = whep.clone();
    let shutdown = async move {
        let wait = move || {
            let reload = reload.clone();
            async move {
                loop {
                    match smol::unblock(move || signals.wait()).await {
                        Ok(nix::sys::signal::Signal::SIGHUP) => {
                            info!("SIGHUP: reloading the TLS certificate");
                            if let Some(tls) = reload.clone() {
                                // File reads, off the executor; the outcome is logged by `reload`.
                                let _ = smol::unblock(move || tls.reload()).await;
                            }
                        }
                        Ok(sig) => return info!("{sig}: shutting down"),
                        Err(e) => return error!("waiting for signals failed: {e}; shutting down"),
                    }
                }
            }
        };
        wait().await;
        if drain.is_zero() {
            return;
        }
        // HTTP goes on meanwhile: sessions answer, `/ready` says draining.
        info!(secs = drain.as_secs(), "draining: no new viewers, current ones kept");
        let drained = async {
            let sleep = |d| async move {
                smol::Timer::after(d).await;
            };
            let left = drainer.drain(drain, sleep).await;
            info!(viewers = left, "drained; closing the viewers left");
        };
        // A second signal cuts the drain short.
        smol::future::or(drained, wait()).await;
    };
    match tls {
        Some(tls) => whep.serve_tls(listener, tls, shutdown).await,
        None => whep.serve(listener, shutdown).await,
    }
    .map_err(|e| e.to_string())?;
    whep.shutdown().await;
    Ok(())
}

fn scheme(line: String, tls: bool) -> String {
    if tls { cli::over_tls(&line) } else { line }
}
