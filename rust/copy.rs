//! The store writer's rows in Postgres's binary COPY format, and the cheap per-value checks
//! that decide which rows may go into it.
//!
//! Each row has the columns `collection_id int8, embedding vector, id text, text text,
//! metadata jsonb, content_hash bytea`, in that order (the writer's COPY names them so). The
//! embedding is pgvector's binary `vector`: uint16 dim, uint16 unused, big-endian float32
//! values, bit for bit (-0.0, denormals). jsonb's binary input is a version byte (1) and the
//! JSON text. The stream is cut into chunks of whole rows so Postgres parses one while the
//! client sends the next; the signature is at the start of the first, the trailer at the end of
//! the last.

use ndarray::Array2;
use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyArrayDyn, PyArrayMethods, PyReadonlyArray1,
    PyReadonlyArray2, PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyBytesMethods, PySlice, PyString};

use crate::errors::{self, Error, Result};

const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
const TRAILER: &[u8] = &(-1i16).to_be_bytes();
const FIELDS: i16 = 6;
const JSONB_VERSION: u8 = 1;
/// pgvector's limit for `vector`; the dimension is a uint16 on the wire.
const MAX_DIM: usize = 16_000;

/// The int8 first column: the collection's id for every row, or one value per row (the row's
/// position, when the rows go to the staging table).
#[derive(Clone, Copy, Debug)]
pub enum First<'a> {
    One(i64),
    Each(&'a [i64]),
}

/// Column-wise rows, borrowed; `vectors` is row-major, `dim` values per row.
#[derive(Clone, Copy, Debug)]
pub struct Rows<'a> {
    pub first: First<'a>,
    pub vectors: &'a [f32],
    pub dim: usize,
    /// Row `k` takes the vector at `picks[k]`; without, the `k`th. Spares the caller a copy of its
    /// matrix in the rows' order.
    pub picks: Option<&'a [usize]>,
    pub ids: &'a [&'a str],
    pub texts: &'a [&'a str],
    pub metadata: &'a [&'a str],
    pub hashes: &'a [&'a [u8]],
}

impl Rows<'_> {
    fn len(&self) -> usize {
        self.ids.len()
    }

    fn check(&self) -> Result<()> {
        let n = self.len();
        if self.dim == 0 || self.dim > MAX_DIM {
            return Err(Error::argument("dim", "in 1..=16000", self.dim));
        }
        if !self.vectors.len().is_multiple_of(self.dim) {
            return Err(Error::array(
                "vectors",
                format!("{} values are not rows of {}", self.vectors.len(), self.dim),
            ));
        }
        let available = self.vectors.len() / self.dim;
        match self.picks {
            None if available != n => {
                return Err(Error::array(
                    "vectors",
                    format!("{available} rows for {n} ids"),
                ));
            }
            Some(picks) if picks.len() != n => {
                return Err(Error::array(
                    "rows",
                    format!("{} values for {n} ids", picks.len()),
                ));
            }
            Some(picks) if picks.iter().any(|&row| row >= available) => {
                return Err(Error::array(
                    "rows",
                    format!("a row beyond the {available} of vectors"),
                ));
            }
            _ => {}
        }
        let lengths = [
            ("texts", self.texts.len()),
            ("metadata", self.metadata.len()),
            ("hashes", self.hashes.len()),
        ];
        if let First::Each(values) = self.first {
            if values.len() != n {
                return Err(Error::array(
                    "first",
                    format!("{} values for {n} rows", values.len()),
                ));
            }
        }
        for (name, len) in lengths {
            if len != n {
                return Err(Error::array(name, format!("{len} values for {n} ids")));
            }
        }
        Ok(())
    }

    /// Bytes of row `k` on the wire.
    fn row_size(&self, k: usize) -> usize {
        2 + 4 * 6
            + 8
            + 4
            + 4 * self.dim
            + self.ids[k].len()
            + self.texts[k].len()
            + 1
            + self.metadata[k].len()
            + self.hashes[k].len()
    }
}

