//! Events for a webhook (`--webhook-url http[s]://host:port/path`): viewer joined and left,
//! stream up and down, each POSTed as one JSON object by a thread of its own
//! ([`crate::outbound`], HTTP/1.1, HTTPS verified like the other outgoing calls), so that a slow
//! or dead receiver never holds up the engine loop.
//!
//! This is the one thread the shell starts of its own (opt-in: only with a webhook URL), and
//! the one place it reads the wall clock and sleeps: a sender on the engine's task would need
//! a TCP client per runtime, and a queue in front of it anyway.
//!
//! The engine hands each event to [`Webhook::send`], which serialises it and puts it in a
//! bounded queue ([`QUEUE`] events) without waiting: when the queue is full the event is
//! dropped and counted (`whep_webhook_dropped_total`). The thread sends one event per
//! connection (`Connection: close`), with [`TIMEOUT`] for connecting, the TLS handshake, writing
//! and reading the status line; a failed attempt (no connection, a timeout, a certificate that
//! does not verify, a status other than 2xx) is tried
//! again up to [`ATTEMPTS`] times in all, [`BACKOFF`] apart and doubling, then the event is
//! given up and counted (`whep_webhook_failures_total`).
//!
//! The JSON ([`event_json`]) has `event` (`viewer_joined`, `viewer_left`, `stream_up`,
//! `stream_down`), `time` (Unix seconds, when the engine emitted it), `stream`, and for viewers
//! `session`; `viewer_joined` adds `client` and `user_agent`, `viewer_left` `reason`,
//! `duration_secs`, `packets_sent` and `bytes_sent`; `stream_down` adds `state`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, SystemTime};

use tracing::{debug, warn};
use whep_core::Event;

use crate::outbound::{self, HttpUrl, Request};

/// Events waiting for the webhook thread at most; more are dropped.
pub const QUEUE: usize = 1024;
/// Attempts per event.
pub const ATTEMPTS: u32 = 3;
/// The wait before the second attempt; it doubles for each further one.
pub const BACKOFF: Duration = Duration::from_millis(250);
/// Limit for connecting, writing the request and reading the status line, each.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// A running webhook sender: cheap to clone (the engine's shards share one); the thread ends
/// when the last clone is dropped and the queue is drained.
#[derive(Debug, Clone)]
pub struct Webhook {
    tx: SyncSender<String>,
    counts: Arc<Counts>,
    url: Arc<str>,
}

#[derive(Debug, Default)]
struct Counts {
    delivered: AtomicU64,
    dropped: AtomicU64,
    failures: AtomicU64,
}

impl Webhook {
    /// Starts the sender thread for `url`.
    pub fn start(url: &HttpUrl) -> Result<Self, String> {
        let target = url.clone();
        let (tx, rx) = sync_channel(QUEUE);
        let counts = Arc::new(Counts::default());
        let thread_counts = Arc::clone(&counts);
        std::thread::Builder::new()
            .name("webhook".into())
            .spawn(move || deliver(&target, &rx, &thread_counts))
            .map_err(|e| format!("cannot start the webhook thread: {e}"))?;
        Ok(Self { tx, counts, url: url.to_string().into() })
    }

    /// Queues `event` for the webhook if it is one it receives (viewers joined and left,
    /// streams up and down), without waiting; counts it as dropped when the queue is full.
    pub fn send(&self, event: &Event) {
        let Some(json) = event_json(event, wall_now()) else { return };
        match self.tx.try_send(json.to_string()) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.counts.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The URL events go to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Events the receiver answered with 2xx.
    pub fn delivered(&self) -> u64 {
        self.counts.delivered.load(Ordering::Relaxed)
    }

    /// Events dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.counts.dropped.load(Ordering::Relaxed)
    }

    /// Events given up after [`ATTEMPTS`] failed attempts.
    pub fn failures(&self) -> u64 {
        self.counts.failures.load(Ordering::Relaxed)
    }
}

#[allow(clippy::disallowed_methods)] // the shell stamps events with the wall clock
fn wall_now() -> SystemTime {
    SystemTime::now()
}

