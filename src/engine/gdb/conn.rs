//! The connection to gdb: a TCP stream that passes gdbstub's bytes through, each reply
//! packet in one write, and that lets the target explain a refusal. gdbstub 0.7 answers
//! a refused request with a bare error code (`Enn`), which gdb cannot explain; where the
//! target left a reason ([`Explain`]), that reply goes out as gdb's text error,
//! `E.kvmpy.<reason>`, which gdb prints ("Remote failure reply: <reason>").

use std::io::Write;
use std::net::TcpStream;
use std::sync::{Arc, Mutex};

use gdbstub::conn::{Connection, ConnectionExt};

use crate::engine::lock;

/// Why the target refused the request being answered, for the error reply.
pub type Explain = Arc<Mutex<Option<String>>>;

pub struct GdbConn {
    stream: TcpStream,
    /// The packet being written, from its `$`.
    packet: Vec<u8>,
    /// Checksum digits still to come, once the packet's `#` is written.
    checksum_left: Option<u8>,
    explain: Explain,
}

impl GdbConn {
    pub fn new(stream: TcpStream, explain: Explain) -> Self {
        GdbConn {
            stream,
            packet: Vec::with_capacity(256),
            checksum_left: None,
            explain,
        }
    }

    /// The packet is complete: out it goes, or its explained replacement.
    fn send_packet(&mut self) -> std::io::Result<()> {
        let reason = lock(&self.explain).take();
        let body = &self.packet[1..self.packet.len().saturating_sub(3)];
        let result = match reason {
            Some(reason) if is_error_code(body) => {
                let text = format!("E.kvmpy.{}", protocol_safe(&reason));
                Write::write_all(&mut self.stream, super::packet(&text).as_bytes())
            }
            _ => Write::write_all(&mut self.stream, &self.packet),
        };
        self.packet.clear();
        self.checksum_left = None;
        result
    }
}

/// Whether a reply body is gdbstub's bare error code, `E` and two hex digits.
fn is_error_code(body: &[u8]) -> bool {
    matches!(body, [b'E', a, b] if a.is_ascii_hexdigit() && b.is_ascii_hexdigit())
}

/// `text` without the characters a packet body may not hold as they are.
fn protocol_safe(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '$' | '#' | '}' | '*' => ' ',
            c if c.is_ascii() && !c.is_ascii_control() => c,
            _ => '?',
        })
        .collect()
}

impl Connection for GdbConn {
    type Error = std::io::Error;

    fn write(&mut self, byte: u8) -> std::io::Result<()> {
        if self.packet.is_empty() && byte != b'$' {
            // An acknowledgement, or anything else outside a packet.
            return Write::write_all(&mut self.stream, &[byte]);
        }
        self.packet.push(byte);
        match self.checksum_left {
            None if byte == b'#' => self.checksum_left = Some(2),
            Some(1) => return self.send_packet(),
            Some(n) => self.checksum_left = Some(n - 1),
            None => {}
        }
        Ok(())
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        buf.iter().try_for_each(|b| self.write(*b))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.packet.is_empty() {
            // Not a whole packet (never the case with gdbstub): out as it is.
            Write::write_all(&mut self.stream, &self.packet)?;
            self.packet.clear();
            self.checksum_left = None;
        }
        Write::flush(&mut self.stream)
    }

    fn on_session_start(&mut self) -> std::io::Result<()> {
        Connection::on_session_start(&mut self.stream)
    }
}

impl ConnectionExt for GdbConn {
    fn read(&mut self) -> std::io::Result<u8> {
        ConnectionExt::read(&mut self.stream)
    }

    fn peek(&mut self) -> std::io::Result<Option<u8>> {
        ConnectionExt::peek(&mut self.stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bare_error_codes_are_explained_and_texts_are_made_safe() {
        assert!(is_error_code(b"E16") && is_error_code(b"Eff"));
        assert!(!is_error_code(b"OK") && !is_error_code(b"E.x") && !is_error_code(b"E1"));
        assert_eq!(protocol_safe("a$b#c}d*e\u{e9}\n"), "a b c d e??");
    }

    #[test]
    fn replies_go_out_whole_and_an_explained_error_as_text() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let explain = Explain::default();
        let mut conn = GdbConn::new(server, Arc::clone(&explain));
        conn.write(b'+').unwrap();
        conn.write_all(b"$OK#9a").unwrap();
        *lock(&explain) = Some("no #1".into());
        conn.write_all(b"$E16#ab").unwrap();
        conn.write_all(b"$E16#ab").unwrap();
        conn.flush().unwrap();
        drop(conn);
        let mut got = String::new();
        std::io::Read::read_to_string(&mut client, &mut got).unwrap();
        let text = super::super::packet("E.kvmpy.no  1");
        assert_eq!(got, format!("+$OK#9a{text}$E16#ab"));
    }
}
