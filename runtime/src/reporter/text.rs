//! Making untrusted text inert in reports.
//!
//! Test names, failure messages, log lines and output come from the suite, which
//! is untrusted: they may hold newlines, terminal escapes (ESC, CSI), carriage
//! returns, bidirectional overrides or characters XML 1.0 forbids. Every reporter
//! passes such text through one of these functions before writing it, so that
//! nothing raw reaches a terminal, a TAP harness or an XML parser.
//!
//! The escapes are visible (`\n`, `\u{1b}`), so a reader still sees what the
//! suite wrote. This module touches no I/O and knows no format but its own.

use std::borrow::Cow;
use std::fmt::Write as _;

/// True for characters that must never reach a report raw: every C0 and C1
/// control and DEL (ESC, CR, NUL, U+0085 ...), the line and paragraph separators
/// some readers split lines on, bidirectional and other invisible format
/// controls that reorder or hide text, and the noncharacters XML 1.0 forbids.
pub fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}'
                | '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{2069}'
                | '\u{feff}'
                | '\u{fff9}'..='\u{fffb}'
                | '\u{fffe}'
                | '\u{ffff}'
        )
}

/// Writes the visible escape of `c`: `\n`, `\r`, `\t`, else `\u{..}` in hex.
fn push_escaped(out: &mut String, c: char) {
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        _ => {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        }
    }
}

/// Escapes every character for which `escape` is true, borrowing when none is.
fn escape_where(text: &str, escape: impl Fn(char) -> bool) -> Cow<'_, str> {
    if !text.chars().any(&escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if escape(c) {
            push_escaped(&mut out, c);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Text that must stay on one line (a test name, a level path, a summary):
/// every unsafe character, newlines and tabs included, is escaped.
pub fn line(text: &str) -> Cow<'_, str> {
    escape_where(text, is_unsafe)
}

/// A block of lines (a failure message, captured output): newlines and tabs stay,
/// every other unsafe character is escaped. A carriage return right before a
/// newline is dropped, so CRLF output reads as lines.
pub fn block(text: &str) -> Cow<'_, str> {
    let crlf = text.contains("\r\n");
    let text: Cow<'_, str> = if crlf {
        Cow::Owned(text.replace("\r\n", "\n"))
    } else {
        Cow::Borrowed(text)
    };
    let unsafe_in_block = |c: char| c != '\n' && c != '\t' && is_unsafe(c);
    if !text.chars().any(unsafe_in_block) {
        return text;
    }
    Cow::Owned(escape_where(&text, unsafe_in_block).into_owned())
}

/// The first line of `text`, at most `width` characters, escaped as [`line()`];
/// an ellipsis marks a cut.
pub fn first_line(text: &str, width: usize) -> String {
    let first = text.split('\n').next().unwrap_or("");
    let first = first.strip_suffix('\r').unwrap_or(first);
    match first.char_indices().nth(width) {
        Some((cut, _)) => format!("{}…", line(&first[..cut])),
        None => line(first).into_owned(),
    }
}

/// A TAP test point description: one line, with `\` and `#` (which would start
/// a directive such as `# TODO`) escaped as TAP 14 asks, and every unsafe
/// character escaped so no harness sees a second line.
pub fn tap_description(text: &str) -> Cow<'_, str> {
    if !text.chars().any(|c| c == '\\' || c == '#' || is_unsafe(c)) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '#' => out.push_str("\\#"),
            c if is_unsafe(c) => push_escaped(&mut out, c),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// A YAML double-quoted scalar, quotes included, on one line, using only the
