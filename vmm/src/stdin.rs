//! Interactive console: when stdin is a terminal, it is put in raw mode (signals kept, so
//! Ctrl-C still stops the VMM) and its bytes are forwarded to the guest's serial port. The
//! terminal is restored when the VMM exits, including on SIGINT (SIGTERM is a graceful
//! shutdown, after which the vmm exits normally).

use std::io::Read;
use std::sync::{Arc, Mutex, OnceLock};

use crate::devices::legacy::serial::SerialDevice;

static SAVED_TERMIOS: OnceLock<libc::termios> = OnceLock::new();

fn stdin_is_terminal() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(libc::STDIN_FILENO) == 1 }
}

/// Restores the terminal saved by [`forward_stdin`], if any.
pub fn restore_terminal() {
    if let Some(saved) = SAVED_TERMIOS.get() {
        // SAFETY: tcsetattr reads the saved struct; it is async-signal-safe.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, saved) };
    }
}

extern "C" fn on_terminating_signal(signal: libc::c_int) {
    restore_terminal();
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(128 + signal) };
}

fn enter_raw_mode() -> bool {
    let mut termios = std::mem::MaybeUninit::<libc::termios>::uninit();
    // SAFETY: tcgetattr fills the struct on success, which is checked before use.
    if unsafe { libc::tcgetattr(libc::STDIN_FILENO, termios.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: initialised by the successful tcgetattr above.
    let saved = unsafe { termios.assume_init() };
    let _ = SAVED_TERMIOS.set(saved);
    let mut raw = saved;
    raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::IEXTEN);
    raw.c_iflag &= !(libc::ICRNL | libc::IXON);
    raw.c_cc[libc::VMIN] = 1;
    raw.c_cc[libc::VTIME] = 0;
    // SAFETY: plain libc calls on valid arguments; the handler only calls async-signal-safe
    // functions.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_terminating_signal as *const () as libc::sighandler_t,
        );
        libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) == 0
    }
}

/// Forwards stdin to the serial device when stdin is a terminal.
pub fn forward_stdin(serial: Arc<Mutex<SerialDevice>>) {
    if !stdin_is_terminal() || !enter_raw_mode() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 64];
            while let Ok(n) = stdin.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut pending = &buf[..n];
                while !pending.is_empty() {
                    let taken = crate::devices::bus::lock(&serial).enqueue_input(pending);
                    pending = &pending[taken..];
                    if taken == 0 {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("stdin is not forwarded to the guest: {e}");
    }
}
