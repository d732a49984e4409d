//! The WHEP PATCH body: trickle-ICE SDP fragments (`application/trickle-ice-sdpfrag`, RFC 8840).
//!
//! A WHEP player PATCHes either trickle candidates or an ICE restart (new ufrag/pwd). Real
//! clients send varied shapes (session-level or media-level credentials, CRLF or LF, blank
//! lines, stray `v=`/`o=` lines), so parsing is tolerant about layout but strict about the
//! credentials it hands on, and total: arbitrary bytes give an error, never a panic.

use std::fmt;

/// A parsed trickle-ICE SDP fragment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SdpFrag {
    /// The `a=ice-ufrag` value, if any section carried one.
    pub ice_ufrag: Option<String>,
    /// The `a=ice-pwd` value, if any section carried one.
    pub ice_pwd: Option<String>,
    /// The first `a=ice-options` value, if any.
    pub ice_options: Option<String>,
    /// Candidate attribute values as they appear after `a=`, e.g.
    /// `"candidate:1387637174 1 udp ..."`, in order, with the mid of the m-section they
    /// appeared in (`None` if before any `m=` / no `a=mid`).
    pub candidates: Vec<(Option<String>, String)>,
    /// True when the fragment contained `a=end-of-candidates`.
    pub end_of_candidates: bool,
    /// The distinct `a=mid` values, in order of first appearance.
    pub mids: Vec<String>,
}

/// Why a fragment was rejected (maps to HTTP 400).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FragError {
    /// The body is not UTF-8.
    NotUtf8,
    /// A line is longer than [`SdpFrag::MAX_LINE`] bytes.
    LineTooLong,
    /// The body has more than [`SdpFrag::MAX_LINES`] lines.
    TooManyLines,
    /// The line with this 1-based number is not a usable SDP line.
    BadLine(usize),
    /// Two sections carry different ufrags or different passwords.
    ConflictingCredentials,
    /// An ufrag came without a password, or a password without an ufrag.
    MissingPwd,
    /// An ufrag or password has the wrong length or characters (RFC 8839 §5.4).
    BadCredential,
}

impl fmt::Display for FragError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotUtf8 => f.write_str("the fragment is not UTF-8"),
            Self::LineTooLong => {
                write!(f, "a line is longer than {} bytes", SdpFrag::MAX_LINE)
            }
            Self::TooManyLines => {
                write!(f, "the fragment has more than {} lines", SdpFrag::MAX_LINES)
            }
            Self::BadLine(n) => write!(f, "line {n} is not an SDP line"),
            Self::ConflictingCredentials => {
                f.write_str("the fragment carries conflicting ICE credentials")
            }
            Self::MissingPwd => f.write_str("ice-ufrag and ice-pwd must be given together"),
            Self::BadCredential => f.write_str("ice-ufrag or ice-pwd is malformed"),
        }
    }
}

impl std::error::Error for FragError {}

/// SDP line types that carry nothing for trickle ICE; some clients copy them into fragments,
/// so they are skipped rather than rejected (RFC 8866 §5).
const IGNORED_TYPES: &[&str] = &["v", "o", "s", "i", "u", "e", "p", "c", "b", "t", "r", "z", "k"];

impl SdpFrag {
    /// Most lines accepted in one fragment, blank ones included.
    pub const MAX_LINES: usize = 1000;
    /// Longest line accepted, in bytes, excluding its line ending.
    pub const MAX_LINE: usize = 4096;

