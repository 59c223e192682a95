//! Dataset averages of Fisher matrices, streamed and mergeable.
//!
//! The mean Fisher over many positions and sequences,
//!
//! ```text
//!     F̄ = (1/n) Σ_i F_i,
//! ```
//!
//! is accumulated one matrix at a time ([`FisherAccumulator::add`]): only the running sum
//! (`d × d`) and the count are kept, never the individual matrices. Independent jobs (one shard
//! of the data each) keep their own accumulators; [`FisherAccumulator::merge`] adds them.
//!
//! ## Exactness
//! Every running sum is a *double-double* `hi + lo` of two `f64`s: each addition
//! `hi ← fl(hi + x)` records its rounding error exactly with Knuth's TwoSum
//! (`e = (hi − (s − b)) + (x − b)`, `b = s − hi`) and adds it to `lo`. The represented sum
//! `hi + lo` therefore carries about 106 bits, and the order in which matrices (or shards) were
//! added changes it only at the level of `n · 2⁻¹⁰⁶` relative — far below the `f64` result
//! [`FisherAccumulator::sum`] rounds it to. Counts are exact integers. So the merge of `N` shard
//! accumulators equals the accumulator of one job over all the data to `f64` round-off.

use crate::{FsError, Matrix, Result};

/// `s = a + b` exactly as `(s, e)` with `s = fl(a + b)` (Knuth's TwoSum).
#[inline]
fn two_sum(a: f64, b: f64) -> (f64, f64) {
    let s = a + b;
    let bb = s - a;
    (s, (a - (s - bb)) + (b - bb))
}

/// A compensated (double-double) running sum of scalars: `hi + lo`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CompensatedSum {
    /// The leading part (the `f64` running sum).
    pub hi: f64,
    /// The accumulated rounding errors of `hi`.
    pub lo: f64,
}

impl CompensatedSum {
    /// Add `x`.
    #[inline]
    pub fn add(&mut self, x: f64) {
        let (s, e) = two_sum(self.hi, x);
        self.hi = s;
        self.lo += e;
    }

    /// Add another compensated sum.
    #[inline]
    pub fn merge(&mut self, other: &CompensatedSum) {
        let (s, e) = two_sum(self.hi, other.hi);
        self.hi = s;
        self.lo += e + other.lo;
    }

    /// The sum rounded to `f64`.
    #[inline]
    pub fn value(&self) -> f64 {
        self.hi + self.lo
    }
}

/// A streamed, mergeable sum of `d × d` Fisher matrices, with the count and the sum of the
/// next-token entropies of the positions they came from (the math is in `accumulate.rs`).
#[derive(Clone, Debug, PartialEq)]
pub struct FisherAccumulator {
    d: usize,
    hi: Vec<f64>,
    lo: Vec<f64>,
    count: u64,
    entropy: CompensatedSum,
}

impl FisherAccumulator {
    /// An empty accumulator for `d × d` matrices.
    pub fn new(d: usize) -> Self {
        FisherAccumulator {
            d,
            hi: vec![0.0; d * d],
            lo: vec![0.0; d * d],
            count: 0,
            entropy: CompensatedSum::default(),
        }
    }

    /// Rebuild an accumulator from its stored parts ([`parts`](Self::parts)): the `d × d`
    /// row-major `hi` and `lo` sums, the count and the entropy sum. Errors on wrong lengths or
    /// non-finite values.
    pub fn from_parts(
        d: usize,
        hi: Vec<f64>,
        lo: Vec<f64>,
        count: u64,
        entropy: CompensatedSum,
    ) -> Result<Self> {
        fs_traits::check_len("accumulator sum (hi)", hi.len(), d * d)?;
        fs_traits::check_len("accumulator sum (lo)", lo.len(), d * d)?;
        fs_traits::check_finite("accumulator sum (hi)", &hi)?;
        fs_traits::check_finite("accumulator sum (lo)", &lo)?;
        fs_traits::check_finite("accumulator entropy sum", &[entropy.hi, entropy.lo])?;
        Ok(FisherAccumulator { d, hi, lo, count, entropy })
    }

    /// The stored parts: `(hi, lo, count, entropy)`, `hi` and `lo` row-major `d × d`.
    pub fn parts(&self) -> (&[f64], &[f64], u64, CompensatedSum) {
        (&self.hi, &self.lo, self.count, self.entropy)
    }

    /// `d`.
    pub fn dim(&self) -> usize {
        self.d
    }

    /// How many matrices were added (over all merged accumulators).
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Add one Fisher matrix (`d × d`, finite) and the entropy of its position's distribution.
    pub fn add(&mut self, f: &Matrix<f64>, entropy: f64) -> Result<()> {
        if f.shape() != (self.d, self.d) {
            return Err(FsError::DimensionMismatch {
                what: format!("Fisher matrix added to a {0}x{0} accumulator", self.d),
                expected: self.d * self.d,
                got: f.rows() * f.cols(),
            });
        }
        fs_traits::check_finite("Fisher matrix", f.as_slice())?;
        fs_traits::check_finite("entropy", &[entropy])?;
        for ((h, l), &x) in self.hi.iter_mut().zip(self.lo.iter_mut()).zip(f.as_slice()) {
            let (s, e) = two_sum(*h, x);
            *h = s;
            *l += e;
        }
        self.count += 1;
        self.entropy.add(entropy);
        Ok(())
    }

