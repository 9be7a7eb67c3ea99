//! What can go wrong loading, running and writing out a simulation.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("creating {}", path.display())]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A scenario file that does not parse, or fails a check.
    #[error("{}: {message}", path.display())]
    Scenario { path: PathBuf, message: String },
    /// A generated scenario that does not parse or fails a check (a fault
    /// of the generator), with its text.
    #[error("family scenario {index} of seed {seed}: {message}\n{text}")]
    Family {
        seed: u64,
        index: u64,
        message: String,
        text: String,
    },
    /// Drawing an SVG failed.
    #[error("{0}")]
    Plot(String),
    #[error("a family thread panicked")]
    ThreadPanicked,
}
