//! Tests of the HTTP client and the WHEP viewer without the real server: tiny std TCP servers
//! scripted per test, and a loopback WHEP server made of a second str0m `Rtc` (ICE lite, RTP
//! mode) that answers the viewer's offer and sends H264 and Opus RTP.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use str0m::change::SdpOffer;
use str0m::format::Codec;
use str0m::media::{MediaKind, Mid, Pt};
use str0m::net::{Protocol, Receive};
use str0m::rtp::RtpWrite;
use str0m::{Candidate, Event, Input, Output, Rtc, RtcConfig};
use whep_e2e::http;
use whep_e2e::viewer::{Stats, Viewer, ViewerError, is_h264_keyframe};

/// A request as the test servers saw it.
#[derive(Debug)]
struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

fn read_request(stream: &TcpStream) -> Request {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).expect("request line");
    let mut parts = line.split_whitespace();
    let method = parts.next().expect("method").to_owned();
    let target = parts.next().expect("target").to_owned();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).expect("header line");
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (n, v) = line.split_once(':').expect("header colon");
        headers.push((n.trim().to_owned(), v.trim().to_owned()));
    }
    let len: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map_or(0, |(_, v)| v.parse().expect("numeric Content-Length"));
    let mut body = vec![0; len];
    reader.read_exact(&mut body).expect("request body");
    Request { method, target, headers, body }
}

/// Serves one connection: reads the request, writes `response` as is, then (with
/// `wait_for_close`) keeps the connection open until the client closes it, so a client that
/// waits for EOF instead of honouring Content-Length would hang and fail by timeout.
fn serve_once(
    response: &'static [u8],
    wait_for_close: bool,
) -> (SocketAddr, mpsc::Receiver<Request>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind test listener");
    let addr = listener.local_addr().expect("listener address");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        let request = read_request(&stream);
        stream.write_all(response).expect("write response");
        if wait_for_close {
            stream.set_read_timeout(Some(Duration::from_secs(5))).expect("read timeout");
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest);
        }
        let _ = tx.send(request);
    });
    (addr, rx)
}

fn received(rx: &mpsc::Receiver<Request>) -> Request {
    rx.recv_timeout(Duration::from_secs(10)).expect("the test server saw a request")
}

#[test]
fn content_length_response_without_eof() {
    let (addr, rx) = serve_once(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Multi: a\r\nx-multi: b\r\n\
          Content-Length: 5\r\n\r\nhello",
        true,
    );
    let started = Instant::now();
    let response =
        http::request(addr, "PUT", "/thing?x=1", &[("X-Test", "yes"), ("host", "ignored")], b"abc")
            .expect("request succeeds");
    assert!(started.elapsed() < Duration::from_secs(5), "client waited for EOF");
    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"hello");
    assert_eq!(response.text(), "hello");
    assert_eq!(response.header("content-type"), Some("text/plain"));
    assert_eq!(response.header("CONTENT-TYPE"), Some("text/plain"));
    assert_eq!(response.header_all("X-MULTI"), vec!["a", "b"]);
    assert_eq!(response.header("missing"), None);

    let request = received(&rx);
    assert_eq!(request.method, "PUT");
    assert_eq!(request.target, "/thing?x=1");
    assert_eq!(request.header("host"), Some(addr.to_string().as_str()));
    assert_eq!(request.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case("host")).count(), 1);
    assert_eq!(request.header("connection"), Some("close"));
    assert_eq!(request.header("content-length"), Some("3"));
    assert_eq!(request.header("x-test"), Some("yes"));
    assert_eq!(request.body, b"abc");
}

#[test]
fn chunked_response() {
    let (addr, rx) = serve_once(
        b"HTTP/1.1 100 Continue\r\n\r\n\
          HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
          5;name=value\r\nhello\r\n7\r\n, world\r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n",
        true,
    );
    let response = http::get(addr, "/chunked").expect("request succeeds");
    assert_eq!(response.status, 200);
    assert_eq!(response.text(), "hello, world0123456789");
    let request = received(&rx);
    assert_eq!(request.method, "GET");
    assert_eq!(request.header("content-length"), Some("0"));
}

