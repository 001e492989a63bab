//! Tokenizing texts into padded or ragged id buffers with a Hugging Face `tokenizer.json`.

use std::path::Path;

use ndarray::Array1;
use numpy::{IntoPyArray, PyArray1, PyArray2};
use pyo3::prelude::*;
use pyo3::types::PyString;
use rayon::prelude::*;
use tokenizers::{
    PostProcessor, Tokenizer as HfTokenizer, TruncationDirection, TruncationParams,
    TruncationStrategy,
};

use crate::errors::{self, Error, Result};
use crate::padding::{check_multiple, pad_rows, Padded};

/// Characters kept per allowed token when capping long texts before tokenizing. Even dense text
/// (CJK, code) rarely needs more than a few characters per token, so the cap is generous.
const CHARS_PER_TOKEN_CAP: usize = 32;

/// Everything an encode needs, free of Python: safe to share across threads.
pub struct Encoder {
    tokenizer: HfTokenizer,
    max_length: usize,
    max_chars: usize,
    multiple: usize,
    pad_id: u32,
}

/// Token ids of each text, truncated to `max_length` (special tokens included).
pub type Rows = Vec<Vec<u32>>;

impl Encoder {
    pub fn from_file(
        path: &Path,
        max_length: usize,
        multiple: usize,
        max_chars: Option<usize>,
    ) -> Result<Self> {
        let mut tokenizer =
            HfTokenizer::from_file(path).map_err(|e| Error::Tokenizer(e.to_string()))?;
        // Keep the file's pad id, but none of its padding: it would pad every row to a fixed length.
        let pad_id = tokenizer
            .get_padding()
            .map(|p| p.pad_id)
            .or_else(|| tokenizer.token_to_id("[PAD]"))
            .or_else(|| tokenizer.token_to_id("<pad>"))
            .unwrap_or(0);
        let specials = tokenizer
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false));
        if max_length <= specials {
            return Err(Error::argument(
                "max_length",
                "larger than the number of special tokens",
                max_length,
            ));
        }
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length,
                stride: 0,
                strategy: TruncationStrategy::LongestFirst,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let max_chars = max_chars.unwrap_or(max_length.saturating_mul(CHARS_PER_TOKEN_CAP));
        if max_chars == 0 {
            return Err(Error::argument("max_chars", "at least 1", max_chars));
        }
        Ok(Self {
            tokenizer,
            max_length,
            max_chars,
            multiple,
            pad_id,
        })
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn max_chars(&self) -> usize {
        self.max_chars
    }

    pub fn multiple(&self) -> usize {
        self.multiple
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Encodes one text; `Ok(None)` means it had to be truncated.
    fn encode_one(&self, text: &str) -> Result<Option<Vec<u32>>> {
        let encode = |t: &str| {
            self.tokenizer
                .encode_fast(t, true)
                .map_err(|e| Error::Tokenizer(e.to_string()))
        };
        if let Some(prefix) = char_capped(text, self.max_chars) {
            // The prefix ends at a word boundary, so if it alone fills max_length the full text
            // gives the same tokens; otherwise (e.g. mostly whitespace) tokenize everything.
            let encoding = encode(prefix)?;
            if !encoding.get_overflowing().is_empty() {
                return Ok(None);
            }
        }
        let encoding = encode(text)?;
        Ok(encoding
            .get_overflowing()
            .is_empty()
            .then(|| encoding.get_ids().to_vec()))
    }

    fn encode_truncated(&self, text: &str) -> Result<Vec<u32>> {
        let capped = char_capped(text, self.max_chars).unwrap_or(text);
        let mut encoding = self
            .tokenizer
            .encode_fast(capped, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        if encoding.get_overflowing().is_empty() && capped.len() < text.len() {
            encoding = self
                .tokenizer
                .encode_fast(text, true)
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
        }
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids of every text, in parallel unless the call is small. With `truncate == false` a
    /// text longer than `max_length` tokens is an error naming its index: the first such text's,
    /// however the work was split, so a call refused twice is refused alike.
    pub fn encode_rows(&self, texts: &[&str], truncate: bool) -> Result<Rows> {
        let encode = |(index, text): (usize, &&str)| {
            without_panics(index, || {
                if truncate {
                    self.encode_truncated(text)
                } else {
                    self.encode_one(text)?.ok_or(Error::InputTooLong {
                        index,
                        max_length: self.max_length,
                    })
                }
            })
        };
        if is_small(texts) {
            texts.iter().enumerate().map(encode).collect()
        } else {
            // rayon's collect into a `Result` keeps whichever error a thread met first.
            let rows: Vec<Result<Vec<u32>>> = texts.par_iter().enumerate().map(encode).collect();
            rows.into_iter().collect()
        }
    }

    pub fn encode_padded(&self, texts: &[&str], truncate: bool) -> Result<(Padded, Array1<i64>)> {
        let rows = self.encode_rows(texts, truncate)?;
        let lengths = rows.iter().map(|r| r.len() as i64).collect();
        Ok((
            pad_rows(&rows, i64::from(self.pad_id), self.multiple),
            lengths,
        ))
    }

    pub fn encode_ragged(&self, texts: &[&str], truncate: bool) -> Result<(Vec<i64>, Vec<i64>)> {
        let rows = self.encode_rows(texts, truncate)?;
        let mut offsets = Vec::with_capacity(rows.len() + 1);
        offsets.push(0);
        let mut flat = Vec::with_capacity(rows.iter().map(Vec::len).sum());
        for row in &rows {
            flat.extend(row.iter().map(|&id| i64::from(id)));
            offsets.push(flat.len() as i64);
        }
        Ok((flat, offsets))
    }
}

/// Bytes of text below which a call is tokenized on the calling thread: handing it to rayon's
/// pool and waiting for it (two thread wake-ups) would cost more than the work saved.
const SEQUENTIAL_BYTES: usize = 1024;
/// Bytes of text below which a call keeps the GIL: releasing it and waiting to take it back from
/// whichever thread took it meanwhile would cost more than the encoding. Kept well under
/// `SEQUENTIAL_BYTES` so that small calls tokenized on worker threads still run side by side.
const GIL_HELD_BYTES: usize = 256;

fn text_bytes(texts: &[&str]) -> usize {
    texts.iter().map(|t| t.len()).sum()
}

fn is_small(texts: &[&str]) -> bool {
    texts.len() < 2 || text_bytes(texts) < SEQUENTIAL_BYTES
}

/// `encode()` with the GIL released, unless the call is tiny (`GIL_HELD_BYTES`).
fn in_or_out<T: Send>(
    py: Python<'_>,
    texts: &[&str],
    encode: impl FnOnce() -> Result<T> + Send,
) -> Result<T> {
    if text_bytes(texts) < GIL_HELD_BYTES {
        errors::caught(encode)
    } else {
        errors::detach(py, encode)
    }
}

/// Runs `encode` for text `index`, turning a panic inside the `tokenizers` crate into an error
/// that names the text, so Python sees a `NativeError` rather than a `PanicException`.
fn without_panics<T>(index: usize, encode: impl FnOnce() -> Result<T>) -> Result<T> {
    // Nothing shared is mutated while encoding (the tokenizer is used through `&self`), so no
    // state a panic interrupted is observed afterwards.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(encode)).unwrap_or_else(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(ToString::to_string)
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_owned());
        Err(Error::Tokenizer(format!(
            "text {index}: internal error: {message}"
        )))
    })
}

