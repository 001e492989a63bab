//! Right-padding token id rows into a rectangular batch plus its attention mask.

use std::borrow::Cow;

use ndarray::{s, Array2};
use numpy::{IntoPyArray, PyArray2, PyReadonlyArray1};
use pyo3::prelude::*;

use crate::errors::{self, Error, Result};

/// Rounds `len` up to a multiple of `multiple` (which must be at least 1).
pub fn round_up(len: usize, multiple: usize) -> usize {
    len.div_ceil(multiple) * multiple
}

/// Checks a user-supplied padding multiple and converts it to `usize`.
pub fn check_multiple(name: &'static str, multiple: i64) -> Result<usize> {
    usize::try_from(multiple)
        .ok()
        .filter(|&m| m >= 1)
        .ok_or_else(|| Error::argument(name, "at least 1", multiple))
}

/// A padded batch: `ids` and `mask` are both `[rows, width]`, row-major.
#[derive(Debug, PartialEq, Eq)]
pub struct Padded {
    pub ids: Array2<i64>,
    pub mask: Array2<i64>,
}

/// Copies each row into a `[rows.len(), width]` batch, padding with `pad_id`; `width` is the longest
/// row rounded up to `multiple`.
pub fn pad_rows<R, T>(rows: &[R], pad_id: i64, multiple: usize) -> Padded
where
    R: AsRef<[T]>,
    T: Copy + Into<i64>,
{
    let longest = rows.iter().map(|r| r.as_ref().len()).max().unwrap_or(0);
    let width = round_up(longest, multiple);
    let mut ids = Array2::from_elem((rows.len(), width), pad_id);
    let mut mask = Array2::zeros((rows.len(), width));
    for ((row, mut id_row), mut mask_row) in rows.iter().zip(ids.rows_mut()).zip(mask.rows_mut()) {
        let row = row.as_ref();
        for (dst, &src) in id_row.iter_mut().zip(row) {
            *dst = src.into();
        }
        mask_row.slice_mut(s![..row.len()]).fill(1);
    }
    Padded { ids, mask }
}

/// `(ids, attention_mask)` as numpy arrays.
pub type PaddedArrays<'py> = (Bound<'py, PyArray2<i64>>, Bound<'py, PyArray2<i64>>);

impl Padded {
    pub fn into_py(self, py: Python<'_>) -> PaddedArrays<'_> {
        (self.ids.into_pyarray(py), self.mask.into_pyarray(py))
    }
}

#[pyfunction]
#[pyo3(signature = (pieces, *, pad_id, multiple))]
pub fn pad_batch<'py>(
    py: Python<'py>,
    pieces: Vec<PyReadonlyArray1<'py, i64>>,
    pad_id: i64,
    multiple: i64,
) -> PyResult<PaddedArrays<'py>> {
    let multiple = check_multiple("multiple", multiple)?;
    // Views of a contiguous encode_ragged buffer borrow; anything strided is copied once.
    let rows: Vec<Cow<'_, [i64]>> = pieces.iter().map(contiguous).collect();
    let padded = errors::detach(py, || Ok(pad_rows(&rows, pad_id, multiple)))?;
    Ok(padded.into_py(py))
}

/// The rows `(source[k], document[k])` of ragged sources (`ids[j]`, document `d` of source `j` being
/// `ids[j][offsets[j][d]..offsets[j][d + 1]]`), or an error naming the first row that is not there.
fn gather_rows<'a>(
    ids: &[&'a [i64]],
    offsets: &[&[i64]],
    source: &[i64],
    document: &[i64],
) -> Result<Vec<&'a [i64]>> {
    if source.len() != document.len() {
        return Err(Error::argument(
            "document",
            "as long as source",
            document.len() as i64,
        ));
    }
    let span = |j: i64, d: i64| -> Option<&'a [i64]> {
        let j = usize::try_from(j).ok()?;
        let d = usize::try_from(d).ok()?;
        let (ids, offsets) = (*ids.get(j)?, *offsets.get(j)?);
        let start = usize::try_from(*offsets.get(d)?).ok()?;
        let end = usize::try_from(*offsets.get(d + 1)?).ok()?;
        ids.get(start..end)
    };
    source
        .iter()
        .zip(document)
        .enumerate()
        .map(|(k, (&j, &d))| {
            span(j, d)
                .ok_or_else(|| Error::argument("source/document", "a row of the sources", k as i64))
        })
        .collect()
}

