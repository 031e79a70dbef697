//! A one-line progress bar on standard error, drawn only when it is a terminal.

use std::io::{IsTerminal, Write};
use std::time::Instant;

/// Runs done out of runs planned, with the time left estimated from the time so far.
#[derive(Debug)]
pub struct Bar {
    total: usize,
    done: usize,
    start: Instant,
    enabled: bool,
}

impl Bar {
    /// A bar for `total` runs (silent unless standard error is a terminal).
    pub fn new(total: usize) -> Self {
        Self {
            total,
            done: 0,
            start: Instant::now(),
            enabled: std::io::stderr().is_terminal(),
        }
    }

    /// Shows that the next run, `label`, is starting.
    pub fn starting(&self, label: &str) {
        if !self.enabled {
            return;
        }
        const WIDTH: usize = 24;
        let filled = (self.done * WIDTH).checked_div(self.total).unwrap_or(WIDTH);
        let eta = match self.done {
            0 => "?".to_owned(),
            d => {
                let per = self.start.elapsed().as_secs_f64() / d as f64;
                let left = (per * (self.total - d) as f64) as u64;
                format!("{}m{:02}s", left / 60, left % 60)
            }
        };
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r[{}{}] {}/{} eta {eta}  {label}\x1b[K",
            "#".repeat(filled),
            " ".repeat(WIDTH - filled),
            self.done,
            self.total
        );
        let _ = err.flush();
    }

    /// Counts a finished run.
    pub fn finished(&mut self) {
        self.done = (self.done + 1).min(self.total);
    }

    /// Clears the bar.
    pub fn clear(&self) {
        if self.enabled {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K");
            let _ = err.flush();
        }
    }
}
