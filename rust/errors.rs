//! The extension's one error type and its single conversion into Python exceptions.
//!
//! Pure-Rust code returns [`Error`]; the `From<Error> for PyErr` impl below is the only place that
//! picks a Python exception class, so the hierarchy in `_native.pyi` has one source of truth.

use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::{PyErr, Python};

create_exception!(
    _native,
    NativeError,
    PyValueError,
    "Bad input to the native extension."
);
create_exception!(
    _native,
    InputTooLongError,
    NativeError,
    "A text exceeds the tokenizer's max_length and truncate=False."
);

create_exception!(
    _native,
    InternalError,
    PyRuntimeError,
    "A bug in the native extension: a Rust panic, caught at its boundary."
);

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Error {
    #[error("text {index} is longer than max_length={max_length} tokens")]
    InputTooLong { index: usize, max_length: usize },
    #[error("text {index} is not valid Unicode: {reason}")]
    InvalidText { index: usize, reason: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{name} must be {requirement}, got {value}")]
    InvalidArgument {
        name: &'static str,
        requirement: &'static str,
        value: String,
    },
    #[error("{name}: {message}")]
    InvalidArray { name: &'static str, message: String },
    #[error("{name} row {row} contains NaN or infinity")]
    NonFinite { name: &'static str, row: usize },
    #[error("internal error in the native extension: {0}")]
    Panicked(String),
}

impl Error {
    pub fn argument(name: &'static str, requirement: &'static str, value: impl ToString) -> Self {
        Self::InvalidArgument {
            name,
            requirement,
            value: value.to_string(),
        }
    }

    pub fn array(name: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidArray {
            name,
            message: message.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Runs `f` with the GIL released. A panic inside becomes [`Error::Panicked`] (`InternalError`, an
/// `Exception`) instead of pyo3's `PanicException`, a `BaseException` that escapes `except Exception`
/// and would end whatever task or thread called us rather than the one request.
pub fn detach<T: Send>(py: Python<'_>, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    py.detach(|| caught(f))
}

/// `f()`, with a panic turned into [`Error::Panicked`].
pub fn caught<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".to_owned());
        Err(Error::Panicked(message))
    })
}

impl From<Error> for PyErr {
    fn from(err: Error) -> Self {
        match err {
            Error::InputTooLong { .. } => InputTooLongError::new_err(err.to_string()),
            Error::Panicked(_) => InternalError::new_err(err.to_string()),
            _ => NativeError::new_err(err.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error() {
        let result: Result<()> = caught(|| panic!("boom {}", 7));
        assert_eq!(result, Err(Error::Panicked("boom 7".to_owned())));
        assert_eq!(caught(|| Ok(3)), Ok(3));
    }
}
