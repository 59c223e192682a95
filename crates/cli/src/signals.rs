//! Stopping a long `compute` cleanly when a cluster scheduler asks.
//!
//! Slurm (and Kubernetes) send `SIGTERM` before they preempt, cancel or time out a job, and
//! `SIGKILL` a grace period later. [`catch_sigterm`] turns `SIGTERM` into a flag that the compute
//! loop reads between sequences ([`sigterm_received`]): the run finishes the sequence it is on,
//! checkpoints the mean accumulator, and exits with a one-line error naming `--resume`. A
//! `SIGKILL` still loses at most the work since the last checkpoint, as every file is written
//! atomically.
//!
//! [`stop_point`] is a deterministic preemption point for tests: with
//! `FISHER_STEIN_STOP_AFTER_SEQUENCE=i` in the environment the run holds right after sequence
//! `i` until a `SIGTERM` arrives, so a test can cancel it at a known point instead of racing it.
//! (Not `SIGSTOP`: a `SIGCONT` sent before the process stopped itself would be lost, and the
//! test would hang.)

use std::sync::atomic::{AtomicBool, Ordering};

static SIGTERM_RECEIVED: AtomicBool = AtomicBool::new(false);
static INTERRUPT_REQUESTED: AtomicBool = AtomicBool::new(false);

/// The error of a computation stopped by [`request_interrupt`] (the Python package's Ctrl-C).
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;

/// Ask every computation running in this process to stop at its next batch of positions with
/// [`Interrupted`] (the Python package calls this on `KeyboardInterrupt`; the command line's
/// `SIGTERM` finishes the sequence it is on instead).
pub fn request_interrupt() {
    INTERRUPT_REQUESTED.store(true, Ordering::SeqCst);
}

/// Forget an earlier [`request_interrupt`] (before a new computation starts).
pub fn clear_interrupt() {
    INTERRUPT_REQUESTED.store(false, Ordering::SeqCst);
}

/// `Err(Interrupted)` once [`request_interrupt`] was called.
pub fn check_interrupt() -> Result<(), Interrupted> {
    if INTERRUPT_REQUESTED.load(Ordering::SeqCst) {
        Err(Interrupted)
    } else {
        Ok(())
    }
}

extern "C" fn on_sigterm(_: libc::c_int) {
    SIGTERM_RECEIVED.store(true, Ordering::SeqCst);
}

/// From now on, `SIGTERM` sets a flag ([`sigterm_received`]) instead of ending the process.
pub fn catch_sigterm() {
    #[cfg(unix)]
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_sigterm as *const () as libc::sighandler_t);
    }
}

/// Whether `SIGTERM` arrived since [`catch_sigterm`].
pub fn sigterm_received() -> bool {
    SIGTERM_RECEIVED.load(Ordering::SeqCst)
}

/// The environment variable of [`stop_point`].
pub const STOP_AFTER_SEQUENCE: &str = "FISHER_STEIN_STOP_AFTER_SEQUENCE";

/// If `FISHER_STEIN_STOP_AFTER_SEQUENCE` names sequence `index`, say so on stderr and wait for
/// `SIGTERM` (or `SIGKILL`) before going on: the run then ends before the plan's next sequence,
/// every time (after the last one it simply finishes).
pub fn stop_point(index: usize) {
    let asked = std::env::var(STOP_AFTER_SEQUENCE).ok().and_then(|v| v.trim().parse().ok());
    if asked == Some(index) {
        eprintln!("sequence {index}: holding for SIGTERM as {STOP_AFTER_SEQUENCE} asks");
        while !sigterm_received() {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}
