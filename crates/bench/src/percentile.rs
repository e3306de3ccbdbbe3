//! Percentiles of a sample, exact (every sample kept and sorted), by nearest rank.

/// The `q`-quantile (0 to 1) of `sorted` (ascending): the sample at rank
/// `floor(q × len)`, clamped to the last one; `None` for an empty sample.
pub(crate) fn percentile<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    let last = sorted.len().checked_sub(1)?;
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64) as usize;
    Some(sorted[rank.min(last)])
}

/// `values` sorted ascending (NaNs, which a duration never is, last).
pub(crate) fn sorted_f64(mut values: Vec<f64>) -> Vec<f64> {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Greater));
    values
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let empty: [u64; 0] = [];
        assert_eq!(percentile(&empty, 0.5), None);
        assert_eq!(percentile(&[7u64], 0.99), Some(7));
        let hundred: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&hundred, 0.5), Some(51));
        assert_eq!(percentile(&hundred, 0.99), Some(100));
        assert_eq!(percentile(&hundred, 1.0), Some(100));
        assert_eq!(percentile(&hundred, 0.0), Some(1));
        // Five rounds: p50 is the third, p99 the largest.
        let five = sorted_f64(vec![5.0, 1.0, 4.0, 2.0, 3.0]);
        assert_eq!(percentile(&five, 0.5), Some(3.0));
        assert_eq!(percentile(&five, 0.99), Some(5.0));
    }
}
