//! Write watchpoints without debug registers: the stub runs the guest one instruction at
//! a time and compares the watched bytes after each (what gdb's own software watchpoints
//! do, without a round trip to gdb per instruction). A write that leaves the value as it
//! was is not seen, as with gdb's software watchpoints.

/// The watched ranges and the bytes last seen in each.
#[derive(Default)]
pub struct Watches {
    entries: Vec<Watch>,
}

struct Watch {
    addr: u64,
    len: u64,
    last: Vec<u8>,
}

/// The most bytes one watchpoint covers (gdb splits a larger object into several).
pub const MAX_LEN: u64 = 64;

impl Watches {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Watches `len` bytes at `addr`, whose bytes are `now`.
    pub fn add(&mut self, addr: u64, now: Vec<u8>) {
        let len = now.len() as u64;
        if !self.entries.iter().any(|w| w.addr == addr && w.len == len) {
            self.entries.push(Watch {
                addr,
                len,
                last: now,
            });
        }
    }

    /// Stops watching `len` bytes at `addr`; false if they were not watched.
    pub fn remove(&mut self, addr: u64, len: u64) -> bool {
        let before = self.entries.len();
        self.entries.retain(|w| !(w.addr == addr && w.len == len));
        self.entries.len() != before
    }

    /// Reads every watched range with `read` (false: unreadable, skipped) and returns the
    /// address of the first whose bytes changed; every range remembers what it read.
    pub fn changed(&mut self, mut read: impl FnMut(u64, &mut [u8]) -> bool) -> Option<u64> {
        let mut hit = None;
        let mut buf = [0u8; MAX_LEN as usize];
        for w in &mut self.entries {
            let now = &mut buf[..w.len as usize];
            if read(w.addr, now) && now != &w.last[..] {
                w.last.copy_from_slice(now);
                hit.get_or_insert(w.addr);
            }
        }
        hit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_reported_once_and_remembered() {
        let mut memory = [0u8; 32];
        let mut w = Watches::default();
        assert!(w.is_empty());
        w.add(8, vec![0; 8]);
        w.add(8, vec![0; 8]);
        w.add(20, vec![0; 2]);
        let read = |m: &[u8; 32]| {
            let m = *m;
            move |addr: u64, out: &mut [u8]| {
                out.copy_from_slice(&m[addr as usize..addr as usize + out.len()]);
                true
            }
        };
        assert_eq!(w.changed(read(&memory)), None);
        memory[21] = 1;
        assert_eq!(w.changed(read(&memory)), Some(20));
        assert_eq!(
            w.changed(read(&memory)),
            None,
            "the new value is remembered"
        );
        memory[9] = 5;
        memory[20] = 5;
        assert_eq!(w.changed(read(&memory)), Some(8), "the first in order");
        assert_eq!(w.changed(read(&memory)), None, "both remembered");
        assert!(w.remove(8, 8));
        assert!(!w.remove(8, 8));
        assert_eq!(w.changed(|_, _| false), None, "unreadable: skipped");
    }
}
