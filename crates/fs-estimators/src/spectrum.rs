//! Eigen-analysis of a Fisher matrix.

use crate::{FsError, Matrix, Result};
use faer::{Mat, Side};

/// The spectrum of a symmetric PSD matrix and the summaries interpretability work uses.
#[derive(Clone, Debug, PartialEq)]
pub struct Spectrum {
    /// The `r` largest eigenvalues, descending, with negative round-off clamped to 0.
    pub eigenvalues: Vec<f64>,
    /// The matching unit eigenvectors as columns (`d × r`); sign fixed so that each vector's
    /// largest-magnitude component is positive.
    pub eigenvectors: Matrix<f64>,
    /// `tr F = Σ_i F_ii` (equals the sum of all raw eigenvalues).
    pub trace: f64,
    /// `exp(−Σ_i λ̂_i log λ̂_i)`, `λ̂ = λ / Σλ` over all clamped eigenvalues: the number of
    /// directions the Fisher mass is spread over (1 for rank one, `d` for isotropic; 0 for `F = 0`).
    pub effective_rank: f64,
    /// `(Σλ)² / Σλ²` over all clamped eigenvalues: another effective dimension, more sensitive to
    /// the top of the spectrum (0 for `F = 0`).
    pub participation_ratio: f64,
    /// How many raw eigenvalues were negative and clamped to 0 (round-off for a PSD matrix).
    pub clamped_negative: usize,
    /// The smallest raw eigenvalue before clamping; compare with `trace` to judge whether the
    /// negatives are round-off (`≥ −1e-6 · trace` in `f32` arithmetic) or a real defect.
    pub min_raw_eigenvalue: f64,
}

/// Eigen-decompose the symmetric matrix `f` (`d × d`) and summarise it.
///
/// `top = Some(r)` keeps only the `r` largest eigenpairs in `eigenvalues`/`eigenvectors` (the
/// summaries always use the full spectrum); `None` keeps all `d`. Errors on a non-square,
/// non-finite or asymmetric (beyond 1e-8 relative) input, or if the eigensolver fails.
pub fn spectrum(f: &Matrix<f64>, top: Option<usize>) -> Result<Spectrum> {
    let (d, c) = f.shape();
    if d != c {
        return Err(FsError::DimensionMismatch {
            what: "Fisher matrix (must be square)".to_string(),
            expected: d * d,
            got: d * c,
        });
    }
    fs_traits::check_finite("Fisher matrix", f.as_slice())?;
    let scale = f.as_slice().iter().fold(0.0f64, |m, x| m.max(x.abs()));
    for i in 0..d {
        for j in 0..i {
            if (f.get(i, j) - f.get(j, i)).abs() > 1e-8 * scale {
                return Err(FsError::invalid(
                    "Fisher matrix",
                    format!("asymmetric at ({i}, {j}): {} vs {}", f.get(i, j), f.get(j, i)),
                    "a symmetric matrix",
                ));
            }
        }
    }
    let trace: f64 = (0..d).map(|i| f.get(i, i)).sum();
    let r = top.unwrap_or(d).min(d);
    if d == 0 {
        return Ok(Spectrum {
            eigenvalues: vec![],
            eigenvectors: Matrix::zeros(0, 0),
            trace,
            effective_rank: 0.0,
            participation_ratio: 0.0,
            clamped_negative: 0,
            min_raw_eigenvalue: 0.0,
        });
    }
    let m = Mat::<f64>::from_fn(d, d, |i, j| f.get(i, j));
    let evd = m
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| FsError::LinearAlgebra(format!("self-adjoint eigendecomposition: {e:?}")))?;
    let s = evd.S().column_vector();
    let u = evd.U();
    // faer returns ascending order.
    let raw: Vec<f64> = (0..d).rev().map(|i| s[i]).collect();
    let min_raw_eigenvalue = raw[d - 1];
    let clamped_negative = raw.iter().filter(|&&x| x < 0.0).count();
    let all: Vec<f64> = raw.iter().map(|&x| x.max(0.0)).collect();
    let total: f64 = all.iter().sum();
    let (effective_rank, participation_ratio) = if total > 0.0 {
        let h: f64 = -all
            .iter()
            .filter(|&&x| x > 0.0)
            .map(|&x| {
                let q = x / total;
                q * q.ln()
            })
            .sum::<f64>();
        let sq: f64 = all.iter().map(|x| x * x).sum();
        (h.exp(), total * total / sq)
    } else {
        (0.0, 0.0)
    };
    let mut eigenvectors = Matrix::<f64>::zeros(d, r);
    for k in 0..r {
        let col = u.col(d - 1 - k);
        let big = (0..d).max_by(|&a, &b| col[a].abs().total_cmp(&col[b].abs())).unwrap_or(0);
        let sign = if col[big] < 0.0 { -1.0 } else { 1.0 };
        for i in 0..d {
            eigenvectors.set(i, k, sign * col[i]);
        }
    }
    Ok(Spectrum {
        eigenvalues: all[..r].to_vec(),
        eigenvectors,
        trace,
        effective_rank,
        participation_ratio,
        clamped_negative,
        min_raw_eigenvalue,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diagonal_spectrum_and_summaries() {
        let f = Matrix::from_fn(3, 3, |i, j| if i == j { [1.0, 3.0, -1e-17][i] } else { 0.0 });
        let s = spectrum(&f, None).unwrap();
        assert_eq!(s.eigenvalues, vec![3.0, 1.0, 0.0]);
        assert_eq!(s.clamped_negative, 1);
        assert!((s.trace - 4.0).abs() < 1e-15);
        let h: f64 = -(0.75f64 * 0.75f64.ln() + 0.25 * 0.25f64.ln());
        assert!((s.effective_rank - h.exp()).abs() < 1e-12);
        assert!((s.participation_ratio - 16.0 / 10.0).abs() < 1e-12);
        assert_eq!(s.eigenvectors.get(1, 0), 1.0);
        let top = spectrum(&f, Some(1)).unwrap();
        assert_eq!(top.eigenvalues, vec![3.0]);
        assert_eq!(top.eigenvectors.shape(), (3, 1));
    }

    #[test]
    fn isotropic_and_rank_one() {
        let eye = Matrix::from_fn(4, 4, |i, j| if i == j { 2.0 } else { 0.0 });
        let s = spectrum(&eye, None).unwrap();
        assert!((s.effective_rank - 4.0).abs() < 1e-12);
        assert!((s.participation_ratio - 4.0).abs() < 1e-12);
        let v = [1.0, 2.0, 2.0];
        let r1 = Matrix::from_fn(3, 3, |i, j| v[i] * v[j]);
        let s = spectrum(&r1, None).unwrap();
        assert!((s.eigenvalues[0] - 9.0).abs() < 1e-12);
        assert!((s.effective_rank - 1.0).abs() < 1e-9);
        assert!(spectrum(&Matrix::zeros(2, 2), None).unwrap().effective_rank == 0.0);
    }

    #[test]
    fn rejects_bad_input() {
        assert!(spectrum(&Matrix::zeros(2, 3), None).is_err());
        let asym = Matrix::from_vec(2, 2, vec![1.0, 2.0, 0.0, 1.0]).unwrap();
        assert!(spectrum(&asym, None).is_err());
        let nan = Matrix::from_vec(1, 1, vec![f64::NAN]).unwrap();
        assert!(matches!(spectrum(&nan, None), Err(FsError::NonFinite { .. })));
    }
}
