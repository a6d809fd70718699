//! A gdb remote stub (the `gdbstub` crate) for a VM: a TCP listener, one debugging
//! session at a time, and the VM as a gdb target (`target`).
//!
//! The server listens on its own thread. The first client gets the session; any client
//! that connects while it lasts is refused with a message gdb prints ("Remote failure
//! reply: E.kvmpy: ..."). When the session ends (gdb detaches, kills, disconnects, or
//! sends garbage until the connection breaks), the vCPUs are stopped and left where they
//! are, gdb's breakpoints are removed, and the server stops listening: the VM is the
//! caller's again.

mod conn;
mod regs;
mod target;
mod watch;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use gdbstub::stub::{DisconnectReason, GdbStub};

use crate::engine::error::{Error, Result};
use crate::engine::lock;
use crate::engine::VmCore;
pub use target::stop_reason;
use target::{VmEventLoop, VmTarget};

/// How long the accept loop sleeps between two looks at `closing`.
const ACCEPT_POLL_MS: libc::c_int = 50;

/// How a session ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    /// gdb detached (`detach`, or `quit` which detaches).
    Detached,
    /// gdb sent `kill`; the VM stays as it is all the same.
    Killed,
    /// The guest exited (an exit port) with this code.
    Exited(u8),
    /// The connection broke or the protocol failed; the message says how.
    Broken(String),
    /// The VM could not do what gdb asked (its vCPUs were running from Python, it was
    /// closed, ...); the message says what.
    Failed(String),
    /// The server was closed before or during a session.
    Closed,
}

impl Ending {
    pub fn describe(&self) -> String {
        match self {
            Ending::Detached => "gdb detached".into(),
            Ending::Killed => "gdb sent kill".into(),
            Ending::Exited(code) => format!("the guest exited with code {code}"),
            Ending::Broken(why) => format!("the gdb connection broke: {why}"),
            Ending::Failed(why) => format!("the session failed: {why}"),
            Ending::Closed => "the server was closed".into(),
        }
    }
}

#[derive(Default)]
struct State {
    /// The address of the client being served.
    client: Option<SocketAddr>,
    /// A second handle on the client's socket, to end the session from `close`.
    conn: Option<TcpStream>,
    ending: Option<Ending>,
    /// The first error a run ended with during the session (a handler's exception).
    error: Option<Error>,
    /// Clients refused while the session lasted.
    refused: u64,
}

struct Shared {
    closing: AtomicBool,
    state: Mutex<State>,
    ended: Condvar,
}

/// The VMs that have a gdb server (by address), and where it listens: one at a time.
static SERVED: Mutex<Vec<(usize, SocketAddr)>> = Mutex::new(Vec::new());

/// Frees `vm`'s place in [`SERVED`] when its server's thread ends.
struct Served(usize);

impl Drop for Served {
    fn drop(&mut self) {
        lock(&SERVED).retain(|(vm, _)| *vm != self.0);
    }
}

