//! Recipe diagnostics: an error with a place (`file:line:column`), the offending source line with
//! a caret under the column, and what to do about it. Pure formatting; no I/O.

use std::fmt;
use std::path::PathBuf;

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
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Diagnostic {
            kind,
            message: message.into(),
            place: None,
            help: None,
        }
    }

    pub fn at(mut self, place: Option<Place>) -> Self {
        self.place = place.map(Box::new);
        self
    }

    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    /// `file:line:column`, if the error has a place.
    pub fn location(&self) -> Option<String> {
        self.place
            .as_ref()
            .map(|p| format!("{}:{}:{}", p.file.display(), p.pos.line, p.pos.column))
    }

    /// Machine-readable form for `--json`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "kind": self.kind,
            "message": self.message,
            "file": self.place.as_ref().map(|p| p.file.display().to_string()),
            "line": self.place.as_ref().map(|p| p.pos.line),
            "column": self.place.as_ref().map(|p| p.pos.column),
            "help": self.help,
        })
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "error: {}", self.message)?;
        if let Some(place) = &self.place {
            let number = place.pos.line.to_string();
            let pad = " ".repeat(number.len());
            writeln!(
                f,
                "{pad}--> {}:{}:{}",
                place.file.display(),
                place.pos.line,
                place.pos.column
            )?;
            writeln!(f, "{pad} |")?;
            writeln!(f, "{number} | {}", place.line_text)?;
            let caret_at = caret_offset(&place.line_text, place.pos.column);
            writeln!(f, "{pad} | {}^", " ".repeat(caret_at))?;
            if let Some(rendered) = &place.rendered {
                writeln!(f, "{pad} = rendered as: {rendered}")?;
            }
        }
        if let Some(help) = &self.help {
            writeln!(f, "  = help: {help}")?;
        }
        Ok(())
    }
}

/// Display width before a 1-based character column (tabs count as one).
fn caret_offset(line: &str, column: usize) -> usize {
    line.chars().take(column.saturating_sub(1)).count()
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
    fn suggests_close_names_only() {
        assert_eq!(
            did_you_mean("nmae", ["name", "kernel"]),
            Some("name".into())
        );
        assert_eq!(did_you_mean("zzz", ["name", "kernel"]), None);
    }
}
