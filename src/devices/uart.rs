//! A 16550 UART subset, enough for guests that poll the line status register before
//! writing: transmit, receive (from bytes the host feeds), LSR/IIR/LCR/MCR/scratch and the
//! divisor latch. No interrupts and no FIFO timing.

use std::any::Any;
use std::collections::VecDeque;
use std::sync::Mutex;

use crate::engine::{lock, Action, Device, Error, Result, VcpuCtx};

const THR_RBR_DLL: u16 = 0;
const IER_DLM: u16 = 1;
const IIR_FCR: u16 = 2;
const LCR: u16 = 3;
const MCR: u16 = 4;
const LSR: u16 = 5;
const MSR: u16 = 6;
const SCR: u16 = 7;

const LCR_DLAB: u8 = 0x80;
const LSR_DATA_READY: u8 = 0x01;
const LSR_THR_EMPTY: u8 = 0x20;
const LSR_TRANSMITTER_EMPTY: u8 = 0x40;
const IIR_NO_INTERRUPT: u8 = 0x01;
const IIR_FIFO_ENABLED: u8 = 0xc0;
const MSR_CTS_DSR_DCD: u8 = 0xb0;

#[derive(Default)]
struct Regs {
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    fcr: u8,
    dll: u8,
    dlm: u8,
    input: VecDeque<u8>,
    output: Vec<u8>,
}

/// The UART's state, shared by the handler table and the Python object.
pub struct UartDev {
    pub base: u16,
    limit: usize,
    regs: Mutex<Regs>,
}

impl UartDev {
    pub fn new(base: u16, limit: usize) -> Self {
        UartDev {
            base,
            limit,
            regs: Mutex::new(Regs {
                dll: 12, // 9600 baud, as after a BIOS
                ..Default::default()
            }),
        }
    }

    fn regs(&self) -> std::sync::MutexGuard<'_, Regs> {
        lock(&self.regs)
    }

    /// What the guest has transmitted; with `clear`, the buffer is emptied.
    pub fn output(&self, clear: bool) -> Vec<u8> {
        let mut regs = self.regs();
        if clear {
            std::mem::take(&mut regs.output)
        } else {
            regs.output.clone()
        }
    }

    /// Queues bytes for the guest to receive.
    pub fn feed(&self, data: &[u8]) {
        self.regs().input.extend(data.iter());
    }

    /// A guest OUT of `value` to `port`.
    pub fn write(&self, port: u16, value: u8) {
        let mut r = self.regs();
        let dlab = r.lcr & LCR_DLAB != 0;
        match port.wrapping_sub(self.base) {
            THR_RBR_DLL if dlab => r.dll = value,
            THR_RBR_DLL => {
                r.output.push(value);
                if r.output.len() > self.limit {
                    let cut = r.output.len() - self.limit / 2;
                    r.output.drain(..cut);
                }
            }
            IER_DLM if dlab => r.dlm = value,
            IER_DLM => r.ier = value & 0x0f,
            IIR_FCR => {
                r.fcr = value;
                if value & 0x02 != 0 {
                    r.input.clear(); // receive FIFO reset
                }
            }
            LCR => r.lcr = value,
            MCR => r.mcr = value & 0x1f,
            SCR => r.scr = value,
            _ => {} // LSR and MSR are read-only
        }
    }

    /// A guest IN from `port`.
    pub fn read(&self, port: u16) -> u8 {
        let mut r = self.regs();
        let dlab = r.lcr & LCR_DLAB != 0;
        match port.wrapping_sub(self.base) {
            THR_RBR_DLL if dlab => r.dll,
            THR_RBR_DLL => r.input.pop_front().unwrap_or(0),
            IER_DLM if dlab => r.dlm,
            IER_DLM => r.ier,
            IIR_FCR => IIR_NO_INTERRUPT | if r.fcr & 1 != 0 { IIR_FIFO_ENABLED } else { 0 },
            LCR => r.lcr,
            MCR => r.mcr,
            LSR => {
                LSR_THR_EMPTY
                    | LSR_TRANSMITTER_EMPTY
                    | if r.input.is_empty() {
                        0
                    } else {
                        LSR_DATA_READY
                    }
            }
            MSR => MSR_CTS_DSR_DCD,
            SCR => r.scr,
            _ => 0xff,
        }
    }
}

