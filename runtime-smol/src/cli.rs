//! `whepd` on smol: the command line and configuration of [`whep_server::cli`], signals, and a
//! clean shutdown. The `whepd-smol` binary is [`main`].

use std::process::ExitCode;

use tracing::{error, info};
use whep_server::cli::{self, CliError, Launch};

use crate::Whep;

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
    // SIGTERM and SIGINT are blocked here, before any thread exists, so that every thread
    // inherits the mask and only the waiter below receives them.
    let signals = match shutdown_signals() {
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

fn shutdown_signals() -> nix::Result<nix::sys::signal::SigSet> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block()?;
    Ok(set)
}

async fn run(launch: Launch, signals: nix::sys::signal::SigSet) -> Result<(), String> {
    crate::check_program(&launch.server.core.process.program, !launch.streams.is_empty())?;
    let Launch { server, http: http_addr, streams } = launch;
    let udp = server.udp_bind;
    let whep =
        Whep::start(server).map_err(|e| format!("cannot bind the WebRTC UDP socket {udp}: {e}"))?;
    let listener = smol::net::TcpListener::bind(http_addr)
        .await
        .map_err(|e| format!("cannot listen on {http_addr}: {e}"))?;
    let http = listener.local_addr().map_err(|e| e.to_string())?;
    // The lines a person (or a test) starting whepd needs, on stdout so scripts can read them.
    #[allow(clippy::print_stdout)]
    {
        println!("{}", cli::listening_line(http, whep.udp_addr()));
    }
    for (name, spec) in streams {
        whep.add_stream(&name, spec).await.map_err(|e| format!("stream {name:?}: {e}"))?;
        info!(stream = %name, url = %cli::player_url(http, &name), "stream added");
        #[allow(clippy::print_stdout)]
        {
            println!("{}", cli::watch_line(http, &name));
        }
    }
    let shutdown = async {
        match smol::unblock(move || signals.wait()).await {
            Ok(sig) => info!("{sig}: shutting down"),
            Err(e) => error!("waiting for signals failed: {e}; shutting down"),
        }
    };
    whep.serve(listener, shutdown).await.map_err(|e| e.to_string())?;
    whep.shutdown().await;
    Ok(())
}
