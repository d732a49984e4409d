//! What a stream added over the admin API may make FFmpeg do.
//!
//! A stream from the configuration file or the command line is the operator's and keeps
//! FFmpeg's full power. The admin API's token is often handed to another program (a CMS), so a
//! stream posted there is held to [`AdminPolicy`]:
//!
//! - `url`: only a network protocol ([`URL_SCHEMES`]), and FFmpeg is told so as well
//!   (`-protocol_whitelist` [`URL_PROTOCOLS`]), so that what the source sends back (an HLS
//!   playlist naming `file:` segments, a redirect to `data:`) cannot reach the local disk
//!   either. The host is not checked: the server may fetch internal addresses (SSRF) that the
//!   API client could not reach itself; firewall the server's outgoing traffic where that
//!   matters.
//! - `file`: only an absolute path inside one of [`AdminPolicy::media_dirs`] (none by default,
//!   so `file` is refused), checked lexically: no `.` or `..` components, no control
//!   characters. FFmpeg reads it with `-protocol_whitelist file` (no `concat:`, `subfile:`) and
//!   `-format_whitelist` [`FILE_FORMATS`] (media containers: no `tty` rendering text files as
//!   video, no `concat` or `hls` lists naming other files). Symbolic links inside a media
//!   directory are followed; they are the operator's responsibility.
//! - `args`, `lavfi` and `lavfi_audio`: refused unless [`AdminPolicy::raw_ffmpeg`] is set. Raw
//!   arguments can add outputs that write files, and a filter graph can write and read files
//!   (`metadata=mode=print:file=…`, `movie=…`).
//! - `external = true`: always allowed (FFmpeg is not the server's to run).

use whep_core::{Feed, StreamConfig};

use super::StreamSpec;

/// The URL schemes a stream added over the admin API may use: network protocols only.
pub const URL_SCHEMES: &[&str] =
    &["rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "srt", "udp", "rtp", "tcp", "tls"];

/// FFmpeg's `-protocol_whitelist` for such a URL: the schemes plus the protocols they are built
/// on or open along the way (`rtsp` over `tcp` and `rtp`/`udp`, `https` over `tls` and `tcp`,
/// `crypto` for AES-encrypted HLS segments, `httpproxy` for a configured proxy). None of them
/// reads local files.
pub const URL_PROTOCOLS: &str =
    "rtsp,rtsps,rtmp,rtmps,http,https,srt,udp,rtp,tcp,tls,crypto,httpproxy";

/// FFmpeg's `-format_whitelist` for a media file added over the admin API: MP4/MOV,
/// Matroska/WebM, MPEG-TS, FLV, Ogg, AVI and MPEG-PS.
pub const FILE_FORMATS: &str = "mov,matroska,mpegts,flv,ogg,avi,mpeg";

/// The opt-in that lifts the rule on `args` and `lavfi`, as the refusal names it.
const RAW_OPT_IN: &str = "the operator can allow them with --admin-raw-ffmpeg \
                          (admin_raw_ffmpeg = true), or configure the stream in the configuration file";

/// What the admin API may ask of FFmpeg (see the [module docs](self)).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminPolicy {
    /// Directories whose files `file` may name: absolute, without `.` or `..` components (see
    /// [`check_media_dir`]). None (the default): `file` is refused.
    pub media_dirs: Vec<String>,
    /// Lets the admin API use raw FFmpeg `args` and `lavfi` graphs, that is FFmpeg's full power
    /// as the server's user (default false).
    pub raw_ffmpeg: bool,
}

/// Why a stream posted to the admin API was not turned into a [`StreamConfig`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The policy forbids it (403); the message names the rule and the opt-in, if any.
    Forbidden(String),
    /// The specification is invalid whoever posts it (400).
    Invalid(String),
}

impl AdminPolicy {
    /// Checks `spec` against the policy and converts it, with FFmpeg's own whitelists added
    /// to the input arguments of a `url` or `file` stream.
    pub fn stream_config(&self, spec: &StreamSpec) -> Result<StreamConfig, Refused> {
        let forbid = |why: String| Err(Refused::Forbidden(format!("admin policy: {why}")));
        if !self.raw_ffmpeg {
            if spec.args.is_some() {
                return forbid(format!(
                    "raw FFmpeg `args` are refused over the admin API; {RAW_OPT_IN}"
                ));
            }
            if spec.lavfi.is_some() || spec.lavfi_audio.is_some() {
                return forbid(format!(
                    "`lavfi` graphs are refused over the admin API; {RAW_OPT_IN}"
                ));
            }
        }
        let mut whitelist: Vec<&str> = Vec::new();
        if let Some(url) = &spec.url {
            if let Err(why) = check_url(url) {
                return forbid(why);
            }
            whitelist = vec!["-protocol_whitelist", URL_PROTOCOLS];
        } else if let Some(path) = &spec.file {
            if let Err(why) = check_file(&self.media_dirs, path) {
                return forbid(why);
            }
            whitelist = vec!["-protocol_whitelist", "file", "-format_whitelist", FILE_FORMATS];
        }
        let mut config = spec.to_config().map_err(Refused::Invalid)?;
        if let Feed::Supervised { input_args } = &mut config.feed {
            // Input options apply to the next `-i`; a url or file stream has exactly one.
            input_args.splice(0..0, whitelist.into_iter().map(str::to_owned));
        }
        Ok(config)
    }
}

