//! The admin API's policy over real HTTP: specs that would make FFmpeg read or write local
//! files are refused (403, naming the rule and the opt-in) without a stream or a process, a
//! network URL and a file in a media directory are accepted, `--admin-raw-ffmpeg` lets raw
//! arguments through, failed authentications are rate limited, and the `Location` of a new
//! stream names it. Written once, instantiated per runtime binary by `suite!`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use whep_e2e::{Server, wait_until};

/// A private directory for one test's media and probe files.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("whep-admin-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Posts `spec` (a JSON object) to `/api/streams` with the admin token.
fn add(server: &Server, spec: &serde_json::Value) -> whep_e2e::http::Response {
    server.admin("POST", "/api/streams", &spec.to_string())
}

fn stream_ids(server: &Server) -> Vec<String> {
    let r = server.admin("GET", "/api/streams", "");
    assert_eq!(r.status, 200, "{}", r.text());
    let list: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON");
    list.as_array()
        .map(|a| a.iter().filter_map(|s| s["id"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

/// The command line of a process, split at its NULs.
fn cmdline(pid: u64) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    raw.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
}

/// Every way the issue found to reach the file system through the admin API is refused with
/// 403 and a reason; nothing is created, spawned or written. A network URL is accepted.
fn hostile_specs_are_refused(bin: &str) {
    let dir = scratch(&format!("hostile-{}", bin.rsplit('/').next().unwrap_or("bin")));
    let media = dir.join("media");
    std::fs::create_dir_all(&media).expect("media dir");
    let media = media.to_str().expect("utf-8 path").to_owned();
    let probe = dir.join("written-by-ffmpeg").to_str().expect("utf-8 path").to_owned();
    let server = Server::start(bin, &["--no-demo", "--media-dir", &media]);
    let net = "only network protocols";
    let outside = "not inside a media directory";
    let raw = "--admin-raw-ffmpeg";
    let cases = [
        (serde_json::json!({"url": "file:/etc/shadow"}), net),
        (serde_json::json!({"url": "concat:/etc/hostname|/etc/hostname"}), net),
        (serde_json::json!({"url": "subfile,,start,0,end,0,,:/etc/shadow"}), net),
        (serde_json::json!({"url": "pipe:0"}), net),
        (serde_json::json!({"url": "http://127.0.0.1:1/\r\nX: 1"}), "no whitespace"),
        (serde_json::json!({"file": "/etc/shadow"}), outside),
        // The tty demuxer would render it as video any viewer can watch.
        (serde_json::json!({"file": "/etc/hostname"}), outside),
        (serde_json::json!({"file": format!("{media}/../../etc/shadow")}), outside),
        (serde_json::json!({"file": format!("concat:{media}/a.mkv|/etc/shadow")}), outside),
        (serde_json::json!({"lavfi": format!("testsrc2,metadata=mode=print:file={probe}")}), raw),
        (
            serde_json::json!({"url": "rtsp://127.0.0.1:1/x", "lavfi_audio": "amovie=/etc/shadow"}),
            raw,
        ),
        (
            serde_json::json!({"args": ["-f", "lavfi", "-i", "testsrc2", "-t", "1", "-y", probe]}),
            raw,
        ),
    ];
    for (i, (mut spec, needle)) in cases.into_iter().enumerate() {
        spec["id"] = format!("h{i}").into();
        let r = add(&server, &spec);
        assert_eq!(r.status, 403, "{spec}: {}", r.text());
        let body: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON error");
        let why = body["error"].as_str().unwrap_or_default();
        assert!(why.starts_with("admin policy: ") && why.contains(needle), "{spec}: {why}");
    }
    assert!(stream_ids(&server).is_empty(), "a refused spec left a stream");
    assert!(whep_e2e::children_of(server.pid()).is_empty(), "a refused spec spawned FFmpeg");
    std::thread::sleep(Duration::from_millis(300));
    assert!(!std::path::Path::new(&probe).exists(), "FFmpeg wrote {probe}");
    let refused =
        server.metric("whep_requests_total{route=\"admin\",method=\"POST\",status=\"403\"}");
    assert_eq!(refused, Some(12.0));

    // Not everything is refused: a network URL is added (not started: nothing listens there).
    let r = add(
        &server,
        &serde_json::json!({"id": "cam", "url": "rtsp://127.0.0.1:1/x", "autostart": false}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(stream_ids(&server), ["cam"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A file in a media directory plays: FFmpeg reads it under its own whitelists and sends RTP.
fn media_file_plays(bin: &str) {
    let dir = scratch(&format!("media-{}", bin.rsplit('/').next().unwrap_or("bin")));
    let clip = dir.join("clip.mkv");
    let made = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i"])
        .args(["testsrc2=size=160x120:rate=15", "-f", "lavfi", "-i", "sine=sample_rate=48000"])
        .args(["-t", "2", "-c:v", "libx264", "-profile:v", "baseline", "-g", "15", "-c:a"])
        .args(["libopus", "-ac", "2"])
        .arg(&clip)
        .status()
        .expect("run ffmpeg");
    assert!(made.success(), "cannot make {}", clip.display());
    let media = dir.to_str().expect("utf-8 path");
    let server = Server::start(bin, &["--no-demo", "--media-dir", media]);
    let path = clip.to_str().expect("utf-8 path");
    let r = add(&server, &serde_json::json!({"id": "vod", "file": path}));
    assert_eq!(r.status, 201, "{}", r.text());
    let s = server
        .wait_stream("vod", Duration::from_secs(15), |s| s["pid"].as_u64().is_some())
        .unwrap_or_else(|s| panic!("FFmpeg not started: {s}"));
    let argv = cmdline(s["pid"].as_u64().unwrap_or(0));
    let whitelists = ["-protocol_whitelist", "file", "-format_whitelist"];
    assert!(argv.windows(3).any(|w| w == whitelists), "{argv:?}");
    assert!(
        wait_until(Duration::from_secs(15), || {
            server.metric("whep_ingest_packets_total").is_some_and(|n| n > 0.0)
        }),
        "no RTP from FFmpeg reading {path}"
    );
    assert_eq!(server.admin("DELETE", "/api/streams/vod", "").status, 204);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--admin-raw-ffmpeg` lets raw `args` through (and FFmpeg runs them); `file` without a
/// media directory is still refused.
fn raw_opt_in_accepts_args(bin: &str) {
    let server = Server::start(bin, &["--no-demo", "--admin-raw-ffmpeg"]);
    let spec = serde_json::json!({
        "id": "raw",
        "args": ["-re", "-f", "lavfi", "-i", "testsrc2=size=160x120:rate=10",
                 "-f", "lavfi", "-i", "sine=sample_rate=48000"],
        "transcode": true,
        "audio_map": "1:a:0",
    });
    let r = add(&server, &spec);
    assert_eq!(r.status, 201, "{}", r.text());
    server
        .wait_stream("raw", Duration::from_secs(15), |s| {
            s["state"] == "running" && s["pid"].as_u64().is_some()
        })
        .unwrap_or_else(|s| panic!("raw args not running: {s}"));
    let r = add(&server, &serde_json::json!({"id": "f", "file": "/srv/media/a.mp4"}));
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("no media directory"), "{}", r.text());
    assert_eq!(server.admin("DELETE", "/api/streams/raw", "").status, 204);
}

/// 300 wrong tokens from one client: after the budget (the request rate's burst, 100) most
/// get 429 + Retry-After, counted in `/metrics`; the right token works once it refills.
fn failed_logins_are_rate_limited(bin: &str) {
    let server = Server::start(bin, &["--no-demo"]);
    let wrong = [("Authorization", "Bearer guess")];
    let (mut unauthorized, mut limited, mut retry_after) = (0, 0, 0);
    for _ in 0..300 {
        let r = server.request("GET", "/api/streams", &wrong, b"");
        match r.status {
            401 => unauthorized += 1,
            429 => {
                limited += 1;
                retry_after = r.header("retry-after").and_then(|v| v.parse().ok()).unwrap_or(0);
            }
            other => panic!("wrong token answered {other}: {}", r.text()),
        }
    }
    assert!(limited >= 100, "{limited} of 300 refused ({unauthorized} answered 401)");
    assert!((100..=200).contains(&unauthorized), "{unauthorized} guesses answered");
    assert_eq!(retry_after, 1, "Retry-After");
    let counted = server.metric("whep_rejections_total{reason=\"admin_rate_limited\"}");
    assert_eq!(counted, Some(f64::from(limited)));
    std::thread::sleep(Duration::from_secs(1));
    let r = server.admin("GET", "/api/streams", "");
    assert_eq!(r.status, 200, "the right token after the wait: {}", r.text());
}

/// The `Location` of a new stream is its id encoded as one path segment, and names it.
fn location_names_the_stream(bin: &str) {
    let server = Server::start(bin, &["--no-demo"]);
    for (id, want) in [
        ("a b", "/api/streams/a%20b"),
        ("a/b", "/api/streams/a%2Fb"),
        ("a%2Fb", "/api/streams/a%252Fb"),
        ("cam:1", "/api/streams/cam:1"),
    ] {
        let r = add(&server, &serde_json::json!({"id": id, "external": true}));
        assert_eq!(r.status, 201, "{id}: {}", r.text());
        let location = r.header("location").unwrap_or_default().to_owned();
        assert_eq!(location, want, "{id}");
        let r = server.admin("GET", &location, "");
        assert_eq!(r.status, 200, "GET {location}: {}", r.text());
        let s: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON");
        assert_eq!(s["id"], id, "GET {location}");
    }
}

whep_e2e::runtime_suite!(
    hostile_specs_are_refused,
    media_file_plays,
    raw_opt_in_accepts_args,
    failed_logins_are_rate_limited,
    location_names_the_stream,
);
