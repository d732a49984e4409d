//! FFmpeg command construction for the WebRTC egress legs.
//!
//! A stream with WebRTC egress has FFmpeg write two extra RTP outputs, appended after the user's
//! own outputs: video to `udp://127.0.0.1:V` and audio to `udp://127.0.0.1:V+1`. This module
//! builds those arguments (the seed's `BuildArgs` and `splitRTPLegs`) and the full command line of
//! a supervised stream. It never spawns anything; the runtime does.
//!
//! Two choices differ from a naive `-f rtp rtp://…` output, on purpose:
//!
//! - The URL scheme is `udp://`, not `rtp://`. With `rtp://host:V` FFmpeg sends RTCP to V+1,
//!   which is the audio port; with `udp://` its sender reports are interleaved with the media on
//!   the same port, and ingest drops them (payload type byte 200..=204). `-rtpflags skip_rtcp` is
//!   not used, so the RTCP filtering at ingest stays the single place that handles it.
//! - `pkt_size=1200` rather than the seed's 1316, so that an RTP packet plus the SRTP tag and
//!   the header extensions a viewer negotiates still fits a 1280-byte IPv6-minimum MTU path.
//! - Each leg sends from a known port, `localaddr=127.0.0.1&localport=V+2` (audio V+3), the two
//!   ports after the pair in the stream's block: ingest accepts a supervised stream's datagrams
//!   from those alone, so another local process cannot inject media into what viewers get.

use crate::config::VideoCodec;

/// The identifier of the video output leg.
pub const VIDEO_LEG_ID: &str = "webrtc_video";

/// The identifier of the audio output leg.
pub const AUDIO_LEG_ID: &str = "webrtc_audio";

/// The `-map` selector used when [`EgressConfig::video_map`] is empty: the first video stream.
pub const DEFAULT_VIDEO_MAP: &str = "0:v:0";

/// The `-map` selector used when [`EgressConfig::audio_map`] is empty: the first audio stream.
pub const DEFAULT_AUDIO_MAP: &str = "0:a:0";

/// The RTP packet size limit FFmpeg is told to respect on both legs.
pub const RTP_PKT_SIZE: u16 = 1200;

/// A further video rendition of a stream: FFmpeg encodes the picture again, in `codec` at
/// `bitrate_kbps`, with the stream's GOP (keyframes aligned with the H264 rendition's when that
/// is transcoded with the same GOP), and sends it to the rendition's own ingest port
/// ([`PortPair::rendition`](crate::PortPair::rendition)). A viewer gets the first rendition
/// its offer can decode, the stream's H264 first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendition {
    /// The codec: VP8 for players without H264 (Firefox without OpenH264), or H264 for a lower
    /// rung of a bitrate ladder.
    pub codec: VideoCodec,
    /// The target bitrate in kbit/s.
    pub bitrate_kbps: u32,
    /// The picture height in pixels (width follows the aspect ratio); `None` keeps the source's.
    pub height: Option<u32>,
}

impl Rendition {
    /// A rendition in `codec` at `bitrate_kbps`, at the source's size.
    pub fn new(codec: VideoCodec, bitrate_kbps: u32) -> Self {
        Self { codec, bitrate_kbps, height: None }
    }
}

/// The RTP payload type FFmpeg writes on a rendition's leg (ingest does not look at it).
pub const RENDITION_PT: u8 = 97;

/// The per-stream WebRTC egress settings (the seed's `ConfigWebRTC`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressConfig {
    /// Whether the stream gets WebRTC egress at all; default true. [`build_args`] ignores it:
    /// the caller decides whether to add the legs.
    pub enabled: bool,
    /// The RTP payload type FFmpeg writes on the video leg; default 96. Viewers get their own
    /// negotiated payload type, so this only has to be consistent with ingest.
    pub video_pt: u8,
    /// The RTP payload type FFmpeg writes on the audio leg; default 111.
    pub audio_pt: u8,
    /// Re-encodes to H264 baseline + Opus instead of copying; default false (`-c:v copy` /
    /// `-c:a copy`, which assumes the source already is H264 + Opus).
    pub force_transcode: bool,
    /// The FFmpeg `-map` selector of the video stream; empty (the default) means `0:v:0`.
    pub video_map: String,
    /// The FFmpeg `-map` selector of the audio stream; empty (the default) means `0:a:0`.
    pub audio_map: String,
    /// The keyframe interval in frames when transcoding; default 60. Short GOPs let a new viewer
    /// start quickly, since video starts at a keyframe.
    pub gop: u32,
    /// The video bitrate in kbit/s when transcoding; default none (encoder default). Gives
    /// `-b:v Nk -maxrate Nk -bufsize ⌈N/2⌉k`. Ignored in copy mode.
    pub video_bitrate_kbps: Option<u32>,
    /// The Opus bitrate in kbit/s when transcoding; default 96. Ignored in copy mode.
    pub audio_bitrate_kbps: u32,
    /// Further video renditions, each an output leg of its own after the audio leg; default
    /// none. At most [`CoreConfig::max_renditions`](crate::CoreConfig::max_renditions).
    pub renditions: Vec<Rendition>,
}