    /// Parses a fragment.
    ///
    /// Lines must look like `<letter>=<value>` (CRLF or LF endings, surrounding whitespace and
    /// blank lines tolerated); only `a=` and `m=` lines are interpreted; other SDP line types
    /// (`v`, `o`, `s`, `c`, `b`, `t`, ...) are ignored; anything else is
    /// [`FragError::BadLine`]. Different ufrags (or passwords) in different sections give
    /// [`FragError::ConflictingCredentials`]. `ice-ufrag` must be 4..=256 and `ice-pwd`
    /// 22..=256 ice-chars (ALPHA / DIGIT / "+" / "/", RFC 8839), else
    /// [`FragError::BadCredential`]. An empty body is a valid fragment with nothing in it.
    pub fn parse(body: &[u8]) -> Result<Self, FragError> {
        let text = std::str::from_utf8(body).map_err(|_| FragError::NotUtf8)?;
        let mut frag = Self::default();
        // The mid of each section, filled in when its `a=mid` arrives; candidates remember their
        // section index and are resolved at the end, so an `a=mid` that follows candidates in
        // the same m-section still labels them.
        let mut sections: Vec<Option<String>> = Vec::new();
        let mut candidates: Vec<(Option<usize>, String)> = Vec::new();

        for (index, raw) in text.lines().enumerate() {
            if index >= Self::MAX_LINES {
                return Err(FragError::TooManyLines);
            }
            if raw.len() > Self::MAX_LINE {
                return Err(FragError::LineTooLong);
            }
            let number = index.saturating_add(1);
            let bad = FragError::BadLine(number);
            let line = raw.trim();
            if line.is_empty() {
                continue;
            }
            let (kind, value) = line.split_once('=').ok_or_else(|| bad.clone())?;
            match kind {
                "m" => {
                    if value.trim().is_empty() {
                        return Err(bad);
                    }
                    sections.push(None);
                }
                "a" => {
                    let (name, arg) = match value.split_once(':') {
                        Some((name, arg)) => (name, Some(arg.trim())),
                        None => (value, None),
                    };
                    match name {
                        "" => return Err(bad),
                        "ice-ufrag" => {
                            let ufrag = credential(arg, 4)?;
                            set_credential(&mut frag.ice_ufrag, ufrag)?;
                        }
                        "ice-pwd" => {
                            let pwd = credential(arg, 22)?;
                            set_credential(&mut frag.ice_pwd, pwd)?;
                        }
                        "ice-options" => {
                            if let Some(opts) = arg.filter(|opts| !opts.is_empty()) {
                                frag.ice_options.get_or_insert_with(|| opts.to_owned());
                            }
                        }
                        "mid" => {
                            let mid = arg.filter(|mid| !mid.is_empty()).ok_or(bad)?;
                            // Some clients omit `m=` lines; an `a=mid` outside a section, or a
                            // second one in a section, then opens an implicit section so the
                            // candidates after it get that mid.
                            if !matches!(sections.last(), Some(None)) {
                                sections.push(None);
                            }
                            if let Some(slot) = sections.last_mut() {
                                *slot = Some(mid.to_owned());
                            }
                            if !frag.mids.iter().any(|known| known == mid) {
                                frag.mids.push(mid.to_owned());
                            }
                        }
                        // An empty candidate is how browsers spell end-of-candidates in the
                        // API; it carries nothing, so it falls through and is dropped.
                        "candidate" if arg.is_some_and(|c| !c.is_empty()) => {
                            let section = sections.len().checked_sub(1);
                            candidates.push((section, value.to_owned()));
                        }
                        "end-of-candidates" => frag.end_of_candidates = true,
                        _ => {}
                    }
                }
                _ if IGNORED_TYPES.contains(&kind) => {}
                _ => return Err(bad),
            }
        }

        if frag.ice_ufrag.is_some() != frag.ice_pwd.is_some() {
            return Err(FragError::MissingPwd);
        }
        frag.candidates = candidates
            .into_iter()
            .map(|(section, candidate)| {
                let mid = section.and_then(|s| sections.get(s).cloned().flatten());
                (mid, candidate)
            })
            .collect();
        Ok(frag)
    }

    /// Returns true when the fragment carries credentials (an ICE restart if they differ from
    /// the current ones).
    pub fn has_credentials(&self) -> bool {
        self.ice_ufrag.is_some() && self.ice_pwd.is_some()
    }
}

/// Validates an ufrag or password: `min..=256` ice-chars (RFC 8839 §5.4).
fn credential(arg: Option<&str>, min: usize) -> Result<&str, FragError> {
    let value = arg.ok_or(FragError::BadCredential)?;
    let ice_char = |b: u8| b.is_ascii_alphanumeric() || b == b'+' || b == b'/';
    if (min..=256).contains(&value.len()) && value.bytes().all(ice_char) {
        Ok(value)
    } else {
        Err(FragError::BadCredential)
    }
}