/// A field's length prefix; Postgres refuses a field over 1 GB anyway, long before i32 ends.
fn length(name: &'static str, len: usize) -> Result<[u8; 4]> {
    i32::try_from(len)
        .map(i32::to_be_bytes)
        .map_err(|_| Error::array(name, format!("a value of {len} bytes is too long for COPY")))
}

fn put_row(out: &mut Vec<u8>, rows: &Rows<'_>, k: usize) -> Result<()> {
    let first = match rows.first {
        First::One(value) => value,
        First::Each(values) => values[k],
    };
    out.extend_from_slice(&FIELDS.to_be_bytes());
    out.extend_from_slice(&8i32.to_be_bytes());
    out.extend_from_slice(&first.to_be_bytes());
    let dim = rows.dim;
    out.extend_from_slice(&length("vectors", 4 + 4 * dim)?);
    out.extend_from_slice(&(dim as u16).to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    let at = out.len();
    out.resize(at + 4 * dim, 0);
    let at_row = rows.picks.map_or(k, |picks| picks[k]);
    let values = &rows.vectors[at_row * dim..(at_row + 1) * dim];
    for (wire, value) in out[at..].chunks_exact_mut(4).zip(values) {
        wire.copy_from_slice(&value.to_be_bytes());
    }
    for (name, value) in [("ids", rows.ids[k]), ("texts", rows.texts[k])] {
        out.extend_from_slice(&length(name, value.len())?);
        out.extend_from_slice(value.as_bytes());
    }
    out.extend_from_slice(&length("metadata", rows.metadata[k].len() + 1)?);
    out.push(JSONB_VERSION);
    out.extend_from_slice(rows.metadata[k].as_bytes());
    out.extend_from_slice(&length("hashes", rows.hashes[k].len())?);
    out.extend_from_slice(rows.hashes[k]);
    Ok(())
}

/// Which ends of the whole COPY stream a run of rows carries: a stream encoded a part at a time
/// (so Postgres parses one part while the next is encoded) has the signature before its first
/// row and the trailer after its last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Framing {
    pub signature: bool,
    pub trailer: bool,
}

impl Framing {
    /// Both ends: the rows are the whole stream.
    pub const WHOLE: Self = Self {
        signature: true,
        trailer: true,
    };
}

/// The binary COPY stream of `rows`, in chunks of `chunk_rows` rows (the last may be shorter; an
/// empty batch is one chunk of signature and trailer).
pub fn encode_copy(rows: &Rows<'_>, chunk_rows: usize) -> Result<Vec<Vec<u8>>> {
    let mut chunks = Vec::new();
    for_each_chunk(rows, chunk_rows, Framing::WHOLE, |chunk| {
        chunks.push(chunk.to_vec());
        Ok(())
    })?;
    Ok(chunks)
}

/// Hands each chunk of [`encode_copy`] to `take`, with the ends `framing` asks for, built in one
/// buffer that is reused: fresh megabytes for every batch cost more in page faults than the
/// encoding itself.
pub fn for_each_chunk(
    rows: &Rows<'_>,
    chunk_rows: usize,
    framing: Framing,
    mut take: impl FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    rows.check()?;
    if chunk_rows == 0 {
        return Err(Error::argument("chunk_rows", "at least 1", chunk_rows));
    }
    let n = rows.len();
    let mut out = Vec::new();
    let mut start = 0;
    loop {
        let end = (start + chunk_rows).min(n);
        out.clear();
        out.reserve(SIGNATURE.len() + (start..end).map(|k| rows.row_size(k)).sum::<usize>() + 2);
        if start == 0 && framing.signature {
            out.extend_from_slice(SIGNATURE);
        }
        for k in start..end {
            put_row(&mut out, rows, k)?;
        }
        if end == n {
            if framing.trailer {
                out.extend_from_slice(TRAILER);
            }
            return take(&out);
        }
        take(&out)?;
        start = end;
    }
}

