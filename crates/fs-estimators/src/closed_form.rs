//! The closed form `F = ∇ᵀ diag(p) ∇ − (∇ᵀp)(∇ᵀp)ᵀ`, from host arrays or from a model.

use crate::exact::{check_shape, ExactOptions};
use crate::gram::{matmul_into, GramAccumulator};
use crate::{
    normalized_probabilities, softmax, FsError, Matrix, MatrixRef, Result, Scalar, SplitModel,
    Threads,
};

/// What the rows of `∇` in [`closed_form_fisher`] are. The formula is the same for both; the kind
/// says which identity the input must satisfy, and is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradientKind {
    /// `∇ = J = ∂z/∂h`, the logit Jacobian (row `y` = `∇_h z_y`). Both terms of the closed form
    /// matter: `F = Jᵀ diag(p) J − (Jᵀp)(Jᵀp)ᵀ`.
    Logits,
    /// `∇ = ∂ log p/∂h = (I − 1pᵀ)J`, the log-probability Jacobian (row `y` = the score `g_y`).
    /// Then `∇ᵀp = 0` and `F = ∇ᵀ diag(p) ∇`; the input is rejected if `‖∇ᵀp‖` is not
    /// round-off small compared with `√(Σ_y p_y ‖∇_y‖²)`.
    LogProbs,
}

/// Streams `Σ_y p_y ∇_y ∇_yᵀ` (symmetric rank-k updates in `S`, `f64` accumulation) and
/// `v = Σ_y p_y ∇_y` (in `f64`) over vocabulary rows.
struct ClosedFormAccumulator<S: Scalar> {
    d: usize,
    chunk_rows: usize,
    gram: GramAccumulator,
    block: Vec<S>,
    v: Vec<f64>,
}

impl<S: Scalar> ClosedFormAccumulator<S> {
    fn new(d: usize, chunk_rows: usize, threads: Threads) -> Self {
        ClosedFormAccumulator {
            d,
            chunk_rows: chunk_rows.max(1),
            gram: GramAccumulator::new(d, threads),
            block: Vec::with_capacity(chunk_rows.max(1) * d),
            v: vec![0.0; d],
        }
    }

    fn push_row(&mut self, row: &[S], p: f64) {
        if p <= 0.0 {
            return;
        }
        let s = p.sqrt();
        for (vi, x) in self.v.iter_mut().zip(row) {
            *vi += p * x.as_f64();
        }
        self.block.extend(row.iter().map(|&x| S::round_from_f64(s * x.as_f64())));
        if self.block.len() == self.chunk_rows * self.d {
            self.gram.add_rows(&self.block);
            self.block.clear();
        }
    }

    fn finish(mut self, kind: GradientKind) -> Result<Matrix<f64>> {
        self.gram.add_rows(&self.block);
        let mut f = self.gram.finish();
        if kind == GradientKind::LogProbs {
            let v_norm = self.v.iter().map(|x| x * x).sum::<f64>().sqrt();
            let scale = (0..self.d).map(|i| f.get(i, i)).sum::<f64>().max(0.0).sqrt();
            let tol = 10.0 * S::epsilon().as_f64().sqrt();
            if v_norm > tol * scale {
                return Err(FsError::invalid(
                    "log-probability Jacobian",
                    format!("rows with ‖Σ_y p_y ∇_y‖ = {v_norm:.3e} (scale {scale:.3e})"),
                    "rows that satisfy Σ_y p_y ∇_y = 0; pass the logit Jacobian as GradientKind::Logits instead",
                ));
            }
        }
        let d = self.d;
        let v = &self.v;
        for i in 0..d {
            for j in 0..d {
                let x = f.get(i, j) - v[i] * v[j];
                f.set(i, j, x);
            }
        }
        Ok(f)
    }
}