impl Default for EgressConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            video_pt: 96,
            audio_pt: 111,
            force_transcode: false,
            video_map: String::new(),
            audio_map: String::new(),
            gop: 60,
            video_bitrate_kbps: None,
            audio_bitrate_kbps: 96,
            renditions: Vec::new(),
        }
    }
}

impl EgressConfig {
    /// Checks the settings, returning a message that names the offending field.
    ///
    /// A map selector may be empty (meaning the default) but must otherwise be non-empty after
    /// trimming, contain no whitespace and not start with `-`, since FFmpeg would read it as a
    /// separate argument or option. Payload types must fit RTP's 7 bits, the GOP must be at least
    /// one frame, and bitrates must be positive.
    pub fn validate(&self) -> Result<(), String> {
        check_map("video_map", &self.video_map)?;
        check_map("audio_map", &self.audio_map)?;
        for (field, pt) in [("video_pt", self.video_pt), ("audio_pt", self.audio_pt)] {
            if pt > 127 {
                return Err(format!("{field} {pt} is not a valid RTP payload type (0..=127)"));
            }
        }
        if self.gop == 0 {
            return Err("gop must be at least 1 frame".to_owned());
        }
        if self.video_bitrate_kbps == Some(0) {
            return Err("video_bitrate_kbps must be positive when set".to_owned());
        }
        if self.audio_bitrate_kbps == 0 {
            return Err("audio_bitrate_kbps must be positive".to_owned());
        }
        for (k, r) in self.renditions.iter().enumerate() {
            if r.bitrate_kbps == 0 {
                return Err(format!("rendition {k}: bitrate_kbps must be positive"));
            }
            if r.height.is_some_and(|h| h == 0 || h % 2 != 0 || h > 4320) {
                return Err(format!("rendition {k}: height must be even, 2 to 4320"));
            }
        }
        Ok(())
    }

    /// Returns the video `-map` selector, with the default filled in.
    #[must_use]
    pub fn effective_video_map(&self) -> &str {
        or_default(&self.video_map, DEFAULT_VIDEO_MAP)
    }

    /// Returns the audio `-map` selector, with the default filled in.
    #[must_use]
    pub fn effective_audio_map(&self) -> &str {
        or_default(&self.audio_map, DEFAULT_AUDIO_MAP)
    }
}

/// One FFmpeg output: its options, then its address (the seed's `ConfigIO`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputLeg {
    /// [`VIDEO_LEG_ID`] or [`AUDIO_LEG_ID`].
    pub id: &'static str,
    /// The output options, starting with `-map`.
    pub options: Vec<String>,
    /// The output URL, e.g. `udp://127.0.0.1:40000?pkt_size=1200`.
    pub address: String,
}