/// The element texts of a JSON array, as JSON writes it: the writer encodes a whole batch's
/// metadata with one call and stores each row's element. Only the array's structure is read
/// (strings and nesting), not the elements' grammar.
pub fn split_json_array(text: &str) -> Result<Vec<&str>> {
    let malformed = |why: &str| Error::array("text", format!("not a JSON array: {why}"));
    let body = text.trim_matches(is_json_space);
    let inner = body
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .ok_or_else(|| malformed("no enclosing brackets"))?;
    let mut items = Vec::new();
    if inner.trim_matches(is_json_space).is_empty() {
        return Ok(items);
    }
    let (mut depth, mut in_string, mut escaped, mut start) = (0usize, false, false, 0usize);
    for (at, byte) in inner.bytes().enumerate() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => depth += 1,
            b']' | b'}' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| malformed("unbalanced"))?;
            }
            b',' if depth == 0 => {
                items.push(inner[start..at].trim_matches(is_json_space));
                start = at + 1;
            }
            _ => {}
        }
    }
    if in_string || depth != 0 {
        return Err(malformed("unbalanced"));
    }
    items.push(inner[start..].trim_matches(is_json_space));
    if items.iter().any(|item| item.is_empty()) {
        return Err(malformed("an empty element"));
    }
    Ok(items)
}

fn is_json_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

/// Whether `value` may be a `text` column value of `min_bytes..=max_bytes` bytes of UTF-8:
/// Postgres's text cannot hold U+0000.
pub fn text_fits(value: &str, min_bytes: usize, max_bytes: usize) -> bool {
    (min_bytes..=max_bytes).contains(&value.len()) && !value.as_bytes().contains(&0)
}

fn collect<'py, T: pyo3::PyTypeCheck>(
    name: &'static str,
    what: &'static str,
    values: &Bound<'py, PyAny>,
) -> Result<Vec<Bound<'py, T>>> {
    let wrong = || Error::array(name, format!("expected a sequence of {what}"));
    if values.is_instance_of::<PyString>() || values.is_instance_of::<PyBytes>() {
        return Err(wrong());
    }
    values
        .try_iter()
        .map_err(|_| wrong())?
        .map(|item| {
            item.ok()
                .and_then(|item| item.cast_into::<T>().ok())
                .ok_or_else(wrong)
        })
        .collect()
}

fn borrow_strs<'a>(name: &'static str, owners: &'a [Bound<'_, PyString>]) -> Result<Vec<&'a str>> {
    owners
        .iter()
        .enumerate()
        .map(|(k, s)| {
            s.to_str()
                .map_err(|_| Error::array(name, format!("item {k} is not valid Unicode")))
        })
        .collect()
}

#[derive(FromPyObject)]
pub enum FirstArg<'py> {
    One(i64),
    Each(PyReadonlyArray1<'py, i64>),
}