/// The closed form of the Fisher matrix from plain host arrays:
///
/// ```text
///     F = ∇ᵀ diag(p) ∇ − (∇ᵀp)(∇ᵀp)ᵀ
/// ```
///
/// `grad` is `∇` (`V × d`, row-major, row `y` = the gradient of output `y` w.r.t. `h`), `p` the
/// probabilities (length `V`; validated — finite, `≥ 0`, summing to 1 within 1e-3 — and
/// renormalised in `f64`), `kind` which Jacobian `grad` is ([`GradientKind`]). The products run
/// in `S` over vocabulary chunks of `opts.vocab_chunk` rows with `f64` accumulation.
///
/// This is the entry point for a user who links only this crate: given a logit Jacobian from
/// any framework, it returns `Jᵀ(diag p − p pᵀ)J`. With [`GradientKind::Logits`] and a peaked
/// `p` the two terms cancel and digits are lost; the centered
/// [`exact_fisher_from_parts`](crate::exact_fisher_from_parts) does not have that problem.
pub fn closed_form_fisher<S: Scalar>(
    grad: MatrixRef<'_, S>,
    p: &[S],
    kind: GradientKind,
    opts: &ExactOptions,
) -> Result<Matrix<f64>> {
    let (v, d) = grad.shape();
    fs_traits::check_len("probabilities (one per row of the Jacobian)", p.len(), v)?;
    let p = normalized_probabilities("probabilities", p)?;
    fs_traits::check_finite("Jacobian", grad.as_slice())?;
    let mut acc = ClosedFormAccumulator::<S>::new(d, opts.vocab_chunk, opts.threads);
    for (y, &py) in p.iter().enumerate() {
        acc.push_row(grad.row(y), py);
    }
    acc.finish(kind)
}

/// The closed form evaluated on a model at each of `positions`, as an independent check of
/// [`exact_fisher`](crate::exact_fisher): `∇` is formed chunk by chunk as `W_U[chunk] · A_t`
/// (for [`GradientKind::LogProbs`] minus `mᵀA_t`, `m = W_Uᵀp`) and fed to the same streaming
/// accumulator as [`closed_form_fisher`]. Costs one extra `V × d_u × d` product per position
/// compared with the exact estimator; never holds more than one chunk of `∇`.
pub fn closed_form_fisher_at<M: SplitModel>(
    model: &M,
    ctx: &M::Context,
    positions: &[usize],
    kind: GradientKind,
    opts: &ExactOptions,
) -> Result<Vec<Matrix<f64>>> {
    if positions.is_empty() {
        return Ok(Vec::new());
    }
    let dims = model.dims();
    let w_u = model.unembedding();
    w_u.check_shape(dims.vocab_size, dims.readout_dim)?;
    let (v, du, d) = (dims.vocab_size, dims.readout_dim, dims.d_model);
    let logits = model.logits(ctx, positions)?;
    check_shape("logits", logits.shape(), (positions.len(), v))?;
    let jacobians = model.readout_jacobians(ctx, positions)?;
    fs_traits::check_len("readout Jacobians (one per position)", jacobians.len(), positions.len())?;
    let chunk = opts.vocab_chunk.max(1);
    let mut out = Vec::with_capacity(positions.len());
    for (i, a) in jacobians.iter().enumerate() {
        check_shape("readout Jacobian A", a.shape(), (du, d))?;
        fs_traits::check_finite("readout Jacobian A", a.as_slice())?;
        let p = softmax(logits.row(i))?;
        // Soft-capped logits: row y of J is s_y w_yᵀ A.
        let slopes = fs_traits::logit_slopes(model.final_logit_softcap(), logits.row(i));
        let slope = |y: usize| slopes.as_ref().map_or(1.0, |s| s[y]);
        // r = mᵀA = pᵀJ, subtracted from every row for the log-prob Jacobian.
        let r: Vec<f64> = match kind {
            GradientKind::Logits => vec![0.0; d],
            GradientKind::LogProbs => {
                let mut m = vec![0.0f64; du];
                w_u.for_each_chunk(chunk, |start, rows| {
                    for (i, w_y) in rows.chunks_exact(du.max(1)).enumerate() {
                        let ps = p[start + i] * slope(start + i);
                        for (mi, w) in m.iter_mut().zip(w_y) {
                            *mi += ps * w.as_f64();
                        }
                    }
                    Ok(())
                })?;
                (0..d).map(|j| (0..du).map(|k| m[k] * a.get(k, j).as_f64()).sum()).collect()
            }
        };
        let mut acc = ClosedFormAccumulator::<M::Scalar>::new(d, chunk, opts.threads);
        let mut j_chunk = vec![M::Scalar::default(); chunk.min(v) * d];
        let mut row = vec![M::Scalar::default(); d];
        w_u.for_each_chunk(chunk, |start, w_chunk| {
            let rows = w_chunk.len() / du.max(1);
            let j_rows = &mut j_chunk[..rows * d];
            matmul_into(j_rows, w_chunk, a.as_slice(), (rows, du, d), opts.threads);
            for (y, j_row) in j_rows.chunks_exact(d).enumerate() {
                let sy = slope(start + y);
                for ((x, &jy), rj) in row.iter_mut().zip(j_row).zip(&r) {
                    *x = M::Scalar::round_from_f64(sy * jy.as_f64() - rj);
                }
                acc.push_row(&row, p[start + y]);
            }
            Ok(())
        })?;
        out.push(acc.finish(kind)?);
    }
    Ok(out)
}
