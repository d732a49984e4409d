//! SDP codec policy: what an offer must contain for us to answer it, and small text edits of
//! offers and answers. Parsing uses `sdp-types`, independent of str0m, so that the policy can be
//! tested and fuzzed on its own.

use std::net::SocketAddr;

use sdp_types::{Fmtp, Media, RtpMap, Session};

use crate::config::{H264Profile, VideoCodec};
use crate::whep::Reject;

/// Most media sections we look at before calling an offer unsupported.
const MAX_MEDIA_SECTIONS: usize = 16;

/// One H264 payload type of an offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct H264Offer {
    /// The payload type.
    pub pt: u8,
    /// `packetization-mode` (0 when absent, as RFC 6184 says).
    pub packetization_mode: u8,
    /// `profile-level-id`, if present and valid hex; absent means Baseline (RFC 6184).
    pub profile_level_id: Option<u32>,
}

impl H264Offer {
    /// The profile of this format: its `profile-level-id`'s, or Baseline (42000a) when it has
    /// none (RFC 6184 §8.1); `None` for a profile we do not know.
    pub fn profile(&self) -> Option<H264Profile> {
        self.profile_level_id.map_or(Some(H264Profile::Baseline), profile_of)
    }
}

/// What the codec policy learned from an acceptable offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferSummary {
    /// `a=mid` of the video section.
    pub video_mid: String,
    /// `a=mid` of the audio section.
    pub audio_mid: String,
    /// H264 payload types with packetization-mode 1, in offer order.
    pub h264: Vec<H264Offer>,
    /// VP8 payload types, in offer order.
    pub vp8: Vec<u8>,
    /// Opus payload types, in offer order.
    pub opus: Vec<u8>,
}

/// Applies the codec and layout policy to an offer body.
///
/// - not UTF-8, empty or unparsable: [`Reject::BadOffer`] (400);
/// - more than one video or audio section, other media kinds, a `sendonly` or `inactive`
///   section, a section without `a=mid`: [`Reject::BadLayout`] (422);
/// - no video section with H264 `packetization-mode=1` or VP8, or no audio section with
///   Opus: [`Reject::CodecMismatch`] (406), naming what is missing. Whether the stream sends
///   a video codec the offer has is the stream's to say (see [`choose_video`]): a stream
///   that sends H264 alone refuses a VP8-only offer later, with its own 406.
pub fn check_offer(body: &[u8]) -> Result<OfferSummary, Reject> {
    let text = std::str::from_utf8(body).map_err(|_| Reject::BadOffer("not UTF-8".into()))?;
    if text.trim().is_empty() {
        return Err(Reject::BadOffer("empty body".into()));
    }
    let session = Session::parse(text.as_bytes())
        .map_err(|e| Reject::BadOffer(format!("not an SDP session description ({e})")))?;
    check_session(&session)
}

fn check_session(session: &Session) -> Result<OfferSummary, Reject> {
    if session.medias.is_empty() {
        return Err(Reject::BadOffer("no media sections".into()));
    }
    if session.medias.len() > MAX_MEDIA_SECTIONS {
        return Err(Reject::BadLayout(format!("{} media sections", session.medias.len())));
    }
    let session_dir =
        direction(session.has_attribute("sendonly"), session.has_attribute("inactive"));
    let (mut video, mut audio) = (None, None);
    // A port of 0 rejects a section, except with `a=bundle-only` (RFC 8843 §6): then it is
    // part of the bundle, and a max-bundle offerer (GStreamer's webrtcbin) offers it so.
    for m in session.medias.iter().filter(|m| m.port != 0 || m.has_attribute("bundle-only")) {
        let slot = match m.media.as_str() {
            "video" => &mut video,
            "audio" => &mut audio,
            "application" => continue,
            other => {
                return Err(Reject::BadLayout(format!("unsupported media kind {other:?}")));
            }
        };
        if slot.is_some() {
            return Err(Reject::BadLayout(format!(
                "more than one {} section; one video and one audio are supported",
                m.media
            )));
        }
        let dir =
            direction(m.has_attribute("sendonly"), m.has_attribute("inactive")).or(session_dir);
        if let Some(d) = dir {
            return Err(Reject::BadLayout(format!(
                "{} section is {d}; a viewer receives",
                m.media
            )));
        }
        let Some(Some(mid)) = m.get_first_attribute_value("mid") else {
            return Err(Reject::BadLayout(format!("{} section has no a=mid", m.media)));
        };
        *slot = Some((m, mid.to_owned()));
    }
    check_payload_types(session)?;
    let h264 = video.as_ref().map(|(m, _)| h264_offers(m)).unwrap_or_default();
    let vp8 = video.as_ref().map(|(m, _)| payload_types(m, "VP8", 90_000)).unwrap_or_default();
    let opus = audio.as_ref().map(|(m, _)| payload_types(m, "opus", 48_000)).unwrap_or_default();
    let no_video = h264.is_empty() && vp8.is_empty();
    match (video, audio) {
        (Some((_, video_mid)), Some((_, audio_mid))) if !no_video && !opus.is_empty() => {
            Ok(OfferSummary { video_mid, audio_mid, h264, vp8, opus })
        }
        _ => Err(Reject::CodecMismatch { h264: no_video, opus: opus.is_empty() }),
    }
}

