//! What kiln's network clients (the Debian mirror, the OCI registry, git over HTTP, NATS) share
//! about untrusted peers: how long a peer may stay silent ([`stall_timeout`]), how to tell that
//! it did ([`is_stall`]), the one function that takes credentials out of URLs before a URL is
//! logged or put into an error message ([`redact`]), and the one percent-encoder
//! ([`percent_encode`]).

use std::borrow::Cow;
use std::time::Duration;

/// How long a peer may send nothing (no header byte, no body byte) before kiln gives up on it.
/// A slow peer that keeps sending is not cut off; a silent one does not hold a worker forever.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Environment variable overriding [`STALL_TIMEOUT`], in seconds (fractions allowed: `2.5`).
pub const STALL_TIMEOUT_ENV: &str = "KILN_STALL_TIMEOUT";

/// [`STALL_TIMEOUT`], or `KILN_STALL_TIMEOUT` when it is set to a positive number of seconds.
pub fn stall_timeout() -> Duration {
    std::env::var(STALL_TIMEOUT_ENV)
        .ok()
        .and_then(|v| parse_seconds(&v))
        .unwrap_or(STALL_TIMEOUT)
}

/// `"2"`, `"2.5"` → a duration; anything else (empty, negative, zero, not a number) → `None`.
fn parse_seconds(text: &str) -> Option<Duration> {
    let secs: f64 = text.trim().parse().ok()?;
    (secs.is_finite() && secs > 0.0 && secs < 1e9).then(|| Duration::from_secs_f64(secs))
}

/// True when `e` (or an error it wraps) is a timeout: the peer stalled. reqwest's blocking
/// client reports a read that waited longer than its timeout as an `io::Error` wrapping a
/// timed-out `reqwest::Error`.
pub fn is_stall(e: &(dyn std::error::Error + 'static)) -> bool {
    if let Some(r) = e.downcast_ref::<reqwest::Error>()
        && r.is_timeout()
    {
        return true;
    }
    if let Some(io) = e.downcast_ref::<std::io::Error>() {
        if io.kind() == std::io::ErrorKind::TimedOut {
            return true;
        }
        // `io::Error::source` skips the error it wraps; look at that one too.
        if let Some(inner) = io.get_ref()
            && is_stall(inner)
        {
            return true;
        }
    }
    e.source().is_some_and(is_stall)
}

/// Query parameters whose values are secrets (matched case-insensitively as substrings of the
/// name): bearer tokens, presigned-URL signatures and credentials, passwords.
const SECRET_PARAMS: [&str; 7] = [
    "token",
    "signature",
    "sig",
    "credential",
    "password",
    "secret",
    "auth",
];

/// Characters that end a URL inside free text.
fn ends_url(c: char) -> bool {
    c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '`' | ')' | '\\')
}

/// `text` with the credentials of every URL in it replaced by `***`: the user info
/// (`https://user:password@host/` → `https://***@host/`) and the values of query parameters
/// that carry secrets (`?token=…`, `X-Amz-Signature=…`). Works on a bare URL, on a list of
/// URLs (`nats://a:b@h1,nats://h2`) and on any message that quotes URLs. Use it wherever a URL
/// that came from a user, a recipe, a message or a server is logged or put into an error.
pub fn redact(text: &str) -> Cow<'_, str> {
    if !text.contains("://") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        // The authority: up to the path, query, fragment, the next URL of a list, or the end.
        let auth_end = tail
            .find(|c: char| matches!(c, '/' | '?' | '#' | ',') || ends_url(c))
            .unwrap_or(tail.len());
        let authority = &tail[..auth_end];
        match authority.rfind('@') {
            Some(i) => {
                out.push_str("***");
                out.push_str(&authority[i..]);
            }
            None => out.push_str(authority),
        }
        let tail = &tail[auth_end..];
        // The rest of this URL: path, query and fragment, up to a list separator or the end.
        let url_end = tail
            .find(|c: char| c == ',' || ends_url(c))
            .unwrap_or(tail.len());
        out.push_str(&redact_query(&tail[..url_end]));
        rest = &tail[url_end..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// The path, query and fragment of a URL with secret query values replaced by `***`.
fn redact_query(path_and_query: &str) -> Cow<'_, str> {
    let Some((path, query)) = path_and_query.split_once('?') else {
        return Cow::Borrowed(path_and_query);
    };
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query, None),
    };
    let mut changed = false;
    let params: Vec<String> = query
        .split('&')
        .map(|param| match param.split_once('=') {
            Some((name, _)) if is_secret_param(name) => {
                changed = true;
                format!("{name}=***")
            }
            _ => param.to_string(),
        })
        .collect();
    if !changed {
        return Cow::Borrowed(path_and_query);
    }
    let mut out = format!("{path}?{}", params.join("&"));
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    Cow::Owned(out)
}

