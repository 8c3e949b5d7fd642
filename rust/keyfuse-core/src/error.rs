//! The one error type of the core; the Python binding maps each variant to an exception.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum KfError {
    /// The image cannot be processed (wrong dimensionality, non-finite values, too small, …).
    #[error("invalid image: {0}")]
    InvalidImage(String),
    /// An argument is out of range or arrays disagree in shape.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Stored data (a key file, an index) is malformed or fails its checksum.
    #[error("corrupt data: {0}")]
    Corrupt(String),
    /// A GPU was asked for but none is usable.
    #[error("device unavailable: {0}")]
    DeviceUnavailable(String),
    /// The computation was stopped through [`crate::cancel::request`] (Ctrl-C).
    #[error("interrupted")]
    Interrupted,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, KfError>;
