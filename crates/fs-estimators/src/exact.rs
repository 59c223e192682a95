//! The exact full-vocabulary Fisher `F = Σ_y p_y g_y g_yᵀ = Aᵀ G A`.

use crate::gram::{centered_output_gram_with_slopes, sandwich, DEFAULT_VOCAB_CHUNK};
use crate::{softmax, FsError, Matrix, MatrixRef, Result, Scalar, SplitModel, Threads};
use fs_traits::Unembedding;

/// Tuning knobs of the exact estimator. The defaults are right for CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExactOptions {
    /// Vocabulary rows per chunk of the weighted Gram `G` (see
    /// [`centered_output_gram`](crate::centered_output_gram)).
    pub vocab_chunk: usize,
    /// Threads for the dense products.
    pub threads: Threads,
}

impl Default for ExactOptions {
    fn default() -> Self {
        ExactOptions { vocab_chunk: DEFAULT_VOCAB_CHUNK, threads: Threads(0) }
    }
}

/// The exact Fisher from its three factors, on host arrays:
///
/// ```text
///     F = Aᵀ G A,    G = Σ_y p_y (w_y − m)(w_y − m)ᵀ,    m = W_Uᵀ p,
/// ```
///
/// with `a` = the readout Jacobian `A = ∂u/∂h` (`d_u × d`), `w_u` = the unembedding `W_U`
/// (`V × d_u`, row `y` = `w_y`) and `p` the next-token probabilities (length `V`, validated and
/// renormalised in `f64`). Equal to `Jᵀ(diag p − p pᵀ)J` with `J = W_U A`, without forming `J`.
pub fn exact_fisher_from_parts<'a, S: Scalar>(
    a: MatrixRef<'_, S>,
    w_u: impl Into<Unembedding<'a, S>>,
    p: &[f64],
    opts: &ExactOptions,
) -> Result<Matrix<f64>> {
    fisher_from_parts(a, w_u.into(), p, None, opts)
}

/// [`exact_fisher_from_parts`] with soft-cap slopes: the logit Jacobian is `diag(s) W_U A`
/// (see [`SplitModel::final_logit_softcap`]), `G` from
/// [`centered_output_gram_with_slopes`](crate::centered_output_gram_with_slopes).
fn fisher_from_parts<S: Scalar>(
    a: MatrixRef<'_, S>,
    w_u: Unembedding<'_, S>,
    p: &[f64],
    slopes: Option<&[f64]>,
    opts: &ExactOptions,
) -> Result<Matrix<f64>> {
    if a.rows() != w_u.cols() {
        return Err(FsError::DimensionMismatch {
            what: "readout Jacobian A rows vs unembedding W_U columns (d_u)".to_string(),
            expected: w_u.cols(),
            got: a.rows(),
        });
    }
    fs_traits::check_finite("readout Jacobian A", a.as_slice())?;
    let g = centered_output_gram_with_slopes(w_u, p, slopes, opts.vocab_chunk, opts.threads)?;
    fs_traits::check_finite("output Gram G", g.as_slice())?;
    sandwich(a, &g, opts.threads)
}

/// The exact Fisher `F_t = Σ_y p_y g_y g_yᵀ` of `model` at each of `positions` of `ctx`.
///
/// Per position: `p = softmax(z_t)` in `f64` from the model's logits, the readout Jacobian
/// `A_t` from the model (all positions in one call, so backends can batch their backward
/// passes), then [`exact_fisher_from_parts`]. Returns one symmetric PSD `d × d` matrix per
/// position, in the order given.
///
/// A model that computes `F` where it lives ([`SplitModel::device_exact_fisher`]: a GPU model)
/// does all of this on its device and returns only the matrices; they are checked for shape
/// and finiteness here.
///
/// Errors: a position outside the sequence, non-finite logits or Jacobians, or a model that
/// returns arrays of the wrong shape.
pub fn exact_fisher<M: SplitModel>(
    model: &M,
    ctx: &M::Context,
    positions: &[usize],
    opts: &ExactOptions,
) -> Result<Vec<Matrix<f64>>> {
    if let Some(found) = model.device_exact_fisher(ctx, positions)? {
        let d = model.dims().d_model;
        fs_traits::check_len(
            "device Fisher matrices (one per position)",
            found.len(),
            positions.len(),
        )?;
        for f in &found {
            check_shape("device Fisher matrix", f.shape(), (d, d))?;
            fs_traits::check_finite("the Fisher matrix", f.as_slice())?;
        }
        return Ok(found);
    }
    Ok(exact_fisher_with_jacobians(model, ctx, positions, opts)?
        .into_iter()
        .map(|e| e.fisher)
        .collect())
}

/// One position's exact Fisher `F_t = A_tᵀ G_t A_t` with the readout Jacobian it was built from.
#[derive(Clone, Debug)]
pub struct FisherWithJacobian<S> {
    /// `F_t`, symmetric PSD, `d × d`, in `f64`.
    pub fisher: Matrix<f64>,
    /// `A_t = ∂u/∂h` at this position, `d_u × d`, in the model's scalar.
    pub jacobian: Matrix<S>,
}

/// [`exact_fisher`], also returning each position's readout Jacobian `A_t = ∂u/∂h`
/// (`d_u × d`, in the model's scalar) that `F_t = A_tᵀ G_t A_t` was built from, so that a
/// caller who needs `A_t` again (the read-outs of
/// [`direction_effects_from_jacobian`](crate::direction_effects_from_jacobian):
/// `J v = W_U A_t v`) does not pay for a second Jacobian. Same errors as [`exact_fisher`].
pub fn exact_fisher_with_jacobians<M: SplitModel>(
    model: &M,
    ctx: &M::Context,
    positions: &[usize],
    opts: &ExactOptions,
) -> Result<Vec<FisherWithJacobian<M::Scalar>>> {
    if positions.is_empty() {
        return Ok(Vec::new());
    }
    let dims = model.dims();
    let w_u = model.unembedding();
    w_u.check_shape(dims.vocab_size, dims.readout_dim)?;
    let logits = model.logits(ctx, positions)?;
    check_shape("logits", logits.shape(), (positions.len(), dims.vocab_size))?;
    let jacobians = model.readout_jacobians(ctx, positions)?;
    fs_traits::check_len("readout Jacobians (one per position)", jacobians.len(), positions.len())?;
    jacobians
        .into_iter()
        .enumerate()
        .map(|(i, a)| {
            check_shape("readout Jacobian A", a.shape(), (dims.readout_dim, dims.d_model))?;
            let p = softmax(logits.row(i))?;
            let slopes = fs_traits::logit_slopes(model.final_logit_softcap(), logits.row(i));
            let fisher = fisher_from_parts(a.view(), w_u, &p, slopes.as_deref(), opts)?;
            Ok(FisherWithJacobian { fisher, jacobian: a })
        })
        .collect()
}

pub(crate) fn check_shape(what: &str, got: (usize, usize), expected: (usize, usize)) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(FsError::DimensionMismatch {
            what: format!(
                "{what} shape (expected {}x{}, got {}x{})",
                expected.0, expected.1, got.0, got.1
            ),
            expected: expected.0 * expected.1,
            got: got.0 * got.1,
        })
    }
}