#[pyfunction]
#[pyo3(signature = (
    first, vectors, ids, texts, metadata, hashes, *, rows = None, chunk_rows = 128, signature = true,
    trailer = true,
))]
#[allow(clippy::too_many_arguments)]
pub fn copy_binary<'py>(
    py: Python<'py>,
    first: FirstArg<'py>,
    vectors: PyReadonlyArray2<'py, f32>,
    ids: &Bound<'py, PyAny>,
    texts: &Bound<'py, PyAny>,
    metadata: &Bound<'py, PyAny>,
    hashes: &Bound<'py, PyAny>,
    rows: Option<PyReadonlyArray1<'py, i64>>,
    chunk_rows: usize,
    signature: bool,
    trailer: bool,
) -> PyResult<Vec<Bound<'py, PyBytes>>> {
    let picks = rows
        .map(|rows| {
            rows.as_array()
                .iter()
                .map(|&row| {
                    usize::try_from(row)
                        .map_err(|_| Error::array("rows", format!("a negative row: {row}")))
                })
                .collect::<Result<Vec<usize>>>()
        })
        .transpose()?;
    let (ids, texts, metadata) = (
        collect::<PyString>("ids", "str", ids)?,
        collect::<PyString>("texts", "str", texts)?,
        collect::<PyString>("metadata", "str", metadata)?,
    );
    let hashes = collect::<PyBytes>("hashes", "bytes", hashes)?;
    let (ids, texts, metadata) = (
        borrow_strs("ids", &ids)?,
        borrow_strs("texts", &texts)?,
        borrow_strs("metadata", &metadata)?,
    );
    let hashes: Vec<&[u8]> = hashes.iter().map(PyBytesMethods::as_bytes).collect();
    let dim = vectors.shape()[1];
    // `as_slice` takes a Fortran-ordered array too, whose slice is column by column.
    let vectors = Some(&vectors)
        .filter(|v| v.is_c_contiguous())
        .and_then(|v| v.as_slice().ok())
        .ok_or_else(|| Error::array("vectors", "expected a C-contiguous array"))?;
    let first_values;
    let first = match &first {
        FirstArg::One(value) => First::One(*value),
        FirstArg::Each(values) => {
            first_values = values.as_array().to_vec();
            First::Each(&first_values)
        }
    };
    let rows = Rows {
        first,
        vectors,
        dim,
        picks: picks.as_deref(),
        ids: &ids,
        texts: &texts,
        metadata: &metadata,
        hashes: &hashes,
    };
    // The GIL stays held: the bytes objects need it, encoding a batch takes about as long as
    // copying it out would, and letting go between chunks could wait a thread switch each time.
    let mut chunks = Vec::new();
    errors::caught(|| {
        let framing = Framing { signature, trailer };
        for_each_chunk(&rows, chunk_rows, framing, |chunk| {
            chunks.push(PyBytes::new(py, chunk));
            Ok(())
        })
    })?;
    Ok(chunks)
}

/// Positions of `values` that are not a `str` of `min_bytes..=max_bytes` bytes of UTF-8 without
/// U+0000 (a lone surrogate has no UTF-8).
#[pyfunction]
#[pyo3(signature = (values, *, min_bytes = 0, max_bytes = None))]
pub fn text_faults(
    values: &Bound<'_, PyAny>,
    min_bytes: usize,
    max_bytes: Option<usize>,
) -> PyResult<Vec<usize>> {
    let max_bytes = max_bytes.unwrap_or(usize::MAX);
    let mut faults = Vec::new();
    for (k, value) in values.try_iter()?.enumerate() {
        let value = value?;
        let fits = value
            .cast::<PyString>()
            .ok()
            .and_then(|s| s.to_str().ok().map(|s| text_fits(s, min_bytes, max_bytes)));
        if fits != Some(true) {
            faults.push(k);
        }
    }
    Ok(faults)
}

/// `values` as one C-contiguous float32 matrix `[len, dim]` when every one is a 1-D float32 numpy
/// array of `dim` values; otherwise None (the caller converts them its own way). The common case of
/// the writer, without numpy's per-array work in `np.stack`. When the values are consecutive rows of
/// one C-contiguous matrix (the rows a batch's embeddings were cut from), the result is a view of
/// those rows, not a copy.
#[pyfunction]
pub fn stack_vectors<'py>(
    py: Python<'py>,
    values: &Bound<'py, PyAny>,
    dim: usize,
) -> PyResult<Option<Bound<'py, PyArray2<f32>>>> {
    let mut arrays = Vec::with_capacity(values.len().unwrap_or(0));
    for value in values.try_iter()? {
        let value = value?;
        match value.cast_into::<PyArray1<f32>>() {
            Ok(array) if array.is_contiguous() && array.len() == dim => arrays.push(array),
            _ => return Ok(None),
        }
    }
    let Some(first) = arrays.first() else {
        return Ok(Some(Array2::<f32>::zeros((0, dim)).into_pyarray(py)));
    };
    let row_bytes = dim * size_of::<f32>();
    let start = first.data() as usize;
    let consecutive = arrays
        .iter()
        .enumerate()
        .all(|(k, array)| array.data() as usize == start + k * row_bytes);
    if consecutive {
        if let Some(view) = rows_of_base(first, arrays.len(), dim)? {
            return Ok(Some(view));
        }
    }
    let mut flat = Vec::with_capacity(arrays.len() * dim);
    for array in &arrays {
        flat.extend_from_slice(array.readonly().as_slice()?);
    }
    let matrix = Array2::from_shape_vec((arrays.len(), dim), flat)
        .map_err(|e| Error::array("values", e.to_string()))?;
    Ok(Some(matrix.into_pyarray(py)))
}

