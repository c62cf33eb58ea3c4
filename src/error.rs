//! Error chains. An error says what failed and where; its cause is its `source()`, never part of
//! its own message. This module walks a chain once, the same way for the command line's printer,
//! the bus's error messages and log lines.

use std::error::Error;
use std::fmt;

/// An error's message and those of its causes, each said once: a cause whose text a message
/// before it already shows (a wrapper that repeats its cause, as reqwest's and async-nats's
/// errors do, or an empty message) is left out.
pub fn chain(e: &dyn Error) -> Vec<String> {
    let mut out: Vec<String> = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !text.is_empty() && !out.iter().any(|shown| shown.contains(&text)) {
            out.push(text);
        }
        source = s.source();
    }
    out
}

/// An error and its causes on one line, `what: cause: cause` (for log lines and messages that
/// must stay one line).
pub struct Chain<'a>(pub &'a (dyn Error + 'a));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&chain(self.0).join(": "))
    }
}

/// [`Chain`] as a `String`.
pub fn chain_text(e: &dyn Error) -> String {
    chain(e).join(": ")
}

/// Whether an error or one of its causes is a file system that is full, over quota or
/// read-only (ENOSPC, EDQUOT, EROFS): an operational error that a retry cannot mend.
pub fn is_no_space(e: &(dyn Error + 'static)) -> bool {
    let mut next: Option<&(dyn Error + 'static)> = Some(e);
    while let Some(err) = next {
        // A wrapped error (tempfile's "… at path …") keeps the kind, not the OS error number.
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && (matches!(
                io.raw_os_error(),
                Some(libc::ENOSPC | libc::EDQUOT | libc::EROFS)
            ) || matches!(
                io.kind(),
                std::io::ErrorKind::StorageFull
                    | std::io::ErrorKind::QuotaExceeded
                    | std::io::ErrorKind::ReadOnlyFilesystem
            ))
        {
            return true;
        }
        next = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("reading {path}")]
    struct Outer {
        path: &'static str,
        #[source]
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("building: {0}")]
    struct Repeats(#[source] Outer);

    #[test]
    fn every_cause_is_said_once() {
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = Outer {
            path: "/x",
            source: io(),
        };
        assert_eq!(chain(&e), ["reading /x", "no such file"]);
        assert_eq!(Chain(&e).to_string(), "reading /x: no such file");
        // A wrapper that still prints its cause: the cause is not repeated.
        let e = Repeats(Outer {
            path: "/x",
            source: io(),
        });
        assert_eq!(chain(&e), ["building: reading /x", "no such file"]);
    }

    #[test]
    fn a_full_disk_is_found_among_the_causes() {
        let full = Outer {
            path: "/x",
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        };
        assert!(is_no_space(&Repeats(full)));
        let wrapped = Outer {
            path: "/x",
            source: std::io::Error::new(std::io::ErrorKind::StorageFull, "at path /x/.tmp"),
        };
        assert!(is_no_space(&wrapped));
        let missing = Outer {
            path: "/x",
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        };
        assert!(!is_no_space(&missing));
    }
}
