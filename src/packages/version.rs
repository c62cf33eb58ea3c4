//! Debian version numbers (`[epoch:]upstream[-revision]`) and their ordering, as dpkg defines it
//! (deb-version(7)): epochs compare numerically; upstream and revision compare by alternating
//! non-digit runs (letters before other characters, `~` before everything, even the end) and
//! digit runs (numerically).

use std::cmp::Ordering;
use std::fmt;

/// A parsed Debian version. Ordering and equality follow dpkg, so spellings that dpkg considers
/// equal are equal here (`1.0`, `0:1.0` and `1.0-0`).
#[derive(Clone)]
pub struct Version {
    text: String,
    epoch: u64,
    upstream_start: usize,
    upstream_end: usize,
}

impl Version {
    /// Parse a version. Lenient like dpkg's comparison (which never fails): a non-numeric epoch
    /// is treated as 0 and kept in the text.
    pub fn new(text: &str) -> Version {
        let text = text.trim().to_string();
        let (epoch, upstream_start) = match text.split_once(':') {
            Some((e, _)) if !e.is_empty() && e.bytes().all(|b| b.is_ascii_digit()) => {
                (e.parse().unwrap_or(0), e.len() + 1)
            }
            _ => (0, 0),
        };
        let upstream_end = match text[upstream_start..].rfind('-') {
            Some(i) => upstream_start + i,
            None => text.len(),
        };
        Version {
            text,
            epoch,
            upstream_start,
            upstream_end,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn upstream(&self) -> &str {
        &self.text[self.upstream_start..self.upstream_end]
    }

    /// The Debian revision (empty when there is none).
    pub fn revision(&self) -> &str {
        self.text.get(self.upstream_end + 1..).unwrap_or("")
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Version({:?})", self.text)
    }
}

impl PartialEq for Version {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Version {}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        self.epoch
            .cmp(&other.epoch)
            .then_with(|| compare_part(self.upstream(), other.upstream()))
            .then_with(|| compare_part(self.revision(), other.revision()))
    }
}

/// Compare two version strings as `dpkg --compare-versions` does.
pub fn compare(a: &str, b: &str) -> Ordering {
    Version::new(a).cmp(&Version::new(b))
}

/// The sort weight of one non-digit character (0 stands for "end of string").
fn weight(c: Option<u8>) -> i32 {
    match c {
        None => 0,
        Some(b'~') => -1,
        Some(c) if c.is_ascii_digit() => 0,
        Some(c) if c.is_ascii_alphabetic() => c as i32,
        Some(c) => c as i32 + 256,
    }
}

/// dpkg's `verrevcmp` on one part (upstream or revision).
fn compare_part(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        // Non-digit run, character by character.
        while (i < a.len() && !a[i].is_ascii_digit()) || (j < b.len() && !b[j].is_ascii_digit()) {
            let wa = weight(a.get(i).copied());
            let wb = weight(b.get(j).copied());
            if wa != wb {
                return wa.cmp(&wb);
            }
            i += 1;
            j += 1;
        }
        // Digit run, numerically: skip leading zeros, then the longer run wins, else the first
        // differing digit.
        while i < a.len() && a[i] == b'0' {
            i += 1;
        }
        while j < b.len() && b[j] == b'0' {
            j += 1;
        }
        let mut first_diff = Ordering::Equal;
        while i < a.len() && a[i].is_ascii_digit() && j < b.len() && b[j].is_ascii_digit() {
            if first_diff == Ordering::Equal {
                first_diff = a[i].cmp(&b[j]);
            }
            i += 1;
            j += 1;
        }
        if i < a.len() && a[i].is_ascii_digit() {
            return Ordering::Greater;
        }
        if j < b.len() && b[j].is_ascii_digit() {
            return Ordering::Less;
        }
        if first_diff != Ordering::Equal {
            return first_diff;
        }
    }
    Ordering::Equal
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (a, b, expected ordering of a against b), checked against dpkg when it is installed.
    pub(crate) const PAIRS: &[(&str, &str, Ordering)] = &[
        ("1.0", "1.0", Ordering::Equal),
        ("1.0", "1.1", Ordering::Less),
        ("1.1", "1.0", Ordering::Greater),
        ("1.0", "1.0-0", Ordering::Equal),
        ("1.0-1", "1.0-2", Ordering::Less),
        ("1.0-10", "1.0-9", Ordering::Greater),
        ("1:1.0", "2.0", Ordering::Greater),
        ("0:1.0", "1.0", Ordering::Equal),
        ("1:0.1", "0:9.9", Ordering::Greater),
        ("1.0~rc1", "1.0", Ordering::Less),
        ("1.0~rc1", "1.0~rc2", Ordering::Less),
        ("1.0~~", "1.0~", Ordering::Less),
        ("1.0~", "1.0", Ordering::Less),
        ("1.0~~a", "1.0~", Ordering::Less),
        ("1.0", "1.0+1", Ordering::Less),
        ("1.0+1", "1.0.1", Ordering::Less),
        ("1.0a", "1.0+", Ordering::Less),
        ("1.0a", "1.0", Ordering::Greater),
        ("1.0.a", "1.0a", Ordering::Greater),
        ("1.01", "1.1", Ordering::Equal),
        ("1.001", "1.1", Ordering::Equal),
        ("1.10", "1.9", Ordering::Greater),
        ("10", "9", Ordering::Greater),
        ("1.2.3", "1.2.3.0", Ordering::Less),
        ("1.2.3-1", "1.2.3-1.1", Ordering::Less),
        ("1.2.3-1ubuntu1", "1.2.3-1", Ordering::Greater),
        ("1.2.3-1+deb12u1", "1.2.3-1", Ordering::Greater),
        ("1.2.3-1+deb12u1", "1.2.3-2", Ordering::Less),
        ("1.2.3-1~bpo12+1", "1.2.3-1", Ordering::Less),
        ("2.36.1-8+deb12u1", "2.36.1-8", Ordering::Greater),
        ("6.1.0-37", "6.1.0-9", Ordering::Greater),
        ("6.1.158-1", "6.1.129-1", Ordering::Greater),
        ("1:2.0", "1:2.0-1", Ordering::Less),
        ("1a", "1b", Ordering::Less),
        ("1A", "1a", Ordering::Less),
        ("1Z", "1a", Ordering::Less),
        ("1a", "1+", Ordering::Less),
        ("1+", "1.", Ordering::Less),
        ("1.0-a", "1.0-A", Ordering::Greater),
        ("252.39-1~deb12u1", "252.38-1~deb12u1", Ordering::Greater),
        (
            "1:9.18.33-1~deb12u2",
            "1:9.18.33-1~deb12u1",
            Ordering::Greater,
        ),
        ("0.0.0", "0", Ordering::Greater),
        ("0", "00", Ordering::Equal),
        ("1.0-1-1", "1.0-1", Ordering::Greater),
        ("1.0-1-1", "1.0-1-2", Ordering::Less),
        ("2:1", "10:0", Ordering::Less),
        ("1.0~beta", "1.0~alpha", Ordering::Greater),
        ("1.36.1-3", "1.35.0-4+b3", Ordering::Greater),
        ("3.0.11-1~deb12u2", "3.0.11-1", Ordering::Less),
        ("1.0+dfsg", "1.0", Ordering::Greater),
        ("1.0+dfsg-1", "1.0-1", Ordering::Greater),
        ("2.0~", "1.9999", Ordering::Greater),
    ];