/// The `n` rows of `dim` values that start at `first`, as a `[n, dim]` view of the array that owns
/// that memory (`first.base`, however many views lie between); None unless that array is a
/// C-contiguous float32 one that holds them all.
fn rows_of_base<'py>(
    first: &Bound<'py, PyArray1<f32>>,
    n: usize,
    dim: usize,
) -> PyResult<Option<Bound<'py, PyArray2<f32>>>> {
    let Ok(base) = first.getattr("base")?.cast_into::<PyArrayDyn<f32>>() else {
        return Ok(None);
    };
    let item = size_of::<f32>();
    let base_start = base.data() as usize;
    let Some(offset) = (first.data() as usize).checked_sub(base_start) else {
        return Ok(None);
    };
    let (start, end) = (offset / item, offset / item + n * dim);
    if !base.is_c_contiguous() || offset % item != 0 || end > base.len() {
        return Ok(None);
    }
    let flat = base.call_method1("reshape", (-1,))?;
    let rows = flat
        .get_item(PySlice::new(
            first.py(),
            to_isize(start)?,
            to_isize(end)?,
            1,
        ))?
        .call_method1("reshape", (n, dim))?;
    Ok(Some(rows.cast_into::<PyArray2<f32>>()?))
}

fn to_isize(value: usize) -> PyResult<isize> {
    Ok(isize::try_from(value).map_err(|e| Error::array("values", e.to_string()))?)
}

/// Why a row cannot be stored ([`vector_faults`]), most serious first: a row is given one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum VectorFault {
    /// A NaN or an infinity (values beyond float32 range became infinite when cast).
    NonFinite = 1,
    /// A value beyond float16's range, in a collection that stores float16.
    BeyondFloat16 = 2,
    /// All zeros: no direction, in a cosine collection.
    Zeros = 3,
}

/// |x| bits of float16's largest finite value: for finite floats, bit order is magnitude order.
const FLOAT16_MAX_BITS: u32 = 0x477F_E000;

/// The rows of a row-major `[_, dim]` matrix that cannot be stored, with why. One pass over
/// the values' bits, without branches per value, so it vectorises.
pub fn vector_faults(
    vectors: &[f32],
    dim: usize,
    cosine: bool,
    float16: bool,
) -> Vec<(usize, VectorFault)> {
    let mut faults = Vec::new();
    if dim == 0 {
        return faults;
    }
    for (k, row) in vectors.chunks_exact(dim).enumerate() {
        let (mut largest, mut any) = (0u32, 0u32);
        for &x in row {
            let magnitude = x.to_bits() & 0x7FFF_FFFF;
            largest = largest.max(magnitude);
            any |= magnitude;
        }
        let fault = if largest >= 0x7F80_0000 {
            Some(VectorFault::NonFinite)
        } else if float16 && largest > FLOAT16_MAX_BITS {
            Some(VectorFault::BeyondFloat16)
        } else if cosine && any == 0 {
            Some(VectorFault::Zeros)
        } else {
            None
        };
        faults.extend(fault.map(|fault| (k, fault)));
    }
    faults
}

/// Rows of `matrix` that cannot be stored, as (row, code): 1 a NaN or infinity, 2 a value beyond
/// float16 range (checked when `float16`), 3 all zeros (checked when `cosine`). The GIL stays held:
/// the pass is short next to a thread switch.
#[pyfunction]
#[pyo3(name = "vector_faults", signature = (matrix, *, cosine, float16))]
pub fn py_vector_faults(
    matrix: PyReadonlyArray2<'_, f32>,
    cosine: bool,
    float16: bool,
) -> Vec<(usize, u8)> {
    let dim = matrix.shape()[1];
    let contiguous;
    let values = match matrix.as_slice() {
        Ok(values) if matrix.is_c_contiguous() => values,
        _ => {
            contiguous = matrix.as_array().iter().copied().collect::<Vec<_>>();
            &contiguous
        }
    };
    vector_faults(values, dim, cosine, float16)
        .into_iter()
        .map(|(k, fault)| (k, fault as u8))
        .collect()
}

