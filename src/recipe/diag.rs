//! Recipe diagnostics: an error with a place (`file:line:column`), the offending source line with
//! a caret under the column, and what to do about it. Pure formatting; no I/O.
//!
//! Diagnostics are about hostile files too, and end up on terminals, in logs and in NATS
//! messages: every text they show is one line with control characters escaped, messages and
//! help at most [`MAX_MESSAGE_CHARS`] characters, the source excerpt at most
//! [`MAX_EXCERPT_CHARS`] around the column.

use std::fmt;
use std::path::PathBuf;

/// Longest source excerpt shown under a diagnostic (and longest file name), in characters.
pub const MAX_EXCERPT_CHARS: usize = 200;

/// Longest message or help, in characters.
pub const MAX_MESSAGE_CHARS: usize = 1000;

/// Characters that must not reach a terminal or a line-based log as they are: C0 and C1 controls
/// (newlines, escape sequences), Unicode line separators and bidirectional overrides.
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// How `c` is shown: itself, or escaped (`\n`, `\u{1b}`).
fn shown_char(c: char) -> String {
    if is_unsafe(c) {
        c.escape_default().collect()
    } else {
        c.to_string()
    }
}

/// `text` on one line: unsafe characters escaped, at most `max` characters (cut with `…`).
pub fn one_line(text: &str, max: usize) -> String {
    let mut out = String::new();
    let mut width = 0;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let piece = shown_char(c);
        let w = piece.chars().count();
        // Keep a column for the ellipsis unless this is the last piece.
        let room = if chars.peek().is_none() {
            max
        } else {
            max.saturating_sub(1)
        };
        if width + w > room {
            out.push('…');
            break;
        }
        out.push_str(&piece);
        width += w;
    }
    out
}

/// The part of `line` to show under a diagnostic and the caret's offset in it: at most
/// [`MAX_EXCERPT_CHARS`] characters around the 1-based `column`, unsafe characters escaped, `…`
/// where the line is cut.
pub fn excerpt(line: &str, column: usize) -> (String, usize) {
    let half = MAX_EXCERPT_CHARS / 2;
    let at = line
        .char_indices()
        .nth(column.saturating_sub(1))
        .map(|(i, _)| i)
        .unwrap_or(line.len());
    // Before the caret, nearest first, up to half the room.
    let mut before: Vec<String> = Vec::new();
    let mut width = 0;
    let mut cut_before = false;
    for c in line[..at].chars().rev() {
        let piece = shown_char(c);
        let w = piece.chars().count();
        if width + w > half {
            cut_before = true;
            break;
        }
        width += w;
        before.push(piece);
    }
    let mut text = String::new();
    if cut_before {
        text.push('…');
    }
    text.extend(before.into_iter().rev());
    let caret = text.chars().count();
    let mut total = caret;
    for c in line[at..].chars() {
        let piece = shown_char(c);
        let w = piece.chars().count();
        if total + w > MAX_EXCERPT_CHARS {
            text.push('…');
            break;
        }
        total += w;
        text.push_str(&piece);
    }
    (text, caret)
}

/// A 1-based position in a source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

/// Where a diagnostic points: a file, a position and that line's text (for the snippet).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Place {
    pub file: PathBuf,
    pub pos: Pos,
    /// The source line at `pos.line`, without its newline.
    pub line_text: String,
    /// When the recipe line was changed by the template, the rendered line the error is in.
    pub rendered: Option<String>,
}

/// What kind of mistake, for the summary and for machines (`--json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Io,
    Yaml,
    Template,
    Schema,
    Semantic,
    Param,
    /// A bound on untrusted input (fuel, output size, time, nesting, file size) was crossed.
    Limit,
}

/// One recipe error.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Diagnostic {
    pub kind: Kind,
    pub message: String,
    pub place: Option<Box<Place>>,
    pub help: Option<String>,
}

impl Diagnostic {
    /// A diagnostic; the message is kept to one line of at most [`MAX_MESSAGE_CHARS`].
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Diagnostic {
            kind,
            message: one_line(&message.into(), MAX_MESSAGE_CHARS),
            place: None,
            help: None,
        }
    }

    pub fn at(mut self, place: Option<Place>) -> Self {
        self.place = place.map(Box::new);
        self
    }

    /// What to do; kept to one line of at most [`MAX_MESSAGE_CHARS`].
    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(one_line(&help.into(), MAX_MESSAGE_CHARS));
        self
    }

    /// `file:line:column`, if the error has a place (the file name shown as [`one_line`]).
    pub fn location(&self) -> Option<String> {
        self.place.as_ref().map(|p| {
            format!(
                "{}:{}:{}",
                one_line(&p.file.display().to_string(), MAX_EXCERPT_CHARS),
                p.pos.line,
                p.pos.column
            )
        })
    }

    /// Machine-readable form for `--json`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "kind": self.kind,
            "message": one_line(&self.message, MAX_MESSAGE_CHARS),
            "file": self.place.as_ref().map(|p| one_line(&p.file.display().to_string(), MAX_EXCERPT_CHARS)),
            "line": self.place.as_ref().map(|p| p.pos.line),
            "column": self.place.as_ref().map(|p| p.pos.column),
            "help": self.help.as_deref().map(|h| one_line(h, MAX_MESSAGE_CHARS)),
        })
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Fields are public: whatever built this diagnostic, show it safely.
        writeln!(f, "error: {}", one_line(&self.message, MAX_MESSAGE_CHARS))?;
        if let (Some(place), Some(location)) = (&self.place, self.location()) {
            let number = place.pos.line.to_string();
            let pad = " ".repeat(number.len());
            writeln!(f, "{pad}--> {location}")?;
            writeln!(f, "{pad} |")?;
            let (text, caret_at) = excerpt(&place.line_text, place.pos.column);
            writeln!(f, "{number} | {text}")?;
            writeln!(f, "{pad} | {}^", " ".repeat(caret_at))?;
            if let Some(rendered) = &place.rendered {
                writeln!(
                    f,
                    "{pad} = rendered as: {}",
                    one_line(rendered, MAX_EXCERPT_CHARS)
                )?;
            }
        }
        if let Some(help) = &self.help {
            writeln!(f, "  = help: {}", one_line(help, MAX_MESSAGE_CHARS))?;
        }
        Ok(())
    }
}

