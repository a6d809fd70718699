//! A write-only console: collects the bytes a guest writes to one port.

use std::any::Any;
use std::sync::Mutex;

use crate::engine::{lock, Action, Device, Result, VcpuCtx};

/// The console's state, shared by the handler table and the Python object.
pub struct ConsoleDev {
    pub port: u16,
    limit: usize,
    buf: Mutex<Vec<u8>>,
}

impl ConsoleDev {
    pub fn new(port: u16, limit: usize) -> Self {
        ConsoleDev {
            port,
            limit,
            buf: Mutex::new(Vec::new()),
        }
    }

    /// Appends what the guest wrote, keeping at most the last `limit` bytes.
    pub fn write(&self, data: &[u8]) {
        let mut buf = lock(&self.buf);
        buf.extend_from_slice(data);
        if buf.len() > self.limit {
            // Drop the oldest bytes in one go, leaving room so this happens rarely.
            let keep = self.limit / 2;
            let cut = buf.len() - keep;
            buf.drain(..cut);
        }
    }

    /// What the guest wrote; with `clear`, the buffer is emptied.
    pub fn take(&self, clear: bool) -> Vec<u8> {
        let mut buf = lock(&self.buf);
        if clear {
            std::mem::take(&mut *buf)
        } else {
            buf.clone()
        }
    }
}

impl Device for ConsoleDev {
    fn name(&self) -> String {
        format!("a console on port {:#x}", self.port)
    }

    fn io_out(&self, _ctx: &mut VcpuCtx<'_, '_>, _port: u16, data: &[u8]) -> Result<Action> {
        self.write(data);
        Ok(Action::Continue)
    }

    fn has_state(&self) -> bool {
        true
    }

    /// The bytes collected so far.
    fn save_state(&self) -> Option<Vec<u8>> {
        Some(self.take(false))
    }

    fn restore_state(&self, state: &[u8]) -> Result<()> {
        *lock(&self.buf) = state.to_vec();
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_bytes_within_the_limit() {
        let dev = ConsoleDev::new(0x3f8, 8);
        dev.write(b"abcdef");
        assert_eq!(dev.take(false), b"abcdef");
        dev.write(b"ghij");
        let out = dev.take(true);
        assert!(out.len() <= 8);
        assert!(b"abcdefghij".ends_with(&out));
        assert!(dev.take(false).is_empty());
    }

    #[test]
    fn state_round_trips() {
        let dev = ConsoleDev::new(0x3f8, 64);
        dev.write(b"before");
        let state = dev.save_state().unwrap();
        dev.write(b" after");
        dev.restore_state(&state).unwrap();
        assert_eq!(dev.take(false), b"before");
    }
}