/// An event as the webhook POSTs it, stamped with `time`; `None` for the kinds it does not
/// receive (see the [module docs](self)).
pub fn event_json(event: &Event, time: SystemTime) -> Option<serde_json::Value> {
    let time = time.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs_f64();
    let time = (time * 1000.0).round() / 1000.0;
    let value = match event {
        Event::ViewerJoined { stream, session, client, user_agent } => serde_json::json!({
            "event": "viewer_joined",
            "time": time,
            "stream": stream.as_str(),
            "session": session.to_string(),
            "client": client.map(|c| c.to_string()),
            "user_agent": user_agent,
        }),
        Event::ViewerLeft { stream, session, reason, duration, packets_sent, bytes_sent } => {
            serde_json::json!({
                "event": "viewer_left",
                "time": time,
                "stream": stream.as_str(),
                "session": session.to_string(),
                "reason": reason.as_str(),
                "duration_secs": duration.as_secs_f64(),
                "packets_sent": packets_sent,
                "bytes_sent": bytes_sent,
            })
        }
        Event::StreamUp { stream } => serde_json::json!({
            "event": "stream_up",
            "time": time,
            "stream": stream.as_str(),
        }),
        Event::StreamDown { stream, state } => serde_json::json!({
            "event": "stream_down",
            "time": time,
            "stream": stream.as_str(),
            "state": state.as_str(),
        }),
        _ => return None,
    };
    Some(value)
}

/// The webhook thread: each queued event POSTed, with bounded retries, until every sender is
/// gone.
fn deliver(target: &HttpUrl, rx: &Receiver<String>, counts: &Counts) {
    while let Ok(body) = rx.recv() {
        let mut wait = BACKOFF;
        let mut attempt = 1;
        loop {
            match post(target, &body) {
                Ok(()) => {
                    counts.delivered.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(e) if attempt < ATTEMPTS => {
                    debug!(error = %e, attempt, "webhook POST failed; trying again");
                    #[allow(clippy::disallowed_methods)] // the webhook's own thread, not the loop
                    std::thread::sleep(wait);
                    wait *= 2;
                    attempt += 1;
                }
                Err(e) => {
                    warn!(error = %e, url = %target, "webhook POST failed; event given up");
                    counts.failures.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
    }
}

/// One POST of `body`; Ok for a 2xx status.
fn post(target: &HttpUrl, body: &str) -> Result<(), String> {
    let request = Request {
        method: "POST",
        json: Some(body),
        user_agent: "whepd-webhook",
        timeout: TIMEOUT,
        read_body: false,
    };
    match outbound::exchange(target, &request)? {
        r if (200..300).contains(&r.status) => Ok(()),
        r => Err(format!("the receiver answered {}", r.status)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_and_counts_without_waiting() {
        // A receiver that never answers: the thread waits on its first event for seconds.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}/h", silent.local_addr().expect("addr"));
        let hook = Webhook::start(&HttpUrl::parse(&url).expect("url")).expect("started");
        let stream = whep_core::StreamId::new("s").expect("id");
        let extra = 100;
        for _ in 0..QUEUE + extra {
            hook.send(&Event::StreamUp { stream: stream.clone() });
        }
        // The thread took one or none off the queue: 99 to 100 dropped, at once.
        assert!((extra as u64 - 1..=extra as u64).contains(&hook.dropped()), "{}", hook.dropped());
        assert_eq!(hook.failures(), 0);
        // Events it does not receive are not queued.
        hook.send(&Event::StreamStale { stream });
        assert!(hook.dropped() <= extra as u64);
    }

    #[test]
    fn events_serialise_with_their_fields() {
        let stream = whep_core::StreamId::new("cam").expect("id");
        let session = whep_core::SessionId::parse(&"ab".repeat(16)).expect("id");
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_500);
        let left = Event::ViewerLeft {
            stream: stream.clone(),
            session,
            reason: whep_core::CloseReason::Kicked,
            duration: Duration::from_millis(2_500),
            packets_sent: 7,
            bytes_sent: 7_000,
        };
        let v = event_json(&left, at).expect("sent");
        assert_eq!(v["event"], "viewer_left");
        assert_eq!(v["time"], 1.5);
        assert_eq!(v["reason"], "kicked");
        assert_eq!(v["duration_secs"], 2.5);
        assert_eq!(v["bytes_sent"], 7_000);
        assert_eq!(v["session"], "ab".repeat(16));
        let down = Event::StreamDown { stream, state: whep_core::StreamStatus::Backoff };
        assert_eq!(event_json(&down, at).expect("sent")["state"], "backoff");
    }
}
