//! Base64 (RFC 4648), strict: the JWT code's base64url without padding (RFC 7515 §2) and the
//! signed webhooks' standard alphabet with padding (Standard Webhooks). Decoding refuses any
//! other character (white space, the other alphabet), a length that leaves a lone character,
//! and non-zero bits after the last whole byte, so that each byte string has one encoding.

/// Which of RFC 4648's two alphabets, and its padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alphabet {
    /// `+` and `/` (§4); encoded with `=` padding, decoded with or without it.
    Standard,
    /// `-` and `_` (§5); never padded.
    UrlSafe,
}

impl Alphabet {
    fn chars(self) -> &'static [u8; 64] {
        match self {
            Self::Standard => b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
            Self::UrlSafe => b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
        }
    }

    fn value(self, c: u8) -> Option<u32> {
        Some(
            match c {
                b'A'..=b'Z' => c - b'A',
                b'a'..=b'z' => c - b'a' + 26,
                b'0'..=b'9' => c - b'0' + 52,
                b'+' if self == Self::Standard => 62,
                b'/' if self == Self::Standard => 63,
                b'-' if self == Self::UrlSafe => 62,
                b'_' if self == Self::UrlSafe => 63,
                _ => return None,
            }
            .into(),
        )
    }
}

/// `data` in `alphabet` (padded for [`Alphabet::Standard`]).
pub fn encode(data: &[u8], alphabet: Alphabet) -> String {
    let chars = alphabet.chars();
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(chars[((n >> (18 - 6 * i)) & 63) as usize]));
        }
        if alphabet == Alphabet::Standard {
            (chunk.len()..3).for_each(|_| out.push('='));
        }
    }
    out
}

/// The bytes `text` encodes in `alphabet`; `None` for anything not in its one strict form
/// (see the [module docs](self)).
pub fn decode(text: &[u8], alphabet: Alphabet) -> Option<Vec<u8>> {
    let unpadded = match alphabet {
        Alphabet::UrlSafe => text,
        Alphabet::Standard => {
            let bare = text.strip_suffix(b"==").or_else(|| text.strip_suffix(b"=")).unwrap_or(text);
            if bare.len() != text.len() && !text.len().is_multiple_of(4) {
                return None;
            }
            bare
        }
    };
    let mut out = Vec::with_capacity(unpadded.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in unpadded {
        acc = (acc << 6) | alphabet.value(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // A lone 6 bits cannot be a byte; leftover bits must be zero (canonical form).
    (bits < 6 && acc == 0).then_some(out)
}