#[test]
fn not_found_and_body_until_eof() {
    let (addr, _rx) = serve_once(b"HTTP/1.1 404 Not Found\r\n\r\nno such stream", false);
    let response = http::get(addr, "/nope").expect("request succeeds");
    assert_eq!(response.status, 404);
    assert_eq!(response.text(), "no such stream");
}

#[test]
fn no_content_has_no_body() {
    let (addr, _rx) = serve_once(b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n", true);
    let response = http::request(addr, "DELETE", "/s/1", &[], &[]).expect("request succeeds");
    assert_eq!(response.status, 204);
    assert!(response.body.is_empty());
    assert_eq!(response.header("x-a"), Some("1"));
}

#[test]
fn malformed_responses_are_errors() {
    let (addr, _rx) = serve_once(b"SMTP ready\r\n\r\n", false);
    let e = http::get(addr, "/").expect_err("not HTTP");
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);

    let (addr, _rx) = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", false);
    let e = http::get(addr, "/").expect_err("truncated body");
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);

    let (addr, _rx) =
        serve_once(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", false);
    let e = http::get(addr, "/").expect_err("bad chunk size");
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);

    let e = http::request(addr, "GET", "/", &[("X-Evil", "a\r\nb")], &[]).expect_err("CRLF");
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
}

#[test]
fn connect_rejected_with_503() {
    let (addr, rx) = serve_once(
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\nRetry-After: 1\r\n\r\nbusy",
        false,
    );
    match Viewer::connect(addr, "/whep/demo", Some("secret")) {
        Err(ViewerError::Rejected { status: 503, body }) => assert_eq!(body, "busy"),
        other => panic!("expected Rejected 503, got {other:?}"),
    }
    let request = received(&rx);
    assert_eq!(request.method, "POST");
    assert_eq!(request.target, "/whep/demo");
    assert_eq!(request.header("content-type"), Some("application/sdp"));
    assert_eq!(request.header("authorization"), Some("Bearer secret"));
    let offer = String::from_utf8(request.body).expect("UTF-8 offer");
    assert!(offer.starts_with("v=0"), "offer: {offer}");
    assert!(offer.contains("m=video") && offer.contains("m=audio"), "offer: {offer}");
    assert_eq!(offer.matches("a=recvonly").count(), 2, "offer: {offer}");
    assert!(offer.contains("H264") && offer.contains("opus"), "offer: {offer}");
    assert!(!offer.contains("VP8"), "offer: {offer}");
    assert!(offer.contains("127.0.0.1"), "offer has the host candidate: {offer}");
}

#[test]
fn connect_to_nothing_is_an_http_error() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    drop(listener);
    match Viewer::connect(addr, "/whep/demo", None) {
        Err(ViewerError::Http(_)) => {}
        other => panic!("expected Http error, got {other:?}"),
    }
}

#[test]
fn h264_keyframe_detection() {
    assert!(!is_h264_keyframe(&[]));
    assert!(is_h264_keyframe(&[0x65, 0x88])); // IDR slice
    assert!(is_h264_keyframe(&[0x67, 0x42])); // SPS
    assert!(!is_h264_keyframe(&[0x68, 0xce])); // PPS alone
    assert!(!is_h264_keyframe(&[0x41, 0x9a])); // non-IDR slice
    // STAP-A with SPS and PPS; with only PPS and a non-IDR slice; truncated.
    assert!(is_h264_keyframe(&[24, 0, 2, 0x67, 0x42, 0, 1, 0x68]));
    assert!(!is_h264_keyframe(&[24, 0, 1, 0x68, 0, 2, 0x41, 0x9a]));
    assert!(!is_h264_keyframe(&[24, 0, 9, 0x67]));
    // FU-A: start of an IDR; middle of an IDR; start of a non-IDR slice.
    assert!(is_h264_keyframe(&[0x7c, 0x85, 0]));
    assert!(!is_h264_keyframe(&[0x7c, 0x05, 0]));
    assert!(!is_h264_keyframe(&[0x5c, 0x81, 0]));
}

