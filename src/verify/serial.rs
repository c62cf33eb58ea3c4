//! Reading the serial console: bytes in, lines out. Splits the stream into lines (CR and terminal
//! escapes removed), remembers the last lines for error messages, and says when the first kernel
//! line, the expected marker or a kernel panic goes by.

use std::collections::VecDeque;

/// Lines kept for error messages.
pub const TAIL_LINES: usize = 40;

/// The kernel's first console line starts with its banner.
pub const KERNEL_BANNER: &str = "Linux version ";

/// A panicking kernel prints this.
pub const PANIC_TEXT: &str = "Kernel panic - not syncing";

/// The kernel's line about UEFI Secure Boot starts here (`secureboot: Secure boot enabled`);
/// kiln's busybox init repeats it on a quiet console.
pub const SECURE_BOOT_TEXT: &str = "secureboot: ";

/// What the kernel prints when a block read through dm-verity does not match its hash tree
/// (`device-mapper: verity: 254:0: data block 7 is corrupted`).
const VERITY_TEXT: &str = "device-mapper: verity: ";

/// What kiln's initramfs says when it mounts the root through dm-verity; the root hash follows.
const VERITY_ROOT_TEXT: &str = "through dm-verity (";

/// What UEFI firmware and systemd-boot print when a signature check refuses an image (EFI status
/// texts, compared ignoring case).
const REFUSED_TEXTS: [&str; 2] = ["access denied", "security violation"];

/// Something the watcher noticed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The first byte of output.
    FirstOutput,
    /// The first complete line.
    FirstLine,
    /// The kernel's banner line.
    Kernel,
    /// A line containing the expected marker.
    Marker(String),
    /// A kernel panic line.
    Panic(String),
    /// The kernel's Secure Boot state (`Secure boot enabled`, `disabled`, …).
    SecureBoot(String),
    /// The firmware or boot loader refused to start an image (a signature check failed).
    Refused(String),
    /// dm-verity found a block that does not match the root hash.
    Corrupted(String),
    /// The root is mounted through dm-verity with this root hash (hex).
    VerityRoot(String),
}

/// Splits serial output into lines and watches them.
pub struct SerialWatcher {
    marker: String,
    partial: Vec<u8>,
    tail: VecDeque<String>,
    seen_output: bool,
    seen_line: bool,
    seen_kernel: bool,
    seen_marker: bool,
}

impl SerialWatcher {
    /// Watch for `marker` (a substring of one line).
    pub fn new(marker: &str) -> SerialWatcher {
        SerialWatcher {
            marker: marker.to_string(),
            partial: Vec::new(),
            tail: VecDeque::with_capacity(TAIL_LINES + 1),
            seen_output: false,
            seen_line: false,
            seen_kernel: false,
            seen_marker: false,
        }
    }

    /// Feed bytes as they arrive; returns what they revealed, in order. The marker is also found
    /// in a line that has not ended yet (a guest may print it and power off without a newline).
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Event> {
        let mut events = Vec::new();
        if !bytes.is_empty() && !self.seen_output {
            self.seen_output = true;
            events.push(Event::FirstOutput);
        }
        for &b in bytes {
            if b == b'\n' {
                let line = clean_line(&self.partial);
                self.partial.clear();
                self.line(line, &mut events);
            } else {
                self.partial.push(b);
                // A runaway line (binary noise) is split rather than held without bound.
                if self.partial.len() >= 64 * 1024 {
                    let line = clean_line(&self.partial);
                    self.partial.clear();
                    self.line(line, &mut events);
                }
            }
        }
        if !self.seen_marker && !self.partial.is_empty() {
            let partial = clean_line(&self.partial);
            if partial.contains(&self.marker) {
                self.seen_marker = true;
                events.push(Event::Marker(partial));
            }
        }
        events
    }

    /// End of stream: the unfinished line counts as a line.
    pub fn finish(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        if !self.partial.is_empty() {
            let line = clean_line(&self.partial);
            self.partial.clear();
            self.line(line, &mut events);
        }
        events
    }