/// Checks a configured media directory: an absolute path without `.` or `..` components,
/// empty components or control characters (a trailing `/` is fine).
pub fn check_media_dir(dir: &str) -> Result<(), String> {
    let trimmed = dir.trim_end_matches('/');
    if !dir.starts_with('/') || !is_normal(trimmed) {
        return Err(format!(
            "media directory {dir:?} must be an absolute path without . or .. components"
        ));
    }
    Ok(())
}

/// Whether `path` (absolute, or empty for `/`) has no empty, `.` or `..` component after its
/// leading `/` and no control character.
fn is_normal(path: &str) -> bool {
    !path.chars().any(char::is_control)
        && path.split('/').skip(1).all(|c| !c.is_empty() && c != "." && c != "..")
}

/// A network URL: a scheme from [`URL_SCHEMES`], `://`, something after it, and no whitespace
/// or control characters (which FFmpeg would pass on, e.g. into an HTTP request line).
fn check_url(url: &str) -> Result<(), String> {
    let allowed = URL_SCHEMES.join(", ");
    let scheme = url.split_once("://").map(|(s, _)| s);
    let Some(scheme) = scheme.filter(|s| URL_SCHEMES.contains(s)) else {
        let shown = scheme.or_else(|| url.split_once(':').map(|(s, _)| s)).unwrap_or(url);
        return Err(format!(
            "url scheme {shown:?} is not allowed over the admin API: only network protocols \
             ({allowed}); configure other inputs in the configuration file"
        ));
    };
    if url.len() == scheme.len() + 3 || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("url {url:?} must name a host and hold no whitespace"));
    }
    Ok(())
}