/// Refuses an offer without a BUNDLE group, with a body that says so: every viewer's media
/// shares one transport (RFC 8843), and str0m answers only bundled offers ("Session attribute
/// a=group missing" would tell a player nothing). GStreamer's webrtcbin sends none with
/// `bundle-policy=balanced`; `max-bundle` or `max-compat` bundles.
pub fn check_bundle(body: &[u8]) -> Result<(), Reject> {
    let bundled =
        body.split(|b| *b == b'\n').any(|l| l.trim_ascii().starts_with(b"a=group:BUNDLE"));
    if bundled {
        Ok(())
    } else {
        Err(Reject::BadOffer(
            "BUNDLE is required: offer both sections in one a=group:BUNDLE (a WebRTC stack's \
             bundle-policy max-bundle or max-compat)"
                .into(),
        ))
    }
}

fn direction(sendonly: bool, inactive: bool) -> Option<&'static str> {
    if sendonly {
        Some("sendonly")
    } else if inactive {
        Some("inactive")
    } else {
        None
    }
}

/// Refuses an offer whose media sections share a payload type number (in their format lists or
/// `rtpmap`/`fmtp` lines). With BUNDLE a payload type must identify one codec across the
/// bundle, browsers never reuse one, and str0m 0.25 panics on such an offer ("Pt locked
/// multiple times"; found by the `whep_request` fuzz target).
fn check_payload_types(session: &Session) -> Result<(), Reject> {
    let mut owner: std::collections::HashMap<u8, usize> = std::collections::HashMap::new();
    for (i, m) in session.medias.iter().enumerate() {
        let listed = m.fmt.split_whitespace().map(str::to_owned);
        let mapped = m
            .attributes
            .iter()
            .filter(|a| a.attribute == "rtpmap" || a.attribute == "fmtp")
            .filter_map(|a| a.value.as_deref())
            .filter_map(|v| v.split_whitespace().next().map(str::to_owned));
        for pt in listed.chain(mapped).filter_map(|p| p.parse::<u8>().ok()) {
            if *owner.entry(pt).or_insert(i) != i {
                return Err(Reject::BadOffer(format!(
                    "payload type {pt} appears in more than one media section"
                )));
            }
        }
    }
    Ok(())
}

fn h264_offers(m: &Media) -> Vec<H264Offer> {
    let fmtps: Vec<Fmtp> = m.attributes_typed::<Fmtp>().filter_map(Result::ok).collect();
    m.attributes_typed::<RtpMap>()
        .filter_map(Result::ok)
        .filter(|r| r.encoding_name.eq_ignore_ascii_case("H264") && r.clock_rate == 90_000)
        .map(|r| {
            let params = fmtps.iter().filter(|f| f.fmt == r.payload_type);
            let param = |name: &str| {
                params
                    .clone()
                    .flat_map(|f| &f.format_specific_params)
                    .find(|p| p.param.trim().eq_ignore_ascii_case(name))
                    .and_then(|p| p.val.as_deref())
                    .map(str::trim)
            };
            H264Offer {
                pt: r.payload_type,
                packetization_mode: param("packetization-mode")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
                profile_level_id: param("profile-level-id")
                    .filter(|v| v.len() == 6)
                    .and_then(|v| u32::from_str_radix(v, 16).ok()),
            }
        })
        .filter(|h| h.packetization_mode == 1)
        .collect()
}

/// The payload types of `encoding` at `clock_rate`, in offer order.
fn payload_types(m: &Media, encoding: &str, clock_rate: u32) -> Vec<u8> {
    m.attributes_typed::<RtpMap>()
        .filter_map(Result::ok)
        .filter(|r| r.encoding_name.eq_ignore_ascii_case(encoding) && r.clock_rate == clock_rate)
        .map(|r| r.payload_type)
        .collect()
}