/// escapes both YAML 1.2 and TAP::Parser's YAMLish reader understand
/// (`\\ \" \n \r \t \e \xXX`), and `\uXXXX` for the rest.
pub fn yaml_quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{1b}' => out.push_str("\\e"),
            c if is_unsafe(c) => {
                let n = u32::from(c);
                if n <= 0xff {
                    let _ = write!(out, "\\x{n:02x}");
                } else {
                    let _ = write!(out, "\\u{n:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use rstest::rstest;

    use super::*;

    #[rstest]
    #[case::plain("plain_name", "plain_name")]
    #[case::newline("line\nbreak", "line\\nbreak")]
    #[case::esc("esc\u{1b}[31mred", "esc\\u{1b}[31mred")]
    #[case::cr_tab("a\rb\tc", "a\\rb\\tc")]
    #[case::nul_del("\0\u{7f}", "\\u{0}\\u{7f}")]
    #[case::c1_csi("\u{9b}31m\u{85}", "\\u{9b}31m\\u{85}")]
    #[case::separators("a\u{2028}b\u{2029}", "a\\u{2028}b\\u{2029}")]
    #[case::bidi("\u{202e}txt.exe", "\\u{202e}txt.exe")]
    #[case::nonchar("\u{fffe}\u{ffff}", "\\u{fffe}\\u{ffff}")]
    #[case::kept("]]> <&> \\ # é 漢", "]]> <&> \\ # é 漢")]
    fn one_line(#[case] input: &str, #[case] expected: &str) {
        assert_eq!(line(input), expected);
    }

    #[test]
    fn unchanged_text_is_borrowed() {
        assert!(matches!(line("abc"), Cow::Borrowed(_)));
        assert!(matches!(block("a\n\tb"), Cow::Borrowed(_)));
        assert!(matches!(tap_description("a b"), Cow::Borrowed(_)));
    }

    #[rstest]
    #[case::newlines_and_tabs_stay("a\n\tb\n", "a\n\tb\n")]
    #[case::crlf_reads_as_lines("a\r\nb\r\n", "a\nb\n")]
    #[case::lone_cr_is_escaped("50%\r100%", "50%\\r100%")]
    #[case::escapes_are_escaped("\u{1b}[2J\u{1b}]0;title\u{7}", "\\u{1b}[2J\\u{1b}]0;title\\u{7}")]
    fn blocks(#[case] input: &str, #[case] expected: &str) {
        assert_eq!(block(input), expected);
    }

    #[test]
    fn first_line_is_cut_and_escaped() {
        assert_eq!(first_line("one\u{1b}\ntwo", 10), "one\\u{1b}");
        assert_eq!(first_line("abcdef", 3), "abc…");
        assert_eq!(first_line("crlf\r\nnext", 10), "crlf");
        assert_eq!(first_line("", 10), "");
    }

    #[rstest]
    #[case::todo("fails # TODO not really", "fails \\# TODO not really")]
    #[case::backslash("a\\#b", "a\\\\\\#b")]
    #[case::injected_line("x\nok 42 - injected", "x\\nok 42 - injected")]
    #[case::cr_line("x\rnot ok 1", "x\\rnot ok 1")]
    #[case::esc("\u{1b}[1m", "\\u{1b}[1m")]
    fn tap_descriptions(#[case] input: &str, #[case] expected: &str) {
        assert_eq!(tap_description(input), expected);
    }

    #[rstest]
    #[case::plain("panic", "\"panic\"")]
    #[case::quotes("say \"hi\" \\o/", "\"say \\\"hi\\\" \\\\o/\"")]
    #[case::lines("a\n  ...\nok 3", "\"a\\n  ...\\nok 3\"")]
    #[case::controls("\u{1b}[31m\0\u{85}\r\t", "\"\\e[31m\\x00\\x85\\r\\t\"")]
    #[case::wide("\u{202e}\u{ffff}", "\"\\u202e\\uffff\"")]
    fn yaml(#[case] input: &str, #[case] expected: &str) {
        assert_eq!(yaml_quoted(input), expected);
    }

    #[test]
    fn nothing_unsafe_survives_any_helper() {
        let hostile: String = (0u32..0x100)
            .chain([0x2028, 0x2029, 0x202e, 0x2066, 0xfeff, 0xfffe, 0xffff])
            .filter_map(char::from_u32)
            .collect();
        for out in [
            line(&hostile).into_owned(),
            first_line(&hostile, 10_000),
            tap_description(&hostile).into_owned(),
            yaml_quoted(&hostile),
        ] {
            assert!(!out.chars().any(is_unsafe), "{out:?}");
        }
        let b = block(&hostile);
        assert!(!b.chars().any(|c| c != '\n' && c != '\t' && is_unsafe(c)));
    }
}
