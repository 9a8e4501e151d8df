//! Process names (`comm`) and the escaping of untrusted text for line
//! output: a process picks its own name (prctl PR_SET_NAME), so it may hold
//! newlines, terminal escape sequences or bytes that are not UTF-8.
//!
//! JSON output carries the name as a JSON string (bytes that are not UTF-8
//! become U+FFFD; control characters are escaped by the JSON writer). Text
//! output goes through [`escape_text`], which keeps one event on one line
//! and sends nothing a terminal would act on: `\n`, `\t`, `\r`, `\\`,
//! `\xNN` for other control characters, spaces and non-UTF-8 bytes, and
//! `\u{NNNN}` for invisible or direction-changing Unicode characters.

use std::borrow::Cow;
use std::fmt::{self, Write as _};

/// Names up to this many bytes are kept inline (the kernel's are at most
/// 15).
const INLINE: usize = 30;

/// A process name, as the kernel has it (up to 15 bytes, anything but NUL).
///
/// Every event with an owner carries one, and the engine copies it onto
/// later events of the connection: a name the kernel gives is kept inline,
/// so making and copying one allocates nothing.
#[derive(Clone)]
pub struct Comm(Repr);

#[derive(Clone)]
enum Repr {
    /// Valid UTF-8 of at most [`INLINE`] bytes (every name the kernel gives).
    Inline { len: u8, bytes: [u8; INLINE] },
    /// Longer, or not UTF-8: `text` with U+FFFD for bytes that are not,
    /// `raw` the bytes when they differ from `text`.
    Heap {
        text: Box<str>,
        raw: Option<Box<[u8]>>,
    },
}

impl Default for Comm {
    fn default() -> Comm {
        Comm(Repr::Inline {
            len: 0,
            bytes: [0; INLINE],
        })
    }
}

impl Comm {
    /// From the kernel's bytes, up to the first NUL.
    pub fn from_bytes(bytes: &[u8]) -> Comm {
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        let bytes = &bytes[..end];
        match std::str::from_utf8(bytes) {
            Ok(s) if s.len() <= INLINE => {
                let mut inline = [0; INLINE];
                inline[..s.len()].copy_from_slice(s.as_bytes());
                Comm(Repr::Inline {
                    len: s.len() as u8,
                    bytes: inline,
                })
            }
            Ok(s) => Comm(Repr::Heap {
                text: s.into(),
                raw: None,
            }),
            Err(_) => Comm(Repr::Heap {
                text: String::from_utf8_lossy(bytes).into(),
                raw: Some(bytes.into()),
            }),
        }
    }

    /// The name as UTF-8 (U+FFFD for bytes that are not): for JSON.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            // SAFETY: `Inline` is only made from a `str` (`from_bytes`),
            // and `len` is its length.
            Repr::Inline { len, bytes } => unsafe {
                std::str::from_utf8_unchecked(&bytes[..usize::from(*len)])
            },
            Repr::Heap { text, .. } => text,
        }
    }

    /// The bytes, when they are not the UTF-8 text.
    fn raw(&self) -> Option<&[u8]> {
        match &self.0 {
            Repr::Heap { raw: Some(raw), .. } => Some(raw),
            _ => None,
        }
    }

    /// The name's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.raw().unwrap_or(self.as_str().as_bytes())
    }

    /// The name made safe for a line of text (see [`escape_text`]).
    pub fn escaped(&self) -> Cow<'_, str> {
        escape_text(self.as_bytes())
    }
}

/// The same bytes, the same name.
impl PartialEq for Comm {
    fn eq(&self, other: &Comm) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Comm {}

impl std::hash::Hash for Comm {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.as_bytes().hash(h)
    }
}

/// By the UTF-8 form, then by the bytes behind it (none before some).
impl Ord for Comm {
    fn cmp(&self, other: &Comm) -> std::cmp::Ordering {
        (self.as_str(), self.raw()).cmp(&(other.as_str(), other.raw()))
    }
}

