//! Debian control-file parsing (deb822 stanzas), `Packages` indices, and dependency fields
//! (`a (>= 1) | b, c:any`). Pure parsers: they take text or a reader and never touch the network
//! or the cache.

use super::version::Version;
use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, BufRead};

/// One deb822 stanza: field name → value, in file order. Continuation lines are joined with
/// `\n` (their single leading space removed; a lone `.` stands for an empty line).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stanza {
    pub fields: Vec<(String, String)>,
}

impl Stanza {
    /// The value of a field (field names compare case-insensitively, as deb822 says).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A syntax error in a control file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct SyntaxError {
    pub line: usize,
    pub reason: String,
}

/// Parse every stanza of a control text (stanzas separated by blank lines; `#` comment lines
/// skipped).
pub fn parse_stanzas(text: &str) -> Result<Vec<Stanza>, SyntaxError> {
    let mut reader = StanzaReader::new(text.as_bytes());
    let mut out = Vec::new();
    while let Some(stanza) = reader.next_stanza().map_err(|e| match e {
        StanzaError::Syntax(s) => s,
        StanzaError::Io(e) => SyntaxError {
            line: 0,
            reason: e.to_string(),
        },
    })? {
        out.push(stanza);
    }
    Ok(out)
}

/// Why reading a stanza failed.
#[derive(Debug, thiserror::Error)]
pub enum StanzaError {
    #[error(transparent)]
    Syntax(#[from] SyntaxError),
    #[error("reading")]
    Io(#[from] io::Error),
}

/// Reads deb822 stanzas one at a time from a stream, so a 50 MB `Packages` file is never held
/// whole in memory.
pub struct StanzaReader<R> {
    reader: R,
    line_no: usize,
    line: String,
}

impl<R: BufRead> StanzaReader<R> {
    pub fn new(reader: R) -> Self {
        StanzaReader {
            reader,
            line_no: 0,
            line: String::new(),
        }
    }

    /// The next stanza, or `None` at the end.
    pub fn next_stanza(&mut self) -> Result<Option<Stanza>, StanzaError> {
        let mut stanza = Stanza::default();
        loop {
            self.line.clear();
            let n = self.reader.read_line(&mut self.line)?;
            if n == 0 {
                return Ok((!stanza.fields.is_empty()).then_some(stanza));
            }
            self.line_no += 1;
            let line = self.line.trim_end_matches(['\n', '\r']);
            if line.trim().is_empty() {
                if stanza.fields.is_empty() {
                    continue;
                }
                return Ok(Some(stanza));
            }
            if line.starts_with('#') {
                continue;
            }
            if line.starts_with([' ', '\t']) {
                let Some((_, value)) = stanza.fields.last_mut() else {
                    return Err(SyntaxError {
                        line: self.line_no,
                        reason: "continuation line before any field".into(),
                    }
                    .into());
                };
                let cont = &line[1..];
                value.push('\n');
                if cont.trim() != "." {
                    value.push_str(cont);
                }
                continue;
            }
            let Some((name, value)) = line.split_once(':') else {
                return Err(SyntaxError {
                    line: self.line_no,
                    reason: format!("expected `Field: value`, found {line:?}"),
                }
                .into());
            };
            if name.is_empty() || name.contains(char::is_whitespace) {
                return Err(SyntaxError {
                    line: self.line_no,
                    reason: format!("invalid field name {name:?}"),
                }
                .into());
            }
            stanza
                .fields
                .push((name.to_string(), value.trim().to_string()));
        }
    }
}

/// A version relation operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Op {
    /// `<<`
    Lt,
    /// `<=`
    Le,
    /// `=`
    Eq,
    /// `>=`
    Ge,
    /// `>>`
    Gt,
}

impl Op {
    fn parse(s: &str) -> Option<Op> {
        Some(match s {
            "<<" => Op::Lt,
            "<=" | "<" => Op::Le,
            "=" => Op::Eq,
            ">=" | ">" => Op::Ge,
            ">>" => Op::Gt,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Op::Lt => "<<",
            Op::Le => "<=",
            Op::Eq => "=",
            Op::Ge => ">=",
            Op::Gt => ">>",
        }
    }

    /// Whether `have <op> want` holds.
    pub fn holds(self, have: &Version, want: &Version) -> bool {
        let ord = have.cmp(want);
        match self {
            Op::Lt => ord.is_lt(),
            Op::Le => ord.is_le(),
            Op::Eq => ord.is_eq(),
            Op::Ge => ord.is_ge(),
            Op::Gt => ord.is_gt(),
        }
    }
}

/// One alternative of a dependency: `name[:arch] [(op version)]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relation {
    pub name: String,
    /// `any`, `native` or an architecture name, when qualified.
    pub arch: Option<String>,
    pub constraint: Option<(Op, Version)>,
}

impl fmt::Display for Relation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if let Some(arch) = &self.arch {
            write!(f, ":{arch}")?;
        }
        if let Some((op, v)) = &self.constraint {
            write!(f, " ({} {v})", op.as_str())?;
        }
        Ok(())
    }
}

