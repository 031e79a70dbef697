//! Turns a hung case into a failed run: a case that runs past its deadline aborts the test
//! binary with a message naming it, instead of hanging CI.

use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::time::Duration;

/// The default deadline of one case, overridable with `QCOW2_CASE_TIMEOUT_SECS`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// Aborts the process unless dropped before the deadline.
#[derive(Debug)]
pub struct Watchdog {
    done: Option<Sender<()>>,
}

impl Watchdog {
    /// Arms a watchdog for the case `name`.
    pub fn arm(name: &'static str) -> Self {
        let timeout = std::env::var("QCOW2_CASE_TIMEOUT_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .map_or(DEFAULT_TIMEOUT, Duration::from_secs);
        let (tx, rx) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(timeout) {
                eprintln!("case {name} still running after {timeout:?}: aborting (a hang?)");
                std::process::abort();
            }
        });
        Self { done: Some(tx) }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(tx) = self.done.take() {
            let _ = tx.send(());
        }
    }
}