// ---------------------------------------------------------------------------------------------
// Loopback WHEP server: HTTP on a std TcpListener, one str0m Rtc per session.

const RUN: u8 = 0;
const CLOSE: u8 = 1;
const VANISH: u8 = 2;

/// One session of the loopback server, as the test sees it.
#[derive(Debug, Default)]
struct Session {
    command: AtomicU8,
    connected: AtomicBool,
    /// The viewer closed (str0m `Event::Closed` on the server side).
    peer_closed: AtomicBool,
    ended: AtomicBool,
    video_sent: AtomicU64,
    audio_sent: AtomicU64,
    /// Keyframe requests (PLI/FIR) received from the viewer.
    keyframe_requests: AtomicU64,
}

#[derive(Debug)]
struct LoopbackWhep {
    addr: SocketAddr,
    sessions: Arc<Mutex<HashMap<String, Arc<Session>>>>,
}

impl LoopbackWhep {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback WHEP server");
        let addr = listener.local_addr().expect("server address");
        let sessions: Arc<Mutex<HashMap<String, Arc<Session>>>> = Arc::default();
        let shared = Arc::clone(&sessions);
        thread::spawn(move || {
            for (n, stream) in listener.incoming().enumerate() {
                let Ok(mut stream) = stream else { continue };
                let request = read_request(&stream);
                let response = handle_http(&request, n, &shared);
                let _ = stream.write_all(&response);
            }
        });
        Self { addr, sessions }
    }

    fn session(&self, location: &str) -> Arc<Session> {
        let sessions = self.sessions.lock().expect("sessions lock");
        Arc::clone(sessions.get(location).expect("session exists"))
    }
}

fn http_response(status: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut r = format!("HTTP/1.1 {status}\r\n");
    for (n, v) in headers {
        r.push_str(&format!("{n}: {v}\r\n"));
    }
    r.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    r.into_bytes()
}

fn handle_http(
    request: &Request,
    n: usize,
    sessions: &Mutex<HashMap<String, Arc<Session>>>,
) -> Vec<u8> {
    match (request.method.as_str(), request.target.as_str()) {
        // `/whep/full` answers as a full ICE agent (as MediaMTX and live777 do), `/whep/demo`
        // as an ICE-lite one (as whepd does).
        ("POST", target @ ("/whep/demo" | "/whep/full")) => {
            let lite = target == "/whep/demo";
            let offer = String::from_utf8_lossy(&request.body);
            let offer = match SdpOffer::from_sdp_string(&offer) {
                Ok(o) => o,
                Err(e) => return http_response("400 Bad Request", &[], &e.to_string()),
            };
            let socket = UdpSocket::bind("127.0.0.1:0").expect("bind server UDP");
            let local = socket.local_addr().expect("server UDP address");
            let mut rtc = RtcConfig::new()
                .set_ice_lite(lite)
                .set_rtp_mode(true)
                .clear_codecs()
                .enable_h264(true)
                .enable_opus(true, false)
                .build(Instant::now());
            rtc.add_local_candidate(Candidate::host(local, "udp").expect("host candidate"))
                .expect("candidate accepted");
            let answer = match rtc.sdp_api().accept_offer(offer) {
                Ok(a) => a,
                Err(e) => return http_response("400 Bad Request", &[], &e.to_string()),
            };
            let location = format!("{target}/session-{n}");
            let session = Arc::new(Session::default());
            sessions.lock().expect("sessions lock").insert(location.clone(), Arc::clone(&session));
            thread::spawn(move || serve_media(rtc, socket, &session));
            http_response(
                "201 Created",
                &[("Content-Type", "application/sdp"), ("Location", &location), ("ETag", "\"1\"")],
                &answer.to_sdp_string(),
            )
        }
        ("DELETE", target) => match sessions.lock().expect("sessions lock").get(target) {
            Some(s) => {
                s.command.store(CLOSE, Ordering::SeqCst);
                http_response("200 OK", &[], "")
            }
            None => http_response("404 Not Found", &[], ""),
        },
        _ => http_response("404 Not Found", &[], ""),
    }
}