/// A file inside one of `dirs`, checked lexically.
fn check_file(dirs: &[String], path: &str) -> Result<(), String> {
    if dirs.is_empty() {
        return Err("`file` is refused over the admin API: no media directory is configured \
                    (the operator can name some with --media-dir DIR, media_dirs = [..])"
            .into());
    }
    let inside = dirs.iter().any(|dir| {
        let dir = dir.trim_end_matches('/');
        path.strip_prefix(dir)
            .and_then(|rest| rest.strip_prefix('/'))
            .is_some_and(|f| !f.is_empty())
    });
    if !path.starts_with('/') || !is_normal(path) || !inside {
        return Err(format!(
            "file {path:?} is not inside a media directory ({}): give an absolute path without \
             . or .. components",
            dirs.join(", ")
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn media() -> AdminPolicy {
        AdminPolicy {
            media_dirs: vec!["/srv/media".into(), "/var/video/".into()],
            ..AdminPolicy::default()
        }
    }

    fn input_args(config: &StreamConfig) -> Vec<String> {
        match &config.feed {
            Feed::Supervised { input_args } => input_args.clone(),
            other => panic!("not supervised: {other:?}"),
        }
    }

    fn forbidden(policy: &AdminPolicy, spec: &StreamSpec) -> String {
        match policy.stream_config(spec) {
            Err(Refused::Forbidden(why)) => why,
            other => panic!("{spec:?} not forbidden: {other:?}"),
        }
    }

    fn url(u: &str) -> StreamSpec {
        StreamSpec { url: Some(u.into()), ..StreamSpec::default() }
    }

    fn file(f: &str) -> StreamSpec {
        StreamSpec { file: Some(f.into()), ..StreamSpec::default() }
    }

    #[test]
    fn network_urls_are_accepted_and_whitelisted_for_ffmpeg() {
        let policy = AdminPolicy::default();
        for ok in [
            "rtsp://127.0.0.1:1/live",
            "rtsps://cam.example/x",
            "rtmp://h/app/key",
            "https://cdn.example/live.m3u8",
            "srt://10.0.0.1:9000?mode=caller",
            "udp://239.0.0.1:1234",
        ] {
            let config = policy.stream_config(&url(ok)).unwrap_or_else(|e| panic!("{ok}: {e:?}"));
            assert_eq!(input_args(&config), ["-protocol_whitelist", URL_PROTOCOLS, "-i", ok]);
        }
    }

    #[test]
    fn local_and_wrapping_protocols_are_refused() {
        let policy = AdminPolicy::default();
        for bad in [
            "file:/etc/shadow",
            "file:///etc/shadow",
            "/etc/shadow",
            "concat:/etc/passwd|/etc/shadow",
            "subfile,,start,0,end,100,,:/etc/shadow",
            "pipe:0",
            "data:text/plain,hi",
            "fd:3",
            "crypto+file:///etc/shadow",
            "async:http://h/x",
            "cache:http://h/x",
            "RTSP://h/x",
            "gopher://h/x",
            "rtsp:/h",
        ] {
            let why = forbidden(&policy, &url(bad));
            assert!(why.contains("only network protocols") && why.contains("rtsp"), "{bad}: {why}");
        }
        for bad in ["http://", "http://h/a b", "http://h/\r\nX-Injected: 1"] {
            let why = forbidden(&policy, &url(bad));
            assert!(why.contains("no whitespace"), "{bad:?}: {why}");
        }
    }

    #[test]
    fn files_only_inside_media_directories() {
        let why = forbidden(&AdminPolicy::default(), &file("/srv/media/a.mp4"));
        assert!(why.contains("no media directory") && why.contains("--media-dir"), "{why}");
        let policy = media();
        for ok in
            ["/srv/media/a.mp4", "/srv/media/sub/b.mkv", "/var/video/c.ts", "/srv/media/x:y.mp4"]
        {
            let config = policy.stream_config(&file(ok)).unwrap_or_else(|e| panic!("{ok}: {e:?}"));
            let args = input_args(&config);
            assert_eq!(
                args[..4],
                ["-protocol_whitelist", "file", "-format_whitelist", FILE_FORMATS],
                "{args:?}"
            );
            assert_eq!(args.last().map(String::as_str), Some(ok));
        }
        for bad in [
            "/etc/shadow",
            "/etc/hostname",
            "/srv/media/../../etc/shadow",
            "/srv/media/./a.mp4",
            "/srv/media//a.mp4",
            "/srv/media/",
            "/srv/media",
            "/srv/mediaX/a.mp4",
            "srv/media/a.mp4",
            "file:/srv/media/a.mp4",
            "concat:/srv/media/a.mp4|/etc/shadow",
            "subfile,,start,0,end,0,,:/srv/media/a.mp4",
            "/srv/media/a\0.mp4",
            "/srv/media/a\n.mp4",
        ] {
            let why = forbidden(&policy, &file(bad));
            assert!(why.contains("not inside a media directory"), "{bad:?}: {why}");
        }
    }

    #[test]
    fn raw_args_and_lavfi_need_the_opt_in() {
        let args = StreamSpec {
            args: Some(vec!["-i".into(), "x".into(), "-f".into(), "null".into(), "/tmp/o".into()]),
            ..StreamSpec::default()
        };
        let writes = StreamSpec {
            lavfi: Some("testsrc2,metadata=mode=print:file=/tmp/pwned".into()),
            ..StreamSpec::default()
        };
        let audio_only =
            StreamSpec { lavfi_audio: Some("amovie=/etc/shadow".into()), ..url("rtsp://h/x") };
        for (spec, needle) in [
            (&args, "`args`"),
            (&StreamSpec::demo(), "`lavfi`"),
            (&writes, "`lavfi`"),
            (&audio_only, "`lavfi`"),
        ] {
            let why = forbidden(&AdminPolicy::default(), spec);
            assert!(why.contains(needle) && why.contains("--admin-raw-ffmpeg"), "{why}");
        }
        let open = AdminPolicy { raw_ffmpeg: true, ..AdminPolicy::default() };
        assert_eq!(open.stream_config(&args), args.to_config().map_err(Refused::Invalid));
        assert_eq!(
            open.stream_config(&StreamSpec::demo()),
            StreamSpec::demo().to_config().map_err(Refused::Invalid)
        );
        // The opt-in lifts only that rule.
        assert!(matches!(open.stream_config(&url("file:/etc/shadow")), Err(Refused::Forbidden(_))));
    }

    #[test]
    fn external_is_allowed_and_invalid_specs_are_400() {
        let ext = StreamSpec { external: true, ..StreamSpec::default() };
        assert_eq!(
            AdminPolicy::default().stream_config(&ext),
            ext.to_config().map_err(Refused::Invalid)
        );
        let two = StreamSpec { external: true, ..url("rtsp://h/x") };
        assert!(matches!(AdminPolicy::default().stream_config(&two), Err(Refused::Invalid(_))));
        let none = StreamSpec::default();
        assert!(matches!(AdminPolicy::default().stream_config(&none), Err(Refused::Invalid(_))));
    }

    #[test]
    fn media_directories_are_checked() {
        for ok in ["/srv/media", "/srv/media/", "/"] {
            assert_eq!(check_media_dir(ok), Ok(()), "{ok}");
        }
        for bad in ["srv/media", "/srv/../etc", "/srv/./m", "", "/srv//m"] {
            assert!(check_media_dir(bad).is_err(), "{bad}");
        }
    }
}