/// `pad_batch` of rows picked out of several callers' ragged token ids without a Python step per
/// row: row `k` is document `document[k]` of source `source[k]`.
#[pyfunction]
#[pyo3(signature = (ids, offsets, source, document, *, pad_id, multiple))]
pub fn pad_gather<'py>(
    py: Python<'py>,
    ids: Vec<PyReadonlyArray1<'py, i64>>,
    offsets: Vec<PyReadonlyArray1<'py, i64>>,
    source: PyReadonlyArray1<'py, i64>,
    document: PyReadonlyArray1<'py, i64>,
    pad_id: i64,
    multiple: i64,
) -> PyResult<PaddedArrays<'py>> {
    let multiple = check_multiple("multiple", multiple)?;
    if ids.len() != offsets.len() {
        return Err(Error::argument("offsets", "one per ids array", offsets.len() as i64).into());
    }
    let ids: Vec<Cow<'_, [i64]>> = ids.iter().map(contiguous).collect();
    let offsets: Vec<Cow<'_, [i64]>> = offsets.iter().map(contiguous).collect();
    let (source, document) = (contiguous(&source), contiguous(&document));
    let padded = errors::detach(py, || {
        let ids: Vec<&[i64]> = ids.iter().map(AsRef::as_ref).collect();
        let offsets: Vec<&[i64]> = offsets.iter().map(AsRef::as_ref).collect();
        let rows = gather_rows(&ids, &offsets, &source, &document)?;
        Ok(pad_rows(&rows, pad_id, multiple))
    })?;
    Ok(padded.into_py(py))
}

/// A borrowed slice of a contiguous array; anything strided is copied once.
fn contiguous<'a>(array: &'a PyReadonlyArray1<'_, i64>) -> Cow<'a, [i64]> {
    match array.as_slice() {
        Ok(slice) => Cow::Borrowed(slice),
        Err(_) => Cow::Owned(array.as_array().to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathers_rows_of_several_sources() {
        let (a, b) = ([1, 2, 3, 4, 5], [7, 8]);
        let (oa, ob) = ([0, 2, 5], [0, 1, 2]);
        let rows = gather_rows(&[&a, &b], &[&oa, &ob], &[1, 0, 0, 1], &[0, 1, 0, 1]).unwrap();
        assert_eq!(rows, vec![&[7][..], &[3, 4, 5][..], &[1, 2][..], &[8][..]]);
        assert!(gather_rows(&[&a], &[&oa], &[0], &[2]).is_err()); // no document 2
        assert!(gather_rows(&[&a], &[&oa], &[1], &[0]).is_err()); // no source 1
        assert!(gather_rows(&[&a], &[&oa], &[-1], &[0]).is_err());
        assert!(gather_rows(&[&a], &[&[0, 9]], &[0], &[0]).is_err()); // offsets past the ids
        assert!(gather_rows(&[&a], &[&oa], &[0, 0], &[0]).is_err());
    }

    #[test]
    fn round_up_multiples() {
        assert_eq!(round_up(0, 8), 0);
        assert_eq!(round_up(1, 8), 8);
        assert_eq!(round_up(8, 8), 8);
        assert_eq!(round_up(9, 8), 16);
        assert_eq!(round_up(5, 1), 5);
    }

    #[test]
    fn pads_to_multiple_with_mask() {
        let rows = [vec![1, 2, 3], vec![4], vec![]];
        let padded = pad_rows(&rows, 0, 4);
        assert_eq!(padded.ids.shape(), &[3, 4]);
        assert_eq!(padded.ids.row(0).to_vec(), vec![1, 2, 3, 0]);
        assert_eq!(padded.ids.row(1).to_vec(), vec![4, 0, 0, 0]);
        assert_eq!(padded.mask.row(0).to_vec(), vec![1, 1, 1, 0]);
        assert_eq!(padded.mask.row(2).to_vec(), vec![0, 0, 0, 0]);
    }

    #[test]
    fn empty_batch_is_zero_by_zero() {
        let rows: [Vec<i64>; 0] = [];
        assert_eq!(pad_rows(&rows, 0, 8).ids.shape(), &[0, 0]);
    }

    #[test]
    fn rejects_nonpositive_multiple() {
        assert!(check_multiple("multiple", 0).is_err());
        assert_eq!(check_multiple("multiple", 8), Ok(8));
    }
}
