//! Planning which queued inputs run together under a padded-cost token budget.

use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1};
use pyo3::prelude::*;

use crate::errors::{self, Error, Result};
use crate::padding::{check_multiple, round_up};

/// Limits a batch must respect: padded cost `round_up(longest, multiple) * count <= max_tokens`
/// and `count <= max_size`. A single input is always allowed, even over budget.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub max_tokens: usize,
    pub max_size: usize,
    pub multiple: usize,
}

/// Groups input positions into batches. Inputs are sorted by length (ties: older first) so each
/// batch wastes little padding; the batch holding position 0, the oldest input, comes first so the
/// queue head is never starved by shorter newcomers.
pub fn plan(lengths: &[usize], budget: Budget) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| (lengths[i], i));

    let mut batches: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    for i in order {
        // Sorted ascending, so the newcomer is the longest of the batch it would join.
        let cost = round_up(lengths[i], budget.multiple).saturating_mul(current.len() + 1);
        if !current.is_empty() && (cost > budget.max_tokens || current.len() + 1 > budget.max_size)
        {
            batches.push(std::mem::take(&mut current));
        }
        current.push(i);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    if let Some(head) = batches.iter().position(|b| b.contains(&0)) {
        batches[..=head].rotate_right(1);
    }
    batches
}

fn positive(name: &'static str, value: i64) -> Result<usize> {
    usize::try_from(value)
        .ok()
        .filter(|&v| v >= 1)
        .ok_or_else(|| Error::argument(name, "at least 1", value))
}

#[pyfunction]
#[pyo3(signature = (lengths, *, max_batch_tokens, max_batch_size, multiple))]
pub fn plan_batches<'py>(
    py: Python<'py>,
    lengths: PyReadonlyArray1<'py, i64>,
    max_batch_tokens: i64,
    max_batch_size: i64,
    multiple: i64,
) -> PyResult<Vec<Bound<'py, PyArray1<i64>>>> {
    let budget = Budget {
        max_tokens: positive("max_batch_tokens", max_batch_tokens)?,
        max_size: positive("max_batch_size", max_batch_size)?,
        multiple: check_multiple("multiple", multiple)?,
    };
    let lengths = lengths
        .as_array()
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            usize::try_from(len)
                .map_err(|_| Error::array("lengths", format!("lengths[{i}] is negative: {len}")))
        })
        .collect::<Result<Vec<usize>>>()?;
    let batches = errors::detach(py, || Ok(plan(&lengths, budget)))?;
    Ok(batches
        .into_iter()
        .map(|b| {
            b.into_iter()
                .map(|i| i as i64)
                .collect::<Vec<i64>>()
                .into_pyarray(py)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: Budget = Budget {
        max_tokens: 64,
        max_size: 4,
        multiple: 8,
    };

    fn check_invariants(lengths: &[usize], budget: Budget, batches: &[Vec<usize>]) {
        let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
        for batch in batches {
            assert!(!batch.is_empty());
            let longest = batch.iter().map(|&i| lengths[i]).max().unwrap();
            if batch.len() > 1 {
                assert!(round_up(longest, budget.multiple) * batch.len() <= budget.max_tokens);
                assert!(batch.len() <= budget.max_size);
            }
        }
        if !lengths.is_empty() {
            assert!(batches[0].contains(&0));
        }
    }

    #[test]
    fn empty_queue_plans_nothing() {
        assert!(plan(&[], BUDGET).is_empty());
    }

    #[test]
    fn oversized_input_runs_alone() {
        let lengths = [100, 3, 3];
        let batches = plan(&lengths, BUDGET);
        check_invariants(&lengths, BUDGET, &batches);
        assert_eq!(batches[0], vec![0]);
        assert_eq!(batches[1], vec![1, 2]);
    }

    #[test]
    fn respects_size_and_token_budget() {
        let lengths = [5, 30, 1, 2, 3, 4, 6, 7, 9, 17, 16, 0];
        let batches = plan(&lengths, BUDGET);
        check_invariants(&lengths, BUDGET, &batches);
    }

    #[test]
    fn oldest_batch_first_and_sorted_within() {
        let lengths = [40, 1, 2, 3, 40];
        let batches = plan(&lengths, BUDGET);
        check_invariants(&lengths, BUDGET, &batches);
        assert_eq!(batches[0], vec![0]);
        assert_eq!(batches[1], vec![1, 2, 3]);
        assert_eq!(batches[2], vec![4]);
    }

    #[test]
    fn pseudo_random_invariants() {
        let mut state = 0x2545_f491_u64;
        for n in 0..200 {
            let lengths: Vec<usize> = (0..n % 37)
                .map(|_| {
                    state = state
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1);
                    (state >> 33) as usize % 90
                })
                .collect();
            let budget = Budget {
                max_tokens: 1 + n % 200,
                max_size: 1 + n % 9,
                multiple: 1 + n % 16,
            };
            check_invariants(&lengths, budget, &plan(&lengths, budget));
        }
    }
}