/// What a stream's renditions send, for a 406: `H264 (packetization-mode=1) or VP8`.
pub fn sends(videos: &[VideoCodec]) -> String {
    let mut names: Vec<&str> = Vec::new();
    for codec in videos {
        let name = match codec {
            VideoCodec::H264 => "H264 (packetization-mode=1)",
            VideoCodec::Vp8 => "VP8",
        };
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names.join(" or ")
}

/// The first of a stream's video renditions (`videos`, in the stream's order: its H264 first)
/// that the offer can receive, and the offered payload type it gets: for H264 the one
/// [`choose_h264`] picks for `profile`, for VP8 the first offered. `usable` says whether
/// str0m accepted an offered payload type.
pub fn choose_video(
    summary: &OfferSummary,
    videos: &[VideoCodec],
    profile: H264Profile,
    usable: impl Fn(u8) -> bool,
) -> Option<(u8, u8)> {
    videos.iter().enumerate().find_map(|(k, codec)| {
        let pt = match codec {
            VideoCodec::H264 => {
                let h264: Vec<_> = summary.h264.iter().copied().filter(|h| usable(h.pt)).collect();
                choose_h264(&h264, profile)
            }
            VideoCodec::Vp8 => summary.vp8.iter().copied().find(|pt| usable(*pt)),
        }?;
        Some((u8::try_from(k).ok()?, pt))
    })
}

/// The H264 profile a `profile-level-id` denotes (RFC 6184 §8.1, table 5), if we know it.
pub fn profile_of(profile_level_id: u32) -> Option<H264Profile> {
    let idc = (profile_level_id >> 16) as u8;
    let iop = (profile_level_id >> 8) as u8;
    let cs1 = iop & 0x40 != 0;
    match idc {
        0x42 if cs1 => Some(H264Profile::ConstrainedBaseline),
        0x42 => Some(H264Profile::Baseline),
        0x4d if iop & 0x80 != 0 => Some(H264Profile::ConstrainedBaseline),
        0x4d => Some(H264Profile::Main),
        0x58 if iop & 0xc0 == 0xc0 => Some(H264Profile::ConstrainedBaseline),
        0x64 => Some(H264Profile::High),
        _ => None,
    }
}

/// Picks the H264 payload type a viewer gets for a stream of profile `want`, from offered
/// packetization-mode 1 types: an exact profile match first; then, for a constrained baseline
/// stream, a baseline type (a baseline decoder decodes constrained baseline); then nothing.
/// Ties go to the offer's order (the viewer's preference).
pub fn choose_h264(offered: &[H264Offer], want: H264Profile) -> Option<u8> {
    let with = |p: H264Profile| {
        offered
            .iter()
            .filter(|h| h.packetization_mode == 1)
            .find(|h| h.profile() == Some(p))
            .map(|h| h.pt)
    };
    with(want).or_else(|| match want {
        H264Profile::ConstrainedBaseline => with(H264Profile::Baseline),
        H264Profile::Baseline => with(H264Profile::ConstrainedBaseline),
        H264Profile::Main | H264Profile::High => None,
    })
}

/// Makes str0m's answer say only what we send and what was offered (RFC 3264 §6, RFC 8285,
/// RFC 4585): each section lists only its chosen payload type (`keep`, by mid) and that type's
/// RTX; feedback lines and header extensions the offer did not carry for them are dropped,
/// `a=extmap-allow-mixed` only stays if offered, and `a=rtcp-rsize` is kept where offered.
pub(crate) fn trim_answer(answer: &str, offer: &str, keep: &[(&str, u8)]) -> String {
    let offered: std::collections::HashSet<&str> = offer.lines().map(str::trim).collect();
    let offered_uris: std::collections::HashSet<&str> = offer
        .lines()
        .filter_map(|l| l.trim().strip_prefix("a=extmap:"))
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    // The offer's sections by mid, to tell which asked for reduced-size RTCP.
    let rsize_mids: Vec<&str> = offer
        .split("m=")
        .filter(|section| section.lines().any(|l| l.trim() == "a=rtcp-rsize"))
        .filter_map(|section| section.lines().find_map(|l| l.trim().strip_prefix("a=mid:")))
        .collect();
    let mut out = String::with_capacity(answer.len());
    let sections: Vec<&str> = answer.split("\r\nm=").collect();
    for (i, section) in sections.iter().enumerate() {
        let section = if i == 0 { (*section).to_owned() } else { format!("m={section}") };
        let lines: Vec<&str> = section.lines().collect();
        let mid = lines.iter().find_map(|l| l.strip_prefix("a=mid:"));
        let chosen = mid.and_then(|m| keep.iter().find(|(k, _)| *k == m)).map(|(_, pt)| *pt);
        let pt_of = |l: &str, attr: &str| -> Option<u8> {
            l.strip_prefix(attr)?.split([' ', ':']).next()?.parse().ok()
        };
        let mut kept: Vec<u8> = Vec::new();
        if let Some(pt) = chosen {
            kept.push(pt);
            for l in &lines {
                if let Some(rtx) = pt_of(l, "a=fmtp:")
                    && l.ends_with(&format!("apt={pt}"))
                {
                    kept.push(rtx);
                }
            }
        }
        let mut rsize_pending =
            mid.is_some_and(|m| rsize_mids.contains(&m)) && !lines.contains(&"a=rtcp-rsize");
        for l in &lines {
            let line: String = if i > 0 && l.starts_with("m=") && chosen.is_some() {
                let mut parts: Vec<&str> = l.split_whitespace().collect();
                let formats: Vec<&str> = parts
                    .split_off(3.min(parts.len()))
                    .into_iter()
                    .filter(|f| f.parse().ok().is_some_and(|p: u8| kept.contains(&p)))
                    .collect();
                parts.extend(formats);
                parts.join(" ")
            } else {
                (*l).to_owned()
            };
            let l = line.as_str();
            if l == "a=extmap-allow-mixed" && !offered.contains(l) {
                continue;
            }
            if let Some(rest) = l.strip_prefix("a=extmap:")
                && rest.split_whitespace().nth(1).is_some_and(|uri| !offered_uris.contains(uri))
            {
                continue;
            }
            // A format line (`rtpmap`, `fmtp`, `rtcp-fb`) of a payload type not sent.
            let format = pt_of(l, "a=rtpmap:").or(pt_of(l, "a=fmtp:")).or(pt_of(l, "a=rtcp-fb:"));
            if chosen.is_some() && format.is_some_and(|pt| !kept.contains(&pt)) {
                continue;
            }
            if l.starts_with("a=rtcp-fb:") && !offered.contains(l) {
                continue;
            }
            out.push_str(l);
            out.push_str("\r\n");
            if rsize_pending && l == "a=rtcp-mux" {
                out.push_str("a=rtcp-rsize\r\n");
                rsize_pending = false;
            }
        }
    }
    out
}

/// Adds what the WHEP draft asks of an answer and str0m leaves out: `a=rtcp-mux-only` next to
/// `a=rtcp-mux` (RFC 8858) and `a=end-of-candidates` after the candidates, since the server never
/// trickles (RFC 8838).
pub(crate) fn finish_answer(answer: &str) -> String {
    let mut out = String::with_capacity(answer.len() + 128);
    let lines: Vec<&str> = answer.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        out.push_str(line);
        out.push_str("\r\n");
        if *line == "a=rtcp-mux" {
            out.push_str("a=rtcp-mux-only\r\n");
        }
        let next_is_candidate = lines.get(i + 1).is_some_and(|l| l.starts_with("a=candidate:"));
        if line.starts_with("a=candidate:") && !next_is_candidate {
            out.push_str("a=end-of-candidates\r\n");
        }
    }
    out
}