/// A dependency: alternatives, the first satisfiable one wins (`a | b`).
pub type Alternatives = Vec<Relation>;

/// Parse a relation field (`Depends`, `Pre-Depends`, `Provides`): comma-separated groups of
/// `|`-separated alternatives. Architecture restrictions (`[amd64]`) and build profiles (`<!nocheck>`)
/// are dropped (they do not appear in binary `Packages` files).
pub fn parse_relations(text: &str) -> Result<Vec<Alternatives>, String> {
    let mut groups = Vec::new();
    for group in text.split(',') {
        let group = group.trim();
        if group.is_empty() {
            continue;
        }
        let mut alts = Vec::new();
        for alt in group.split('|') {
            alts.push(parse_relation(alt.trim())?);
        }
        groups.push(alts);
    }
    Ok(groups)
}

fn parse_relation(text: &str) -> Result<Relation, String> {
    // Drop `[arch list]` and `<profiles>` (outside the version's parentheses).
    let mut clean = String::with_capacity(text.len());
    let mut in_parens = false;
    let mut skip_until: Option<char> = None;
    for c in text.chars() {
        if let Some(end) = skip_until {
            if c == end {
                skip_until = None;
            }
            continue;
        }
        match c {
            '(' => in_parens = true,
            ')' => in_parens = false,
            '[' if !in_parens => {
                skip_until = Some(']');
                continue;
            }
            '<' if !in_parens => {
                skip_until = Some('>');
                continue;
            }
            _ => {}
        }
        clean.push(c);
    }
    let clean = clean.trim();
    let (head, constraint) = match clean.split_once('(') {
        Some((head, rest)) => {
            let inner = rest
                .strip_suffix(')')
                .ok_or_else(|| format!("unclosed `(` in {text:?}"))?
                .trim();
            let op_len = inner
                .find(|c: char| !matches!(c, '<' | '>' | '='))
                .unwrap_or(inner.len());
            let op = Op::parse(&inner[..op_len])
                .ok_or_else(|| format!("unknown version operator in {text:?}"))?;
            let version = inner[op_len..].trim();
            if version.is_empty() {
                return Err(format!("missing version in {text:?}"));
            }
            (head.trim(), Some((op, Version::new(version))))
        }
        None => (clean, None),
    };
    if head.is_empty() || head.contains(char::is_whitespace) {
        return Err(format!("invalid package name in {text:?}"));
    }
    let (name, arch) = match head.split_once(':') {
        Some((n, a)) => (n.to_string(), Some(a.to_string())),
        None => (head.to_string(), None),
    };
    Ok(Relation {
        name,
        arch,
        constraint,
    })
}