/// Several diagnostics (a `check` of many files reports each).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.0 {
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostic {}

/// "did you mean" for a misspelled name among the expected ones.
pub fn did_you_mean<'a>(got: &str, expected: impl IntoIterator<Item = &'a str>) -> Option<String> {
    expected
        .into_iter()
        .map(|e| (strsim::jaro_winkler(got, e), e))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, e)| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_location_snippet_and_caret() {
        let d = Diagnostic::new(Kind::Schema, "unknown field `nmae`")
            .at(Some(Place {
                file: "r.yaml".into(),
                pos: Pos { line: 3, column: 5 },
                line_text: "    nmae: x".into(),
                rendered: None,
            }))
            .help("did you mean `name`?");
        let text = d.to_string();
        assert!(text.contains("--> r.yaml:3:5"), "{text}");
        assert!(text.contains("3 |     nmae: x\n  |     ^"), "{text}");
        assert!(text.contains("help: did you mean `name`?"), "{text}");
    }

    #[test]
    fn one_line_escapes_and_cuts() {
        let cases: &[(&str, usize, &str)] = &[
            ("plain", 10, "plain"),
            ("a\nb", 10, "a\\nb"),
            ("\u{1b}[2Jx", 20, "\\u{1b}[2Jx"),
            ("\u{9b}31m", 20, "\\u{9b}31m"),
            ("\u{202e}evil", 20, "\\u{202e}evil"),
            ("tab\there", 20, "tab\\there"),
            ("0123456789", 10, "0123456789"),
            ("0123456789a", 10, "012345678…"),
            ("ünïcödé", 10, "ünïcödé"),
        ];
        for (text, max, want) in cases {
            let got = one_line(text, *max);
            assert_eq!(&got, want, "{text:?}");
            assert!(got.chars().count() <= *max, "{got:?}");
        }
    }

    #[test]
    fn excerpts_are_short_single_lines_with_the_caret_on_the_column() {
        // (line, column, excerpt, the excerpt from the caret on)
        let long = "k: ".to_string() + &"x".repeat(10_000);
        let cases: Vec<(String, usize, &str)> = vec![
            ("name: x".into(), 7, "x"),
            ("a\u{1b}[31mb: c".into(), 10, "c"),
            ("a\nb: c".into(), 6, "c"),
            (long.clone(), 4, "xxx"),
            (long.clone(), 5000, "xxx"),
            (long.clone(), 10_003, "x"),
            (long, 20_000, ""),
        ];
        for (line, column, from_caret) in cases {
            let (text, caret) = excerpt(&line, column);
            let shown: String = text.chars().skip(caret).collect();
            assert!(text.chars().count() <= MAX_EXCERPT_CHARS + 2, "{text}");
            assert!(!text.chars().any(is_unsafe), "{text:?}");
            assert!(
                shown.starts_with(from_caret),
                "{column}: {text:?} at {caret}"
            );
        }
        let (text, caret) = excerpt("a\u{1b}[31mb: c", 10);
        assert_eq!(text, "a\\u{1b}[31mb: c");
        assert_eq!(caret, 14);
    }

    #[test]
    fn hostile_diagnostics_print_short_single_lines() {
        let hostile = format!("\u{1b}]0;owned\u{7}{}\n", "y".repeat(1 << 20));
        let d = Diagnostic::new(Kind::Semantic, format!("bad value `{hostile}`"))
            .at(Some(Place {
                file: "r\u{1b}[2J.yaml".into(),
                pos: Pos {
                    line: 1,
                    column: 500_000,
                },
                line_text: hostile.clone(),
                rendered: Some(hostile.clone()),
            }))
            .help(hostile);
        let text = d.to_string();
        assert!(text.len() < 4 * MAX_MESSAGE_CHARS, "{} bytes", text.len());
        assert_eq!(text.lines().count(), 7, "{text}");
        assert!(!text.chars().any(|c| c != '\n' && is_unsafe(c)), "{text:?}");
        assert!(text.contains("--> r\\u{1b}[2J.yaml:1:500000"), "{text}");
        assert!(d.message.chars().count() <= MAX_MESSAGE_CHARS);
        let json = d.to_json().to_string();
        assert!(json.len() < 4 * MAX_MESSAGE_CHARS, "{json}");
    }

    #[test]
    fn suggests_close_names_only() {
        assert_eq!(
            did_you_mean("nmae", ["name", "kernel"]),
            Some("name".into())
        );
        assert_eq!(did_you_mean("zzz", ["name", "kernel"]), None);
    }
}
