//! Interpretability read-outs: what a direction `v` in activation space does to the prediction.
//!
//! At a position with activation `h`, logits `z(h)`, `p = softmax(z)` and logit Jacobian
//! `J = ∂z/∂h = W_U A` ([`SplitModel::readout_jacobians`] gives `A = ∂u/∂h`,
//! [`SplitModel::unembedding`] gives `W_U`):
//!
//! ```text
//!     Δz = J v = W_U (A v)                               logit change per unit step along v (exact,
//!                                                        no finite differences)
//!     ∂p_y/∂ε = p_y ((Jv)_y − Σ_y' p_y' (Jv)_y')          probability change along v
//!     vᵀ F v = Σ_y p_y ((Jv)_y − pᵀJv)²                  = Var_{y~p}[(Jv)_y]  (centered: no cancellation)
//!     KL(p ‖ p(h + εv)) = ½ ε² vᵀFv + O(ε³)              the Fisher as the curvature of the KL
//! ```
//!
//! [`direction_effects`] evaluates all of these for a set of directions (typically the top
//! eigenvectors of `F`, for which `vᵀFv = λ`), and measures the KL at a small step `ε` with the
//! model's own upper half ([`SplitModel::upper_logits`]) so that the second-order identity can be
//! checked on real models. [`project`] gives the coordinates `hᵀv` of an activation on a set of
//! directions.

use crate::{softmax, FsError, Matrix, MatrixRef, Result, Scalar, SplitModel};
use fs_traits::Unembedding;

/// How [`direction_effects`] chooses the step `ε` of the KL check.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DirectionOptions {
    /// A fixed step `ε` (in activation units, along the direction as given). `None` picks it per
    /// direction: `ε = logit_scale / √(vᵀFv)`, so that the standard deviation of the logit change
    /// `ε·Jv` under `p` is `logit_scale` (and `KL ≈ logit_scale²/2`), capped at
    /// `0.05·max(‖h‖, 1)/‖v‖`; for `vᵀFv = 0` it is `1e-3·max(‖h‖, 1)/‖v‖`.
    pub epsilon: Option<f64>,
    /// The target standard deviation of the logit change for the automatic `ε` (default 0.01:
    /// `KL ≈ 5e-5`, where the third-order terms — the skewness of `Jv` under `p` and the model's
    /// curvature along `v` — are a few percent of the second on the fixtures, and `f32` logits
    /// still resolve the KL to ~1e-4 relative).
    pub logit_scale: f64,
}

impl Default for DirectionOptions {
    fn default() -> Self {
        DirectionOptions { epsilon: None, logit_scale: 0.01 }
    }
}

/// What one direction `v` does at one position (the math is in [`direction_effects`]).
#[derive(Clone, Debug, PartialEq)]
pub struct DirectionEffect {
    /// `J v = W_U A v` (length `V`): the logit change per unit step along `v`.
    pub logit_change: Vec<f64>,
    /// `∂p_y/∂ε = p_y ((Jv)_y − pᵀJv)` (length `V`, sums to 0): the first-order probability change
    /// per unit step along `v`. Positive entries are the tokens `+v` pushes up (and `−v` pushes
    /// down); negative entries the tokens `−v` pushes up.
    pub prob_change: Vec<f64>,
    /// `vᵀ F v = Var_{y~p}[(Jv)_y]`, from the exact `Jv` (equals `λ` for a unit eigenvector of the
    /// exact Fisher).
    pub fisher_quadratic: f64,
    /// The step `ε` the KL was measured at.
    pub epsilon: f64,
    /// `KL(p ‖ p(h + εv))`, measured with the model's upper half (in `f64` from its logits).
    pub kl: f64,
    /// The second-order prediction `½ ε² vᵀFv`.
    pub kl_quadratic: f64,
}

impl DirectionEffect {
    /// `kl / kl_quadratic` (→ 1 as `ε → 0`; NaN when the prediction is 0).
    pub fn kl_ratio(&self) -> f64 {
        self.kl / self.kl_quadratic
    }

    /// The `n` tokens whose probability `+v` raises most, with `∂p_y/∂ε`, largest first.
    pub fn pushed_up(&self, n: usize) -> Vec<(u32, f64)> {
        top_by(&self.prob_change, n, |a, b| b.total_cmp(a))
    }