/// The text fields of a [`PackageEntry`], in storage order.
#[derive(Clone, Copy)]
enum Field {
    Name,
    Version,
    Architecture,
    MultiArch,
    Depends,
    PreDepends,
    Provides,
    Filename,
    Priority,
    Source,
}

const FIELDS: usize = 10;

/// One binary package of a `Packages` index: only the fields kiln uses, packed into one string
/// (a full bookworm index holds 63 000 of these, so each costs one allocation, not ten).
/// Relation fields are kept as text and parsed when resolving.
#[derive(Clone, PartialEq, Eq)]
pub struct PackageEntry {
    text: Box<str>,
    /// End offset of each field in `text`.
    ends: [u32; FIELDS],
    size: u64,
    /// `Installed-Size` (KiB), when the index declares it.
    installed_size: Option<u64>,
    sha256: [u8; 32],
    essential: bool,
}

impl fmt::Debug for PackageEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PackageEntry({} {})", self.name(), self.version_str())
    }
}

impl PackageEntry {
    /// Build an entry from a stanza; `Err` names the missing or malformed field.
    pub fn from_stanza(stanza: &Stanza) -> Result<PackageEntry, String> {
        let need = |f: &str| stanza.get(f).ok_or_else(|| format!("missing field {f}"));
        let name = need("Package")?;
        let size = need("Size")?
            .parse()
            .map_err(|_| format!("package {name}: Size is not a number"))?;
        let installed_size = match stanza.get("Installed-Size") {
            Some(v) => Some(
                v.trim()
                    .parse()
                    .map_err(|_| format!("package {name}: Installed-Size is not a number"))?,
            ),
            None => None,
        };
        let mut sha256 = [0u8; 32];
        hex::decode_to_slice(need("SHA256")?, &mut sha256)
            .map_err(|_| format!("package {name}: SHA256 is not 64 hex digits"))?;
        let values: [&str; FIELDS] = [
            name,
            need("Version")?,
            need("Architecture")?,
            stanza.get("Multi-Arch").unwrap_or(""),
            stanza.get("Depends").unwrap_or(""),
            stanza.get("Pre-Depends").unwrap_or(""),
            stanza.get("Provides").unwrap_or(""),
            need("Filename")?,
            stanza.get("Priority").unwrap_or(""),
            stanza.get("Source").unwrap_or(""),
        ];
        let mut text = String::with_capacity(values.iter().map(|v| v.len()).sum());
        let mut ends = [0u32; FIELDS];
        for (i, v) in values.iter().enumerate() {
            text.push_str(v);
            ends[i] = u32::try_from(text.len())
                .map_err(|_| format!("package {name}: fields too long"))?;
        }
        Ok(PackageEntry {
            text: text.into_boxed_str(),
            ends,
            size,
            installed_size,
            sha256,
            essential: stanza
                .get("Essential")
                .is_some_and(|v| v.eq_ignore_ascii_case("yes")),
        })
    }

    fn field(&self, f: Field) -> &str {
        let i = f as usize;
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.text[start..self.ends[i] as usize]
    }

    fn optional(&self, f: Field) -> Option<&str> {
        Some(self.field(f)).filter(|v| !v.is_empty())
    }

    pub fn name(&self) -> &str {
        self.field(Field::Name)
    }

    pub fn version(&self) -> Version {
        Version::new(self.version_str())
    }

    pub fn version_str(&self) -> &str {
        self.field(Field::Version)
    }

    pub fn architecture(&self) -> &str {
        self.field(Field::Architecture)
    }

    pub fn multi_arch(&self) -> Option<&str> {
        self.optional(Field::MultiArch)
    }

    pub fn depends(&self) -> &str {
        self.field(Field::Depends)
    }

    pub fn pre_depends(&self) -> &str {
        self.field(Field::PreDepends)
    }

    pub fn provides(&self) -> &str {
        self.field(Field::Provides)
    }

    /// Path of the .deb relative to the mirror root (`pool/main/…`).
    pub fn filename(&self) -> &str {
        self.field(Field::Filename)
    }