/// Builds the flat argument list for both legs, video first.
///
/// `video_port` is V and audio goes to V+1, so V must be at most 65534 (a pair from
/// `PortPool` always is). Nothing is rejected here; call
/// [`EgressConfig::validate`] first.
#[must_use]
pub fn build_args(cfg: &EgressConfig, video_port: u16) -> Vec<String> {
    let mut args: Vec<String> = Vec::with_capacity(48);
    let mut push = |items: &[&str]| args.extend(items.iter().map(|s| (*s).to_owned()));

    // Video leg.
    push(&["-map", cfg.effective_video_map()]);
    if cfg.force_transcode {
        let gop = cfg.gop.to_string();
        // Baseline, no B-frames and zerolatency keep decode order equal to presentation order
        // and the encoder from buffering; a fixed GOP with no scene-cut keyframes makes keyframe
        // spacing (and so a new viewer's wait) predictable.
        push(&[
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-profile:v",
            "baseline",
            "-pix_fmt",
            "yuv420p",
            "-tune",
            "zerolatency",
            "-g",
            &gop,
            "-keyint_min",
            &gop,
            "-sc_threshold",
            "0",
            "-bf",
            "0",
        ]);
        if let Some(kbps) = cfg.video_bitrate_kbps {
            let rate = format!("{kbps}k");
            // Half a second of buffer caps bursts; rounding up keeps 1 kbit/s from giving 0k.
            let bufsize = format!("{}k", kbps.div_ceil(2));
            push(&["-b:v", &rate, "-maxrate", &rate, "-bufsize", &bufsize]);
        }
    } else {
        push(&["-c:v", "copy"]);
    }
    let video_pt = cfg.video_pt.to_string();
    push(&["-payload_type", &video_pt, "-f", "rtp"]);
    push(&[&udp_address(u32::from(video_port), u32::from(video_port) + 2)]);

    // Audio leg.
    push(&["-map", cfg.effective_audio_map()]);
    if cfg.force_transcode {
        let rate = format!("{}k", cfg.audio_bitrate_kbps);
        // WebRTC Opus is always signalled as 48 kHz stereo.
        push(&["-c:a", "libopus", "-b:a", &rate, "-ar", "48000", "-ac", "2"]);
    } else {
        push(&["-c:a", "copy"]);
    }
    let audio_pt = cfg.audio_pt.to_string();
    push(&["-payload_type", &audio_pt, "-f", "rtp"]);
    // In u32 so that a bad V of 65535 gives a bad address rather than a panic or port 0.
    push(&[&udp_address(u32::from(video_port) + 1, u32::from(video_port) + 3)]);

    // Rendition legs.
    for (k, r) in cfg.renditions.iter().enumerate() {
        let port = u32::from(video_port) + 4 + 2 * k as u32;
        args.extend(rendition_leg(cfg, r, port));
    }
    args
}

/// One rendition's output leg: `-map`, the encoder, `-f rtp` and its address (`port`, sent
/// from `port + 1`).
fn rendition_leg(cfg: &EgressConfig, r: &Rendition, port: u32) -> Vec<String> {
    let gop = cfg.gop.to_string();
    let rate = format!("{}k", r.bitrate_kbps);
    let bufsize = format!("{}k", r.bitrate_kbps.div_ceil(2));
    let mut leg: Vec<String> = ["-map", cfg.effective_video_map()].map(str::to_owned).to_vec();
    if let Some(h) = r.height {
        leg.extend(["-vf".to_owned(), format!("scale=-2:{h}")]);
    }
    let encoder: &[&str] = match r.codec {
        // Real-time VP8: no look-ahead or alternate reference frames (they add latency), error
        // resilient partitions, fastest speed; keyframes every GOP like the H264 rendition.
        VideoCodec::Vp8 => &[
            "-c:v",
            "libvpx",
            "-deadline",
            "realtime",
            "-cpu-used",
            "8",
            "-lag-in-frames",
            "0",
            "-auto-alt-ref",
            "0",
            "-error-resilient",
            "1",
        ],
        VideoCodec::H264 => &[
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-profile:v",
            "baseline",
            "-tune",
            "zerolatency",
            "-sc_threshold",
            "0",
            "-bf",
            "0",
        ],
    };
    leg.extend(encoder.iter().map(|s| (*s).to_owned()));
    leg.extend(
        [
            "-pix_fmt",
            "yuv420p",
            "-g",
            &gop,
            "-keyint_min",
            &gop,
            "-b:v",
            &rate,
            "-maxrate",
            &rate,
            "-bufsize",
            &bufsize,
            "-payload_type",
            &RENDITION_PT.to_string(),
            "-f",
            "rtp",
        ]
        .map(str::to_owned),
    );
    leg.push(udp_address(port, port + 1));
    leg
}