    #[test]
    fn table_matches_expected() {
        for (a, b, want) in PAIRS {
            assert_eq!(compare(a, b), *want, "{a} vs {b}");
            assert_eq!(compare(b, a), want.reverse(), "{b} vs {a}");
        }
    }

    #[test]
    fn table_matches_dpkg() {
        let probe = std::process::Command::new("dpkg").arg("--version").output();
        if !matches!(probe, Ok(ref o) if o.status.success()) {
            eprintln!("dpkg not installed: skipping the cross-check");
            return;
        }
        for (a, b, _) in PAIRS {
            for (op, want) in [
                ("lt", Ordering::Less),
                ("eq", Ordering::Equal),
                ("gt", Ordering::Greater),
            ] {
                let status = std::process::Command::new("dpkg")
                    .args(["--compare-versions", a, op, b])
                    .status()
                    .unwrap();
                assert_eq!(
                    status.success(),
                    compare(a, b) == want,
                    "dpkg --compare-versions {a} {op} {b}"
                );
            }
        }
    }

    #[test]
    fn parts() {
        let v = Version::new("1:2.3-4-5");
        assert_eq!((v.epoch(), v.upstream(), v.revision()), (1, "2.3-4", "5"));
        let v = Version::new("2.3");
        assert_eq!((v.epoch(), v.upstream(), v.revision()), (0, "2.3", ""));
    }
}