    pub fn priority(&self) -> Option<&str> {
        self.optional(Field::Priority)
    }

    /// `Source`: the source package, with its version in parentheses when it differs from the
    /// binary's (`linux-signed-amd64 (6.1.158+1)`); absent when it has the binary's name.
    pub fn source(&self) -> Option<&str> {
        self.optional(Field::Source)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// `Installed-Size` in KiB (what the unpacked package takes, as its maker declared it).
    pub fn installed_size(&self) -> Option<u64> {
        self.installed_size
    }

    /// SHA256 of the .deb.
    pub fn sha256(&self) -> &[u8; 32] {
        &self.sha256
    }

    pub fn essential(&self) -> bool {
        self.essential
    }

    /// `Pre-Depends` then `Depends`, parsed.
    pub fn dependencies(&self) -> Result<Vec<Alternatives>, String> {
        let mut all = parse_relations(self.pre_depends())?;
        all.extend(parse_relations(self.depends())?);
        Ok(all)
    }
}

/// A `Packages` index: every package of one suite/component/architecture, with lookups by name
/// and by provided (virtual) name.
#[derive(Clone, Debug, Default)]
pub struct Index {
    packages: Vec<PackageEntry>,
    by_name: BTreeMap<String, Vec<usize>>,
    /// Virtual name → (provider index, provided version if versioned).
    provides: BTreeMap<String, Vec<(usize, Option<Version>)>>,
}

impl Index {
    pub fn new() -> Self {
        Self::default()
    }

    /// Read a whole `Packages` stream. Errors carry the line number.
    pub fn read(reader: impl BufRead) -> Result<Index, StanzaError> {
        let mut index = Index::new();
        index.read_into(reader)?;
        Ok(index)
    }

    /// Add every package of a `Packages` stream (e.g. another component) to this index.
    pub fn read_into(&mut self, reader: impl BufRead) -> Result<(), StanzaError> {
        let index = self;
        let mut stanzas = StanzaReader::new(reader);
        while let Some(stanza) = stanzas.next_stanza()? {
            let line = stanzas.line_no;
            let entry = PackageEntry::from_stanza(&stanza)
                .map_err(|reason| SyntaxError { line, reason })?;
            index
                .add(entry)
                .map_err(|reason| SyntaxError { line, reason })?;
        }
        Ok(())
    }

    /// Parse a `Packages` text (tests and small indices).
    pub fn parse(text: &str) -> Result<Index, StanzaError> {
        Self::read(text.as_bytes())
    }

    /// Add a package (a later index, e.g. another component, adds to the same lookups).
    pub fn add(&mut self, entry: PackageEntry) -> Result<(), String> {
        let id = self.packages.len();
        for group in parse_relations(entry.provides())
            .map_err(|e| format!("package {}: Provides: {e}", entry.name()))?
        {
            for rel in group {
                let version = match rel.constraint {
                    Some((Op::Eq, v)) => Some(v),
                    _ => None,
                };
                self.provides
                    .entry(rel.name)
                    .or_default()
                    .push((id, version));
            }
        }
        self.by_name
            .entry(entry.name().to_string())
            .or_default()
            .push(id);
        self.packages.push(entry);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.packages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.packages.is_empty()
    }

    pub fn get(&self, id: usize) -> &PackageEntry {
        &self.packages[id]
    }

    /// Every version of a real package, in index order.
    pub fn versions_of(&self, name: &str) -> impl Iterator<Item = (usize, &PackageEntry)> {
        self.by_name
            .get(name)
            .into_iter()
            .flatten()
            .map(|&id| (id, &self.packages[id]))
    }

    /// The packages that provide `name`, with the version they provide (if versioned).
    pub fn providers_of(&self, name: &str) -> &[(usize, Option<Version>)] {
        self.provides.get(name).map(Vec::as_slice).unwrap_or(&[])
    }

