//! The persistent loop of a child of kvmpy's AFL++ fork server: it talks to afl-fuzz's
//! control and status pipes itself (the forkserver protocol of AFL++ 4.0x), so that an
//! input costs no hand-off through the fork server. Per round: read afl-fuzz's control
//! word, write this process's pid, read the input (afl-fuzz's shared memory, a file or
//! stdin), run it on the [`Executor`], write the coverage into afl-fuzz's map, write the
//! status: 0, or a crash as "killed by SIGSEGV" while this process lives on. A timeout
//! waits for afl-fuzz to kill this process; the fork server, which waits for its death,
//! then writes the status and starts the next child.
//!
//! The fork server learns whether afl-fuzz is waiting for a status from a word of memory
//! shared with it ([`Phase`]): this loop sets it to [`Phase::Running`] before it writes
//! its pid and back to [`Phase::Idle`] after it wrote the status. (afl-fuzz kills only a
//! process that has not answered within its timeout; one killed in the few instructions
//! between its status and the phase store would get a second status from the fork
//! server.) No Python here.

use std::fs::File;
use std::io::Read;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use crate::engine::campaign::{verdict, Verdict};
use crate::engine::error::{Error, Result};
use crate::engine::fuzz::Executor;
use crate::engine::lock;

/// The wait status a child that lives on reports a crash with: "killed by SIGSEGV".
pub const CRASH_STATUS: u32 = libc::SIGSEGV as u32;

/// Where a round stands, in the word shared with the fork server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Phase {
    /// Between rounds: afl-fuzz expects nothing from this process.
    Idle = 0,
    /// A round began (a pid was or is being written): afl-fuzz waits for its status.
    Running = 1,
    /// The fork server read a round's control word and forked this process for it:
    /// afl-fuzz waits for its pid (set by the fork server, never by this loop).
    Begun = 2,
}

/// Where inputs come from.
#[derive(Clone, Debug)]
pub enum InputSource {
    /// afl-fuzz's shared memory (`__AFL_SHM_FUZZ_ID`): a u32 length, then the bytes.
    Shm(i32),
    /// The file afl-fuzz names (`@@`), read again each round.
    File(PathBuf),
    /// Standard input, read from offset 0 each round.
    Stdin,
}

/// What the loop is told.
#[derive(Clone, Debug)]
pub struct Channel {
    /// afl-fuzz's control pipe (read) and status pipe (written).
    pub ctl: RawFd,
    pub status: RawFd,
    /// afl-fuzz's coverage map (`__AFL_SHM_ID`).
    pub trace_shm: i32,
    pub input: InputSource,
    /// The fork server read this round's control word already (the first round starts
    /// with the pid).
    pub round_pending: bool,
}

/// An attached System V shared memory segment (detached on drop).
struct Shm {
    addr: *mut u8,
    len: usize,
}

impl Shm {
    fn attach(id: i32, what: &str) -> Result<Shm> {
        // SAFETY: an all-zero shmid_ds is a valid value for IPC_STAT to fill.
        let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
        // SAFETY: IPC_STAT writes into `ds`, which lives across the call.
        if unsafe { libc::shmctl(id, libc::IPC_STAT, &mut ds) } != 0 {
            let err = std::io::Error::last_os_error();
            return Err(Error::Io(format!("cannot use {what} {id}"), err));
        }
        // SAFETY: shmat maps the segment at an address the kernel picks; nothing in this
        // process is at that address before.
        let addr = unsafe { libc::shmat(id, std::ptr::null(), 0) };
        if addr as isize == -1 {
            let err = std::io::Error::last_os_error();
            return Err(Error::Io(format!("cannot attach {what} {id}"), err));
        }
        Ok(Shm {
            addr: addr.cast(),
            len: ds.shm_segsz,
        })
    }
}

impl Drop for Shm {
    fn drop(&mut self) {
        // SAFETY: `addr` is where `attach` mapped the segment; no slice of it outlives
        // this object.
        unsafe { libc::shmdt(self.addr.cast()) };
    }
}