/// A scripted source: 30 fps H264 (keyframe every 15 frames: STAP-A SPS+PPS, then an IDR in
/// three FU-A fragments; else one non-IDR NAL) and 50 packets/s Opus.
#[derive(Debug, Default)]
struct Source {
    frame: u32,
    video_seq: u64,
    audio_seq: u64,
    next_video: Option<Instant>,
    next_audio: Option<Instant>,
}

fn pt_for(rtc: &Rtc, mid: Mid, codec: Codec) -> Option<Pt> {
    let media = rtc.media(mid)?;
    media.remote_pts().iter().copied().find(|pt| {
        rtc.codec_config().find(|p| p.pt() == *pt).is_some_and(|p| p.spec().codec == codec)
    })
}

fn send_media(rtc: &mut Rtc, mids: &HashMap<MediaKind, Mid>, src: &mut Source, s: &Session) {
    let now = Instant::now();
    if let Some(&mid) = mids.get(&MediaKind::Video)
        && src.next_video.is_none_or(|t| t <= now)
        && let Some(pt) = pt_for(rtc, mid, Codec::H264)
    {
        let mut payloads: Vec<Vec<u8>> = Vec::new();
        if src.frame.is_multiple_of(15) {
            payloads.push(vec![24, 0, 4, 0x67, 0x42, 0xc0, 0x1e, 0, 2, 0x68, 0xce]);
            payloads.push(vec![0x7c, 0x85, 1, 2, 3]);
            payloads.push(vec![0x7c, 0x05, 4, 5, 6]);
            payloads.push(vec![0x7c, 0x45, 7, 8, 9]);
        } else {
            payloads.push(vec![0x41, 0x9a, 1, 2, 3, 4]);
        }
        let ts = src.frame.wrapping_mul(3000);
        src.frame += 1;
        let last = payloads.len() - 1;
        if let Some(tx) = rtc.direct_api().stream_tx_by_mid(mid, None) {
            for (i, p) in payloads.into_iter().enumerate() {
                let write = RtpWrite::new(pt, src.video_seq.into(), ts, now, p).marker(i == last);
                tx.write_rtp(write);
                src.video_seq += 1;
                s.video_sent.fetch_add(1, Ordering::SeqCst);
            }
        }
        src.next_video = Some(src.next_video.unwrap_or(now) + Duration::from_micros(33_333));
    }
    if let Some(&mid) = mids.get(&MediaKind::Audio)
        && src.next_audio.is_none_or(|t| t <= now)
        && let Some(pt) = pt_for(rtc, mid, Codec::Opus)
    {
        let ts = (src.audio_seq as u32).wrapping_mul(960);
        if let Some(tx) = rtc.direct_api().stream_tx_by_mid(mid, None) {
            tx.write_rtp(RtpWrite::new(pt, src.audio_seq.into(), ts, now, vec![0xfc; 40]));
            src.audio_seq += 1;
            s.audio_sent.fetch_add(1, Ordering::SeqCst);
        }
        src.next_audio = Some(src.next_audio.unwrap_or(now) + Duration::from_millis(20));
    }
}