    /// The `n` tokens whose probability `−v` raises most (`+v` lowers most), with `∂p_y/∂ε`
    /// (negative), most negative first.
    pub fn pushed_down(&self, n: usize) -> Vec<(u32, f64)> {
        top_by(&self.prob_change, n, |a, b| a.total_cmp(b))
    }
}

fn top_by(x: &[f64], n: usize, cmp: impl Fn(&f64, &f64) -> std::cmp::Ordering) -> Vec<(u32, f64)> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    let n = n.min(x.len());
    if n == 0 {
        return Vec::new();
    }
    order.select_nth_unstable_by(n - 1, |&a, &b| cmp(&x[a], &x[b]).then(a.cmp(&b)));
    order.truncate(n);
    order.sort_by(|&a, &b| cmp(&x[a], &x[b]).then(a.cmp(&b)));
    order.into_iter().map(|y| (y as u32, x[y])).collect()
}

/// The logit change `J v = W_U (A v)` (length `V`) from the readout Jacobian `a` (`d_u × d`) and
/// the unembedding `w_u` (`V × d_u`), in `f64`, without forming `J`.
pub fn logit_change_from_parts<'a, S: Scalar>(
    a: MatrixRef<'_, S>,
    w_u: impl Into<Unembedding<'a, S>>,
    v: &[f64],
) -> Result<Vec<f64>> {
    let w_u = w_u.into();
    let (du, d) = a.shape();
    fs_traits::check_len("direction v", v.len(), d)?;
    if w_u.cols() != du {
        return Err(FsError::DimensionMismatch {
            what: "unembedding W_U columns vs readout Jacobian A rows (d_u)".to_string(),
            expected: du,
            got: w_u.cols(),
        });
    }
    fs_traits::check_finite("direction v", v)?;
    let av: Vec<f64> =
        (0..du).map(|k| a.row(k).iter().zip(v).map(|(x, y)| x.as_f64() * y).sum()).collect();
    unembed(&w_u, &av)
}

/// `W_U x` in `f64` (length `V`), `W_U` read in vocabulary chunks.
fn unembed<S: Scalar>(w_u: &Unembedding<'_, S>, x: &[f64]) -> Result<Vec<f64>> {
    let du = w_u.cols().max(1);
    let mut out = Vec::with_capacity(w_u.rows());
    w_u.for_each_chunk(fs_traits::UNEMBEDDING_CHUNK_ROWS, |_, rows| {
        out.extend(
            rows.chunks_exact(du)
                .map(|w| w.iter().zip(x).map(|(w, x)| w.as_f64() * x).sum::<f64>()),
        );
        Ok(())
    })?;
    Ok(out)
}

/// `vᵀ F v = Σ_y p_y (Δz_y − pᵀΔz)²` from the logit change `Δz = Jv` and `p` (centered form).
pub fn fisher_quadratic_form(p: &[f64], logit_change: &[f64]) -> Result<f64> {
    fs_traits::check_len("logit change Jv", logit_change.len(), p.len())?;
    let mean: f64 = p.iter().zip(logit_change).map(|(p, z)| p * z).sum();
    Ok(p.iter().zip(logit_change).map(|(p, z)| p * (z - mean) * (z - mean)).sum())
}

/// `KL(softmax(z0) ‖ softmax(z1))` in `f64`, from the two logit vectors:
/// `Σ_y p_y (z0_y − z1_y) − lse(z0) + lse(z1)`, clamped at 0 (round-off).
pub fn kl_from_logits<S: Scalar>(z0: &[S], z1: &[S]) -> Result<f64> {
    fs_traits::check_len("perturbed logits", z1.len(), z0.len())?;
    fs_traits::check_finite("logits", z0)?;
    fs_traits::check_finite("perturbed logits", z1)?;
    let p = softmax(z0)?;
    let cross: f64 =
        p.iter().zip(z0.iter().zip(z1)).map(|(p, (a, b))| p * (a.as_f64() - b.as_f64())).sum();
    Ok((cross - log_sum_exp(z0, None) + log_sum_exp(z1, None)).max(0.0))
}

/// `log Σ_y exp(z_y)` in `f64` (shifted by the maximum), over every `y` but `skip`.
pub(crate) fn log_sum_exp<S: Scalar>(z: &[S], skip: Option<usize>) -> f64 {
    let kept = || z.iter().enumerate().filter(move |&(y, _)| Some(y) != skip);
    let m = kept().map(|(_, x)| x.as_f64()).fold(f64::NEG_INFINITY, f64::max);
    m + kept().map(|(_, x)| (x.as_f64() - m).exp()).sum::<f64>().ln()
}

