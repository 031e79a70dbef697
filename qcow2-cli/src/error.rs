//! The tool's error: a message for stderr (printed as `qcow2: MESSAGE`) and an exit status.

use std::fmt;

/// A failed command.
#[derive(Debug)]
pub struct CliError {
    /// What went wrong, without the `qcow2: ` prefix.
    pub message: String,
    /// The process exit status.
    pub code: i32,
}

impl CliError {
    /// An error with exit status 1.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: 1,
        }
    }

    /// An error with a specific exit status.
    pub fn with_code(code: i32, message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code,
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        Self::new(e.to_string())
    }
}

/// The result of a command: the exit status on success.
pub type CmdResult = Result<i32, CliError>;

/// Describes an OS error the way qemu does (`strerror`, without Rust's "(os error N)").
pub fn strerror(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}