/// Rewrites a stored offer for an ICE restart: every `a=ice-ufrag` / `a=ice-pwd` gets the new
/// credentials, candidates and `a=end-of-candidates` are dropped (the PATCH carries its own).
pub(crate) fn restart_offer(offer: &str, ufrag: &str, pwd: &str) -> String {
    let mut out = String::with_capacity(offer.len());
    for line in offer.lines() {
        let line = if line.starts_with("a=ice-ufrag:") {
            format!("a=ice-ufrag:{ufrag}")
        } else if line.starts_with("a=ice-pwd:") {
            format!("a=ice-pwd:{pwd}")
        } else if line.starts_with("a=candidate:") || line.starts_with("a=end-of-candidates") {
            continue;
        } else {
            line.to_owned()
        };
        out.push_str(&line);
        out.push_str("\r\n");
    }
    out
}

/// What a viewer keeps of its offer, to re-accept it on an ICE restart
/// ([`restart_offer`]): every line but the candidates (a restart drops them) and, in each
/// media section named in `keep` (by `a=mid`), the payload types other than the ones kept
/// and their retransmission types (`a=fmtp:<rtx> apt=<kept>`), from the `m=` line and from
/// `a=rtpmap`, `a=fmtp` and `a=rtcp-fb`. A browser offers twenty-odd video payload types
/// (VP8, VP9, AV1, H265, RED, FEC, each with RTX) we never send: 6 KiB of Chromium's offer,
/// 2.1 KiB kept. Sections not named, and lines it does not understand, stay as they are.
pub(crate) fn compact_offer(offer: &str, keep: &[(&str, &[u8])]) -> String {
    let mut out = String::with_capacity(offer.len() / 2);
    let lines: Vec<&str> = offer.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        // One section: the session part, or an m= line and what follows it.
        let end = (i + 1..lines.len()).find(|&j| lines[j].starts_with("m=")).unwrap_or(lines.len());
        let section = &lines[i..end];
        let mid = section.iter().find_map(|l| l.strip_prefix("a=mid:")).map(str::trim);
        let kept = mid.and_then(|m| keep.iter().find(|(k, _)| *k == m)).map(|(_, pts)| *pts);
        let allowed = kept.map(|pts| {
            let mut allowed: Vec<&str> = Vec::new();
            for l in section {
                // `a=fmtp:<rtx> apt=<pt>`: the retransmission type of a kept one.
                if let Some((pt, params)) =
                    l.strip_prefix("a=fmtp:").and_then(|r| r.split_once(' '))
                    && let Some(apt) = params.split(';').find_map(|p| p.trim().strip_prefix("apt="))
                    && apt.parse::<u8>().is_ok_and(|a| pts.contains(&a))
                {
                    allowed.push(pt);
                }
            }
            (pts, allowed)
        });
        for line in section {
            if line.starts_with("a=candidate:") || line.starts_with("a=end-of-candidates") {
                continue;
            }
            if let Some((pts, rtx)) = &allowed {
                let keeps = |pt: &str| {
                    pt == "*"
                        || rtx.contains(&pt)
                        || pt.parse::<u8>().is_ok_and(|p| pts.contains(&p))
                };
                if line.starts_with("m=") {
                    let mut fields = line.split(' ');
                    let head: Vec<&str> = fields.by_ref().take(3).collect();
                    let formats: Vec<&str> = fields.filter(|f| keeps(f)).collect();
                    out.push_str(&head.join(" "));
                    for f in formats {
                        out.push(' ');
                        out.push_str(f);
                    }
                    out.push_str("\r\n");
                    continue;
                }
                let pt_attr = ["a=rtpmap:", "a=fmtp:", "a=rtcp-fb:"]
                    .iter()
                    .find_map(|p| line.strip_prefix(p))
                    .and_then(|rest| rest.split(' ').next());
                if pt_attr.is_some_and(|pt| !keeps(pt)) {
                    continue;
                }
            }
            out.push_str(line);
            out.push_str("\r\n");
        }
        i = end;
    }
    out
}

