//! Embedding whep-smol in an application with its own executor and its own http-types server.
//!
//! ```sh
//! cargo run -p whep-smol --example embed_smol
//! ```
//!
//! The application owns a `smol::Executor` (run on two threads), starts the engine on it, adds
//! the demo stream (needs `ffmpeg` on PATH), logs events, and serves one async-h1 listener on
//! `http://127.0.0.1:8084/` that answers `/hello` itself and hands every other request to
//! [`Whep::handle`] (player page, `/metrics`, admin API, WHEP). Open
//! `http://127.0.0.1:8084/?stream=demo`. Ctrl-C closes every viewer, stops FFmpeg and exits.

use std::sync::Arc;

use http_types::{Response, StatusCode};
use whep_core::Event;
use whep_server::app::{ServerConfig, StreamSpec};
use whep_smol::Whep;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    // Before any thread starts, so that every thread inherits the blocked SIGINT.
    let (ctrl_c_tx, ctrl_c) = smol::channel::bounded::<()>(1);
    ctrl_c_handler(ctrl_c_tx);
    let ex = Arc::new(smol::Executor::new());
    let (stop, stopped) = smol::channel::unbounded::<()>();
    // The application's executor threads.
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let (ex, stopped) = (ex.clone(), stopped.clone());
            std::thread::spawn(move || smol::block_on(ex.run(stopped.recv())))
        })
        .collect();

    let result = smol::block_on(ex.run(async {
        let config = ServerConfig { udp_bind: "127.0.0.1:3480".parse()?, ..Default::default() };
        let whep = Whep::start_on(config, &ex)?;
        whep.add_stream("demo", StreamSpec::demo()).await?;

        let mut events = whep.subscribe();
        ex.spawn(async move {
            while let Some(event) = events.recv().await {
                if let Event::ViewerLeft { stream, reason, .. } = event {
                    tracing::info!(%stream, ?reason, "app: a viewer left");
                }
            }
        })
        .detach();

        let listener = smol::net::TcpListener::bind("127.0.0.1:8084").await?;
        tracing::info!("open http://127.0.0.1:8084/?stream=demo");
        loop {
            let accepted = smol::future::or(async { Some(listener.accept().await) }, async {
                let _ = ctrl_c.recv().await;
                None
            })
            .await;
            let Some(Ok((stream, _))) = accepted else { break };
            let whep = whep.clone();
            ex.spawn(async move {
                let _ = async_h1::accept(stream, |req| {
                    let whep = whep.clone();
                    async move {
                        if req.url().path() == "/hello" {
                            let mut r = Response::new(StatusCode::Ok);
                            r.set_body("hello from the app\n");
                            return Ok(r);
                        }
                        Ok(whep.handle(req).await)
                    }
                })
                .await;
            })
            .detach();
        }
        whep.shutdown().await;
        Ok::<_, Box<dyn std::error::Error>>(())
    }));
    drop(stop);
    for t in threads {
        let _ = t.join();
    }
    result
}

/// Ctrl-C (SIGINT) as a channel message, without a signal crate: a thread waits for it.
fn ctrl_c_handler(tx: smol::channel::Sender<()>) {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    // Blocked in this thread and every thread spawned after; only the waiter takes it.
    if set.thread_block().is_ok() {
        std::thread::spawn(move || {
            let _ = set.wait();
            let _ = tx.try_send(());
        });
    }
}