/// The server side of one session: drives its `Rtc` and, once connected, sends media.
fn serve_media(mut rtc: Rtc, socket: UdpSocket, session: &Session) {
    let local = socket.local_addr().expect("server UDP address");
    let mut mids: HashMap<MediaKind, Mid> = HashMap::new();
    let mut source = Source::default();
    let mut buf = vec![0u8; 2000];
    loop {
        let deadline = loop {
            match rtc.poll_output() {
                Ok(Output::Timeout(t)) => break t,
                Ok(Output::Transmit(t)) => {
                    let _ = socket.send_to(&t.contents, t.destination);
                }
                Ok(Output::Event(e)) => match e {
                    Event::MediaAdded(m) => {
                        mids.insert(m.kind, m.mid);
                    }
                    Event::Connected => session.connected.store(true, Ordering::SeqCst),
                    Event::Closed => session.peer_closed.store(true, Ordering::SeqCst),
                    Event::KeyframeRequest(_) => {
                        session.keyframe_requests.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => {}
                },
                Err(_) => break Instant::now() + Duration::from_secs(3600),
            }
        };
        match session.command.load(Ordering::SeqCst) {
            CLOSE => {
                rtc.close().expect("server close");
                while let Ok(out) = rtc.poll_output() {
                    match out {
                        Output::Transmit(t) => {
                            let _ = socket.send_to(&t.contents, t.destination);
                        }
                        Output::Timeout(_) => break,
                        Output::Event(_) => {}
                    }
                }
                break;
            }
            VANISH => break,
            RUN => {}
            other => panic!("unknown command {other}"),
        }
        if !rtc.is_alive() || session.peer_closed.load(Ordering::SeqCst) {
            break;
        }
        let now = Instant::now();
        if session.connected.load(Ordering::SeqCst) {
            send_media(&mut rtc, &mids, &mut source, session);
            let _ = rtc.handle_input(Input::Timeout(now));
            continue_drain(&mut rtc, &socket, session);
        }
        let wait = deadline
            .saturating_duration_since(now)
            .clamp(Duration::from_millis(1), Duration::from_millis(10));
        socket.set_read_timeout(Some(wait)).expect("read timeout");
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                if let Ok(r) = Receive::new(Protocol::Udp, from, local, &buf[..n]) {
                    let _ = rtc.handle_input(Input::Receive(Instant::now(), r));
                }
            }
            Err(_) => {
                let _ = rtc.handle_input(Input::Timeout(Instant::now()));
            }
        }
    }
    session.ended.store(true, Ordering::SeqCst);
}

/// Drains after writing media, so every mutation is followed by a full drain.
fn continue_drain(rtc: &mut Rtc, socket: &UdpSocket, session: &Session) {
    while let Ok(out) = rtc.poll_output() {
        match out {
            Output::Timeout(_) => return,
            Output::Transmit(t) => {
                let _ = socket.send_to(&t.contents, t.destination);
            }
            Output::Event(Event::Closed) => session.peer_closed.store(true, Ordering::SeqCst),
            Output::Event(Event::KeyframeRequest(_)) => {
                session.keyframe_requests.fetch_add(1, Ordering::SeqCst);
            }
            Output::Event(_) => {}
        }
    }
}

fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    f()
}

fn media_flows(s: &Stats) -> bool {
    s.video_packets >= 40 && s.audio_packets >= 20 && s.keyframes >= 2
}

#[test]
fn loopback_media_then_server_delete_closes_viewer() {
    let server = LoopbackWhep::start();
    let viewer = Viewer::connect(server.addr, "/whep/demo", Some("t0k3n")).expect("connect");
    assert!(viewer.location().starts_with("/whep/demo/session-"), "{}", viewer.location());
    assert_eq!(viewer.etag(), Some("\"1\""));
    assert!(viewer.answer().starts_with("v=0"));
    assert!(viewer.answer().contains("a=ice-lite"), "{}", viewer.answer());
    assert!(viewer.wait_for(Duration::from_secs(10), |s| s.connected), "{:?}", viewer.stats());
    assert!(viewer.wait_for(Duration::from_secs(10), media_flows), "{:?}", viewer.stats());

    let stats = viewer.stats();
    assert!(stats.ice_state == "Connected" || stats.ice_state == "Completed", "{stats:?}");
    assert!(stats.video_bytes > 0 && stats.audio_bytes > 0, "{stats:?}");
    let (connected, first_video) =
        (stats.connected_at.expect("connected_at"), stats.first_video_at.expect("first video"));
    assert!(first_video >= connected);
    assert!(stats.first_audio_at.is_some() && stats.last_media_at.is_some());
    assert_eq!(stats.first_video_is_keyframe, Some(true), "source starts with a keyframe");
    assert!(!stats.closed);

    let session = server.session(viewer.location());
    // Nothing is lost on loopback, so what was sent before is what was counted, give or take
    // the packets in flight.
    let sent = session.video_sent.load(Ordering::SeqCst);
    assert!(sent >= stats.video_packets, "sent {sent}, counted {}", stats.video_packets);

    assert_eq!(viewer.delete().expect("DELETE"), 200);
    assert!(viewer.wait_for(Duration::from_secs(5), |s| s.closed), "{:?}", viewer.stats());
    let reason = viewer.stats().close_reason.expect("a close reason");
    assert!(reason.contains("DTLS close") || reason.contains("alive"), "{reason}");
    viewer.close();
}

