//! The extension's one error type and its single conversion into Python exceptions.
//!
//! Pure-Rust code returns [`Error`]; the `From<Error> for PyErr` impl below is the only place that
//! picks a Python exception class, so the hierarchy in `_native.pyi` has one source of truth.

use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
use pyo3::PyErr;

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

impl From<Error> for PyErr {
    fn from(err: Error) -> Self {
        match err {
            Error::InputTooLong { .. } => InputTooLongError::new_err(err.to_string()),
            _ => NativeError::new_err(err.to_string()),
        }
    }
}