/// The coordinates `c_k = hᵀ v_k` of an activation `h` (length `d`) on the columns `v_k` of
/// `directions` (`d × K`), in `f64`.
pub fn project<S: Scalar>(h: &[S], directions: &Matrix<f64>) -> Result<Vec<f64>> {
    fs_traits::check_len("activation h", h.len(), directions.rows())?;
    Ok((0..directions.cols())
        .map(|k| h.iter().enumerate().map(|(j, x)| x.as_f64() * directions.get(j, k)).sum())
        .collect())
}

/// What each column `v` of `directions` (`d × K`) does at `position` of `ctx`: the exact logit
/// change `J v = W_U A v`, the probability change, `vᵀFv`, and the KL check
/// `KL(p ‖ p(h + εv))` vs `½ ε² vᵀFv` (see [`DirectionOptions`] for `ε`).
///
/// Costs one batched JVP ([`SplitModel::readout_jvp`]: all `K` products `A v` in one
/// forward-mode pass where the model has one), `K` products with `W_U` and `K + 1`
/// single-position upper passes. `p` is taken from [`SplitModel::upper_logits`] at the
/// unperturbed `h`, the same function the perturbed logits come from. With the Jacobian at
/// hand (from [`exact_fisher_with_jacobians`](crate::exact_fisher_with_jacobians)), call
/// [`direction_effects_from_jacobian`] instead.
pub fn direction_effects<M: SplitModel>(
    model: &M,
    ctx: &M::Context,
    position: usize,
    directions: &Matrix<f64>,
    opts: &DirectionOptions,
) -> Result<Vec<DirectionEffect>> {
    let dims = model.dims();
    fs_traits::check_len("direction length", directions.rows(), dims.d_model)?;
    fs_traits::check_finite("directions", directions.as_slice())?;
    let tangents = Matrix::from_fn(directions.cols(), directions.rows(), |k, j| {
        M::Scalar::round_from_f64(directions.get(j, k))
    });
    let av = model.readout_jvp(ctx, position, tangents.view())?;
    crate::exact::check_shape(
        "readout JVP A V",
        av.shape(),
        (directions.cols(), dims.readout_dim),
    )?;
    effects(model, ctx, position, directions, opts, |k, _| {
        Ok(av.row(k).iter().map(|x| x.as_f64()).collect())
    })
}

/// [`direction_effects`] with the readout Jacobian `A = ∂u/∂h` (`d_u × d`) of `position`
/// given, so that only the `K` products `W_U A v` and the `K + 1` upper passes are paid.
/// `a` must be the Jacobian at this `position` of this `ctx`; its shape is checked.
pub fn direction_effects_from_jacobian<M: SplitModel>(
    model: &M,
    ctx: &M::Context,
    position: usize,
    a: MatrixRef<'_, M::Scalar>,
    directions: &Matrix<f64>,
    opts: &DirectionOptions,
) -> Result<Vec<DirectionEffect>> {
    let dims = model.dims();
    fs_traits::check_len("direction length", directions.rows(), dims.d_model)?;
    crate::exact::check_shape("readout Jacobian A", a.shape(), (dims.readout_dim, dims.d_model))?;
    effects(model, ctx, position, directions, opts, |_, v| {
        fs_traits::check_finite("direction v", v)?;
        Ok((0..a.rows())
            .map(|k| a.row(k).iter().zip(v).map(|(x, y)| x.as_f64() * y).sum())
            .collect())
    })
}

