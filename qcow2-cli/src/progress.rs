//! qemu-img's `-p` progress lines: `    (P.PP/100%)` and a carriage return on stdout, printed
//! when the value moved by more than a step since the last line, and always at 0 and 100.

use std::io::Write;

/// A progress reporter (silent when disabled).
#[derive(Debug)]
pub struct Progress {
    enabled: bool,
    min_skip: f32,
    current: f32,
    last_print: f32,
}

impl Progress {
    /// A reporter printing when the value moved by more than `min_skip` percent.
    pub fn new(enabled: bool, min_skip: f32) -> Self {
        Self {
            enabled,
            min_skip,
            current: 0.0,
            last_print: 0.0,
        }
    }

    /// Sets the value to `percent` (clamped to 100), printing if qemu would.
    pub fn set(&mut self, percent: f32) {
        let current = percent.min(100.0);
        self.current = current;
        if current > self.last_print + self.min_skip
            || current < self.last_print - self.min_skip
            || current == 0.0
            || current == 100.0
        {
            self.last_print = current;
            self.print();
        }
    }

    /// Adds `delta` percent.
    pub fn add(&mut self, delta: f32) {
        self.set(self.current + delta);
    }

    fn print(&self) {
        if self.enabled {
            let mut out = std::io::stdout().lock();
            let _ = write!(out, "    ({:.2}/100%)\r", self.current);
            let _ = out.flush();
        }
    }

    /// Ends the progress output with a newline.
    pub fn end(&self) {
        if self.enabled {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out);
            let _ = out.flush();
        }
    }
}