    /// All package names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    /// Names of the packages marked `Essential: yes`, sorted.
    pub fn essential(&self) -> Vec<&str> {
        self.by_name
            .iter()
            .filter(|(_, ids)| ids.iter().any(|&i| self.packages[i].essential()))
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// Names of the packages with a given `Priority` (e.g. `required`), sorted.
    pub fn with_priority(&self, priority: &str) -> Vec<&str> {
        self.by_name
            .iter()
            .filter(|(_, ids)| {
                ids.iter()
                    .any(|&i| self.packages[i].priority() == Some(priority))
            })
            .map(|(n, _)| n.as_str())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stanzas_with_continuations_and_comments() {
        let text = "# comment\nPackage: a\nDescription: short\n long line\n .\n more\n\n\n\
                    Package: b\nVersion: 1\n";
        let s = parse_stanzas(text).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].get("package"), Some("a"));
        assert_eq!(s[0].get("Description"), Some("short\nlong line\n\nmore"));
        assert_eq!(s[1].get("Version"), Some("1"));
        let err = parse_stanzas("Package: a\nbogus line\n").unwrap_err();
        assert_eq!(err.line, 2);
        assert!(parse_stanzas(" cont\n").is_err());
    }

    #[test]
    fn relations() {
        let r = parse_relations(
            "libc6 (>= 2.34), foo:any | bar (<< 2:1.0~rc1) [amd64], python3:native, \
             baz (=1.0) <!nocheck>",
        )
        .unwrap();
        assert_eq!(r.len(), 4);
        assert_eq!(r[0][0].name, "libc6");
        assert_eq!(r[0][0].constraint.as_ref().unwrap().0, Op::Ge);
        assert_eq!(r[0][0].constraint.as_ref().unwrap().1.as_str(), "2.34");
        assert_eq!(r[1].len(), 2);
        assert_eq!(r[1][0].arch.as_deref(), Some("any"));
        assert_eq!(r[1][1].to_string(), "bar (<< 2:1.0~rc1)");
        assert_eq!(r[2][0].arch.as_deref(), Some("native"));
        assert_eq!(r[3][0].to_string(), "baz (= 1.0)");
        assert!(parse_relations("a (>= 1").is_err());
        assert!(parse_relations("a (~ 1)").is_err());
        assert!(parse_relations("a b").is_err());
        assert_eq!(parse_relations("").unwrap().len(), 0);
    }

    #[test]
    fn index_lookups() {
        let text = "Package: mawk\nVersion: 1.3.4\nArchitecture: amd64\nProvides: awk\n\
                    Filename: pool/m/mawk.deb\nSize: 10\nInstalled-Size: 263\nSHA256: {h}\n\
                    Priority: required\n\n\
                    Package: dash\nVersion: 0.5\nArchitecture: amd64\nEssential: yes\n\
                    Provides: sh (= 1.0)\nFilename: pool/d/dash.deb\nSize: 20\nSHA256: {h}\n";
        let text = text.replace("{h}", &"ab".repeat(32));
        let index = Index::parse(&text).unwrap();
        assert_eq!(index.len(), 2);
        assert_eq!(index.essential(), vec!["dash"]);
        assert_eq!(index.with_priority("required"), vec!["mawk"]);
        assert_eq!(index.providers_of("awk").len(), 1);
        assert_eq!(
            index.providers_of("sh")[0].1.as_ref().map(Version::as_str),
            Some("1.0")
        );
        let sizes: Vec<Option<u64>> = (0..2).map(|i| index.get(i).installed_size()).collect();
        assert_eq!(sizes, [Some(263), None]);
        let bad = text.replace("Installed-Size: 263", "Installed-Size: lots");
        let err = Index::parse(&bad).unwrap_err();
        assert!(err.to_string().contains("Installed-Size"), "{err}");
        let missing = Index::parse("Package: x\nVersion: 1\n").unwrap_err();
        assert!(missing.to_string().contains("missing field"), "{missing}");
    }
}