fn is_secret_param(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_PARAMS.iter().any(|s| name.contains(s))
}

/// Percent-encode everything but RFC 3986's unreserved characters (`A-Z a-z 0-9 - . _ ~`): a URL
/// path segment, a purl component.
pub fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Undo [`percent_encode`] (and `+` of a query string, a space): `%XX` becomes its byte;
/// bytes that are not UTF-8 after decoding are replaced.
pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_undoes_encoding() {
        for text in ["127.0.0.1:5000/app@sha256:ab", "a b/c%", "ü"] {
            assert_eq!(percent_decode(&percent_encode(text)), text);
        }
        assert_eq!(percent_decode("a+b%2"), "a b%2");
        assert_eq!(percent_decode("%zz%41"), "%zzA");
    }

    #[test]
    fn redacts_credentials_in_urls_and_text() {
        for (input, want) in [
            // Nothing to hide.
            (
                "https://deb.debian.org/debian",
                "https://deb.debian.org/debian",
            ),
            ("no url here: user:pass@host", "no url here: user:pass@host"),
            ("http://127.0.0.1:5000/v2/", "http://127.0.0.1:5000/v2/"),
            ("http://[::1]:5000/v2/", "http://[::1]:5000/v2/"),
            // User and password, user only (a token as user name), no path.
            (
                "https://user:s3cret@git.example.org/team/repo.git",
                "https://***@git.example.org/team/repo.git",
            ),
            (
                "https://ghp_abcdef@github.com/o/r",
                "https://***@github.com/o/r",
            ),
            ("nats://kiln:pw@10.0.0.1:4222", "nats://***@10.0.0.1:4222"),
            // A password holding `@` (user info ends at the last `@` of the authority).
            (
                "http://u:p@ss@mirror:8080/debian",
                "http://***@mirror:8080/debian",
            ),
            // URL lists (NATS), several URLs in a message, quoting.
            (
                "nats://a:b@h1:4222,nats://h2:4222,tls://c:d@h3",
                "nats://***@h1:4222,nats://h2:4222,tls://***@h3",
            ),
            (
                "GET \"https://x:y@r.io/v2/\" failed; then (http://p:q@m/debian)",
                "GET \"https://***@r.io/v2/\" failed; then (http://***@m/debian)",
            ),
            // Secrets in the query; harmless parameters stay.
            (
                "https://s3.example/b/k?X-Amz-Credential=AKIA&X-Amz-Signature=abc&x-id=GetObject",
                "https://s3.example/b/k?X-Amz-Credential=***&X-Amz-Signature=***&x-id=GetObject",
            ),
            (
                "https://auth.io/token?service=reg&scope=repo:a:pull&access_token=t0k#f",
                "https://auth.io/token?service=reg&scope=repo:a:pull&access_token=***#f",
            ),
            (
                "http://r:5000/v2/a/blobs/uploads/x?_state=s&digest=sha256:00",
                "http://r:5000/v2/a/blobs/uploads/x?_state=s&digest=sha256:00",
            ),
            // An `@` in the path is not user info.
            ("https://h/a@b", "https://h/a@b"),
        ] {
            assert_eq!(redact(input), want, "{input}");
        }
    }

    #[test]
    fn stall_timeout_parses_seconds() {
        assert_eq!(parse_seconds("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_seconds(" 2.5 "), Some(Duration::from_millis(2500)));
        for bad in ["", "0", "-1", "abc", "inf", "NaN"] {
            assert_eq!(parse_seconds(bad), None, "{bad}");
        }
    }

    #[test]
    fn timeouts_are_stalls() {
        let timed_out = std::io::Error::new(std::io::ErrorKind::TimedOut, "x");
        assert!(is_stall(&timed_out));
        let wrapped = std::io::Error::other(timed_out);
        assert!(is_stall(&wrapped));
        assert!(!is_stall(&std::io::Error::other("reset")));
    }
}