fn read_u32(fd: RawFd) -> Result<Option<u32>> {
    let mut word = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        // SAFETY: writes at most 4 - got bytes into `word` from offset `got`.
        let n = unsafe { libc::read(fd, word[got..].as_mut_ptr().cast(), 4 - got) };
        match n {
            0 => return Ok(None),
            n if n > 0 => got += n as usize,
            _ => {
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::Interrupted {
                    return Err(Error::Io("reading afl-fuzz's control pipe".into(), err));
                }
            }
        }
    }
    Ok(Some(u32::from_le_bytes(word)))
}

fn write_u32(fd: RawFd, value: u32) -> Result<()> {
    let word = value.to_le_bytes();
    loop {
        // SAFETY: reads the 4 bytes of `word`; a pipe write of 4 bytes is atomic.
        let n = unsafe { libc::write(fd, word.as_ptr().cast(), 4) };
        if n == 4 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if n >= 0 || err.kind() != std::io::ErrorKind::Interrupted {
            return Err(Error::Io("writing afl-fuzz's status pipe".into(), err));
        }
    }
}

/// The size of the map afl-fuzz should scan for `executor`: in "armed" mode the
/// executor's map; in "once" mode one byte per coverage block (in the order of their
/// addresses), rounded up to 64 as afl-fuzz does. None without coverage.
pub fn map_size(executor: &Executor) -> Option<usize> {
    let cov = executor.coverage.as_ref()?;
    let armed = lock(&executor.vm.breakpoints)
        .coverage
        .as_ref()
        .map(|m| (m.armed, m.map.len()));
    Some(match armed {
        Some((true, len)) => len,
        _ => cov.block_index.len().max(1).div_ceil(64) * 64,
    })
}

/// What the children of one fork server have run, in memory shared with it (and, where
/// the harness was asked to, with a file that outlives afl-fuzz's final kill): inputs run,
/// and nanoseconds spent running them (`Executor::run`, coverage not included). afl-fuzz's
/// time per execution less this mean is what the harness and afl-fuzz cost per input, on
/// the very inputs afl-fuzz ran.
pub struct RunCounters<'a> {
    pub runs: &'a AtomicU64,
    pub nanos: &'a AtomicU64,
}