/// The start of `text` when it is longer than `max_chars` characters, cut on a character boundary
/// and, when one is near the end, on whitespace so no word is split.
fn char_capped(text: &str, max_chars: usize) -> Option<&str> {
    if text.len() <= max_chars {
        return None; // bytes >= chars
    }
    let (cut, _) = text.char_indices().nth(max_chars)?;
    let prefix = &text[..cut];
    match prefix.rfind(char::is_whitespace) {
        Some(space) if space >= prefix.len() / 2 => Some(&prefix[..space]),
        _ => Some(prefix),
    }
}

/// Borrows the UTF-8 of each `str` in `texts`; the strings stay alive in `owners`.
fn borrow_texts<'a>(owners: &'a [Bound<'_, PyString>]) -> Result<Vec<&'a str>> {
    owners
        .iter()
        .enumerate()
        .map(|(index, s)| {
            s.to_str().map_err(|e| Error::InvalidText {
                index,
                reason: e.to_string(),
            })
        })
        .collect()
}

fn collect_strings<'py>(texts: &Bound<'py, PyAny>) -> PyResult<Vec<Bound<'py, PyString>>> {
    if texts.is_instance_of::<PyString>() {
        return Err(pyo3::exceptions::PyTypeError::new_err(
            "texts must be a sequence of str, not a str",
        ));
    }
    texts
        .try_iter()?
        .map(|item| Ok(item?.cast_into::<PyString>()?))
        .collect()
}