/// Splits the flat list from [`build_args`] at the second `-map` into the video and audio legs.
///
/// Each leg's address is its last element and its options are everything before. Returns `None`
/// unless the list starts with `-map`, holds exactly two `-map` options, and each leg has at
/// least a `-map` selector and an address that does not look like an option.
#[must_use]
pub fn split_legs(args: &[String]) -> Option<[OutputLeg; 2]> {
    if args.first().map(String::as_str) != Some("-map") {
        return None;
    }
    // Start past the first `-map` and its selector, so a selector is never taken for an option.
    let second = 2 + args.get(2..)?.iter().position(|a| a == "-map")?;
    if args.get(second + 2..).is_some_and(|rest| rest.iter().any(|a| a == "-map")) {
        return None;
    }
    let (video, audio) = args.split_at(second);
    Some([leg(VIDEO_LEG_ID, video)?, leg(AUDIO_LEG_ID, audio)?])
}

/// Builds the full command line of a stream the core supervises, without the program name.
///
/// It is `-hide_banner -nostdin -loglevel warning`, then the user's input arguments verbatim
/// (e.g. `["-re", "-f", "lavfi", "-i", "testsrc2=…"]`), then [`build_args`]. `-nostdin` keeps a
/// child from stealing or blocking on the server's terminal; warnings only keep its stderr,
/// which the runtime logs, quiet.
#[must_use]
pub fn command_line(input_args: &[String], cfg: &EgressConfig, video_port: u16) -> Vec<String> {
    let prefix = ["-hide_banner", "-nostdin", "-loglevel", "warning"];
    prefix
        .iter()
        .map(|s| (*s).to_owned())
        .chain(input_args.iter().cloned())
        .chain(build_args(cfg, video_port))
        .collect()
}

/// Returns `map`, or `default` when it is empty.
fn or_default<'a>(map: &'a str, default: &'a str) -> &'a str {
    if map.is_empty() { default } else { map }
}

/// Checks one `-map` selector; empty means the default and is fine.
fn check_map(field: &str, map: &str) -> Result<(), String> {
    if map.is_empty() {
        return Ok(());
    }
    if map.trim().is_empty() {
        return Err(format!("{field} {map:?} is blank; leave it empty for the default"));
    }
    if map.chars().any(char::is_whitespace) {
        return Err(format!(
            "{field} {map:?} must not contain whitespace (it is a single FFmpeg argument)"
        ));
    }
    if map.starts_with('-') {
        return Err(format!(
            "{field} {map:?} must not start with '-' (FFmpeg would read it as an option)"
        ));
    }
    Ok(())
}

/// Formats the loopback RTP output address of `port`, sent from `127.0.0.1:source`.
fn udp_address(port: u32, source: u32) -> String {
    format!("udp://127.0.0.1:{port}?pkt_size={RTP_PKT_SIZE}&localaddr=127.0.0.1&localport={source}")
}