/// The read-outs of the columns of `directions`, given `A v` for column `k` (`readout_change(k, v)`).
fn effects<M: SplitModel>(
    model: &M,
    ctx: &M::Context,
    position: usize,
    directions: &Matrix<f64>,
    opts: &DirectionOptions,
    readout_change: impl Fn(usize, &[f64]) -> Result<Vec<f64>>,
) -> Result<Vec<DirectionEffect>> {
    let dims = model.dims();
    opts.validate()?;
    let h = model.activation(ctx, position)?;
    let z0 = model.upper_logits(ctx, position, &h)?;
    fs_traits::check_len("upper_logits output", z0.len(), dims.vocab_size)?;
    let p = softmax(&z0)?;
    let w_u = model.unembedding();
    w_u.check_shape(dims.vocab_size, dims.readout_dim)?;
    let slopes = fs_traits::logit_slopes(model.final_logit_softcap(), &z0);
    (0..directions.cols())
        .map(|k| {
            let v = nonzero_column(directions, k)?;
            let av = readout_change(k, &v)?;
            fs_traits::check_len("readout change A v", av.len(), dims.readout_dim)?;
            let mut jv = unembed(&w_u, &av)?;
            if let Some(s) = &slopes {
                // Soft-capped logits: J v = diag(s) W_U A v.
                jv.iter_mut().zip(s).for_each(|(z, s)| *z *= s);
            }
            effect_along(&p, jv, &h, &v, opts, |shifted| {
                kl_from_logits(&z0, &model.upper_logits(ctx, position, shifted)?)
            })
        })
        .collect()
}

impl DirectionOptions {
    /// Check `epsilon` (finite and positive where given) and `logit_scale`.
    pub(crate) fn validate(&self) -> Result<()> {
        if let Some(e) = self.epsilon {
            if !(e.is_finite() && e > 0.0) {
                return Err(FsError::invalid("epsilon", e, "a finite number > 0"));
            }
        }
        if !(self.logit_scale.is_finite() && self.logit_scale > 0.0) {
            return Err(FsError::invalid("logit_scale", self.logit_scale, "a finite number > 0"));
        }
        Ok(())
    }
}

/// Column `k` of `directions`, which must not be zero.
pub(crate) fn nonzero_column(directions: &Matrix<f64>, k: usize) -> Result<Vec<f64>> {
    let v: Vec<f64> = (0..directions.rows()).map(|j| directions.get(j, k)).collect();
    if v.iter().all(|&x| x == 0.0) {
        return Err(FsError::invalid(
            "direction",
            format!("column {k} is zero"),
            "a non-zero vector",
        ));
    }
    Ok(v)
}

