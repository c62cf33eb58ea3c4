//! A NATS client in a few lines of the text protocol, with no kiln code and no client library:
//! the independent reader tests use to ask the server itself (JetStream API requests such as
//! `$JS.API.STREAM.INFO.KILN` or `$JS.API.STREAM.MSG.GET.KILN`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub struct RawNats {
    sock: TcpStream,
    reader: BufReader<TcpStream>,
    next_sid: u64,
}

impl RawNats {
    /// Connect to the server on loopback `port` (no auth).
    pub fn connect(port: u16) -> RawNats {
        let sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut reader = BufReader::new(sock.try_clone().unwrap());
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.starts_with("INFO "), "{line}");
        let mut raw = RawNats {
            sock,
            reader,
            next_sid: 1,
        };
        raw.send(b"CONNECT {\"verbose\":false,\"pedantic\":true,\"name\":\"raw-test\"}\r\n");
        raw
    }

    /// Send protocol bytes as they are (`SUB …\r\n`).
    pub fn send(&mut self, bytes: &[u8]) {
        self.sock.write_all(bytes).unwrap();
    }

    /// Publish `payload` on `subject` asking for replies on `reply`.
    pub fn publish_with_reply(&mut self, subject: &str, reply: &str, payload: &[u8]) {
        self.send(format!("PUB {subject} {reply} {}\r\n", payload.len()).as_bytes());
        self.send(payload);
        self.send(b"\r\n");
    }

    /// The next message (subject, payload), answering PINGs; `None` when nothing came within the
    /// read timeout (5 s).
    pub fn next(&mut self) -> Option<(String, Vec<u8>)> {
        let mut line = String::new();
        loop {
            line.clear();
            match self.reader.read_line(&mut line) {
                Ok(0) => panic!("server closed the connection"),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return None;
                }
                Err(e) => panic!("{e}"),
            }
            assert!(!line.starts_with("-ERR"), "{line}");
            if line.starts_with("PING") {
                self.send(b"PONG\r\n");
                continue;
            }
            if let Some(rest) = line.strip_prefix("MSG ") {
                let parts: Vec<&str> = rest.split_whitespace().collect();
                let len: usize = parts.last().unwrap().parse().unwrap();
                let mut payload = vec![0u8; len + 2];
                self.reader.read_exact(&mut payload).unwrap();
                payload.truncate(len);
                return Some((parts[0].to_string(), payload));
            }
        }
    }

    /// Publish `payload` on `subject` and return the payload of the one reply.
    pub fn request(&mut self, subject: &str, payload: &[u8]) -> Vec<u8> {
        let sid = self.next_sid;
        self.next_sid += 1;
        let inbox = format!("_INBOX.raw.{sid}");
        self.send(format!("SUB {inbox} {sid}\r\nUNSUB {sid} 1\r\n").as_bytes());
        self.publish_with_reply(subject, &inbox, payload);
        loop {
            match self.next() {
                Some((s, reply)) if s == inbox => return reply,
                Some(_) => continue,
                None => panic!("no reply to {subject} within the read timeout"),
            }
        }
    }

    /// A JetStream API request with a JSON answer.
    pub fn api(&mut self, subject: &str, body: &serde_json::Value) -> serde_json::Value {
        let reply = self.request(subject, body.to_string().as_bytes());
        serde_json::from_slice(&reply).unwrap()
    }

    /// The last sequence of `stream` (0 when empty).
    pub fn last_sequence(&mut self, stream: &str) -> u64 {
        let info = self.api(
            &format!("$JS.API.STREAM.INFO.{stream}"),
            &serde_json::json!({}),
        );
        info["state"]["last_seq"].as_u64().unwrap_or(0)
    }

    /// Every message stored in `stream` after sequence `after`: (subject, payload size in bytes),
    /// as the server answers `STREAM.MSG.GET`.
    pub fn messages_after(&mut self, stream: &str, after: u64) -> Vec<(String, usize)> {
        let last = self.last_sequence(stream);
        let mut out = Vec::new();
        for seq in after + 1..=last {
            let got = self.api(
                &format!("$JS.API.STREAM.MSG.GET.{stream}"),
                &serde_json::json!({ "seq": seq }),
            );
            let Some(m) = got.get("message") else {
                continue; // deleted
            };
            let data = m["data"].as_str().unwrap_or("");
            let padding = data.bytes().rev().take_while(|b| *b == b'=').count();
            let size = data.len() / 4 * 3 - padding;
            out.push((m["subject"].as_str().unwrap().to_string(), size));
        }
        out
    }
}