    fn line(&mut self, line: String, events: &mut Vec<Event>) {
        if !self.seen_line {
            self.seen_line = true;
            events.push(Event::FirstLine);
        }
        if !self.seen_kernel && line.contains(KERNEL_BANNER) {
            self.seen_kernel = true;
            events.push(Event::Kernel);
        }
        if !self.seen_marker && line.contains(&self.marker) {
            self.seen_marker = true;
            events.push(Event::Marker(line.clone()));
        }
        if line.contains(PANIC_TEXT) {
            events.push(Event::Panic(line.clone()));
        }
        if let Some(at) = line.find(SECURE_BOOT_TEXT) {
            let state = line[at + SECURE_BOOT_TEXT.len()..].trim().to_string();
            events.push(Event::SecureBoot(state));
        }
        if line.contains(VERITY_ROOT_TEXT)
            && let Some((_, rest)) = line.split_once("root hash ")
        {
            let hash: String = rest.chars().take_while(char::is_ascii_hexdigit).collect();
            events.push(Event::VerityRoot(hash));
        }
        if line.contains(VERITY_TEXT) && line.contains("corrupted") {
            events.push(Event::Corrupted(line.clone()));
        }
        let lower = line.to_ascii_lowercase();
        if REFUSED_TEXTS.iter().any(|t| lower.contains(t)) {
            events.push(Event::Refused(line.clone()));
        }
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(line);
    }

    /// The last lines (at most [`TAIL_LINES`]), the unfinished one included, joined by newlines.
    pub fn tail(&self) -> String {
        let mut lines: Vec<&str> = self.tail.iter().map(String::as_str).collect();
        let partial = clean_line(&self.partial);
        if !partial.is_empty() {
            if lines.len() == TAIL_LINES {
                lines.remove(0);
            }
            lines.push(&partial);
            return lines.join("\n");
        }
        lines.join("\n")
    }
}

/// A whole console log as plain text for people: one line per line the guest printed, each as
/// [`clean_line`] leaves it (no carriage returns, no terminal escapes), empty lines kept.
pub fn console_text(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for line in bytes.split(|b| *b == b'\n') {
        out.push_str(&clean_line(line));
        out.push('\n');
    }
    out.pop();
    out
}

/// A line as text: invalid UTF-8 replaced, ANSI escape sequences (firmware screen control) and
/// other control characters except tab removed.
fn clean_line(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte; other escapes: ESC and one character.
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if ('\u{40}'..='\u{7e}').contains(&c) {
                        break;
                    }
                }
            } else {
                chars.next();
            }
        } else if c == '\t' || !c.is_control() {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_markers_and_panics() {
        let mut w = SerialWatcher::new("READY");
        assert_eq!(
            console_text(b"\x1b[2J\x1b[01;01Hfirmware\r\n\r\nLinux \x1b]0;t\x07x\x1b[0m\n"),
            "firmware\n\nLinux 0;tx\n"
        );
        let ev = w.feed(b"\x1b[2J\x1b[01;01Hfirmware\r\n[    0.0] Linux version 6.1\r\npart");
        assert_eq!(
            ev,
            vec![Event::FirstOutput, Event::FirstLine, Event::Kernel]
        );
        let ev = w.feed(b"ial\r\nRE");
        assert!(ev.is_empty());
        let ev = w.feed(b"ADY now");
        assert_eq!(ev, vec![Event::Marker("READY now".into())]);
        // Found once, even when the line ends later.
        assert!(w.feed(b"\r\n").is_empty());
        let ev = w.feed(b"Kernel panic - not syncing: oops\n");
        assert_eq!(
            ev,
            vec![Event::Panic("Kernel panic - not syncing: oops".into())]
        );
        assert_eq!(
            w.tail(),
            "firmware\n[    0.0] Linux version 6.1\npartial\nREADY now\nKernel panic - not syncing: oops"
        );
    }

    #[test]
    fn secure_boot_state_and_refusals() {
        let mut w = SerialWatcher::new("READY");
        let ev = w.feed(
            b"BdsDxe: failed to load Boot0001 \"UEFI Misc Device\" from PciRoot(0x0): Access Denied\n\
              kiln: secureboot: Secure boot enabled\n",
        );
        assert_eq!(
            ev[2..],
            [
                Event::Refused(
                    "BdsDxe: failed to load Boot0001 \"UEFI Misc Device\" from PciRoot(0x0): Access Denied"
                        .into()
                ),
                Event::SecureBoot("Secure boot enabled".into())
            ]
        );
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let mut w = SerialWatcher::new("never");
        for i in 0..100 {
            w.feed(format!("line {i}\n").as_bytes());
        }
        w.feed(b"unfinished");
        let tail = w.tail();
        let lines: Vec<&str> = tail.lines().collect();
        assert_eq!(lines.len(), TAIL_LINES);
        assert_eq!(lines[0], "line 61");
        assert_eq!(lines[TAIL_LINES - 1], "unfinished");
        assert_eq!(w.finish(), vec![]);
    }
}