/// One direction's read-out of a softmax distribution `p = softmax(z)` over outcomes, from the
/// exact logit change `jv = J v`: the probability change `p_y((Jv)_y − pᵀJv)`, `vᵀFv`, the step
/// `ε` ([`DirectionOptions`]) and the KL measured by `kl_at(h + εv)` (rounded to the model's
/// scalar). Shared by the next-token read-outs and the attention read-outs.
pub(crate) fn effect_along<S: Scalar>(
    p: &[f64],
    jv: Vec<f64>,
    h: &[S],
    v: &[f64],
    opts: &DirectionOptions,
    kl_at: impl FnOnce(&[S]) -> Result<f64>,
) -> Result<DirectionEffect> {
    let h_norm = h.iter().map(|x| x.as_f64() * x.as_f64()).sum::<f64>().sqrt();
    let v_norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let mean: f64 = p.iter().zip(&jv).map(|(p, z)| p * z).sum();
    let prob_change: Vec<f64> = p.iter().zip(&jv).map(|(p, z)| p * (z - mean)).collect();
    let vfv = fisher_quadratic_form(p, &jv)?;
    let scale = h_norm.max(1.0) / v_norm;
    let epsilon = opts.epsilon.unwrap_or(if vfv > 0.0 {
        (opts.logit_scale / vfv.sqrt()).min(0.05 * scale)
    } else {
        1e-3 * scale
    });
    let shifted: Vec<S> =
        h.iter().zip(v).map(|(x, d)| S::round_from_f64(x.as_f64() + epsilon * d)).collect();
    let kl = kl_at(&shifted)?;
    Ok(DirectionEffect {
        logit_change: jv,
        prob_change,
        fisher_quadratic: vfv,
        epsilon,
        kl,
        kl_quadratic: 0.5 * epsilon * epsilon * vfv,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analytic::{LinearModel, TanhModel};
    use crate::{exact_fisher, spectrum, ExactOptions, SplitModel};

    fn central_difference<M: SplitModel>(
        model: &M,
        ctx: &M::Context,
        t: usize,
        v: &[f64],
        eps: f64,
    ) -> Vec<f64> {
        let h = model.activation(ctx, t).unwrap();
        let at = |s: f64| {
            let x: Vec<M::Scalar> = h
                .iter()
                .zip(v)
                .map(|(a, b)| M::Scalar::round_from_f64(a.as_f64() + s * eps * b))
                .collect();
            model.upper_logits(ctx, t, &x).unwrap()
        };
        let (zp, zm) = (at(1.0), at(-1.0));
        zp.iter().zip(&zm).map(|(a, b)| (a.as_f64() - b.as_f64()) / (2.0 * eps)).collect()
    }

    fn rel(a: &[f64], b: &[f64]) -> f64 {
        let n: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt();
        n / b.iter().map(|y| y * y).sum::<f64>().sqrt()
    }

    #[test]
    fn logit_change_matches_finite_differences_of_the_tanh_model() {
        let model = TanhModel::<f64>::random(40, 8, 12, 6, 1.0, 3);
        let ctx = model.lower(&[1, 7, 3, 9], 0).unwrap();
        let f = exact_fisher(&model, &ctx, &[2], &ExactOptions::default()).unwrap();
        let s = spectrum(&f[0], Some(3)).unwrap();
        let effects =
            direction_effects(&model, &ctx, 2, &s.eigenvectors, &DirectionOptions::default())
                .unwrap();
        for (k, e) in effects.iter().enumerate() {
            let v: Vec<f64> = (0..8).map(|j| s.eigenvectors.get(j, k)).collect();
            let fd = central_difference(&model, &ctx, 2, &v, 1e-5);
            let err = rel(&e.logit_change, &fd);
            assert!(err < 1e-8, "direction {k}: Jv vs central difference {err:e}");
            // vᵀFv from Jv equals the eigenvalue of the exact Fisher.
            let lambda = s.eigenvalues[k];
            assert!((e.fisher_quadratic - lambda).abs() <= 1e-10 * lambda.max(1e-12), "{k}");
            // The probability change sums to zero and is p ⊙ centred Jv.
            assert!(e.prob_change.iter().sum::<f64>().abs() < 1e-14);
            // The KL check: ½ ε² vᵀFv within a few percent at the automatic ε.
            let r = e.kl_ratio();
            assert!((r - 1.0).abs() < 0.1, "direction {k}: KL ratio {r}");
        }
    }

    /// The Jacobian kept by `exact_fisher_with_jacobians` is the model's own `A_t`, its Fisher is
    /// `exact_fisher`'s, and read-outs from it equal those that compute `A_t` again — and a
    /// Jacobian of the wrong position gives different read-outs (the reuse is not a no-op).
    #[test]
    fn readouts_from_the_kept_jacobian_equal_recomputed_ones() {
        let model = TanhModel::<f64>::random(40, 8, 12, 6, 1.0, 5);
        let ctx = model.lower(&[1, 7, 3, 9, 2], 0).unwrap();
        let opts = ExactOptions::default();
        let positions = [1, 3, 4];
        let kept = crate::exact_fisher_with_jacobians(&model, &ctx, &positions, &opts).unwrap();
        let plain = exact_fisher(&model, &ctx, &positions, &opts).unwrap();
        let fresh = model.readout_jacobians(&ctx, &positions).unwrap();
        for (i, (k, (f, a))) in kept.iter().zip(plain.iter().zip(&fresh)).enumerate() {
            assert_eq!(k.fisher.as_slice(), f.as_slice(), "F at {i}");
            assert_eq!(k.jacobian.as_slice(), a.as_slice(), "A at {i}");
        }
        let s = spectrum(&kept[1].fisher, Some(2)).unwrap();
        let o = DirectionOptions::default();
        let again = direction_effects(&model, &ctx, 3, &s.eigenvectors, &o).unwrap();
        let from = |a: MatrixRef<'_, f64>| {
            direction_effects_from_jacobian(&model, &ctx, 3, a, &s.eigenvectors, &o)
        };
        let reused = from(kept[1].jacobian.view()).unwrap();
        for (x, y) in again.iter().zip(&reused) {
            assert_eq!(x.logit_change, y.logit_change);
            assert_eq!(
                (x.fisher_quadratic, x.kl, x.epsilon),
                (y.fisher_quadratic, y.kl, y.epsilon)
            );
        }
        let wrong = from(kept[0].jacobian.view()).unwrap();
        assert!(rel(&wrong[0].logit_change, &again[0].logit_change) > 1e-3);
        assert!(from(Matrix::<f64>::zeros(3, 8).view()).is_err());
    }

    #[test]
    fn kl_ratio_converges_as_epsilon_shrinks() {
        let model = TanhModel::<f64>::random(30, 6, 10, 4, 1.5, 11);
        let ctx = model.lower(&[4, 2, 8], 0).unwrap();
        let f = exact_fisher(&model, &ctx, &[1], &ExactOptions::default()).unwrap();
        let s = spectrum(&f[0], Some(1)).unwrap();
        let mut last = f64::INFINITY;
        for eps in [1e-1, 3e-2, 1e-2, 3e-3] {
            let o = DirectionOptions { epsilon: Some(eps), ..Default::default() };
            let e = &direction_effects(&model, &ctx, 1, &s.eigenvectors, &o).unwrap()[0];
            assert_eq!(e.epsilon, eps);
            let gap = (e.kl_ratio() - 1.0).abs();
            assert!(gap < last, "ε = {eps}: |ratio − 1| = {gap} did not shrink from {last}");
            last = gap;
        }
        assert!(last < 1e-2, "{last}");
    }

    #[test]
    fn linear_model_effects_are_w_v_and_f32_models_agree() {
        let model = LinearModel::<f64>::random(25, 5, 4, 0.7, 5);
        let ctx = model.lower(&[3, 1], 0).unwrap();
        let v = Matrix::from_fn(5, 2, |i, j| ((i + 2 * j) as f64).sin());
        let e = direction_effects(&model, &ctx, 1, &v, &DirectionOptions::default()).unwrap();
        let w = model.unembedding().to_matrix().unwrap();
        for (k, ek) in e.iter().enumerate() {
            let expected: Vec<f64> =
                (0..25).map(|y| (0..5).map(|j| w.get(y, j) * v.get(j, k)).sum()).collect();
            assert!(rel(&ek.logit_change, &expected) < 1e-14);
        }
        // The same model in f32 gives the same read-outs to f32 accuracy, and its KL check holds.
        let m32 = model.cast::<f32>();
        let ctx32 = m32.lower(&[3, 1], 0).unwrap();
        let e32 = direction_effects(&m32, &ctx32, 1, &v, &DirectionOptions::default()).unwrap();
        for (a, b) in e32.iter().zip(&e) {
            assert!(rel(&a.logit_change, &b.logit_change) < 1e-6);
            assert!((a.kl_ratio() - 1.0).abs() < 0.1, "{}", a.kl_ratio());
        }
    }

    #[test]
    fn top_tokens_and_projections() {
        let e = DirectionEffect {
            logit_change: vec![0.0; 4],
            prob_change: vec![0.1, -0.3, 0.25, -0.05],
            fisher_quadratic: 1.0,
            epsilon: 0.1,
            kl: 0.005,
            kl_quadratic: 0.005,
        };
        assert_eq!(e.pushed_up(2), vec![(2, 0.25), (0, 0.1)]);
        assert_eq!(e.pushed_down(1), vec![(1, -0.3)]);
        assert_eq!(e.pushed_up(0), vec![]);
        assert_eq!(e.pushed_up(9).len(), 4);
        assert!((e.kl_ratio() - 1.0).abs() < 1e-15);
        let dirs = Matrix::from_fn(3, 2, |i, j| if i == j { 1.0 } else { 0.5 });
        let c = project(&[1.0f32, 2.0, 4.0], &dirs).unwrap();
        assert_eq!(c, vec![1.0 + 1.0 + 2.0, 0.5 + 2.0 + 2.0]);
        assert!(project(&[1.0f32], &dirs).is_err());
    }

    #[test]
    fn rejects_bad_directions() {
        let model = LinearModel::<f64>::random(10, 3, 2, 1.0, 1);
        let ctx = model.lower(&[1], 0).unwrap();
        let o = DirectionOptions::default();
        assert!(direction_effects(&model, &ctx, 0, &Matrix::zeros(4, 1), &o).is_err());
        assert!(direction_effects(&model, &ctx, 0, &Matrix::zeros(3, 1), &o).is_err());
        assert!(direction_effects(&model, &ctx, 1, &Matrix::from_fn(3, 1, |_, _| 1.0), &o).is_err());
        let bad = DirectionOptions { epsilon: Some(-1.0), ..o };
        assert!(
            direction_effects(&model, &ctx, 0, &Matrix::from_fn(3, 1, |_, _| 1.0), &bad).is_err()
        );
        assert!(kl_from_logits(&[0.0f64, 1.0], &[0.0]).is_err());
        assert_eq!(kl_from_logits(&[0.0f64, 1.0], &[5.0, 6.0]).unwrap(), 0.0);
    }
}