/// The `a=ice-ufrag` and `a=ice-pwd` values of an SDP (first occurrence of each).
pub(crate) fn ice_credentials(sdp: &str) -> Option<(String, String)> {
    let find = |prefix: &str| {
        sdp.lines().find_map(|l| l.strip_prefix(prefix)).map(|v| v.trim().to_owned())
    };
    Some((find("a=ice-ufrag:")?, find("a=ice-pwd:")?))
}

/// The addresses of the relayed (`typ relay`) candidates of an SDP offer or fragment.
pub fn relay_addresses(sdp: &str) -> Vec<SocketAddr> {
    sdp.lines()
        .filter_map(|l| l.trim().strip_prefix("a=candidate:"))
        .filter_map(|c| {
            let f: Vec<&str> = c.split_whitespace().collect();
            let relay = f.get(6) == Some(&"typ") && f.get(7) == Some(&"relay");
            let ip = f.get(4)?.parse().ok()?;
            let port = f.get(5)?.parse().ok()?;
            relay.then_some(SocketAddr::new(ip, port))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_addresses_are_those_of_typ_relay_candidates() {
        let o = "m=video 9 X 1\r\na=candidate:1 1 udp 2122 10.0.0.1 5000 typ host\r\n\
                 a=candidate:2 1 udp 16777215 203.0.113.9 40000 typ relay raddr 10.0.0.1 rport 5000\r\n\
                 a=candidate:3 1 udp 5 bad 1 typ relay\r\n";
        let want: Vec<SocketAddr> = vec!["203.0.113.9:40000".parse().expect("addr")];
        assert_eq!(relay_addresses(o), want);
    }

    pub(crate) const CHROMIUM_OFFER: &str = include_str!("../tests/data/chromium-156-offer.sdp");

    #[test]
    fn chromium_offer_passes_and_prefers_42e01f() {
        let s = check_offer(CHROMIUM_OFFER.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((s.video_mid.as_str(), s.audio_mid.as_str()), ("0", "1"));
        assert_eq!(s.opus, vec![111]);
        assert_eq!(
            s.h264.iter().map(|h| h.pt).collect::<Vec<_>>(),
            vec![102, 108, 116, 41],
            "only packetization-mode=1 types"
        );
        assert_eq!(choose_h264(&s.h264, H264Profile::ConstrainedBaseline), Some(108));
        assert_eq!(choose_h264(&s.h264, H264Profile::Baseline), Some(102));
        assert_eq!(choose_h264(&s.h264, H264Profile::Main), Some(116));
        assert_eq!(choose_h264(&s.h264, H264Profile::High), None);
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // str0m needs a start instant
    fn a_compacted_offer_keeps_the_chosen_types_and_is_accepted_again() {
        use str0m::Rtc;
        use str0m::change::SdpOffer;
        let compact = compact_offer(CHROMIUM_OFFER, &[("0", &[108]), ("1", &[111])]);
        assert!(compact.len() < 2560, "{} bytes:\n{compact}", compact.len());
        let s = check_offer(compact.as_bytes()).unwrap_or_else(|e| panic!("{e}\n{compact}"));
        assert_eq!(
            (s.h264.iter().map(|h| h.pt).collect::<Vec<_>>(), s.opus),
            (vec![108], vec![111])
        );
        assert!(compact.contains("m=video 9 UDP/TLS/RTP/SAVPF 108 109\r\n"), "{compact}");
        assert!(compact.contains("a=fmtp:109 apt=108"), "the RTX type of 108 stays");
        assert!(compact.contains("a=rtcp-fb:108 nack"));
        assert!(!compact.contains("VP8") && !compact.contains("a=candidate"), "{compact}");
        for needed in
            ["a=ice-ufrag:", "a=ice-pwd:", "a=fingerprint:", "a=group:BUNDLE", "a=extmap:"]
        {
            assert!(compact.contains(needed), "{needed} lost");
        }
        // str0m accepts the original, then the compacted one with new credentials (a restart),
        // and still sends H264 on 108.
        let mut rtc =
            Rtc::builder().set_ice_lite(true).set_rtp_mode(true).build(std::time::Instant::now());
        let first = SdpOffer::from_sdp_string(CHROMIUM_OFFER).expect("offer");
        rtc.sdp_api().accept_offer(first).expect("first accept");
        let again = restart_offer(&compact, "newufrag", "newpasswordnewpasswordxx");
        let again = SdpOffer::from_sdp_string(&again).expect("compacted offer");
        let answer = rtc.sdp_api().accept_offer(again).expect("restart accept").to_sdp_string();
        assert!(answer.contains("a=rtpmap:108 H264/90000"), "{answer}");
        let media = rtc.media(str0m::media::Mid::from("0")).expect("video");
        assert!(
            media.remote_pts().contains(&str0m::media::Pt::from(108)),
            "{:?}",
            media.remote_pts()
        );
    }

    #[test]
    fn compacting_leaves_unnamed_sections_and_unknown_lines() {
        let o = offer(H264, OPUS);
        assert_eq!(compact_offer(&o, &[]), o);
        let with_candidate =
            o.replace("a=mid:0\r\n", "a=mid:0\r\na=candidate:1 1 udp 1 10.0.0.1 5000 typ host\r\n");
        assert_eq!(compact_offer(&with_candidate, &[]), o);
    }

    fn offer(video: &str, audio: &str) -> String {
        format!(
            "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1\r\n{video}{audio}"
        )
    }

    #[test]
    fn payload_type_shared_by_two_sections_is_refused() {
        let audio_with_h264 =
            OPUS.replace("a=rtpmap:111", "a=rtpmap:98 H264/90000\r\na=rtpmap:111");
        let bad = offer(H264, &audio_with_h264);
        match check_offer(bad.as_bytes()) {
            Err(Reject::BadOffer(why)) => assert!(why.contains("payload type 98"), "{why}"),
            other => panic!("expected 400, got {other:?}"),
        }
        assert!(check_offer(offer(H264, OPUS).as_bytes()).is_ok());
    }

    const VP8: &str = "m=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=recvonly\r\na=rtpmap:96 VP8/90000\r\n";
    const H264_PM0: &str = "m=video 9 UDP/TLS/RTP/SAVPF 98\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=recvonly\r\na=rtpmap:98 H264/90000\r\na=fmtp:98 profile-level-id=42e01f\r\n";
    const H264: &str = "m=video 9 UDP/TLS/RTP/SAVPF 98\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=recvonly\r\na=rtpmap:98 h264/90000\r\na=fmtp:98 packetization-mode=1;profile-level-id=42e01f\r\n";
    const OPUS: &str = "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:1\r\na=recvonly\r\na=rtpmap:111 OPUS/48000/2\r\n";
    const PCMU: &str = "m=audio 9 UDP/TLS/RTP/SAVPF 0\r\nc=IN IP4 0.0.0.0\r\na=mid:1\r\na=recvonly\r\na=rtpmap:0 PCMU/8000\r\n";

    #[test]
    fn codec_rule_names_what_is_missing() {
        assert!(check_offer(offer(H264, OPUS).as_bytes()).is_ok());
        // VP8 is a video codec a stream may send (a rendition): the stream decides.
        let vp8 = check_offer(offer(VP8, OPUS).as_bytes()).expect("VP8 and Opus pass");
        assert_eq!((vp8.h264.len(), vp8.vp8.as_slice()), (0, &[96u8][..]));
        assert_eq!(
            check_offer(offer(H264_PM0, OPUS).as_bytes()),
            Err(Reject::CodecMismatch { h264: true, opus: false })
        );
        assert_eq!(
            check_offer(offer(H264, PCMU).as_bytes()),
            Err(Reject::CodecMismatch { h264: false, opus: true })
        );
        assert_eq!(
            check_offer(offer(H264, "").as_bytes()),
            Err(Reject::CodecMismatch { h264: false, opus: true })
        );
        assert_eq!(
            check_offer(offer(VP8, PCMU).as_bytes()),
            Err(Reject::CodecMismatch { h264: false, opus: true })
        );
        assert_eq!(
            check_offer(offer(H264_PM0, PCMU).as_bytes()),
            Err(Reject::CodecMismatch { h264: true, opus: true })
        );
    }

    #[test]
    fn layout_rules() {
        let two_video = format!("{H264}{}", H264.replace("a=mid:0", "a=mid:2"));
        assert!(matches!(
            check_offer(offer(&two_video, OPUS).as_bytes()),
            Err(Reject::BadLayout(_))
        ));
        let sendonly = H264.replace("a=recvonly", "a=sendonly");
        assert!(matches!(
            check_offer(offer(&sendonly, OPUS).as_bytes()),
            Err(Reject::BadLayout(_))
        ));
        let inactive = OPUS.replace("a=recvonly", "a=inactive");
        assert!(matches!(
            check_offer(offer(H264, &inactive).as_bytes()),
            Err(Reject::BadLayout(_))
        ));
        let sendrecv = H264.replace("a=recvonly", "a=sendrecv");
        assert!(check_offer(offer(&sendrecv, OPUS).as_bytes()).is_ok());
        let no_mid = OPUS.replace("a=mid:1\r\n", "");
        assert!(matches!(check_offer(offer(H264, &no_mid).as_bytes()), Err(Reject::BadLayout(_))));
        let text = "m=text 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:3\r\n";
        assert!(matches!(
            check_offer(offer(H264, &format!("{OPUS}{text}")).as_bytes()),
            Err(Reject::BadLayout(_))
        ));
        let many: String =
            (0..40).map(|i| VP8.replace("a=mid:0", &format!("a=mid:v{i}"))).collect();
        assert!(matches!(check_offer(offer(&many, OPUS).as_bytes()), Err(Reject::BadLayout(_))));
    }

    #[test]
    fn garbage_is_bad_offer() {
        for body in [&b""[..], b"   \r\n", b"hello", b"\xff\xfe", b"v=0\r\n"] {
            assert!(matches!(check_offer(body), Err(Reject::BadOffer(_))), "{body:?}");
        }
    }

    #[test]
    fn profiles() {
        assert_eq!(profile_of(0x42e01f), Some(H264Profile::ConstrainedBaseline));
        assert_eq!(profile_of(0x42c01e), Some(H264Profile::ConstrainedBaseline));
        assert_eq!(profile_of(0x42001f), Some(H264Profile::Baseline));
        assert_eq!(profile_of(0x4d001f), Some(H264Profile::Main));
        assert_eq!(profile_of(0x640c34), Some(H264Profile::High));
        assert_eq!(profile_of(0xf4001f), None);
    }

    #[test]
    fn answer_gets_mux_only_and_end_of_candidates() {
        let a = "v=0\r\nm=video 9 X 1\r\na=rtcp-mux\r\na=candidate:1 1 udp 1 1.2.3.4 5 typ host\r\na=candidate:2 1 udp 1 1.2.3.4 6 typ host\r\na=mid:0\r\n";
        let f = finish_answer(a);
        assert_eq!(f.matches("a=rtcp-mux-only").count(), 1);
        assert_eq!(f.matches("a=end-of-candidates").count(), 1);
        assert!(f.find("a=end-of-candidates") > f.find("a=candidate:2"));
    }

    #[test]
    fn restart_offer_swaps_credentials() {
        let o = restart_offer(CHROMIUM_OFFER, "NEWU", "newpassword0123456789012");
        assert_eq!(ice_credentials(&o), Some(("NEWU".into(), "newpassword0123456789012".into())));
        assert!(!o.contains("a=candidate:"));
        assert!(check_offer(o.as_bytes()).is_ok());
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn h264_offer() -> impl Strategy<Value = H264Offer> {
            (
                96u8..128,
                0u8..2,
                prop::option::of(prop::sample::select(vec![
                    0x42001f_u32,
                    0x42e01f,
                    0x4d001f,
                    0x64001f,
                    0xf4001f,
                    0x42c01e,
                    0x640c34,
                ])),
            )
                .prop_map(|(pt, packetization_mode, profile_level_id)| H264Offer {
                    pt,
                    packetization_mode,
                    profile_level_id,
                })
        }

        fn profile() -> impl Strategy<Value = H264Profile> {
            prop::sample::select(vec![
                H264Profile::ConstrainedBaseline,
                H264Profile::Baseline,
                H264Profile::Main,
                H264Profile::High,
            ])
        }

        proptest! {
            /// The chosen type is always an offered packetization-mode 1 type whose profile is
            /// the wanted one or a baseline-family substitute, and the choice exists whenever
            /// an exact match was offered.
            #[test]
            fn choice_is_offered_and_compatible(offered in prop::collection::vec(h264_offer(), 0..12), want in profile()) {
                // Payload types are unique within an offer.
                let mut seen = std::collections::BTreeSet::new();
                let offered: Vec<H264Offer> = offered.into_iter().filter(|h| seen.insert(h.pt)).collect();
                let exact = offered.iter().any(|h| h.packetization_mode == 1 && h.profile() == Some(want));
                match choose_h264(&offered, want) {
                    Some(pt) => {
                        let h = offered.iter().find(|h| h.pt == pt && h.packetization_mode == 1);
                        prop_assert!(h.is_some());
                        let got = h.and_then(H264Offer::profile);
                        let baseline_family = [H264Profile::ConstrainedBaseline, H264Profile::Baseline];
                        prop_assert!(got == Some(want) || (baseline_family.contains(&want) && got.is_some_and(|g| baseline_family.contains(&g))));
                    }
                    None => prop_assert!(!exact),
                }
            }

            /// The policy never panics, whatever the bytes.
            #[test]
            fn check_offer_total(body in prop::collection::vec(any::<u8>(), 0..2048)) {
                let _ = check_offer(&body);
            }

            /// Any section soup of known pieces gives Ok exactly when there is one H264 pm1 or
            /// VP8 video and one Opus audio section, and otherwise the matching rejection.
            #[test]
            fn layouts(video in prop::sample::select(vec!["", VP8, H264_PM0, H264]), audio in prop::sample::select(vec!["", OPUS, PCMU])) {
                let r = check_offer(offer(video, audio).as_bytes());
                let (has_h264, has_opus) = (video == H264 || video == VP8, audio == OPUS);
                if has_h264 && has_opus {
                    prop_assert!(r.is_ok());
                } else if video.is_empty() && audio.is_empty() {
                    prop_assert!(matches!(r, Err(Reject::BadOffer(_))));
                } else {
                    prop_assert_eq!(r, Err(Reject::CodecMismatch { h264: !has_h264, opus: !has_opus }));
                }
            }
        }
    }
}