/// `(ids, attention_mask, lengths)` as numpy arrays.
type Encoded<'py> = (
    Bound<'py, PyArray2<i64>>,
    Bound<'py, PyArray2<i64>>,
    Bound<'py, PyArray1<i64>>,
);
/// `(flat_ids, offsets)` as numpy arrays.
type Ragged<'py> = (Bound<'py, PyArray1<i64>>, Bound<'py, PyArray1<i64>>);

/// A Hugging Face tokenizer configured for embedding: no fixed padding, truncation at `max_length`.
#[pyclass(frozen, module = "embedpool._native")]
pub struct Tokenizer {
    encoder: Encoder,
}

#[pymethods]
impl Tokenizer {
    #[new]
    #[pyo3(signature = (path, *, max_length, pad_to_multiple_of = 8, max_chars = None))]
    fn new(
        path: std::path::PathBuf,
        max_length: i64,
        pad_to_multiple_of: i64,
        max_chars: Option<i64>,
    ) -> PyResult<Self> {
        let max_length = usize::try_from(max_length)
            .map_err(|_| Error::argument("max_length", "positive", max_length))?;
        let multiple = check_multiple("pad_to_multiple_of", pad_to_multiple_of)?;
        let max_chars = max_chars
            .map(|c| usize::try_from(c).map_err(|_| Error::argument("max_chars", "at least 1", c)))
            .transpose()?;
        Ok(Self {
            encoder: Encoder::from_file(&path, max_length, multiple, max_chars)?,
        })
    }

    #[getter]
    fn max_length(&self) -> usize {
        self.encoder.max_length()
    }

    #[getter]
    fn max_chars(&self) -> usize {
        self.encoder.max_chars()
    }

    #[getter]
    fn pad_id(&self) -> u32 {
        self.encoder.pad_id()
    }

    #[getter]
    fn pad_to_multiple_of(&self) -> usize {
        self.encoder.multiple()
    }

    #[pyo3(signature = (texts, *, truncate = true))]
    fn encode<'py>(
        &self,
        py: Python<'py>,
        texts: &Bound<'py, PyAny>,
        truncate: bool,
    ) -> PyResult<Encoded<'py>> {
        let owners = collect_strings(texts)?;
        let texts = borrow_texts(&owners)?;
        let (padded, lengths) =
            in_or_out(py, &texts, || self.encoder.encode_padded(&texts, truncate))?;
        let (ids, mask) = padded.into_py(py);
        Ok((ids, mask, lengths.into_pyarray(py)))
    }

    #[pyo3(signature = (texts, *, truncate = true))]
    fn encode_ragged<'py>(
        &self,
        py: Python<'py>,
        texts: &Bound<'py, PyAny>,
        truncate: bool,
    ) -> PyResult<Ragged<'py>> {
        let owners = collect_strings(texts)?;
        let texts = borrow_texts(&owners)?;
        let (flat, offsets) =
            in_or_out(py, &texts, || self.encoder.encode_ragged(&texts, truncate))?;
        Ok((flat.into_pyarray(py), offsets.into_pyarray(py)))
    }

    fn __repr__(&self) -> String {
        format!(
            "Tokenizer(max_length={}, pad_to_multiple_of={}, pad_id={}, max_chars={})",
            self.encoder.max_length,
            self.encoder.multiple,
            self.encoder.pad_id,
            self.encoder.max_chars
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_become_errors_naming_the_text() {
        let err = without_panics::<()>(3, || panic!("boom {}", 1)).unwrap_err();
        assert_eq!(
            err,
            Error::Tokenizer("text 3: internal error: boom 1".into())
        );
        assert_eq!(without_panics(0, || Ok(7)), Ok(7));
    }

    #[test]
    fn short_texts_are_not_capped() {
        assert_eq!(char_capped("hello world", 11), None);
        assert_eq!(char_capped("héllo", 5), None);
    }

    #[test]
    fn cap_cuts_on_char_boundary() {
        let text = "é".repeat(10);
        assert_eq!(char_capped(&text, 4), Some("éééé"));
    }

    #[test]
    fn cap_prefers_whitespace_near_the_end() {
        assert_eq!(char_capped("aaaa bbbb cccc", 12), Some("aaaa bbbb"));
        // No whitespace in the second half: cut mid-word rather than losing half the budget.
        assert_eq!(char_capped("a bbbbbbbbbbbbbb", 10), Some("a bbbbbbbb"));
    }
}
