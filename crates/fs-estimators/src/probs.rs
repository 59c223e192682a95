//! Probabilities: softmax in `f64`, validation, tempered / nucleus sampling distributions, and
//! seeded categorical draws.

use crate::{FsError, Result, Scalar};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How far a probability vector's sum may stray from 1 before it is rejected (an `f32` softmax
/// over 50k tokens drifts by ~3e-5; anything near 1e-3 is a bug upstream, not round-off).
pub const PROBABILITY_SUM_TOLERANCE: f64 = 1e-3;

pub use fs_traits::softmax;

/// Validate a probability vector given by the caller and return it renormalised in `f64`.
///
/// Accepts a vector whose entries are finite and `≥ 0` and whose sum is within
/// [`PROBABILITY_SUM_TOLERANCE`] of 1; divides by the `f64` sum so that downstream identities
/// (`Σ p = 1`, `Σ_y p_y (w_y − m) = 0`) hold to `f64` round-off.
pub fn normalized_probabilities<S: Scalar>(what: &str, p: &[S]) -> Result<Vec<f64>> {
    if p.is_empty() {
        return Err(FsError::NotAProbability {
            what: what.to_string(),
            detail: "it is empty".to_string(),
        });
    }
    fs_traits::check_finite(what, p)?;
    if let Some((i, v)) = p.iter().enumerate().find(|(_, v)| v.as_f64() < 0.0) {
        return Err(FsError::NotAProbability {
            what: what.to_string(),
            detail: format!("entry {i} is negative ({v})"),
        });
    }
    let sum: f64 = p.iter().map(|v| v.as_f64()).sum();
    if (sum - 1.0).abs() > PROBABILITY_SUM_TOLERANCE {
        return Err(FsError::NotAProbability {
            what: what.to_string(),
            detail: format!(
                "it sums to {sum}, not 1 (tolerance {PROBABILITY_SUM_TOLERANCE}); pass softmax(logits)"
            ),
        });
    }
    Ok(p.iter().map(|v| v.as_f64() / sum).collect())
}

/// Shannon entropy `−Σ p log p` in nats (terms with `p = 0` contribute 0).
pub fn entropy(p: &[f64]) -> f64 {
    -p.iter().filter(|&&x| x > 0.0).map(|&x| x * x.ln()).sum::<f64>()
}

/// How to draw tokens from a next-token distribution.
///
/// The default (`temperature = 1`, `top_p = 1`) draws from `p` itself, which makes the sampled
/// Fisher estimator **unbiased**. Any other setting draws from a different distribution `q` and
/// makes the sampled estimator a **biased** estimate of `F` (it estimates
/// `E_{y~q}[g_y g_yᵀ] ≠ F`); it is offered because the original script used it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingOptions {
    /// Softmax temperature `τ > 0`: draw from `softmax(z / τ)`. `1` = unbiased. Biased otherwise.
    pub temperature: f64,
    /// Nucleus mass in `(0, 1]`: keep the smallest set of most probable tokens whose mass is
    /// `≥ top_p`, renormalised. `1` = unbiased. Biased otherwise.
    pub top_p: f64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        SamplingOptions { temperature: 1.0, top_p: 1.0 }
    }
}

impl SamplingOptions {
    /// `true` when draws come from `p` itself (temperature 1, top-p 1).
    pub fn is_unbiased(&self) -> bool {
        self.temperature == 1.0 && self.top_p == 1.0
    }

    /// Check `temperature > 0` (finite) and `top_p ∈ (0, 1]`.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(FsError::invalid(
                "temperature",
                self.temperature,
                "a finite number > 0 (1 = unbiased)",
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(FsError::invalid("top_p", self.top_p, "a number in (0, 1] (1 = unbiased)"));
        }
        Ok(())
    }
}

/// The distribution `q` that [`SamplingOptions`] draws from, given logits `z`:
/// `q = softmax(z / τ)`, then truncated to its top-`p` nucleus and renormalised.
/// Ties at the nucleus boundary are broken by token id (lower id kept first).
pub fn sampling_distribution<S: Scalar>(logits: &[S], opts: &SamplingOptions) -> Result<Vec<f64>> {
    opts.validate()?;
    let mut q = fs_traits::tempered_softmax(logits, opts.temperature)?;
    if opts.top_p < 1.0 {
        let mut order: Vec<usize> = (0..q.len()).collect();
        order.sort_by(|&a, &b| q[b].total_cmp(&q[a]).then(a.cmp(&b)));
        let mut mass = 0.0;
        let mut kept = 0;
        for &i in &order {
            mass += q[i];
            kept += 1;
            // A 1e-12 slack so that a nucleus boundary hit exactly (up to round-off) is kept.
            if mass >= opts.top_p - 1e-12 {
                break;
            }
        }
        for &i in &order[kept..] {
            q[i] = 0.0;
        }
        let total: f64 = q.iter().sum();
        q.iter_mut().for_each(|x| *x /= total);
    }
    Ok(q)
}