    /// Add another accumulator of the same dimension (another shard's).
    pub fn merge(&mut self, other: &FisherAccumulator) -> Result<()> {
        if other.d != self.d {
            return Err(FsError::DimensionMismatch {
                what: "accumulators to merge (d × d)".to_string(),
                expected: self.d * self.d,
                got: other.d * other.d,
            });
        }
        for i in 0..self.hi.len() {
            let (s, e) = two_sum(self.hi[i], other.hi[i]);
            self.hi[i] = s;
            self.lo[i] += e + other.lo[i];
        }
        self.count += other.count;
        self.entropy.merge(&other.entropy);
        Ok(())
    }

    /// `Σ_i F_i`, rounded to `f64`.
    pub fn sum(&self) -> Matrix<f64> {
        Matrix::from_fn(self.d, self.d, |i, j| {
            let k = i * self.d + j;
            self.hi[k] + self.lo[k]
        })
    }

    /// The mean `F̄ = Σ_i F_i / n`, symmetrised (`(F̄ + F̄ᵀ)/2`, which only removes round-off of
    /// inputs that were not exactly symmetric); `None` when nothing was added.
    pub fn mean(&self) -> Option<Matrix<f64>> {
        if self.count == 0 {
            return None;
        }
        let s = self.sum();
        let n = self.count as f64;
        Some(Matrix::from_fn(self.d, self.d, |i, j| 0.5 * (s.get(i, j) + s.get(j, i)) / n))
    }

    /// The mean next-token entropy of the positions added; `None` when nothing was added.
    pub fn mean_entropy(&self) -> Option<f64> {
        (self.count > 0).then(|| self.entropy.value() / self.count as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrices(n: usize, d: usize) -> Vec<Matrix<f64>> {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        (0..n)
            .map(|k| {
                let g = Matrix::from_fn(d, d, |_, _| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    // Widely varying magnitudes make plain f64 summation order-dependent.
                    ((state >> 11) as f64 / (1u64 << 53) as f64 - 0.5)
                        * 10f64.powi((k % 9) as i32 - 4)
                });
                Matrix::from_fn(d, d, |i, j| (0..d).map(|l| g.get(i, l) * g.get(j, l)).sum())
            })
            .collect()
    }

    #[test]
    fn merge_of_shards_equals_one_job() {
        let (n, d) = (60, 7);
        let ms = matrices(n, d);
        let mut one = FisherAccumulator::new(d);
        for (i, m) in ms.iter().enumerate() {
            one.add(m, i as f64 * 0.1).unwrap();
        }
        for shards in [2usize, 3, 7] {
            let mut parts: Vec<FisherAccumulator> =
                (0..shards).map(|_| FisherAccumulator::new(d)).collect();
            for (i, m) in ms.iter().enumerate() {
                parts[i % shards].add(m, i as f64 * 0.1).unwrap();
            }
            // Merge in reverse order: order must not matter.
            let mut merged = FisherAccumulator::new(d);
            for p in parts.iter().rev() {
                merged.merge(p).unwrap();
            }
            assert_eq!(merged.count(), n as u64);
            let (a, b) = (merged.sum(), one.sum());
            let num: f64 =
                a.as_slice().iter().zip(b.as_slice()).map(|(x, y)| (x - y).powi(2)).sum::<f64>();
            let den: f64 = b.as_slice().iter().map(|y| y * y).sum::<f64>();
            assert!((num / den).sqrt() <= 1e-15, "{shards} shards: {}", (num / den).sqrt());
            assert!((merged.mean_entropy().unwrap() - one.mean_entropy().unwrap()).abs() < 1e-15);
        }
    }

    #[test]
    fn compensation_recovers_what_plain_f64_loses() {
        let mut c = CompensatedSum::default();
        let mut plain = 0.0f64;
        for x in [1e16, 1.0, -1e16, 1.0] {
            c.add(x);
            plain += x;
        }
        assert_eq!(c.value(), 2.0);
        assert_ne!(plain, 2.0);
    }

    #[test]
    fn mean_and_round_trip() {
        let ms = matrices(5, 3);
        let mut acc = FisherAccumulator::new(3);
        assert!(acc.mean().is_none() && acc.mean_entropy().is_none());
        for m in &ms {
            acc.add(m, 1.0).unwrap();
        }
        let mean = acc.mean().unwrap();
        for i in 0..3 {
            for j in 0..3 {
                let e: f64 = ms.iter().map(|m| m.get(i, j)).sum::<f64>() / 5.0;
                assert!((mean.get(i, j) - e).abs() <= 1e-14 * e.abs().max(1e-3));
            }
        }
        let (hi, lo, n, ent) = acc.parts();
        let back = FisherAccumulator::from_parts(3, hi.to_vec(), lo.to_vec(), n, ent).unwrap();
        assert_eq!(back, acc);
        assert!(FisherAccumulator::from_parts(3, vec![0.0; 8], vec![0.0; 9], 1, ent).is_err());
        assert!(acc.add(&Matrix::zeros(2, 2), 0.0).is_err());
        assert!(acc.add(&Matrix::from_vec(1, 1, vec![1.0]).unwrap(), 0.0).is_err());
        assert!(acc.merge(&FisherAccumulator::new(4)).is_err());
        let mut nan = Matrix::zeros(3, 3);
        nan.set(0, 0, f64::NAN);
        assert!(acc.add(&nan, 0.0).is_err());
        assert_eq!(acc.count(), 5);
    }
}