impl PartialOrd for Comm {
    fn partial_cmp(&self, other: &Comm) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// The UTF-8 form, for matching and sorting; text output uses `Display`.
impl std::ops::Deref for Comm {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl From<&str> for Comm {
    fn from(s: &str) -> Comm {
        Comm::from_bytes(s.as_bytes())
    }
}

impl From<String> for Comm {
    fn from(s: String) -> Comm {
        Comm::from_bytes(s.as_bytes())
    }
}

impl PartialEq<str> for Comm {
    fn eq(&self, other: &str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl PartialEq<&str> for Comm {
    fn eq(&self, other: &&str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl fmt::Debug for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// Escaped for text output: what a `{}` in a text line shows.
impl fmt::Display for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.escaped())
    }
}

impl serde::Serialize for Comm {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Characters that change nothing visible or the direction of the text
/// around them (zero-width, bidi controls, soft hyphen, BOM): a name made
/// of them could hide or reorder what follows on the line.
fn invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{061C}' | '\u{180E}'
        | '\u{200B}'..='\u{200F}'
        | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}'
        | '\u{FEFF}'
        | '\u{FFF9}'..='\u{FFFB}')
}

/// `bytes` safe for one line of text output; borrowed when nothing needed
/// escaping.
pub fn escape_text(bytes: &[u8]) -> Cow<'_, str> {
    let plain =
        |c: char| c != '\\' && c != ' ' && !c.is_control() && !c.is_whitespace() && !invisible(c);
    if let Ok(s) = std::str::from_utf8(bytes)
        && s.chars().all(plain)
    {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(bytes.len() + 8);
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                c if plain(c) => out.push(c),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                '\r' => out.push_str("\\r"),
                c if (c as u32) < 0x80 => {
                    let _ = write!(out, "\\x{:02x}", c as u32);
                }
                c => {
                    let _ = write!(out, "\\u{{{:04x}}}", c as u32);
                }
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    Cow::Owned(out)
}

/// `s` safe for one line of text output.
pub fn escape_str(s: &str) -> Cow<'_, str> {
    escape_text(s.as_bytes())
}

/// `s` with control and invisible characters escaped but spaces and
/// backslashes kept: for messages that quote what a user gave us.
pub fn escape_controls(s: &str) -> Cow<'_, str> {
    let bad = |c: char| c.is_control() || invisible(c) || (c.is_whitespace() && c != ' ');
    if !s.chars().any(bad) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if bad(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_are_borrowed_unchanged() {
        assert!(matches!(escape_str("curl"), Cow::Borrowed("curl")));
        assert!(matches!(escape_str("nginx: wörker"), Cow::Owned(_)));
        assert_eq!(escape_str("postgrès"), "postgrès");
    }

    #[test]
    fn the_issue_name_stays_on_one_line_without_escape_sequences() {
        let c = Comm::from_bytes(b"a\nb\"c\x1b[31mX\0\0\0");
        assert_eq!(c.as_str(), "a\nb\"c\x1b[31mX");
        assert_eq!(c.to_string(), "a\\nb\"c\\x1b[31mX");
        assert!(!c.to_string().chars().any(|ch| ch.is_control()));
    }

    #[test]
    fn bytes_that_are_not_utf8_are_shown_as_hex() {
        let c = Comm::from_bytes(b"ab\xff\xfecd");
        assert_eq!(c.as_str(), "ab\u{fffd}\u{fffd}cd");
        assert_eq!(c.to_string(), "ab\\xff\\xfecd");
        assert_eq!(c.as_bytes(), b"ab\xff\xfecd");
    }

    #[test]
    fn spaces_backslashes_c1_and_bidi_controls_are_escaped() {
        assert_eq!(escape_str("Web Content"), "Web\\x20Content");
        assert_eq!(escape_str("a\\nb"), "a\\\\nb");
        assert_eq!(escape_str("x\u{85}y"), "x\\u{0085}y");
        assert_eq!(escape_str("ab\u{202e}cd"), "ab\\u{202e}cd");
        assert_eq!(escape_str("a\u{7f}"), "a\\x7f");
        assert_eq!(escape_str("a\u{2028}b"), "a\\u{2028}b");
    }

    #[test]
    fn messages_keep_spaces_but_not_controls() {
        assert_eq!(escape_controls("a b\\c"), "a b\\c");
        assert_eq!(escape_controls("x\n\u{1b}[1m"), "x\\n\\u{1b}[1m");
    }

    #[test]
    fn long_names_and_names_that_are_not_utf8_keep_their_bytes() {
        let long = "x".repeat(INLINE + 1);
        for bytes in [long.as_bytes(), b"q\xff", b"", b"curl"] {
            let c = Comm::from_bytes(bytes);
            assert_eq!(c.as_bytes(), bytes);
            assert_eq!(c.as_str(), String::from_utf8_lossy(bytes));
            assert_eq!(c.clone(), c);
        }
        // Sorted by the text first, as names are shown.
        let mut v = [Comm::from("b"), Comm::from_bytes(b"a\xff"), Comm::from("a")];
        v.sort();
        assert_eq!(
            v.map(|c| c.as_bytes().to_vec()),
            [&b"a"[..], b"a\xff", b"b"]
        );
    }

    #[test]
    fn json_gets_the_utf8_form() {
        let c = Comm::from_bytes(b"q\xff");
        assert_eq!(serde_json::to_string(&c).unwrap(), "\"q\u{fffd}\"");
        let c = Comm::from("a\nb");
        assert_eq!(serde_json::to_string(&c).unwrap(), "\"a\\nb\"");
    }
}