/// Runs afl-fuzz's rounds on `executor` until afl-fuzz closes the control pipe. `phase`
/// is the word shared with the fork server. Returns on a clean end; an error leaves the
/// phase as it was, for the fork server to see.
pub fn serve(
    executor: &Executor,
    channel: &Channel,
    phase: &AtomicU32,
    counters: &RunCounters<'_>,
) -> Result<()> {
    let size = map_size(executor)
        .ok_or_else(|| Error::Value("under afl-fuzz a target needs coverage".into()))?;
    let trace = Shm::attach(channel.trace_shm, "afl-fuzz's coverage map (__AFL_SHM_ID)")?;
    if trace.len < size {
        return Err(Error::Value(format!(
            "the target's map ({size} bytes) is larger than afl-fuzz's ({} bytes): set \
             AFL_MAP_SIZE={size}",
            trace.len
        )));
    }
    let shm_input = match channel.input {
        InputSource::Shm(id) => Some(Shm::attach(id, "afl-fuzz's input (__AFL_SHM_FUZZ_ID)")?),
        _ => None,
    };
    let max_len = executor.config.max_len;
    let mut buf = vec![0u8; max_len];
    // "once" mode: the map indices of the blocks covered so far.
    let mut covered: Vec<usize> = Vec::new();
    // SAFETY: getpid cannot fail.
    let pid = unsafe { libc::getpid() } as u32;
    let mut pending = channel.round_pending;
    loop {
        if !pending && read_u32(channel.ctl)?.is_none() {
            return Ok(()); // afl-fuzz is gone
        }
        pending = false;
        phase.store(Phase::Running as u32, Ordering::SeqCst);
        write_u32(channel.status, pid)?;
        let len = match (&channel.input, &shm_input) {
            (_, Some(shm)) => {
                let mut n = [0u8; 4];
                // SAFETY: the segment is at least 4 bytes (checked below for the data);
                // afl-fuzz writes it only between rounds.
                let n = unsafe {
                    std::ptr::copy_nonoverlapping(shm.addr, n.as_mut_ptr(), 4.min(shm.len));
                    u32::from_le_bytes(n) as usize
                };
                let n = n.min(max_len).min(shm.len.saturating_sub(4));
                // SAFETY: `n` bytes from offset 4 are inside the segment (n <= len - 4)
                // and inside `buf` (n <= max_len).
                unsafe { std::ptr::copy_nonoverlapping(shm.addr.add(4), buf.as_mut_ptr(), n) };
                n
            }
            (InputSource::File(path), None) => read_up_to(File::open(path), &mut buf, path)?,
            _ => {
                // SAFETY: pread writes at most buf.len() bytes into `buf`.
                let n = unsafe { libc::pread(0, buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n < 0 {
                    let err = std::io::Error::last_os_error();
                    return Err(Error::Io("reading the input from stdin".into(), err));
                }
                n as usize
            }
        };
        let start = Instant::now();
        let execution = executor.run(&buf[..len], None)?;
        let nanos = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        // One writer at a time (the fork server runs one child), so plain adds suffice.
        counters.nanos.fetch_add(nanos, Ordering::Relaxed);
        counters.runs.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the map segment is at least `size` bytes (checked above); afl-fuzz
        // reads it only after the status below.
        let map = unsafe { std::slice::from_raw_parts_mut(trace.addr, size) };
        write_coverage(executor, &execution.new_blocks, &mut covered, map);
        let rip = execution.regs.as_ref().map_or(0, |r| r.rip);
        let status = match verdict(&execution.exit, rip) {
            Verdict::Ok => 0,
            Verdict::Crash { .. } => CRASH_STATUS,
            Verdict::Timeout => {
                // A hang for afl-fuzz too: its timeout kills this process, and the fork
                // server reports that. Should afl-fuzz go away first, so does this.
                wait_for_hang_up(channel.ctl);
                return Ok(());
            }
        };
        write_u32(channel.status, status)?;
        phase.store(Phase::Idle as u32, Ordering::SeqCst);
    }
}

/// Waits until the other end of `fd` (a pipe) is closed.
fn wait_for_hang_up(fd: RawFd) {
    let mut poll = libc::pollfd {
        fd,
        events: 0,
        revents: 0,
    };
    // SAFETY: `poll` is one valid pollfd; with no events asked, only a hang-up or an
    // error ends the wait.
    while unsafe { libc::poll(&mut poll, 1, -1) } <= 0 || poll.revents == 0 {}
}

fn read_up_to(file: std::io::Result<File>, buf: &mut [u8], path: &Path) -> Result<usize> {
    let mut file = file.map_err(|e| Error::Io(format!("cannot open {}", path.display()), e))?;
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::Io(format!("cannot read {}", path.display()), e)),
        }
    }
    Ok(got)
}

/// Puts one execution's coverage into afl-fuzz's map (which afl-fuzz clears before each
/// round): in "armed" mode the executor's edge counts; in "once" mode a 1 for every block
/// the campaign covered so far (a new block is a new entry for afl-fuzz), touching only
/// those bytes.
fn write_coverage(
    executor: &Executor,
    new_blocks: &[u64],
    covered: &mut Vec<usize>,
    map: &mut [u8],
) {
    let Some(cov) = executor.coverage.as_ref() else {
        return;
    };
    if let Some(m) = lock(&executor.vm.breakpoints).coverage.as_ref() {
        if m.armed {
            let n = m.map.len().min(map.len());
            map[..n].copy_from_slice(&m.map[..n]);
            return;
        }
    }
    for block in new_blocks {
        let at = cov
            .block_index
            .binary_search(block)
            .unwrap_or_else(|at| at.min(cov.block_index.len().saturating_sub(1)));
        covered.push(at.min(map.len() - 1));
    }
    for &at in covered.iter() {
        map[at] = 1;
    }
}
