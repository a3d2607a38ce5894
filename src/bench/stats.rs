//! The statistics of a benchmark's samples: mean ± standard deviation,
//! median and percentiles, a 95 % bootstrap confidence interval of the
//! mean, Tukey's outlier counts, and the bootstrap interval of the
//! relative change between two sample sets (`wharf bench compare`).
//!
//! The bootstrap draws from a generator seeded by the samples themselves,
//! so the same samples always give the same interval.

use serde::{Deserialize, Serialize};

/// Resamples of the bootstrap.
const RESAMPLES: usize = 2_000;

/// The summary of one metric over a benchmark's runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Summary {
    /// Samples summarized.
    pub(crate) n: usize,
    pub(crate) mean: f64,
    /// Sample standard deviation (n - 1).
    pub(crate) stddev: f64,
    pub(crate) median: f64,
    pub(crate) p90: f64,
    pub(crate) p99: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
    /// 95 % bootstrap confidence interval of the mean.
    pub(crate) ci95: [f64; 2],
    /// Samples outside Tukey's inner fences (1.5 IQR) but inside the outer.
    pub(crate) outliers_mild: usize,
    /// Samples outside the outer fences (3 IQR).
    pub(crate) outliers_severe: usize,
}

/// The `p` quantile (0..=1) of sorted samples, interpolated linearly.
pub(crate) fn quantile(sorted: &[f64], p: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        1 => sorted[0],
        n => {
            let rank = p.clamp(0.0, 1.0) * (n - 1) as f64;
            let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
            sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
        }
    }
}

fn mean(samples: &[f64]) -> f64 {
    samples.iter().sum::<f64>() / samples.len() as f64
}

/// A generator seeded from the samples' bits: reproducible intervals.
fn seeded(samples: &[&[f64]]) -> fastrand::Rng {
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    for set in samples {
        for s in *set {
            seed = (seed ^ s.to_bits()).wrapping_mul(0x1000_0000_01b3);
        }
    }
    fastrand::Rng::with_seed(seed)
}

/// The mean of one resample (with replacement) of `samples`.
fn resampled_mean(rng: &mut fastrand::Rng, samples: &[f64]) -> f64 {
    let n = samples.len();
    (0..n).map(|_| samples[rng.usize(..n)]).sum::<f64>() / n as f64
}

/// Summarizes samples; `None` when there are none.
pub(crate) fn summarize(samples: &[f64]) -> Option<Summary> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let m = mean(&sorted);
    let stddev = if n > 1 {
        (sorted.iter().map(|s| (s - m).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
    } else {
        0.0
    };
    let ci95 = if n > 1 {
        let mut rng = seeded(&[samples]);
        let mut means: Vec<f64> = (0..RESAMPLES)
            .map(|_| resampled_mean(&mut rng, &sorted))
            .collect();
        means.sort_by(f64::total_cmp);
        [quantile(&means, 0.025), quantile(&means, 0.975)]
    } else {
        [m, m]
    };
    let (q1, q3) = (quantile(&sorted, 0.25), quantile(&sorted, 0.75));
    let iqr = q3 - q1;
    let (inner, outer) = (
        (q1 - 1.5 * iqr, q3 + 1.5 * iqr),
        (q1 - 3.0 * iqr, q3 + 3.0 * iqr),
    );
    let severe = sorted
        .iter()
        .filter(|s| **s < outer.0 || **s > outer.1)
        .count();
    let beyond_inner = sorted
        .iter()
        .filter(|s| **s < inner.0 || **s > inner.1)
        .count();
    Some(Summary {
        n,
        mean: m,
        stddev,
        median: quantile(&sorted, 0.5),
        p90: quantile(&sorted, 0.9),
        p99: quantile(&sorted, 0.99),
        min: sorted[0],
        max: sorted[n - 1],
        ci95,
        outliers_mild: beyond_inner - severe,
        outliers_severe: severe,
    })
}

/// The relative change of the mean from `base` to `new` (0.05 = 5 %
/// more) with its 95 % bootstrap interval (each set resampled on its
/// own); `None` if either is empty or the base mean is zero.
pub(crate) fn change(base: &[f64], new: &[f64]) -> Option<(f64, [f64; 2])> {
    if base.is_empty() || new.is_empty() {
        return None;
    }
    let (mb, mn) = (mean(base), mean(new));
    if mb == 0.0 {
        return None;
    }
    let point = mn / mb - 1.0;
    let mut rng = seeded(&[base, new]);
    let mut changes: Vec<f64> = (0..RESAMPLES)
        .filter_map(|_| {
            let b = resampled_mean(&mut rng, base);
            let n = resampled_mean(&mut rng, new);
            (b != 0.0).then(|| n / b - 1.0)
        })
        .collect();
    changes.sort_by(f64::total_cmp);
    Some((
        point,
        [quantile(&changes, 0.025), quantile(&changes, 0.975)],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_has_the_textbook_values() {
        let s = summarize(&[1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
        assert_eq!(
            (s.n, s.mean, s.median, s.min, s.max),
            (5, 3.0, 3.0, 1.0, 5.0)
        );
        assert!((s.stddev - 2.5f64.sqrt()).abs() < 1e-12);
        assert!((s.p90 - 4.6).abs() < 1e-12);
        assert!(s.ci95[0] < 3.0 && s.ci95[1] > 3.0 && s.ci95[0] >= 1.0 && s.ci95[1] <= 5.0);
        assert_eq!((s.outliers_mild, s.outliers_severe), (0, 0));
        // The same samples give the same interval.
        assert_eq!(summarize(&[1.0, 2.0, 3.0, 4.0, 5.0]).unwrap().ci95, s.ci95);
        assert!(summarize(&[]).is_none());
        let one = summarize(&[7.0]).unwrap();
        assert_eq!((one.stddev, one.ci95), (0.0, [7.0, 7.0]));
    }

    #[test]
    fn outliers_are_counted_by_tukeys_fences() {
        let mut samples: Vec<f64> = (0..20).map(|i| 10.0 + f64::from(i % 4)).collect();
        samples.push(16.5); // beyond 1.5 IQR, inside 3 IQR
        samples.push(100.0); // far out
        let s = summarize(&samples).unwrap();
        assert_eq!((s.outliers_mild, s.outliers_severe), (1, 1));
    }

    #[test]
    fn a_change_and_its_interval_bracket_the_truth() {
        let base: Vec<f64> = (0..50).map(|i| 100.0 + f64::from(i % 5)).collect();
        let slower: Vec<f64> = base.iter().map(|b| b * 1.2).collect();
        let (point, ci) = change(&base, &slower).unwrap();
        assert!((point - 0.2).abs() < 1e-9, "{point}");
        assert!(ci[0] > 0.15 && ci[1] < 0.25, "{ci:?}");
        let (same, ci) = change(&base, &base).unwrap();
        assert_eq!(same, 0.0);
        assert!(ci[0] <= 0.0 && ci[1] >= 0.0, "{ci:?}");
        assert!(change(&[], &base).is_none());
    }
}
