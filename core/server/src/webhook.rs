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
//! With a secret (`--webhook-secret-file`, [`WebhookSecret`]) every delivery is signed as
//! [Standard Webhooks](https://www.standardwebhooks.com/) specifies, so that the receiver can
//! check it came from us and is not a replay: `webhook-id` (`msg_` and 32 hex digits, the same
//! on every attempt of one event: the receiver's key for dropping duplicates),
//! `webhook-timestamp` (Unix seconds of the attempt) and `webhook-signature`
//! (`v1,` and the base64 HMAC-SHA256 of `{id}.{timestamp}.{body}` under the secret): the
//! Standard Webhooks libraries verify it as they are.
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
use whep_core::base64::{self, Alphabet};

use crate::outbound::{self, HttpUrl, Request};

/// Events waiting for the webhook thread at most; more are dropped.
pub const QUEUE: usize = 1024;
/// Attempts per event.
pub const ATTEMPTS: u32 = 3;
/// The wait before the second attempt; it doubles for each further one.
pub const BACKOFF: Duration = Duration::from_millis(250);
/// Limit for connecting, writing the request and reading the status line, each.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// The key that signs webhook deliveries: `whsec_` and base64 (Standard Webhooks' form), or
/// the base64 alone; 24 to 64 bytes once decoded. Its `Debug` shows no key material.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret(Vec<u8>);

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WebhookSecret({} bytes)", self.0.len())
    }
}

impl WebhookSecret {
    /// Reads a secret as written in a file (surrounding white space ignored).
    ///
    /// # Errors
    ///
    /// When it is not base64 (after an optional `whsec_`) or not 24 to 64 bytes long.
    pub fn parse(text: &str) -> Result<Self, String> {
        const HINT: &str = "make one with: echo \"whsec_$(head -c 32 /dev/urandom | base64)\"";
        let text = text.trim();
        let encoded = text.strip_prefix("whsec_").unwrap_or(text);
        let key = base64_decode(encoded)
            .ok_or_else(|| format!("the webhook secret is not base64 (whsec_...); {HINT}"))?;
        if !(24..=64).contains(&key.len()) {
            return Err(format!(
                "the webhook secret is {} bytes, expected 24 to 64; {HINT}",
                key.len()
            ));
        }
        Ok(Self(key))
    }

    /// The three Standard Webhooks header fields of a delivery `id` of `body`, signed now.
    pub fn headers(&self, id: &str, body: &str) -> [(&'static str, String); 3] {
        let now = wall_now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        let timestamp = now.as_secs();
        [
            ("webhook-id", id.to_owned()),
            ("webhook-timestamp", timestamp.to_string()),
            ("webhook-signature", self.sign(id, timestamp, body)),
        ]
    }

    /// The `webhook-signature` value of the delivery `id` at `timestamp` of `body`.
    pub fn sign(&self, id: &str, timestamp: u64, body: &str) -> String {
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &self.0);
        let mut ctx = aws_lc_rs::hmac::Context::with_key(&key);
        ctx.update(id.as_bytes());
        ctx.update(format!(".{timestamp}.").as_bytes());
        ctx.update(body.as_bytes());
        format!("v1,{}", base64_encode(ctx.sign().as_ref()))
    }
}

/// Standard base64 with padding (RFC 4648 §4).
pub fn base64_encode(data: &[u8]) -> String {
    base64::encode(data, Alphabet::Standard)
}

/// Standard base64 (RFC 4648 §4), padded or not; `None` for anything else (white space, the
/// URL-safe alphabet, bits left over).
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    base64::decode(text.as_bytes(), Alphabet::Standard)
}

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
    /// Starts the sender thread for `url`, signing with `secret` if there is one.
    pub fn start(url: &HttpUrl, secret: Option<WebhookSecret>) -> Result<Self, String> {
        let target = url.clone();
        let (tx, rx) = sync_channel(QUEUE);
        let counts = Arc::new(Counts::default());
        let thread_counts = Arc::clone(&counts);
        std::thread::Builder::new()
            .name("webhook".into())
            .spawn(move || deliver(&target, secret.as_ref(), &rx, &thread_counts))
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
fn deliver(
    target: &HttpUrl,
    secret: Option<&WebhookSecret>,
    rx: &Receiver<String>,
    counts: &Counts,
) {
    while let Ok(body) = rx.recv() {
        let id = secret.map(|_| message_id());
        let mut wait = BACKOFF;
        let mut attempt = 1;
        loop {
            let signed = secret.zip(id.as_deref()).map(|(key, id)| key.headers(id, &body));
            match post(target, &body, signed.as_ref().map_or(&[], |h| &h[..])) {
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

/// A fresh `webhook-id`: `msg_` and 16 random bytes in hex.
pub fn message_id() -> String {
    let mut bytes = [0u8; 16];
    // The system's random source cannot fail on Linux; zeros would still be a valid id.
    let _ = aws_lc_rs::rand::fill(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("msg_{hex}")
}

/// One POST of `body` with `headers`; Ok for a 2xx status.
fn post(target: &HttpUrl, body: &str, headers: &[(&str, String)]) -> Result<(), String> {
    let request = Request {
        method: "POST",
        json: Some(body),
        user_agent: "whepd-webhook",
        headers,
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
        let hook = Webhook::start(&HttpUrl::parse(&url).expect("url"), None).expect("started");
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
    fn signatures_are_standard_webhooks_ones() {
        // The Standard Webhooks specification's example.
        let secret = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n").expect("ok");
        let sig =
            secret.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1_614_265_330, r#"{"test": 2432232314}"#);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        // The prefix is optional; the key material never shows.
        assert_eq!(WebhookSecret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"), Ok(secret.clone()));
        assert_eq!(format!("{secret:?}"), "WebhookSecret(24 bytes)");
        for bad in ["", "whsec_", "whsec_c2hvcnQ=", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaS!", "x y"]
        {
            assert!(WebhookSecret::parse(bad).is_err(), "{bad:?} accepted");
        }
        let long = format!("whsec_{}", base64_encode(&[7; 65]));
        assert!(WebhookSecret::parse(&long).expect_err("long").contains("65 bytes"));
        let ids = [message_id(), message_id()];
        assert!(ids[0].len() == 36 && ids[0].starts_with("msg_") && ids[0] != ids[1], "{ids:?}");
    }

    #[test]
    fn base64_matches_rfc_4648() {
        let vectors =
            [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg==")];
        for (plain, encoded) in
            vectors.into_iter().chain([("fooba", "Zm9vYmE="), ("foobar", "Zm9vYmFy")])
        {
            assert_eq!(base64_encode(plain.as_bytes()), encoded);
            assert_eq!(base64_decode(encoded).as_deref(), Some(plain.as_bytes()));
            assert_eq!(
                base64_decode(encoded.trim_end_matches('=')).as_deref(),
                Some(plain.as_bytes())
            );
        }
        for bad in ["Zg=", "Z", "Zh==", "Zm9v-", "Zm 9v", "=", "Zm9v=", "Zg==="] {
            assert_eq!(base64_decode(bad), None, "{bad:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn base64_round_trips_and_never_panics(data: Vec<u8>, text in "\\PC{0,24}") {
            proptest::prop_assert_eq!(base64_decode(&base64_encode(&data)), Some(data));
            if let Some(bytes) = base64_decode(&text) {
                let again = base64_encode(&bytes);
                proptest::prop_assert_eq!(again.trim_end_matches('='), text.trim_end_matches('='));
            }
        }
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