/// A gdb server for one VM: listening from `start`, serving one session.
pub struct GdbServer {
    vm: Arc<VmCore>,
    addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl GdbServer {
    /// Listens on `host:port` (port 0: a free port, see [`GdbServer::addr`]) and serves
    /// the first client on a thread of its own. Fails at once where the VM cannot be
    /// debugged: no vCPUs, or breakpoints cannot reach kvmpy on this host.
    pub fn start(vm: Arc<VmCore>, host: &str, port: u16) -> Result<GdbServer> {
        vm.check_open()?;
        if vm.vcpus().is_empty() {
            return Err(Error::Value(
                "the VM has no vCPUs to debug: create_vcpu() first".into(),
            ));
        }
        vm.check_debuggable("gdb's breakpoints and single steps")?;
        let addrs: Vec<SocketAddr> = (host, port)
            .to_socket_addrs()
            .map_err(|e| Error::Value(format!("cannot resolve {host:?}: {e}")))?
            .collect();
        let listener = TcpListener::bind(&addrs[..])
            .map_err(|e| Error::Io(format!("cannot listen on {host}:{port}"), e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Io("the gdb listener's address".into(), e))?;
        let key = Arc::as_ptr(&vm) as usize;
        let mut served = lock(&SERVED);
        if let Some((_, other)) = served.iter().find(|(v, _)| *v == key) {
            return Err(Error::Busy(format!(
                "this VM already has a gdb server, on {other}: close it (or let its session \
                 end) first"
            )));
        }
        served.push((key, addr));
        let registered = Served(key);
        drop(served);
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::Io("the gdb listener".into(), e))?;
        let shared = Arc::new(Shared {
            closing: AtomicBool::new(false),
            state: Mutex::new(State::default()),
            ended: Condvar::new(),
        });
        let for_thread = Arc::clone(&shared);
        let vm_for_thread = Arc::clone(&vm);
        let thread = std::thread::Builder::new()
            .name("kvmpy-gdb".into())
            .spawn(move || serve(&vm_for_thread, &listener, &for_thread, registered))
            .map_err(|e| Error::Io("cannot start the gdb server's thread".into(), e))?;
        Ok(GdbServer {
            vm,
            addr,
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The client being served, if any.
    pub fn client(&self) -> Option<SocketAddr> {
        lock(&self.shared.state).client
    }

    /// How many clients were refused because another one was being served.
    pub fn refused(&self) -> u64 {
        lock(&self.shared.state).refused
    }

    /// How the session ended, once it has.
    pub fn ending(&self) -> Option<Ending> {
        lock(&self.shared.state).ending.clone()
    }

    /// Takes the first error a run of the session ended with.
    pub fn take_error(&self) -> Option<Error> {
        lock(&self.shared.state).error.take()
    }

    /// Waits until the session has ended, at most `timeout`; true when it has.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        let state = lock(&self.shared.state);
        let (state, ended) =
            crate::engine::wait_while(&self.shared.ended, state, timeout, |s| s.ending.is_none());
        if !ended {
            return false;
        }
        drop(state);
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
        true
    }

    /// Ends the session (the vCPUs are stopped and left as they are) or stops waiting for
    /// a client, and waits for the server's thread.
    pub fn close(&self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        if let Some(conn) = lock(&self.shared.state).conn.as_ref() {
            let _ = conn.shutdown(std::net::Shutdown::Both);
            // gdb's vCPUs: a run or a step that waits (a `hlt`) ends now.
            for v in self.vm.vcpus() {
                v.kicker.stop_run();
            }
        }
        self.wait(None);
    }
}

impl Drop for GdbServer {
    fn drop(&mut self) {
        self.close();
    }
}

/// Waits until `listener` has a client or `closing` is set (then None).
fn accept(listener: &TcpListener, closing: &AtomicBool) -> Option<(TcpStream, SocketAddr)> {
    while !closing.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok(client) => return Some(client),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let mut pfd = libc::pollfd {
                    fd: listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: `pfd` is one valid pollfd for the listener's open fd, and the
                // count passed is 1; the result only decides whether to look again.
                unsafe { libc::poll(&mut pfd, 1, ACCEPT_POLL_MS) };
            }
            Err(_) => std::thread::sleep(Duration::from_millis(ACCEPT_POLL_MS as u64)),
        }
    }
    None
}

/// The server thread: the first client's session, the other clients refused meanwhile.
fn serve(vm: &Arc<VmCore>, listener: &TcpListener, shared: &Arc<Shared>, served: Served) {
    let ending = match accept(listener, &shared.closing) {
        None => Ending::Closed,
        Some((conn, peer)) => {
            let session_over = Arc::new(AtomicBool::new(false));
            let refuser = std::thread::Builder::new()
                .name("kvmpy-gdb-refuse".into())
                .spawn({
                    let listener = listener.try_clone();
                    let (over, shared) = (Arc::clone(&session_over), Arc::clone(shared));
                    move || {
                        if let Ok(listener) = listener {
                            refuse_others(&listener, &over, &shared, peer)
                        }
                    }
                });
            let ending = session(vm, conn, peer, shared);
            session_over.store(true, Ordering::SeqCst);
            if let Ok(t) = refuser {
                let _ = t.join();
            }
            ending
        }
    };
    // The VM may have another server as soon as this one says it is over.
    drop(served);
    let mut state = lock(&shared.state);
    state.client = None;
    state.conn = None;
    state.ending = Some(ending);
    drop(state);
    shared.ended.notify_all();
}

/// One gdb session over `conn`.
fn session(vm: &Arc<VmCore>, conn: TcpStream, peer: SocketAddr, shared: &Shared) -> Ending {
    if conn.set_nonblocking(false).is_err() {
        return Ending::Broken("cannot set up the connection".into());
    }
    {
        let mut state = lock(&shared.state);
        state.client = Some(peer);
        state.conn = conn.try_clone().ok();
    }
    if shared.closing.load(Ordering::SeqCst) {
        return Ending::Closed;
    }
    let mut target = VmTarget::new(Arc::clone(vm));
    let conn = conn::GdbConn::new(conn, Arc::clone(&target.explain));
    let result = GdbStub::new(conn).run_blocking::<VmEventLoop>(&mut target);
    // However it ended: the guest stays stopped, gdb's breakpoints go.
    target.stop();
    target.remove_breakpoints();
    if let Some(e) = target.error.take() {
        lock(&shared.state).error.get_or_insert(e);
    }
    match result {
        _ if shared.closing.load(Ordering::SeqCst) => Ending::Closed,
        Ok(DisconnectReason::Disconnect) => Ending::Detached,
        Ok(DisconnectReason::Kill) => Ending::Killed,
        Ok(DisconnectReason::TargetExited(code)) => Ending::Exited(code),
        Ok(DisconnectReason::TargetTerminated(sig)) => {
            Ending::Broken(format!("the target was terminated by {sig}"))
        }
        Err(e) if e.is_target_error() => Ending::Failed(e.to_string()),
        Err(e) => Ending::Broken(e.to_string()),
    }
}

/// The message a refused client gets, as the error reply to its first packet.
pub const REFUSAL: &str = "kvmpy: another gdb is attached to this VM (one client at a time)";

/// Accepts and refuses clients until the session is over.
fn refuse_others(listener: &TcpListener, over: &AtomicBool, shared: &Shared, served: SocketAddr) {
    while let Some((mut conn, _)) = accept(listener, over) {
        lock(&shared.state).refused += 1;
        let _ = conn.set_nonblocking(false);
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        // Read the client's first packet ("$...#xx"), then answer it with an error that
        // gdb prints, and hang up.
        let mut seen = Vec::new();
        let mut byte = [0u8];
        while seen.len() < 4096 && conn.read(&mut byte).is_ok_and(|n| n == 1) {
            seen.push(byte[0]);
            if seen.len() >= 3 && seen[seen.len() - 3] == b'#' {
                break;
            }
        }
        let text = format!("E.{REFUSAL} (the client at {served})");
        let _ = conn.write_all(format!("+{}", packet(&text)).as_bytes());
        let _ = conn.flush();
        let _ = conn.shutdown(std::net::Shutdown::Both);
    }
}

/// `$data#checksum`.
fn packet(data: &str) -> String {
    let sum = data.bytes().fold(0u8, |s, b| s.wrapping_add(b));
    format!("${data}#{sum:02x}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn packets_carry_their_checksum() {
        assert_eq!(super::packet("OK"), "$OK#9a");
        assert_eq!(super::packet(""), "$#00");
    }
}