/// Turns one leg's slice (`-map sel … address`) into an [`OutputLeg`].
fn leg(id: &'static str, args: &[String]) -> Option<OutputLeg> {
    let (address, options) = args.split_last()?;
    if options.len() < 2 || address.starts_with('-') {
        return None;
    }
    Some(OutputLeg { id, options: options.to_vec(), address: address.clone() })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    /// Parses the port out of
    /// `udp://127.0.0.1:<port>?pkt_size=1200&localaddr=127.0.0.1&localport=<port + 2>`.
    fn port_of(address: &str) -> Option<u32> {
        let rest = address.strip_prefix("udp://127.0.0.1:")?;
        let (port, query) = rest.split_once('?')?;
        let port: u32 = port.parse().ok()?;
        let source = query.strip_prefix("pkt_size=1200&localaddr=127.0.0.1&localport=")?;
        (source.parse::<u32>().ok()? == port + 2).then_some(port)
    }

    fn transcode() -> EgressConfig {
        EgressConfig { force_transcode: true, ..EgressConfig::default() }
    }

    #[test]
    fn defaults() {
        let cfg = EgressConfig::default();
        assert!(cfg.enabled);
        assert_eq!((cfg.video_pt, cfg.audio_pt), (96, 111));
        assert!(!cfg.force_transcode);
        assert_eq!(cfg.gop, 60);
        assert_eq!(cfg.video_bitrate_kbps, None);
        assert_eq!(cfg.audio_bitrate_kbps, 96);
        assert_eq!(cfg.validate(), Ok(()));
    }

    #[test]
    fn copy_mode_args_exact() {
        let got = build_args(&EgressConfig::default(), 40000);
        let want = strings(&[
            "-map",
            "0:v:0",
            "-c:v",
            "copy",
            "-payload_type",
            "96",
            "-f",
            "rtp",
            "udp://127.0.0.1:40000?pkt_size=1200&localaddr=127.0.0.1&localport=40002",
            "-map",
            "0:a:0",
            "-c:a",
            "copy",
            "-payload_type",
            "111",
            "-f",
            "rtp",
            "udp://127.0.0.1:40001?pkt_size=1200&localaddr=127.0.0.1&localport=40003",
        ]);
        assert_eq!(got, want);
    }

    #[test]
    fn transcode_mode_args_exact() {
        let got = build_args(&transcode(), 40000);
        let want = strings(&[
            "-map",
            "0:v:0",
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-profile:v",
            "baseline",
            "-pix_fmt",
            "yuv420p",
            "-tune",
            "zerolatency",
            "-g",
            "60",
            "-keyint_min",
            "60",
            "-sc_threshold",
            "0",
            "-bf",
            "0",
            "-payload_type",
            "96",
            "-f",
            "rtp",
            "udp://127.0.0.1:40000?pkt_size=1200&localaddr=127.0.0.1&localport=40002",
            "-map",
            "0:a:0",
            "-c:a",
            "libopus",
            "-b:a",
            "96k",
            "-ar",
            "48000",
            "-ac",
            "2",
            "-payload_type",
            "111",
            "-f",
            "rtp",
            "udp://127.0.0.1:40001?pkt_size=1200&localaddr=127.0.0.1&localport=40003",
        ]);
        assert_eq!(got, want);
    }

    #[test]
    fn transcode_with_bitrates_and_gop() {
        let cfg = EgressConfig {
            gop: 30,
            video_bitrate_kbps: Some(2501),
            audio_bitrate_kbps: 64,
            ..transcode()
        };
        let got = build_args(&cfg, 50000);
        let video_tail = strings(&[
            "-g",
            "30",
            "-keyint_min",
            "30",
            "-sc_threshold",
            "0",
            "-bf",
            "0",
            "-b:v",
            "2501k",
            "-maxrate",
            "2501k",
            "-bufsize",
            "1251k",
            "-payload_type",
            "96",
        ]);
        assert!(got.windows(video_tail.len()).any(|w| w == video_tail), "{got:?}");
        assert!(got.windows(2).any(|w| w == ["-b:a", "64k"]), "{got:?}");
    }

    #[test]
    fn video_bitrate_ignored_in_copy_mode() {
        let cfg = EgressConfig { video_bitrate_kbps: Some(1000), ..EgressConfig::default() };
        assert_eq!(build_args(&cfg, 40000), build_args(&EgressConfig::default(), 40000));
    }

    #[test]
    fn no_rtcp_split_ssrc_or_rtpflags() {
        for cfg in [EgressConfig::default(), transcode()] {
            let args = build_args(&cfg, 40000);
            for banned in ["-ssrc", "-rtpflags", "-bsf:v", "-sdp_file"] {
                assert!(!args.iter().any(|a| a == banned), "{banned} in {args:?}");
            }
            assert!(!args.iter().any(|a| a.starts_with("rtp://")), "{args:?}");
        }
    }

    #[test]
    fn audio_port_is_video_plus_one() {
        let args = build_args(&EgressConfig::default(), 41234);
        let ports: Vec<_> = args.iter().filter_map(|a| port_of(a)).collect();
        assert_eq!(ports, vec![41234, 41235]);
    }

    #[test]
    fn default_maps() {
        let cfg = EgressConfig::default();
        assert_eq!(cfg.effective_video_map(), "0:v:0");
        assert_eq!(cfg.effective_audio_map(), "0:a:0");
        let args = build_args(&cfg, 40000);
        let maps: Vec<_> =
            args.windows(2).filter(|w| w[0] == "-map").map(|w| w[1].as_str()).collect();
        assert_eq!(maps, ["0:v:0", "0:a:0"]);
    }

    #[test]
    fn custom_maps() {
        let cfg = EgressConfig {
            video_map: "1:v:0".to_owned(),
            audio_map: "0:a:1".to_owned(),
            ..EgressConfig::default()
        };
        assert_eq!(cfg.validate(), Ok(()));
        let args = build_args(&cfg, 40000);
        assert_eq!(args[..2], ["-map", "1:v:0"]);
        let maps: Vec<_> =
            args.windows(2).filter(|w| w[0] == "-map").map(|w| w[1].as_str()).collect();
        assert_eq!(maps, ["1:v:0", "0:a:1"]);
    }

    #[test]
    fn validate_rejects_bad_settings() {
        let bad_maps = [" ", "0:v 0", " 0:v:0", "0:v:0\n", "-0:v:0", "-map", "\t"];
        for map in bad_maps {
            for video in [true, false] {
                let cfg = if video {
                    EgressConfig { video_map: map.to_owned(), ..EgressConfig::default() }
                } else {
                    EgressConfig { audio_map: map.to_owned(), ..EgressConfig::default() }
                };
                let err = cfg.validate().err().unwrap_or_default();
                let field = if video { "video_map" } else { "audio_map" };
                assert!(err.starts_with(field), "{map:?}: {err:?}");
            }
        }
        let cases = [
            EgressConfig { video_pt: 128, ..EgressConfig::default() },
            EgressConfig { audio_pt: 255, ..EgressConfig::default() },
            EgressConfig { gop: 0, ..EgressConfig::default() },
            EgressConfig { video_bitrate_kbps: Some(0), ..EgressConfig::default() },
            EgressConfig { audio_bitrate_kbps: 0, ..EgressConfig::default() },
        ];
        for cfg in cases {
            assert!(cfg.validate().is_err(), "{cfg:?}");
        }
    }

    #[test]
    fn split_legs_gives_two_legs_with_right_ports() {
        for cfg in [EgressConfig::default(), transcode()] {
            let args = build_args(&cfg, 40000);
            let Some([video, audio]) = split_legs(&args) else {
                panic!("split failed: {args:?}");
            };
            assert_eq!(video.id, "webrtc_video");
            assert_eq!(audio.id, "webrtc_audio");
            assert!(
                video.address.ends_with(":40000?pkt_size=1200&localaddr=127.0.0.1&localport=40002")
            );
            assert!(
                audio.address.ends_with(":40001?pkt_size=1200&localaddr=127.0.0.1&localport=40003")
            );
            assert_eq!(video.options[..2], ["-map", "0:v:0"]);
            assert_eq!(audio.options[..2], ["-map", "0:a:0"]);
            assert_eq!(video.options.last().map(String::as_str), Some("rtp"));
            // Options then address, leg after leg, gives back the flat list.
            let rejoined: Vec<String> = [video, audio]
                .into_iter()
                .flat_map(|l| l.options.into_iter().chain([l.address]))
                .collect();
            assert_eq!(rejoined, args);
        }
    }

    #[test]
    fn split_legs_rejects_malformed_lists() {
        let cases: [&[&str]; 7] = [
            &[],
            &["-map", "0:v:0", "udp://a"],
            &["-c:v", "copy", "-map", "0:a:0", "udp://b"],
            &["-map", "0:v:0", "udp://a", "-map", "0:a:0", "udp://b", "-map", "x", "c"],
            &["-map", "0:v:0", "-map", "0:a:0", "udp://b"],
            &["-map", "0:v:0", "udp://a", "-map", "0:a:0"],
            &["-map", "0:v:0", "-f", "-map", "0:a:0", "udp://b"],
        ];
        for case in cases {
            assert_eq!(split_legs(&strings(case)), None, "{case:?}");
        }
        // A selector that reads "-map" is skipped, not taken as the second option.
        let odd = strings(&["-map", "-map", "udp://a", "-map", "0:a:0", "udp://b"]);
        assert!(split_legs(&odd).is_some());
    }

    #[test]
    fn command_line_layout() {
        let input = strings(&["-re", "-f", "lavfi", "-i", "testsrc2=size=640x360:rate=30"]);
        let cfg = EgressConfig::default();
        let argv = command_line(&input, &cfg, 40000);
        assert_eq!(argv[..4], ["-hide_banner", "-nostdin", "-loglevel", "warning"]);
        assert_eq!(argv[4..9], input[..]);
        assert_eq!(argv[9..], build_args(&cfg, 40000)[..]);
        assert_eq!(
            argv.last().map(String::as_str),
            Some("udp://127.0.0.1:40001?pkt_size=1200&localaddr=127.0.0.1&localport=40003")
        );
    }

    #[test]
    fn top_port_works() {
        let args = build_args(&EgressConfig::default(), 65534);
        let Some([video, audio]) = split_legs(&args) else {
            panic!("split failed: {args:?}");
        };
        assert_eq!(port_of(&video.address), Some(65534));
        assert_eq!(port_of(&audio.address), Some(65535));
        // An invalid V of 65535 must not panic or wrap to port 0.
        let args = build_args(&EgressConfig::default(), 65535);
        assert_eq!(
            args.last().map(String::as_str),
            Some("udp://127.0.0.1:65536?pkt_size=1200&localaddr=127.0.0.1&localport=65538")
        );
    }

    /// A valid selector: empty, or no whitespace and no leading '-'.
    fn map_selector() -> impl Strategy<Value = String> {
        prop_oneof![
            1 => Just(String::new()),
            4 => "[0-9a-zA-Z:?#_.\\[\\]][0-9a-zA-Z:?#_.\\[\\]-]{0,15}",
        ]
    }

    proptest! {
        #[test]
        fn legs_carry_ports_v_and_v_plus_one(
            port in 0u16..=65534,
            video_map in map_selector(),
            audio_map in map_selector(),
            force_transcode in any::<bool>(),
            video_pt in 0u8..=127,
            audio_pt in 0u8..=127,
            video_bitrate_kbps in proptest::option::of(1u32..100_000),
        ) {
            let cfg = EgressConfig {
                video_map,
                audio_map,
                force_transcode,
                video_pt,
                audio_pt,
                video_bitrate_kbps,
                ..EgressConfig::default()
            };
            prop_assert_eq!(cfg.validate(), Ok(()));
            let args = build_args(&cfg, port);
            let legs = split_legs(&args);
            prop_assert!(legs.is_some(), "split failed: {:?}", args);
            let Some([video, audio]) = legs else { unreachable!() };
            prop_assert_eq!(port_of(&video.address), Some(u32::from(port)));
            prop_assert_eq!(port_of(&audio.address), Some(u32::from(port) + 1));
            let head = |leg: &OutputLeg| leg.options.iter().take(2).cloned().collect::<Vec<_>>();
            prop_assert_eq!(head(&video), ["-map", cfg.effective_video_map()]);
            prop_assert_eq!(head(&audio), ["-map", cfg.effective_audio_map()]);
        }

        #[test]
        fn maps_with_whitespace_or_leading_dash_are_rejected(
            head in "[0-9a-z:]{0,4}",
            bad in prop_oneof![Just(" "), Just("\t"), Just("\n"), Just("\u{a0}")],
            tail in "[0-9a-z:]{0,4}",
            dashed in "-[0-9a-z:-]{0,6}",
        ) {
            let spaced = format!("{head}{bad}{tail}");
            for map in [spaced, dashed] {
                let cfg = EgressConfig { audio_map: map.clone(), ..EgressConfig::default() };
                prop_assert!(cfg.validate().is_err(), "accepted {:?}", map);
            }
        }
    }
    #[test]
    fn renditions_are_legs_of_their_own_after_audio_on_their_ports() {
        let cfg = EgressConfig {
            force_transcode: true,
            renditions: vec![
                Rendition::new(VideoCodec::Vp8, 800),
                Rendition { codec: VideoCodec::H264, bitrate_kbps: 400, height: Some(240) },
            ],
            ..EgressConfig::default()
        };
        assert_eq!(cfg.validate(), Ok(()));
        let args = build_args(&cfg, 40_000);
        assert_eq!(args.iter().filter(|a| *a == "-map").count(), 4);
        let joined = args.join(" ");
        assert!(joined.contains("-c:v libvpx -deadline realtime"), "{joined}");
        assert!(joined.contains("-b:v 800k"), "{joined}");
        assert!(
            joined.contains(
                "udp://127.0.0.1:40004?pkt_size=1200&localaddr=127.0.0.1&localport=40005"
            ),
            "{joined}"
        );
        assert!(joined.contains("-vf scale=-2:240"), "{joined}");
        assert!(
            joined.ends_with(
                "udp://127.0.0.1:40006?pkt_size=1200&localaddr=127.0.0.1&localport=40007"
            ),
            "{joined}"
        );
        let bad = EgressConfig { renditions: vec![Rendition::new(VideoCodec::Vp8, 0)], ..cfg };
        assert!(bad.validate().is_err());
    }
}
