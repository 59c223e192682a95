//! Helpers shared by the integration tests.
#![allow(dead_code)]

use fs_estimators::{spectrum, Matrix};

/// Largest asymmetry `|F_ij − F_ji|` relative to `max |F|`.
pub fn asymmetry(f: &Matrix<f64>) -> f64 {
    let n = f.rows();
    let scale = f.as_slice().iter().fold(0.0f64, |m, x| m.max(x.abs())).max(f64::MIN_POSITIVE);
    let mut worst = 0.0f64;
    for i in 0..n {
        for j in 0..i {
            worst = worst.max((f.get(i, j) - f.get(j, i)).abs());
        }
    }
    worst / scale
}

/// The smallest raw eigenvalue over the trace (PSD check: ≥ −tolerance).
pub fn min_eigenvalue_over_trace(f: &Matrix<f64>) -> f64 {
    let s = spectrum(f, None).expect("spectrum");
    if s.trace > 0.0 {
        s.min_raw_eigenvalue / s.trace
    } else {
        0.0
    }
}

/// Convert a f64 matrix to f32.
pub fn to_f32(m: &Matrix<f64>) -> Matrix<f32> {
    m.map(|x| x as f32)
}

/// Log-prob Jacobian `(I − 1pᵀ)J` from a logit Jacobian, in f64.
pub fn log_prob_jacobian(j: &Matrix<f64>, p: &[f64]) -> Matrix<f64> {
    let (v, d) = j.shape();
    let jp: Vec<f64> = (0..d).map(|c| (0..v).map(|y| p[y] * j.get(y, c)).sum()).collect();
    Matrix::from_fn(v, d, |y, c| j.get(y, c) - jp[c])
}
