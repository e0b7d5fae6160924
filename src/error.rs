//! The crate's one error type.
//!
//! Every fallible function returns [`Result<T>`]. Messages are short, lowercase, name the subsystem and carry
//! the bad input; `main` prints the chain and picks the exit code from [`Error::exit_code`].

use std::fmt;

/// Everything that can go wrong, by subsystem.
#[derive(Debug)]
pub enum Error {
    /// A command-line flag is unknown, missing or malformed (exit code 2).
    Usage(String),
    /// A configuration value is unusable (a token file that cannot be read, ...).
    Config(String),
    /// SQLite failed; the string says what we were doing.
    Db(String, rusqlite::Error),
    /// The database file exists but is not one of ours, or is newer than this binary.
    Schema(String),
    /// Reading or writing a file or socket failed.
    Io(String, std::io::Error),
    /// The mihomo controller sent something we cannot use, or refused us.
    Mihomo(String),
    /// A frame from mihomo is not valid JSON of the expected shape.
    Frame(String),
    /// Talking to the master failed (agent side).
    Sync(String),
    /// The HTTP server could not start.
    Http(String),
    /// A thread or channel went away unexpectedly.
    Stopped(&'static str),
    /// A blocking call ran out of time (the writer's queue stayed full, or it did not answer); the message
    /// names what did not answer.
    Timeout(String),
}

/// Shorthand used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The process exit code for this error: 2 for usage errors, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_) => 2,
            _ => 1,
        }
    }

    /// Wraps a SQLite error with what we were doing.
    pub fn db(what: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> Error {
        let what = what.into();
        move |e| Error::Db(what, e)
    }

    /// Wraps an I/O error with what we were doing.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |e| Error::Io(what, e)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage(m) => write!(f, "usage: {m}"),
            Error::Config(m) => write!(f, "config: {m}"),
            Error::Db(what, e) => write!(f, "database: {what}: {e}"),
            Error::Schema(m) => write!(f, "database: {m}"),
            Error::Io(what, e) => write!(f, "{what}: {e}"),
            Error::Mihomo(m) => write!(f, "mihomo: {m}"),
            Error::Frame(m) => write!(f, "mihomo frame: {m}"),
            Error::Sync(m) => write!(f, "sync: {m}"),
            Error::Http(m) => write!(f, "http: {m}"),
            Error::Stopped(what) => write!(f, "{what} stopped unexpectedly"),
            Error::Timeout(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Db(_, e) => Some(e),
            Error::Io(_, e) => Some(e),
            _ => None,
        }
    }
}

impl From<pico_args::Error> for Error {
    fn from(e: pico_args::Error) -> Self {
        Error::Usage(e.to_string())
    }
}