#[test]
fn loopback_viewer_close_is_seen_by_server() {
    let server = LoopbackWhep::start();
    let viewer = Viewer::connect(server.addr, "/whep/demo", None).expect("connect");
    assert!(
        viewer.wait_for(Duration::from_secs(10), |s| s.video_packets > 0),
        "{:?}",
        viewer.stats()
    );
    let session = server.session(viewer.location());
    viewer.request_keyframe();
    assert!(viewer.wait_for(Duration::from_secs(5), |s| s.keyframe_requests == 1));
    assert!(
        wait_until(Duration::from_secs(5), || session.keyframe_requests.load(Ordering::SeqCst) > 0),
        "server saw no keyframe request"
    );
    viewer.close();
    assert!(
        wait_until(Duration::from_secs(5), || session.peer_closed.load(Ordering::SeqCst)),
        "server saw no DTLS close from the viewer"
    );
}

#[test]
fn loopback_two_viewers_are_independent() {
    let server = LoopbackWhep::start();
    let a = Viewer::connect(server.addr, "/whep/demo", None).expect("connect a");
    let b = Viewer::connect(server.addr, "/whep/demo", None).expect("connect b");
    assert_ne!(a.location(), b.location());
    assert_ne!(a.local_addr(), b.local_addr());
    assert!(a.wait_for(Duration::from_secs(10), media_flows), "{:?}", a.stats());
    assert!(b.wait_for(Duration::from_secs(10), media_flows), "{:?}", b.stats());
    assert_eq!(a.delete().expect("DELETE a"), 200);
    assert!(a.wait_for(Duration::from_secs(5), |s| s.closed), "{:?}", a.stats());
    // b keeps receiving.
    let before = b.stats().video_packets;
    assert!(b.wait_for(Duration::from_secs(5), |s| s.video_packets > before + 10));
    assert!(!b.stats().closed);
    drop(b);
}

#[test]
fn loopback_server_vanishing_closes_viewer_after_ice_timeout() {
    let server = LoopbackWhep::start();
    let viewer = Viewer::connect(server.addr, "/whep/demo", None).expect("connect");
    assert!(
        viewer.wait_for(Duration::from_secs(10), |s| s.video_packets > 0),
        "{:?}",
        viewer.stats()
    );
    let session = server.session(viewer.location());
    session.command.store(VANISH, Ordering::SeqCst);
    let vanished = Instant::now();
    assert!(viewer.wait_for(Duration::from_secs(30), |s| s.closed), "{:?}", viewer.stats());
    let stats = viewer.stats();
    assert_eq!(stats.ice_state, "Disconnected", "{stats:?}");
    let reason = stats.close_reason.expect("a close reason");
    assert!(reason.contains("ICE disconnected"), "{reason}");
    assert!(vanished.elapsed() > Duration::from_secs(3));
    viewer.abandon();
}

/// The viewer (whep-load's and the end-to-end suite's) also plays from a server that runs full
/// ICE, as MediaMTX and live777 do, and not only from an ICE-lite one like whepd: both sides
/// send connectivity checks and the viewer, controlling, nominates.
#[test]
fn loopback_full_ice_server() {
    let server = LoopbackWhep::start();
    let viewer = Viewer::connect(server.addr, "/whep/full", None).expect("connect");
    assert!(!viewer.answer().contains("a=ice-lite"), "{}", viewer.answer());
    assert!(viewer.wait_for(Duration::from_secs(10), media_flows), "{:?}", viewer.stats());
    let stats = viewer.stats();
    assert!(stats.ice_state == "Connected" || stats.ice_state == "Completed", "{stats:?}");
    assert_eq!(viewer.delete().expect("DELETE"), 200);
    assert!(viewer.wait_for(Duration::from_secs(5), |s| s.closed), "{:?}", viewer.stats());
    viewer.close();
}