/// The element texts of the JSON array `text` (see [`split_json_array`]).
#[pyfunction]
pub fn json_array_items<'py>(py: Python<'py>, text: &str) -> PyResult<Vec<Bound<'py, PyString>>> {
    Ok(split_json_array(text)?
        .into_iter()
        .map(|item| PyString::new(py, item))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_row<'a>(vectors: &'a [f32], hashes: &'a [&'a [u8]]) -> Rows<'a> {
        Rows {
            first: First::One(7),
            vectors,
            dim: vectors.len(),
            picks: None,
            ids: &["é"],
            texts: &[""],
            metadata: &["{}"],
            hashes,
        }
    }

    #[test]
    fn a_row_is_laid_out_as_postgres_reads_it() {
        let vectors = [-0.0f32, f32::from_bits(1)];
        let chunks = encode_copy(&one_row(&vectors, &[b"\x01\x02"]), 128).unwrap();
        let mut expected = SIGNATURE.to_vec();
        expected.extend_from_slice(&[0, 6, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 7]);
        expected.extend_from_slice(&[0, 0, 0, 12, 0, 2, 0, 0, 0x80, 0, 0, 0, 0, 0, 0, 1]);
        expected.extend_from_slice(&[0, 0, 0, 2, 0xc3, 0xa9, 0, 0, 0, 0]);
        expected.extend_from_slice(&[0, 0, 0, 3, 1, b'{', b'}', 0, 0, 0, 2, 1, 2, 0xff, 0xff]);
        assert_eq!(chunks, vec![expected]);
    }

    #[test]
    fn chunks_hold_whole_rows_and_join_into_one_stream() {
        let vectors = [1.0f32; 10];
        let ids = ["a", "b", "c", "d", "e"];
        let metadata = ["{}"; 5];
        let hashes: [&[u8]; 5] = [b"h"; 5];
        let positions = [0i64, 1, 2, 3, 4];
        let rows = Rows {
            first: First::Each(&positions),
            vectors: &vectors,
            dim: 2,
            picks: None,
            ids: &ids,
            texts: &ids,
            metadata: &metadata,
            hashes: &hashes,
        };
        let whole = encode_copy(&rows, 128).unwrap();
        let cut = encode_copy(&rows, 2).unwrap();
        assert_eq!(cut.len(), 3);
        assert_eq!(whole.len(), 1);
        assert_eq!(cut.concat(), whole[0]);
        let row = rows.row_size(0);
        assert_eq!(cut[1].len(), 2 * row);
    }

    #[test]
    fn an_empty_batch_is_signature_and_trailer() {
        let rows = Rows {
            first: First::One(1),
            vectors: &[],
            dim: 3,
            picks: None,
            ids: &[],
            texts: &[],
            metadata: &[],
            hashes: &[],
        };
        assert_eq!(
            encode_copy(&rows, 128).unwrap(),
            vec![[SIGNATURE, TRAILER].concat()]
        );
    }

    #[test]
    fn mismatched_columns_are_refused() {
        let vectors = [1.0f32; 3];
        let mut rows = one_row(&vectors, &[b"h"]);
        rows.dim = 2;
        assert!(encode_copy(&rows, 128).is_err());
        rows.dim = 3;
        rows.texts = &[];
        assert!(encode_copy(&rows, 128).is_err());
        rows.texts = &[""];
        rows.first = First::Each(&[]);
        assert!(encode_copy(&rows, 128).is_err());
        rows.first = First::One(1);
        rows.picks = Some(&[1]);
        assert!(encode_copy(&rows, 128).is_err());
    }

    #[test]
    fn picked_rows_take_the_vectors_they_name() {
        let vectors = [1.0f32, 2.0, 3.0];
        let ids = ["a", "b"];
        let metadata = ["{}"; 2];
        let hashes: [&[u8]; 2] = [b""; 2];
        let picked = Rows {
            first: First::One(1),
            vectors: &vectors,
            dim: 1,
            picks: Some(&[2, 0]),
            ids: &ids,
            texts: &ids,
            metadata: &metadata,
            hashes: &hashes,
        };
        let copied = Rows {
            vectors: &[3.0, 1.0],
            picks: None,
            ..picked
        };
        assert_eq!(encode_copy(&picked, 128), encode_copy(&copied, 128));
    }

    #[test]
    fn json_arrays_split_at_top_level_commas_only() {
        let text = r#"[{"a":[1,2],"b":"x,\"]}"},{},{"c":{"d":","}}]"#;
        assert_eq!(
            split_json_array(text).unwrap(),
            [r#"{"a":[1,2],"b":"x,\"]}"}"#, "{}", r#"{"c":{"d":","}}"#]
        );
        assert_eq!(split_json_array(" [ ] ").unwrap(), Vec::<&str>::new());
        assert_eq!(
            split_json_array("[1, \"\\\\\"]").unwrap(),
            ["1", "\"\\\\\""]
        );
        for bad in ["", "{}", "[1,]", "[,1]", "[{]", "[\"]", "[}{]"] {
            assert!(split_json_array(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn texts_fit_by_length_and_without_nul() {
        assert!(text_fits("ab", 1, 2));
        assert!(!text_fits("", 1, 2));
        assert!(!text_fits("é€", 1, 4));
        assert!(!text_fits("a\0b", 0, 10));
    }

    #[test]
    fn vector_faults_name_each_bad_row_once_most_serious_first() {
        use VectorFault::{BeyondFloat16, NonFinite, Zeros};
        let rows = [
            [1.0f32, 0.0],
            [f32::NAN, 0.0],
            [0.0, -f32::INFINITY],
            [-0.0, 0.0],
            [65504.0, -65504.0],
            [65505.0, 0.0],
            [f32::NAN, 1e9],
            [f32::from_bits(1), 0.0],
        ];
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        assert_eq!(
            vector_faults(&flat, 2, true, true),
            vec![
                (1, NonFinite),
                (2, NonFinite),
                (3, Zeros),
                (5, BeyondFloat16),
                (6, NonFinite)
            ]
        );
        assert_eq!(
            vector_faults(&flat, 2, false, false),
            vec![(1, NonFinite), (2, NonFinite), (6, NonFinite)]
        );
        assert!(vector_faults(&[], 0, true, true).is_empty());
    }

    #[test]
    fn float16_max_bits_are_float16s_largest_finite_value() {
        assert_eq!(FLOAT16_MAX_BITS, 65504.0f32.to_bits());
    }

    #[test]
    fn parts_framed_by_where_they_lie_join_into_the_whole_stream() {
        let vectors = [0.5f32; 10];
        let ids = ["a", "b", "c", "d", "e"];
        let metadata = ["{}"; 5];
        let hashes: [&[u8]; 5] = [b"h"; 5];
        let rows = |from: usize, to: usize| Rows {
            first: First::One(3),
            vectors: &vectors[from * 2..to * 2],
            dim: 2,
            picks: None,
            ids: &ids[from..to],
            texts: &ids[from..to],
            metadata: &metadata[from..to],
            hashes: &hashes[from..to],
        };
        let whole = encode_copy(&rows(0, 5), 128).unwrap().concat();
        let mut parts = Vec::new();
        for (from, to) in [(0, 2), (2, 3), (3, 5)] {
            let framing = Framing {
                signature: from == 0,
                trailer: to == 5,
            };
            for_each_chunk(&rows(from, to), 128, framing, |chunk| {
                parts.extend_from_slice(chunk);
                Ok(())
            })
            .unwrap();
        }
        assert_eq!(parts, whole);
    }
}