/// Stores a credential, rejecting a second, different value (repeats of the same value are
/// normal: clients copy the credentials into every bundled section).
fn set_credential(slot: &mut Option<String>, value: &str) -> Result<(), FragError> {
    match slot {
        Some(existing) if existing != value => Err(FragError::ConflictingCredentials),
        Some(_) => Ok(()),
        None => {
            *slot = Some(value.to_owned());
            Ok(())
        }
    }
}

/// Appends one CRLF-terminated line made of `parts`; line breaks inside a part become spaces
/// so that no value can inject extra SDP lines.
fn push_line(out: &mut String, parts: &[&str]) {
    for part in parts {
        out.extend(part.chars().map(|c| if c == '\r' || c == '\n' { ' ' } else { c }));
    }
    out.push_str("\r\n");
}

/// Builds the 200 OK body of an ICE-restart PATCH: the server's new credentials and candidates.
///
/// Output uses CRLF line endings, every line terminated: `a=ice-lite` (if `ice_lite`),
/// `a=ice-options:<opts>` (if `ice_options` is given), `a=group:BUNDLE <mids>`, then for the
/// first mid only `m=<first_media_kind> 9 UDP/TLS/RTP/SAVPF 0` and `a=mid:<mid>`, then
/// `a=ice-ufrag:<ufrag>`, `a=ice-pwd:<pwd>`, one `a=<candidate>` per candidate (the strings
/// already start with `candidate:`), and `a=end-of-candidates`. With no mids at all the group
/// and m-section lines are left out and the credentials stay at session level.
pub fn build_restart_answer(
    ice_lite: bool,
    ice_options: Option<&str>,
    first_media_kind: &str,
    mids: &[&str],
    ufrag: &str,
    pwd: &str,
    candidates: &[String],
) -> String {
    let mut out = String::new();
    if ice_lite {
        push_line(&mut out, &["a=ice-lite"]);
    }
    if let Some(opts) = ice_options {
        push_line(&mut out, &["a=ice-options:", opts]);
    }
    if let Some(first) = mids.first() {
        push_line(&mut out, &["a=group:BUNDLE ", &mids.join(" ")]);
        // RFC 8840 §9: fragment m-lines are placeholders; port 9 and a dummy format suffice.
        push_line(&mut out, &["m=", first_media_kind, " 9 UDP/TLS/RTP/SAVPF 0"]);
        push_line(&mut out, &["a=mid:", first]);
    }
    push_line(&mut out, &["a=ice-ufrag:", ufrag]);
    push_line(&mut out, &["a=ice-pwd:", pwd]);
    for candidate in candidates {
        push_line(&mut out, &["a=", candidate]);
    }
    push_line(&mut out, &["a=end-of-candidates"]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EXAMPLE: &str = "a=ice-options:trickle ice2\r\n\
a=group:BUNDLE 0 1\r\n\
m=audio 9 RTP/AVP 0\r\n\
a=mid:0\r\n\
a=ice-ufrag:EsAw\r\n\
a=ice-pwd:P2uYro0UCOQ4zxjKXaWCBui1\r\n\
a=candidate:1387637174 1 udp 2122260223 192.0.2.1 61764 typ host generation 0 \
ufrag EsAw network-id 1\r\n\
a=candidate:3471623853 1 udp 2122194687 198.51.100.2 61765 typ host generation 0 \
ufrag EsAw network-id 2\r\n\
a=candidate:473322822 1 tcp 1518280447 192.0.2.1 9 typ host tcptype active \
generation 0 ufrag EsAw network-id 1\r\n\
a=end-of-candidates\r\n";

    fn ok(body: &str) -> SdpFrag {
        match SdpFrag::parse(body.as_bytes()) {
            Ok(frag) => frag,
            Err(e) => panic!("{e}: {body:?}"),
        }
    }

    #[test]
    fn example() {
        let f = ok(EXAMPLE);
        assert_eq!(f.ice_ufrag.as_deref(), Some("EsAw"));
        assert_eq!(f.ice_pwd.as_deref(), Some("P2uYro0UCOQ4zxjKXaWCBui1"));
        assert_eq!(f.ice_options.as_deref(), Some("trickle ice2"));
        assert!(f.end_of_candidates && f.has_credentials());
        assert_eq!(f.mids, vec!["0".to_owned()]);
        assert_eq!(f.candidates.len(), 3);
        assert!(f.candidates.iter().all(|(mid, _)| mid.as_deref() == Some("0")));
        assert!(f.candidates[0].1.starts_with("candidate:1387637174 1 udp 2122260223 192.0.2.1"));
        assert!(f.candidates[1].1.contains("198.51.100.2 61765"));
        assert!(f.candidates[2].1.contains(" tcp ") && f.candidates[2].1.ends_with("network-id 1"));
        // LF-only endings give the same result.
        assert_eq!(ok(&EXAMPLE.replace("\r\n", "\n")), f);
        // CRLF with trailing spaces, blank lines and the v=/o=/s=/t= lines some clients add.
        let noisy = format!(
            "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n\r\n{}",
            EXAMPLE.replace("\r\n", "  \t\r\n\r\n")
        );
        assert_eq!(ok(&noisy), f);
    }

    #[test]
    fn session_level_credentials_and_mids() {
        let body = "a=ice-ufrag:abcd\na=ice-pwd:abcdefghijklmnopqrstuv\n\
a=candidate:1 1 udp 1 192.0.2.9 5000 typ host\n\
m=audio 9 UDP/TLS/RTP/SAVPF 111\na=candidate:2 1 udp 1 192.0.2.9 5001 typ host\na=mid:a\n\
m=video 9 UDP/TLS/RTP/SAVPF 96\na=mid:v\na=ice-ufrag:abcd\na=ice-pwd:abcdefghijklmnopqrstuv\n\
a=candidate:3 1 udp 1 192.0.2.9 5002 typ host\nm=video 9 UDP/TLS/RTP/SAVPF 96\n\
a=candidate:4 1 udp 1 192.0.2.9 5003 typ host\n";
        let f = ok(body);
        assert!(f.has_credentials());
        assert_eq!(f.mids, vec!["a".to_owned(), "v".to_owned()]);
        let mids: Vec<_> = f.candidates.iter().map(|(m, _)| m.as_deref()).collect();
        assert_eq!(mids, vec![None, Some("a"), Some("v"), None]);
        assert!(!f.end_of_candidates);
    }

    #[test]
    fn mid_without_m_line() {
        let f = ok("a=candidate:1 1 udp 1 h 1 typ host\na=mid:0\na=candidate:2 1 udp 1 h 2 typ \
host\na=mid:1\na=candidate:3 1 udp 1 h 3 typ host\n");
        let mids: Vec<_> = f.candidates.iter().map(|(m, _)| m.as_deref()).collect();
        assert_eq!(mids, vec![None, Some("0"), Some("1")]);
        assert!(!f.has_credentials());
    }

    #[test]
    fn empty_and_trivial_bodies() {
        assert_eq!(ok(""), SdpFrag::default());
        assert_eq!(ok("\r\n\n  \n"), SdpFrag::default());
        assert_eq!(
            ok("a=end-of-candidates"),
            SdpFrag { end_of_candidates: true, ..SdpFrag::default() }
        );
        // Empty candidates carry nothing and are dropped.
        assert!(ok("a=candidate:\na=candidate").candidates.is_empty());
    }

    #[test]
    fn errors() {
        assert_eq!(SdpFrag::parse(b"a=mid:0\n\xff\xfe"), Err(FragError::NotUtf8));
        assert_eq!(SdpFrag::parse(b"a=mid:0\r\n\r\nnonsense\r\n"), Err(FragError::BadLine(3)));
        assert_eq!(SdpFrag::parse(b"x=1"), Err(FragError::BadLine(1)));
        assert_eq!(SdpFrag::parse(b"ab=1"), Err(FragError::BadLine(1)));
        assert_eq!(SdpFrag::parse(b"=1"), Err(FragError::BadLine(1)));
        assert_eq!(SdpFrag::parse(b"v=0\na="), Err(FragError::BadLine(2)));
        assert_eq!(SdpFrag::parse(b"a=mid:"), Err(FragError::BadLine(1)));
        assert_eq!(SdpFrag::parse(b"m=  "), Err(FragError::BadLine(1)));
        let conflict = "m=audio 9 X 0\na=ice-ufrag:abcd\na=ice-pwd:abcdefghijklmnopqrstuv\n\
m=video 9 X 0\na=ice-ufrag:abce\na=ice-pwd:abcdefghijklmnopqrstuv\n";
        assert_eq!(SdpFrag::parse(conflict.as_bytes()), Err(FragError::ConflictingCredentials));
        let conflict = "a=ice-ufrag:abcd\na=ice-pwd:abcdefghijklmnopqrstuv\n\
a=ice-pwd:abcdefghijklmnopqrstuw\n";
        assert_eq!(SdpFrag::parse(conflict.as_bytes()), Err(FragError::ConflictingCredentials));
        assert_eq!(
            SdpFrag::parse(b"a=ice-ufrag:abcd\na=ice-pwd:abcdefghijklmnopqrstu"),
            Err(FragError::BadCredential)
        );
        assert_eq!(
            SdpFrag::parse(b"a=ice-ufrag:abc\na=ice-pwd:abcdefghijklmnopqrstuv"),
            Err(FragError::BadCredential)
        );
        assert_eq!(SdpFrag::parse(b"a=ice-ufrag:ab-d"), Err(FragError::BadCredential));
        assert_eq!(SdpFrag::parse(b"a=ice-ufrag"), Err(FragError::BadCredential));
        let long = format!("a=ice-ufrag:{}", "a".repeat(257));
        assert_eq!(SdpFrag::parse(long.as_bytes()), Err(FragError::BadCredential));
        assert_eq!(SdpFrag::parse(b"a=ice-ufrag:abcd"), Err(FragError::MissingPwd));
        assert_eq!(SdpFrag::parse(b"a=ice-pwd:abcdefghijklmnopqrstuv"), Err(FragError::MissingPwd));
        let huge = format!("a=candidate:{}", "1".repeat(SdpFrag::MAX_LINE));
        assert_eq!(SdpFrag::parse(huge.as_bytes()), Err(FragError::LineTooLong));
        assert_eq!(FragError::BadLine(3).to_string(), "line 3 is not an SDP line");
    }

    #[test]
    fn line_limits() {
        let exactly = "a=end-of-candidates\r\n".repeat(SdpFrag::MAX_LINES);
        assert!(ok(&exactly).end_of_candidates);
        let over = "a=end-of-candidates\r\n".repeat(SdpFrag::MAX_LINES + 1);
        assert_eq!(SdpFrag::parse(over.as_bytes()), Err(FragError::TooManyLines));
        let blank = "\n".repeat(SdpFrag::MAX_LINES + 1);
        assert_eq!(SdpFrag::parse(blank.as_bytes()), Err(FragError::TooManyLines));
        let fits = format!("a=candidate:{}", "1".repeat(SdpFrag::MAX_LINE - 12));
        assert_eq!(ok(&fits).candidates.len(), 1);
    }

    #[test]
    fn mdns_candidate_kept_verbatim() {
        let c = "candidate:2 1 udp 2113937151 0f3c1f4e-5a1b-4c2d-9e8f-0123456789ab.local 54321 typ \
host generation 0 network-cost 999";
        let f = ok(&format!("m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na={c}\r\n"));
        assert_eq!(f.candidates, vec![(Some("1".to_owned()), c.to_owned())]);
    }

    #[test]
    fn restart_answer_round_trips() {
        let candidates = vec![
            "candidate:1 1 udp 2130706431 192.0.2.1 40000 typ host".to_owned(),
            "candidate:2 1 tcp 1518280447 192.0.2.1 8443 typ host tcptype passive".to_owned(),
        ];
        let pwd = "abcdefghijklmnopqrstuvwx";
        let body = build_restart_answer(
            true,
            Some("trickle"),
            "video",
            &["0", "1"],
            "wxyz",
            pwd,
            &candidates,
        );
        assert!(body.starts_with(
            "a=ice-lite\r\na=ice-options:trickle\r\na=group:BUNDLE 0 1\r\n\
m=video 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:0\r\na=ice-ufrag:wxyz\r\n"
        ));
        assert!(body.ends_with("typ host tcptype passive\r\na=end-of-candidates\r\n"));
        let f = ok(&body);
        assert_eq!(f.ice_ufrag.as_deref(), Some("wxyz"));
        assert_eq!(f.ice_pwd.as_deref(), Some(pwd));
        assert_eq!(f.ice_options.as_deref(), Some("trickle"));
        assert_eq!(f.mids, vec!["0".to_owned()]);
        let got: Vec<_> = f.candidates.iter().map(|(_, c)| c.clone()).collect();
        assert_eq!(got, candidates);
        assert!(f.end_of_candidates);

        let bare = build_restart_answer(false, None, "audio", &[], "wxyz", pwd, &[]);
        assert_eq!(bare, format!("a=ice-ufrag:wxyz\r\na=ice-pwd:{pwd}\r\na=end-of-candidates\r\n"));
        assert!(ok(&bare).has_credentials());

        // A value with a line break cannot inject a line.
        let sneaky = vec!["candidate:1 1 udp 1 h 1 typ host\r\na=ice-ufrag:evil".to_owned()];
        let f = ok(&build_restart_answer(false, None, "audio", &["0"], "wxyz", pwd, &sneaky));
        assert_eq!(f.ice_ufrag.as_deref(), Some("wxyz"));
        assert_eq!(f.candidates.len(), 1);
    }

    const SOUP: &[&str] = &[
        "",
        " ",
        "\r",
        "v=0",
        "o=- 1 1 IN IP4 0.0.0.0",
        "s=-",
        "t=0 0",
        "c=IN IP4 0.0.0.0",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111",
        "m=video 9 UDP/TLS/RTP/SAVPF 96",
        "m=",
        "a=mid:0",
        "a=mid:1",
        "a=mid:",
        "a=group:BUNDLE 0 1",
        "a=ice-options:trickle",
        "a=ice-ufrag:EsAw",
        "a=ice-ufrag:Zz9+",
        "a=ice-pwd:P2uYro0UCOQ4zxjKXaWCBui1",
        "a=ice-pwd:short",
        "a=candidate:1 1 udp 2122260223 192.0.2.1 61764 typ host",
        "a=candidate:2 1 udp 1 x.local 5 typ host",
        "a=candidate:",
        "a=end-of-candidates",
        "a=",
        "a",
        "=",
        "é=ü",
        "x=y",
    ];

    proptest! {
        #[test]
        fn parse_never_panics_on_bytes(d in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = SdpFrag::parse(&d);
        }

        #[test]
        fn parse_never_panics_on_line_soup(
            lines in proptest::collection::vec(
                (0..SOUP.len(), prop_oneof![Just("\n"), Just("\r\n"), Just(" \r\n")]),
                0..60,
            ),
        ) {
            let body: String = lines
                .iter()
                .map(|(i, end)| format!("{}{}", SOUP.get(*i).copied().unwrap_or(""), end))
                .collect();
            if let Ok(f) = SdpFrag::parse(body.as_bytes()) {
                prop_assert_eq!(f.ice_ufrag.is_some(), f.ice_pwd.is_some());
                for (mid, c) in &f.candidates {
                    prop_assert!(c.starts_with("candidate:"));
                    if let Some(mid) = mid {
                        prop_assert!(f.mids.contains(mid));
                    }
                }
            }
        }

        #[test]
        fn restart_answer_always_parses(
            lite in any::<bool>(),
            ufrag in "[A-Za-z0-9+/]{4,256}",
            pwd in "[A-Za-z0-9+/]{22,256}",
            mids in proptest::collection::vec("[a-z0-9]{1,8}", 0..4),
            candidates in proptest::collection::vec(
                "candidate:[0-9]{1,10} 1 (udp|tcp) [0-9]{1,10} [a-z0-9.:-]{1,40} [0-9]{1,5} \
                 typ host",
                0..10,
            ),
        ) {
            let mid_refs: Vec<&str> = mids.iter().map(String::as_str).collect();
            let body = build_restart_answer(
                lite, Some("trickle"), "audio", &mid_refs, &ufrag, &pwd, &candidates,
            );
            let f = SdpFrag::parse(body.as_bytes());
            prop_assert!(f.is_ok(), "{:?}", f);
            if let Ok(f) = f {
                prop_assert_eq!(f.ice_ufrag, Some(ufrag));
                prop_assert_eq!(f.ice_pwd, Some(pwd));
                let got: Vec<String> = f.candidates.into_iter().map(|(_, c)| c).collect();
                prop_assert_eq!(got, candidates);
                prop_assert_eq!(f.mids, mids.first().cloned().into_iter().collect::<Vec<_>>());
            }
        }
    }
}