impl Regs {
    /// The registers, then the receive queue and the output, each after its length (u32 LE).
    fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![
            self.ier, self.lcr, self.mcr, self.scr, self.fcr, self.dll, self.dlm,
        ];
        let input: Vec<u8> = self.input.iter().copied().collect();
        for part in [&input, &self.output] {
            out.extend_from_slice(&(part.len() as u32).to_le_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    fn from_bytes(bytes: &[u8]) -> Option<Regs> {
        let (head, mut rest) = bytes.split_at_checked(7)?;
        let mut parts = Vec::new();
        for _ in 0..2 {
            let (len, tail) = rest.split_at_checked(4)?;
            let len = u32::from_le_bytes(len.try_into().ok()?) as usize;
            let (part, tail) = tail.split_at_checked(len)?;
            parts.push(part.to_vec());
            rest = tail;
        }
        let output = parts.pop()?;
        let input = parts.pop()?;
        rest.is_empty().then(|| Regs {
            ier: head[0],
            lcr: head[1],
            mcr: head[2],
            scr: head[3],
            fcr: head[4],
            dll: head[5],
            dlm: head[6],
            input: input.into(),
            output,
        })
    }
}

impl Device for UartDev {
    fn name(&self) -> String {
        format!(
            "a UART on ports {:#x}..{:#x}",
            self.base,
            u32::from(self.base) + 8
        )
    }

    fn io_in(&self, _ctx: &mut VcpuCtx<'_, '_>, port: u16, data: &mut [u8]) -> Result<Action> {
        for (k, b) in data.iter_mut().enumerate() {
            *b = self.read(port.wrapping_add(k as u16));
        }
        Ok(Action::Continue)
    }

    fn io_out(&self, _ctx: &mut VcpuCtx<'_, '_>, port: u16, data: &[u8]) -> Result<Action> {
        for (k, b) in data.iter().enumerate() {
            self.write(port.wrapping_add(k as u16), *b);
        }
        Ok(Action::Continue)
    }

    fn has_state(&self) -> bool {
        true
    }

    /// Registers, receive queue and output.
    fn save_state(&self) -> Option<Vec<u8>> {
        Some(self.regs().to_bytes())
    }

    fn restore_state(&self, state: &[u8]) -> Result<()> {
        let regs = Regs::from_bytes(state)
            .ok_or_else(|| Error::Value(format!("{}: malformed saved state", self.name())))?;
        *self.regs() = regs;
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
    fn transmit_receive_and_line_status() {
        let u = UartDev::new(0x3f8, 1024);
        assert_eq!(u.read(0x3fd) & LSR_THR_EMPTY, LSR_THR_EMPTY);
        assert_eq!(u.read(0x3fd) & LSR_DATA_READY, 0);
        u.write(0x3f8, b'h');
        u.write(0x3f8, b'i');
        assert_eq!(u.regs().output, b"hi");
        u.regs().input.extend(b"ok");
        assert_eq!(u.read(0x3fd) & LSR_DATA_READY, LSR_DATA_READY);
        assert_eq!(
            (u.read(0x3f8), u.read(0x3f8), u.read(0x3f8)),
            (b'o', b'k', 0)
        );
        // The divisor latch hides THR/IER while DLAB is set.
        u.write(0x3fb, 0x83);
        u.write(0x3f8, 1);
        u.write(0x3f9, 0);
        assert_eq!((u.read(0x3f8), u.read(0x3f9)), (1, 0));
        u.write(0x3fb, 0x03);
        assert_eq!(u.regs().output, b"hi");
        u.write(0x3ff, 0x5a);
        assert_eq!(u.read(0x3ff), 0x5a);
        assert_eq!(u.read(0x3fa) & 1, 1); // no interrupt pending
    }

    #[test]
    fn state_round_trips_and_bad_state_is_refused() {
        let u = UartDev::new(0x3f8, 1024);
        u.write(0x3fb, 0x03);
        u.write(0x3ff, 0x42);
        u.write(0x3f8, b'x');
        u.feed(b"in");
        let state = u.save_state().unwrap();
        u.write(0x3ff, 0);
        u.write(0x3f8, b'y');
        assert_eq!(u.read(0x3f8), b'i');
        u.restore_state(&state).unwrap();
        assert_eq!(u.read(0x3ff), 0x42);
        assert_eq!(u.output(false), b"x");
        assert_eq!((u.read(0x3f8), u.read(0x3f8)), (b'i', b'n'));
        assert!(u.restore_state(&state[..state.len() - 1]).is_err());
        assert!(u.restore_state(&[]).is_err());
    }
}