/// The random stream for `(seed, stream)`: ChaCha8 seeded with `seed`, stream number `stream`.
/// Estimators use the position as the stream, so a position's draws do not depend on which
/// other positions are computed in the same call.
pub(crate) fn rng(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// Draw `n` i.i.d. tokens from the distribution `q` (normalised, e.g. from
/// [`sampling_distribution`]) with the random stream `(seed, stream)`, by inversion of the
/// `f64` cumulative distribution with 53-bit uniforms. Deterministic across platforms.
pub fn sample_tokens(q: &[f64], n: usize, seed: u64, stream: u64) -> Result<Vec<u32>> {
    let q = normalized_probabilities("sampling distribution", q)?;
    let mut cdf = Vec::with_capacity(q.len());
    let mut acc = 0.0;
    for &x in &q {
        acc += x;
        cdf.push(acc);
    }
    let last_positive = q.iter().rposition(|&x| x > 0.0).unwrap_or(0);
    let mut rng = rng(seed, stream);
    Ok((0..n)
        .map(|_| {
            let u = (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64) * acc;
            // First index whose cumulative mass exceeds u; never a zero-probability token.
            let i = cdf.partition_point(|&c| c <= u).min(last_positive);
            let i = if q[i] > 0.0 {
                i
            } else {
                // Only reachable through round-off at the top end: step back to a real token.
                (0..=i).rev().find(|&j| q[j] > 0.0).unwrap_or(last_positive)
            };
            i as u32
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probability_validation() {
        assert!(normalized_probabilities("p", &[0.5f32, 0.5]).is_ok());
        let e = normalized_probabilities("p", &[0.5f64, 0.6]).unwrap_err();
        assert!(e.to_string().contains("sums to 1.1"), "{e}");
        assert!(normalized_probabilities("p", &[1.5f64, -0.5]).is_err());
        assert!(normalized_probabilities("p", &[f64::INFINITY]).is_err());
    }

    #[test]
    fn nucleus_keeps_the_smallest_covering_set() {
        let z: Vec<f64> = [0.5f64, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let q =
            sampling_distribution(&z, &SamplingOptions { temperature: 1.0, top_p: 0.8 }).unwrap();
        assert!((q[0] - 0.625).abs() < 1e-12 && (q[1] - 0.375).abs() < 1e-12);
        assert_eq!(&q[2..], &[0.0, 0.0]);
        let bad = SamplingOptions { temperature: 1.0, top_p: 0.0 };
        assert!(sampling_distribution(&z, &bad).is_err());
        let bad = SamplingOptions { temperature: 0.0, top_p: 1.0 };
        assert!(sampling_distribution(&z, &bad).is_err());
    }

    #[test]
    fn temperature_sharpens() {
        let z = [0.0f64, 1.0];
        let q =
            sampling_distribution(&z, &SamplingOptions { temperature: 0.5, top_p: 1.0 }).unwrap();
        let expected = 1.0 / (1.0 + (-2.0f64).exp());
        assert!((q[1] - expected).abs() < 1e-12);
    }

    #[test]
    fn draws_follow_the_distribution_and_are_reproducible() {
        let q = [0.1, 0.0, 0.6, 0.3];
        let n = 200_000;
        let draws = sample_tokens(&q, n, 7, 3).unwrap();
        assert_eq!(draws, sample_tokens(&q, n, 7, 3).unwrap());
        assert_ne!(draws[..50], sample_tokens(&q, n, 7, 4).unwrap()[..50]);
        let mut counts = [0usize; 4];
        draws.iter().for_each(|&t| counts[t as usize] += 1);
        assert_eq!(counts[1], 0, "zero-probability token drawn");
        for (c, p) in counts.iter().zip(q) {
            // 5 standard deviations of a binomial proportion.
            let sd = (p * (1.0 - p) / n as f64).sqrt();
            assert!((*c as f64 / n as f64 - p).abs() <= 5.0 * sd + 1e-12);
        }
    }

    #[test]
    fn entropy_of_uniform_is_log_n() {
        assert!((entropy(&[0.25; 4]) - 4f64.ln()).abs() < 1e-15);
        assert_eq!(entropy(&[1.0, 0.0]), 0.0);
    }
}
