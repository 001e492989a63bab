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
    let rows: Vec<Cow<'_, [i64]>> = pieces
        .iter()
        .map(|p| match p.as_slice() {
            Ok(slice) => Cow::Borrowed(slice),
            Err(_) => Cow::Owned(p.as_array().to_vec()),
        })
        .collect();
    let padded = errors::detach(py, || Ok(pad_rows(&rows, pad_id, multiple)))?;
    Ok(padded.into_py(py))
}

#[cfg(test)]
mod tests {
    use super::*;

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
