//! Editing an activation: what an edit along a direction costs, and steering the prediction
//! toward (or away from) a target token with the least damage to everything else.
//!
//! At a position with activation `h`, `p = softmax(z(h))`, Fisher `F` and a target token `y*`:
//!
//! ```text
//!     KL(p(h) ‖ p(h + δ)) = ½ δᵀ F δ + O(‖δ‖³)                   the cost of an edit δ
//!     g = ∇_h log p_{y*}(h) = Jᵀ(e_{y*} − p)                       the target's score
//!     min ½ δᵀFδ  s.t.  gᵀδ = c      ⇒   δ ∝ F⁻¹ g                 the Fisher-optimal direction
//!     δ_λ ∝ (F + λI)⁻¹ g,  λ = ρ · gᵀFg / gᵀg                     damped (ρ = ∞: Euclidean δ ∝ g)
//! ```
//!
//! **Off-target KL.** With `p̃` the distribution over the other tokens (`y ≠ y*`, renormalised),
//! the KL splits exactly (chain rule) into the change of the target's own probability and the
//! change of everything else:
//!
//! ```text
//!     KL(p ‖ q) = KL_bin(p_{y*} ‖ q_{y*}) + (1 − p_{y*}) · KL(p̃ ‖ q̃)
//! ```
//!
//! Two edits that reach the same target probability have the same binary term, so comparing
//! their total KL and comparing their **off-target KL** `KL(p̃ ‖ q̃)` are the same comparison —
//! and the Fisher-optimal direction minimises the total KL per unit of first-order gain.
//!
//! [`edit_cost`] evaluates a given direction (second-order cost next to the measured KL at
//! several step sizes, and the first-order effect on chosen tokens); [`steer`] walks from `h`
//! toward a target probability along the Euclidean gradient, the damped Fisher direction or a
//! fixed direction (e.g. a contrastive steering vector, [`contrastive_direction`]), recomputing
//! the direction at every step, and stops at the target probability so that methods can be
//! compared there. The Fisher direction is solved by conjugate gradients on
//! [`FisherOperator`] without forming `F`: per step the readout Jacobian `A` (`d_u × d`) is formed
//! once by the model's batched pass, and every CG iteration `F x = Aᵀ G (A x)` runs on the host
//! in `2·d_u·d + 4·V·d_u` flops (never the `V·d_u²` of `G` itself).

use crate::readouts::{kl_from_logits, log_sum_exp};
use crate::{direction_effects, DirectionOptions};
use crate::{softmax, FisherOperator, FsError, Matrix, Result, Scalar, SplitContext, SplitModel};

/// `log softmax(z)_y` in `f64`.
fn log_prob<S: Scalar>(z: &[S], y: usize) -> f64 {
    z[y].as_f64() - log_sum_exp(z, None)
}

/// The **off-target KL** `KL(p̃ ‖ q̃)` between the distributions `p = softmax(z0)` and
/// `q = softmax(z1)` restricted to the tokens other than `target` and renormalised, in `f64`
/// from the logits: `Σ_{y≠y*} p̃_y (log p̃_y − log q̃_y)` with
/// `log p̃_y = z0_y − lse_{y'≠y*}(z0)`. Clamped at 0 (round-off).
pub fn off_target_kl<S: Scalar>(z0: &[S], z1: &[S], target: u32) -> Result<f64> {
    fs_traits::check_len("perturbed logits", z1.len(), z0.len())?;
    fs_traits::check_tokens_in_vocab(&[target], z0.len())?;
    fs_traits::check_finite("logits", z0)?;
    fs_traits::check_finite("perturbed logits", z1)?;
    let t = target as usize;
    if z0.len() < 2 {
        return Ok(0.0);
    }
    let (lse0, lse1) = (log_sum_exp(z0, Some(t)), log_sum_exp(z1, Some(t)));
    let kl: f64 = z0
        .iter()
        .zip(z1)
        .enumerate()
        .filter(|&(y, _)| y != t)
        .map(|(_, (a, b))| {
            let lp = a.as_f64() - lse0;
            lp.exp() * (lp - (b.as_f64() - lse1))
        })
        .sum();
    Ok(kl.max(0.0))
}

/// The binary KL `KL_bin(p ‖ q) = p log(p/q) + (1−p) log((1−p)/(1−q))` of two probabilities.
pub fn binary_kl(p: f64, q: f64) -> f64 {
    let term = |a: f64, b: f64| if a > 0.0 { a * (a / b).ln() } else { 0.0 };
    (term(p, q) + term(1.0 - p, 1.0 - q)).max(0.0)
}

/// The contrastive steering vector at `layer`: the mean of the last-position activations of the
/// `positive` token sequences minus that of the `negative` ones (each set non-empty).
pub fn contrastive_direction<M: SplitModel>(
    model: &M,
    layer: usize,
    positive: &[Vec<u32>],
    negative: &[Vec<u32>],
) -> Result<Vec<f64>> {
    let mean = |set: &[Vec<u32>], name: &str| -> Result<Vec<f64>> {
        if set.is_empty() {
            return Err(FsError::invalid(
                format!("{name} prompt set"),
                "empty",
                "at least one prompt",
            ));
        }
        let mut acc = vec![0.0f64; model.dims().d_model];
        for tokens in set {
            let ctx = model.lower(tokens, layer)?;
            let h = model.activation(&ctx, ctx.seq_len() - 1)?;
            acc.iter_mut().zip(&h).for_each(|(a, x)| *a += x.as_f64());
        }
        Ok(acc.into_iter().map(|a| a / set.len() as f64).collect())
    };
    let (pos, neg) = (mean(positive, "positive")?, mean(negative, "negative")?);
    Ok(pos.iter().zip(&neg).map(|(a, b)| a - b).collect())
}

/// The effect of one edit size in [`EditCost`].
#[derive(Clone, Debug, PartialEq)]
pub struct EditStep {
    /// The edit's size relative to the activation: `h' = h + scale·‖h‖·v̂`.
    pub scale: f64,
    /// `ε = scale·‖h‖`, the step along the unit direction `v̂`.
    pub epsilon: f64,
    /// The second-order prediction `½ ε² v̂ᵀFv̂`.
    pub kl_quadratic: f64,
    /// `KL(p(h) ‖ p(h'))`, measured with the model's upper half.
    pub kl: f64,
    /// Per target token: `(predicted, measured)` change of `log p_y`, the prediction first
    /// order, `ε·((Jv̂)_y − pᵀJv̂)`.
    pub target_log_prob_change: Vec<(f64, f64)>,
}

/// What editing `h` along a direction `v` costs ([`edit_cost`]).
#[derive(Clone, Debug, PartialEq)]
pub struct EditCost {
    /// `‖v‖` of the direction as given.
    pub direction_norm: f64,
    /// `‖h‖`.
    pub activation_norm: f64,
    /// `v̂ᵀ F v̂` for the unit direction `v̂ = v/‖v‖` (`Var_{y~p}[(Jv̂)_y]`, exact `Jv̂`).
    pub unit_fisher: f64,
    /// First-order change of `log p_y` per unit step along `v̂`, per target token.
    pub target_slopes: Vec<f64>,
    /// One entry per requested scale.
    pub steps: Vec<EditStep>,
}

/// The cost of editing the activation at `position` along `v` (length `d`, any non-zero norm):
/// `v̂ᵀFv̂` from the exact logit change `Jv̂ = W_U A v̂` (one JVP), and for each `scale` the
/// edit `h' = h + scale·‖h‖·v̂`: `½ε²v̂ᵀFv̂` next to `KL(p(h) ‖ p(h'))` measured with the upper
/// half, and the predicted vs measured change of `log p_y` for each of `targets`.
pub fn edit_cost<M: SplitModel>(
    model: &M,
    ctx: &M::Context,
    position: usize,
    v: &[f64],
    scales: &[f64],
    targets: &[u32],
) -> Result<EditCost> {
    let dims = model.dims();
    fs_traits::check_len("direction", v.len(), dims.d_model)?;
    fs_traits::check_finite("direction", v)?;
    fs_traits::check_tokens_in_vocab(targets, dims.vocab_size)?;
    if let Some(&s) = scales.iter().find(|s| !(s.is_finite() && **s != 0.0)) {
        return Err(FsError::invalid("edit scale", s, "a finite non-zero number"));
    }
    let v_norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    if v_norm == 0.0 {
        return Err(FsError::invalid("direction", "the zero vector", "a non-zero vector"));
    }
    let unit: Vec<f64> = v.iter().map(|x| x / v_norm).collect();
    let h = model.activation(ctx, position)?;
    let h_norm = h.iter().map(|x| x.as_f64().powi(2)).sum::<f64>().sqrt();
    let z0 = model.upper_logits(ctx, position, &h)?;
    fs_traits::check_len("upper_logits output", z0.len(), dims.vocab_size)?;
    let p = softmax(&z0)?;
    // Jv̂ = diag(s) W_U A v̂ (one JVP) and v̂ᵀFv̂, as the eigenvector read-outs compute them.
    let direction = Matrix::from_vec(dims.d_model, 1, unit.clone())?;
    let effect = direction_effects(model, ctx, position, &direction, &DirectionOptions::default())?
        .remove(0);
    let (jv, unit_fisher) = (effect.logit_change, effect.fisher_quadratic);
    let mean: f64 = p.iter().zip(&jv).map(|(p, z)| p * z).sum();
    let target_slopes: Vec<f64> = targets.iter().map(|&y| jv[y as usize] - mean).collect();
    let steps = scales
        .iter()
        .map(|&scale| {
            let epsilon = scale * h_norm;
            let shifted: Vec<M::Scalar> = h
                .iter()
                .zip(&unit)
                .map(|(x, d)| M::Scalar::round_from_f64(x.as_f64() + epsilon * d))
                .collect();
            let z1 = model.upper_logits(ctx, position, &shifted)?;
            let changes = targets
                .iter()
                .zip(&target_slopes)
                .map(|(&y, slope)| {
                    let y = y as usize;
                    (epsilon * slope, log_prob(&z1, y) - log_prob(&z0, y))
                })
                .collect();
            Ok(EditStep {
                scale,
                epsilon,
                kl_quadratic: 0.5 * epsilon * epsilon * unit_fisher,
                kl: kl_from_logits(&z0, &z1)?,
                target_log_prob_change: changes,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(EditCost {
        direction_norm: v_norm,
        activation_norm: h_norm,
        unit_fisher,
        target_slopes,
        steps,
    })
}

/// How [`steer`] chooses its direction at each step.
#[derive(Clone, Debug, PartialEq)]
pub enum SteeringMethod {
    /// The Euclidean gradient `g = ∇_h log p_{y*}` (recomputed at every step).
    Euclidean,
    /// The damped Fisher-optimal direction `(F + λI)⁻¹ g` with `λ = damping · gᵀFg / gᵀg`
    /// (the curvature along `g` itself: `damping → ∞` is the Euclidean direction, `→ 0` the
    /// undamped natural gradient), `F` and `g` recomputed at every step.
    Fisher {
        /// `ρ` in `λ = ρ · gᵀFg / gᵀg` (> 0).
        damping: f64,
        /// How `(F + λI) x = g` is solved.
        solver: FisherSolver,
    },
    /// A fixed direction (e.g. a contrastive steering vector), followed with the sign that
    /// moves the target the requested way at each step.
    Fixed(Vec<f64>),
}

impl SteeringMethod {
    /// A short name: `euclidean`, `fisher`, `fixed`.
    pub fn name(&self) -> &'static str {
        match self {
            SteeringMethod::Euclidean => "euclidean",
            SteeringMethod::Fisher { .. } => "fisher",
            SteeringMethod::Fixed(_) => "fixed",
        }
    }
}

/// How [`SteeringMethod::Fisher`] solves `(F + λI) x = g` at each step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FisherSolver {
    /// Form the exact `F = AᵀGA` ([`exact_fisher`](crate::exact_fisher): `d` tangents, `V·d_u²`
    /// for `G`, `d³` for the sandwich) and solve by Cholesky. Exact; the fastest when `G` costs
    /// less than a few dozen passes over `W_U` (every model up to a few hundred million
    /// parameters: SmolLM2, Gemma-3-270M).
    #[default]
    Exact,
    /// Conjugate gradients on [`FisherOperator::with_formed_jacobian`] without forming `F` or
    /// `G`: `A` formed once per step, each iteration `Aᵀ G (A x)` streams `W_U` once
    /// (`4·V·d_u` flops) — for models whose `V·d_u²` is too large to form per step.
    ConjugateGradient,
}

/// Options of [`steer`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SteeringOptions {
    /// The probability of the target token to reach (in `(0, 1)`); above the current one the
    /// target is pushed up, below it down.
    pub target_probability: f64,
    /// The largest first-order change of `log p_{y*}` (nats) one step aims for; smaller steps
    /// follow the curved path more closely. A step whose measured gain is under a quarter of
    /// its first-order prediction is halved and retried.
    pub max_step_nats: f64,
    /// Steps (direction recomputations) before giving up.
    pub max_steps: usize,
    /// `|log p_{y*} − log target_probability|` at which the target counts as reached (the last
    /// step is bisected down to it).
    pub tolerance_nats: f64,
    /// Conjugate gradients stop at `‖(F+λI)x − g‖ ≤ cg_tolerance · ‖g‖` …
    pub cg_tolerance: f64,
    /// … or after this many iterations (the best iterate is used; its residual is reported).
    pub cg_max_iterations: usize,
}

impl Default for SteeringOptions {
    fn default() -> Self {
        SteeringOptions {
            target_probability: 0.5,
            max_step_nats: 0.5,
            max_steps: 100,
            tolerance_nats: 1e-3,
            cg_tolerance: 1e-5,
            cg_max_iterations: 500,
        }
    }
}

impl SteeringOptions {
    fn validate(&self) -> Result<()> {
        let p = self.target_probability;
        if !(p > 0.0 && p < 1.0) {
            return Err(FsError::invalid("target probability", p, "a number in (0, 1)"));
        }
        for (name, x) in [
            ("max step (nats)", self.max_step_nats),
            ("tolerance (nats)", self.tolerance_nats),
            ("CG tolerance", self.cg_tolerance),
        ] {
            if !(x.is_finite() && x > 0.0) {
                return Err(FsError::invalid(name, x, "a finite number > 0"));
            }
        }
        if self.max_steps == 0 || self.cg_max_iterations == 0 {
            return Err(FsError::invalid("max steps / CG iterations", 0, "at least 1"));
        }
        Ok(())
    }
}

/// One accepted step of a [`SteeringPath`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SteeringPoint {
    /// `p_{y*}` after the step.
    pub target_probability: f64,
    /// `KL(p(h₀) ‖ p(h))`.
    pub kl: f64,
    /// [`off_target_kl`] between `p(h₀)` and `p(h)`.
    pub off_target_kl: f64,
    /// `‖h − h₀‖`.
    pub edit_norm: f64,
}

/// Where [`steer`] went and what it cost.
#[derive(Clone, Debug, PartialEq)]
pub struct SteeringPath {
    /// Whether the target probability was reached (within the tolerance).
    pub reached: bool,
    /// Why it stopped, when it did not reach the target.
    pub stopped: Option<String>,
    /// `p_{y*}(h₀)`.
    pub initial_probability: f64,
    /// `p_{y*}` at the end.
    pub final_probability: f64,
    /// The edit `δ = h − h₀` at the end (length `d`).
    pub edit: Vec<f64>,
    /// The logits at `h₀` and at `h₀ + δ` (`f64`, length `V`), as the KLs were computed from.
    pub logits: [Vec<f64>; 2],
    /// `‖δ‖`.
    pub edit_norm: f64,
    /// `‖δ‖ / ‖h₀‖`.
    pub relative_edit_norm: f64,
    /// `KL(p(h₀) ‖ p(h₀ + δ))`.
    pub kl: f64,
    /// [`off_target_kl`] between `p(h₀)` and `p(h₀ + δ)`.
    pub off_target_kl: f64,
    /// The start and every accepted step.
    pub path: Vec<SteeringPoint>,
    /// Steps taken (directions computed).
    pub steps: usize,
    /// Fisher operator applications (Fisher method; 0 otherwise).
    pub operator_applications: usize,
    /// Largest relative CG residual `‖(F+λI)x − g‖ / ‖g‖` of any step (Fisher method).
    pub cg_residual: f64,
    /// Upper-half evaluations (line search and bisection).
    pub evaluations: usize,
}

/// Steer the activation at `position` so that `p_{target}` reaches `opts.target_probability`,
/// along `method`'s direction recomputed at every step (module docs: the math). Each step aims
/// for a first-order change of `log p_{target}` of at most `opts.max_step_nats`; the last one
/// is bisected to the target probability. Returns the path, the final edit, its KL and its
/// off-target KL. Needs [`SplitModel::with_activation`] (for `g` and `F` at edited
/// activations).
pub fn steer<M: SplitModel>(
    model: &M,
    ctx: &M::Context,
    position: usize,
    target: u32,
    method: &SteeringMethod,
    opts: &SteeringOptions,
) -> Result<SteeringPath> {
    opts.validate()?;
    let dims = model.dims();
    fs_traits::check_tokens_in_vocab(&[target], dims.vocab_size)?;
    match method {
        SteeringMethod::Fisher { damping, .. } if !(damping.is_finite() && *damping > 0.0) => {
            return Err(FsError::invalid("Fisher damping", damping, "a finite number > 0"));
        }
        SteeringMethod::Fixed(v) => {
            fs_traits::check_len("steering direction", v.len(), dims.d_model)?;
            fs_traits::check_finite("steering direction", v)?;
            if v.iter().all(|&x| x == 0.0) {
                return Err(FsError::invalid("steering direction", "zero", "a non-zero vector"));
            }
        }
        _ => {}
    }
    let y = target as usize;
    let h0: Vec<f64> = model.activation(ctx, position)?.iter().map(|x| x.as_f64()).collect();
    let h0_norm = norm(&h0);
    let mut evaluations = 0usize;
    let mut eval = |h: &[f64]| -> Result<Vec<M::Scalar>> {
        evaluations += 1;
        let hs: Vec<M::Scalar> = h.iter().map(|&x| M::Scalar::round_from_f64(x)).collect();
        let z = model.upper_logits(ctx, position, &hs)?;
        fs_traits::check_len("upper_logits output", z.len(), dims.vocab_size)?;
        fs_traits::check_finite("logits at the edited activation", &z)?;
        Ok(z)
    };
    let z0 = eval(&h0)?;
    let lp0 = log_prob(&z0, y);
    let goal = opts.target_probability.ln();
    let up = goal > lp0;
    let sign = if up { 1.0 } else { -1.0 };
    let point = |z: &[M::Scalar], h: &[f64]| -> Result<SteeringPoint> {
        Ok(SteeringPoint {
            target_probability: log_prob(z, y).exp(),
            kl: kl_from_logits(&z0, z)?,
            off_target_kl: off_target_kl(&z0, z, target)?,
            edit_norm: norm(&sub(h, &h0)),
        })
    };
    let mut path = vec![point(&z0, &h0)?];
    let (mut h, mut lp) = (h0.clone(), lp0);
    let mut z = z0.clone();
    let mut reached = (lp - goal).abs() <= opts.tolerance_nats;
    let mut stopped = None;
    let (mut steps, mut applications, mut cg_residual) = (0usize, 0usize, 0.0f64);
    while !reached && stopped.is_none() {
        if steps == opts.max_steps {
            stopped = Some(format!("{} steps without reaching the target", opts.max_steps));
            break;
        }
        steps += 1;
        let hs: Vec<M::Scalar> = h.iter().map(|&x| M::Scalar::round_from_f64(x)).collect();
        let edited = model.with_activation(ctx, position, &hs)?;
        let g: Vec<f64> = model
            .score_gradients(&edited, position, &[target])?
            .row(0)
            .iter()
            .map(|x| x.as_f64())
            .collect();
        fs_traits::check_finite("score gradient", &g)?;
        let dir = match method {
            SteeringMethod::Euclidean => g.clone(),
            SteeringMethod::Fisher { damping, solver: FisherSolver::ConjugateGradient } => {
                let mut op = FisherOperator::with_formed_jacobian(model, &edited, position)?;
                let (x, residual) = damped_solve(&mut op, &g, *damping, opts)?;
                applications += op.applications();
                cg_residual = cg_residual.max(residual);
                x
            }
            SteeringMethod::Fisher { damping, solver: FisherSolver::Exact } => {
                let f = crate::exact_fisher(model, &edited, &[position], &Default::default())?;
                dense_damped_solve(&f[0], &g, *damping)?
            }
            SteeringMethod::Fixed(v) => v.clone(),
        };
        let slope = dot(&g, &dir);
        // Follow the direction in the sense that moves log p the requested way (−g, −F⁻¹g to
        // push the target down; a fixed direction with whichever sign helps here).
        let (dir, slope) = if slope * sign < 0.0 {
            (dir.iter().map(|x| -x).collect::<Vec<_>>(), -slope)
        } else {
            (dir, slope)
        };
        if slope * sign <= 0.0 || slope.is_nan() {
            stopped = Some(format!(
                "the {} direction no longer moves the target the requested way (gᵀd = {slope:.3e})",
                method.name()
            ));
            break;
        }
        let want = (goal - lp).abs().min(opts.max_step_nats) * sign;
        let mut epsilon = want / slope;
        let mut accepted = false;
        for _ in 0..40 {
            let candidate = axpy(&h, epsilon, &dir);
            let zc = eval(&candidate)?;
            let lpc = log_prob(&zc, y);
            if (lpc - goal) * sign >= -opts.tolerance_nats {
                // Reached or passed the goal within this step: bisect the step to the goal.
                let (mut lo, mut hi) = (0.0f64, 1.0f64);
                let (mut best_h, mut best_z, mut best_lp) = (candidate, zc, lpc);
                for _ in 0..60 {
                    if (best_lp - goal).abs() <= opts.tolerance_nats {
                        break;
                    }
                    let mid = 0.5 * (lo + hi);
                    let hm = axpy(&h, mid * epsilon, &dir);
                    let zm = eval(&hm)?;
                    let lpm = log_prob(&zm, y);
                    if (lpm - goal) * sign >= 0.0 {
                        hi = mid;
                    } else {
                        lo = mid;
                    }
                    (best_h, best_z, best_lp) = (hm, zm, lpm);
                }
                reached = (best_lp - goal).abs() <= opts.tolerance_nats;
                if !reached {
                    stopped = Some("bisection of the last step did not reach the target".into());
                }
                (h, z, lp) = (best_h, best_z, best_lp);
                accepted = true;
                break;
            }
            if (lpc - lp) * sign >= 0.25 * (epsilon * slope).abs() {
                (h, z, lp) = (candidate, zc, lpc);
                accepted = true;
                break;
            }
            epsilon *= 0.5;
        }
        if !accepted {
            stopped = Some("no step along the direction increases the target enough".into());
        } else {
            path.push(point(&z, &h)?);
        }
    }
    let edit = sub(&h, &h0);
    let edit_norm = norm(&edit);
    Ok(SteeringPath {
        reached,
        stopped,
        initial_probability: lp0.exp(),
        final_probability: lp.exp(),
        relative_edit_norm: edit_norm / h0_norm.max(f64::MIN_POSITIVE),
        edit_norm,
        edit,
        kl: kl_from_logits(&z0, &z)?,
        logits: [z0.iter().map(|x| x.as_f64()).collect(), z.iter().map(|x| x.as_f64()).collect()],
        off_target_kl: off_target_kl(&z0, &z, target)?,
        path,
        steps,
        operator_applications: applications,
        cg_residual,
        evaluations,
    })
}

/// `x = (F + λI)⁻¹ g` with `λ = damping · gᵀFg / gᵀg` for a formed `F`, by Cholesky (`F + λI` is
/// SPD for `λ > 0`).
fn dense_damped_solve(f: &Matrix<f64>, g: &[f64], damping: f64) -> Result<Vec<f64>> {
    let d = g.len();
    fs_traits::check_len("Fisher matrix rows", f.rows(), d)?;
    let gg = dot(g, g);
    if gg == 0.0 {
        return Ok(vec![0.0; d]);
    }
    let gfg: f64 = (0..d).map(|i| g[i] * dot(f.row(i), g)).sum();
    let lambda = damping * (gfg / gg).max(f64::MIN_POSITIVE);
    let a = faer::Mat::from_fn(d, d, |i, j| f.get(i, j) + if i == j { lambda } else { 0.0 });
    let llt = a
        .llt(faer::Side::Lower)
        .map_err(|_| FsError::LinearAlgebra("Cholesky of F + λI (not positive definite)".into()))?;
    let b = faer::Mat::from_fn(d, 1, |i, _| g[i]);
    let x = faer::linalg::solvers::Solve::solve(&llt, &b);
    Ok((0..d).map(|i| x[(i, 0)]).collect())
}

/// `x = (F + λI)⁻¹ g` with `λ = damping · gᵀFg / gᵀg`, by conjugate gradients on the operator
/// (`F` symmetric PSD, so `F + λI` is SPD). Returns the best iterate and its relative residual.
fn damped_solve<M: SplitModel>(
    op: &mut FisherOperator<'_, M>,
    g: &[f64],
    damping: f64,
    opts: &SteeringOptions,
) -> Result<(Vec<f64>, f64)> {
    let d = g.len();
    let g_norm = norm(g);
    if g_norm == 0.0 {
        return Ok((vec![0.0; d], 0.0));
    }
    let apply = |op: &mut FisherOperator<'_, M>, x: &[f64]| -> Result<Vec<f64>> {
        let m = Matrix::from_vec(1, d, x.to_vec())?;
        Ok(op.apply(&m)?.row(0).to_vec())
    };
    let fg = apply(op, g)?;
    let curvature = dot(g, &fg) / (g_norm * g_norm);
    let lambda = damping * curvature.max(f64::MIN_POSITIVE);
    // CG from x = 0: r = g, p = g, and (F + λI) g is already known.
    let mut x = vec![0.0; d];
    let mut r = g.to_vec();
    let mut p = g.to_vec();
    let mut ap: Vec<f64> = fg.iter().zip(g).map(|(f, g)| f + lambda * g).collect();
    let mut rr = dot(&r, &r);
    let mut residual = 1.0;
    for iteration in 0..opts.cg_max_iterations {
        if iteration > 0 {
            ap = apply(op, &p)?.iter().zip(&p).map(|(f, p)| f + lambda * p).collect();
        }
        let pap = dot(&p, &ap);
        if pap <= 0.0 || pap.is_nan() {
            break;
        }
        let alpha = rr / pap;
        x.iter_mut().zip(&p).for_each(|(x, p)| *x += alpha * p);
        r.iter_mut().zip(&ap).for_each(|(r, a)| *r -= alpha * a);
        let rr_next = dot(&r, &r);
        residual = rr_next.sqrt() / g_norm;
        if residual <= opts.cg_tolerance {
            break;
        }
        let beta = rr_next / rr;
        rr = rr_next;
        p.iter_mut().zip(&r).for_each(|(p, r)| *p = r + beta * *p);
    }
    Ok((x, residual))
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

fn sub(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

fn axpy(h: &[f64], epsilon: f64, d: &[f64]) -> Vec<f64> {
    h.iter().zip(d).map(|(h, d)| h + epsilon * d).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analytic::TanhModel;

    fn model() -> (TanhModel<f64>, crate::analytic::AnalyticContext<f64>) {
        let m = TanhModel::<f64>::random(40, 12, 16, 8, 0.6, 11);
        let ctx = m.lower(&[3, 7, 1], 0).unwrap();
        (m, ctx)
    }

    /// `(F + λI) x = g` by a dense Cholesky solve (faer), independent of the CG.
    fn dense_solve(f: &Matrix<f64>, lambda: f64, g: &[f64]) -> Vec<f64> {
        let d = g.len();
        let a = faer::Mat::from_fn(d, d, |i, j| f.get(i, j) + if i == j { lambda } else { 0.0 });
        let llt = a.llt(faer::Side::Lower).unwrap();
        let b = faer::Mat::from_fn(d, 1, |i, _| g[i]);
        let x = faer::linalg::solvers::Solve::solve(&llt, &b);
        (0..d).map(|i| x[(i, 0)]).collect()
    }

    #[test]
    fn off_target_kl_satisfies_the_chain_rule() {
        let z0: Vec<f64> = (0..30).map(|i| ((i * 7 % 11) as f64 - 5.0) * 0.4).collect();
        let z1: Vec<f64> =
            z0.iter().enumerate().map(|(i, z)| z + ((i % 5) as f64 - 2.0) * 0.3).collect();
        for target in [0u32, 4, 29] {
            let (p0, p1) = (softmax(&z0).unwrap(), softmax(&z1).unwrap());
            let t = target as usize;
            let total = kl_from_logits(&z0, &z1).unwrap();
            let off = off_target_kl(&z0, &z1, target).unwrap();
            let split = binary_kl(p0[t], p1[t]) + (1.0 - p0[t]) * off;
            assert!((total - split).abs() <= 1e-12 * total.max(1.0), "{total} vs {split}");
            // And by the definition, from renormalised probabilities.
            let (r0, r1) = (1.0 - p0[t], 1.0 - p1[t]);
            let direct: f64 = (0..30)
                .filter(|&y| y != t)
                .map(|y| p0[y] / r0 * ((p0[y] / r0) / (p1[y] / r1)).ln())
                .sum();
            assert!((off - direct).abs() <= 1e-12, "{off} vs {direct}");
        }
        assert_eq!(off_target_kl(&z0, &z0, 3).unwrap(), 0.0);
    }

    #[test]
    fn edit_cost_matches_the_known_fisher_and_the_measured_kl() {
        let (m, ctx) = model();
        let f = m.known_fisher(&ctx, 2).unwrap();
        let v: Vec<f64> = (0..12).map(|i| (i as f64 * 0.7).sin() * 3.0).collect();
        let cost = edit_cost(&m, &ctx, 2, &v, &[1e-4, -1e-4, 1e-3, 0.3], &[5, 9]).unwrap();
        let vn = norm(&v);
        let vfv: f64 =
            (0..12).map(|a| (0..12).map(|b| v[a] * f.get(a, b) * v[b]).sum::<f64>()).sum::<f64>()
                / (vn * vn);
        assert!((cost.unit_fisher - vfv).abs() <= 1e-10 * vfv, "{} vs {vfv}", cost.unit_fisher);
        assert!((cost.direction_norm - vn).abs() < 1e-12);
        // Small edits: the KL is the quadratic form (the ratio's error is first order in ε).
        for step in &cost.steps[..3] {
            let ratio = step.kl / step.kl_quadratic;
            let allowed = 2e-2 * step.scale.abs() / 1e-4;
            assert!((ratio - 1.0).abs() < allowed, "ratio {ratio} at {}", step.scale);
        }
        // The first-order change of log p: the central difference of the measured changes at
        // ±ε (error O(ε³)) equals the predicted one.
        let (plus, minus) = (&cost.steps[0], &cost.steps[1]);
        for (a, b) in plus.target_log_prob_change.iter().zip(&minus.target_log_prob_change) {
            let central = 0.5 * (a.1 - b.1);
            assert!((central - a.0).abs() <= 1e-6 * a.0.abs(), "{central} vs {}", a.0);
            assert_eq!(a.0, -b.0);
        }
        // A large edit leaves the quadratic regime (the check above is not vacuous).
        let big = &cost.steps[3];
        assert!((big.kl / big.kl_quadratic - 1.0).abs() > 5e-2, "{big:?}");
        assert!(edit_cost(&m, &ctx, 2, &[0.0; 12], &[0.1], &[]).is_err());
        assert!(edit_cost(&m, &ctx, 2, &v, &[f64::NAN], &[]).is_err());
    }

    #[test]
    fn the_damped_cg_solve_equals_a_dense_solve() {
        let (m, ctx) = model();
        let f = m.known_fisher(&ctx, 2).unwrap();
        let g: Vec<f64> = m.score_gradients(&ctx, 2, &[5]).unwrap().row(0).to_vec();
        let fg: Vec<f64> = (0..12).map(|a| (0..12).map(|b| f.get(a, b) * g[b]).sum()).collect();
        for damping in [1e-3, 1e-1, 10.0] {
            let lambda = damping * dot(&g, &fg) / dot(&g, &g);
            let mut op = FisherOperator::new(&m, &ctx, 2).unwrap();
            let opts = SteeringOptions { cg_tolerance: 1e-12, ..Default::default() };
            let (x, residual) = damped_solve(&mut op, &g, damping, &opts).unwrap();
            let want = dense_solve(&f, lambda, &g);
            let dense = dense_damped_solve(&f, &g, damping).unwrap();
            assert!(norm(&sub(&dense, &want)) <= 1e-12 * norm(&want), "damping {damping}");
            let err = norm(&sub(&x, &want)) / norm(&want);
            assert!(err < 1e-8 && residual < 1e-10, "damping {damping}: {err:.2e} {residual:.2e}");
        }
    }

    #[test]
    fn steering_reaches_the_target_and_fisher_costs_less_off_target() {
        let (m, ctx) = model();
        let z = m.logits(&ctx, &[2]).unwrap();
        let p = softmax(z.row(0)).unwrap();
        // A mid-probability token, pushed up by 30 % and down by 30 %.
        let target = (0..40).min_by(|&a, &b| (p[a] - 0.1).abs().total_cmp(&(p[b] - 0.1).abs()));
        let target = target.unwrap();
        assert!(p[target] > 0.03 && p[target] < 0.5, "{}", p[target]);
        let g0: Vec<f64> = m.score_gradients(&ctx, 2, &[target as u32]).unwrap().row(0).to_vec();
        for goal in [p[target] * 1.3, p[target] * 0.7] {
            let opts = SteeringOptions { target_probability: goal, ..Default::default() };
            let mut results = Vec::new();
            for method in [
                SteeringMethod::Euclidean,
                SteeringMethod::Fisher { damping: 1e-3, solver: FisherSolver::Exact },
                SteeringMethod::Fixed(g0.clone()),
                SteeringMethod::Fisher { damping: 1e-3, solver: FisherSolver::ConjugateGradient },
            ] {
                let r = steer(&m, &ctx, 2, target as u32, &method, &opts).unwrap();
                assert!(r.reached, "{method:?}: {r:?}");
                assert!((r.final_probability.ln() - goal.ln()).abs() <= 1e-3);
                // The reported KLs are those of the reported edit.
                let h0 = m.activation(&ctx, 2).unwrap();
                let h1: Vec<f64> = h0.iter().zip(&r.edit).map(|(a, b)| a + b).collect();
                let z1 = m.upper_logits(&ctx, 2, &h1).unwrap();
                assert_eq!(r.off_target_kl, off_target_kl(z.row(0), &z1, target as u32).unwrap());
                assert_eq!(r.path.last().unwrap().off_target_kl, r.off_target_kl);
                results.push(r);
            }
            let (euclid, fisher) = (&results[0], &results[1]);
            // The minimum-KL direction costs less at the same target probability; the edit is
            // not smaller in norm (it moves along low-curvature directions).
            assert!(fisher.off_target_kl < 0.9 * euclid.off_target_kl, "{fisher:?} vs {euclid:?}");
            assert!(fisher.kl < euclid.kl);
            assert_eq!((euclid.operator_applications, fisher.operator_applications), (0, 0));
            // The matrix-free CG solve walks the same path as the dense one.
            let cg = &results[3];
            assert!(cg.operator_applications > 0 && cg.cg_residual < 1e-4, "{cg:?}");
            let rel = (cg.off_target_kl - fisher.off_target_kl).abs() / fisher.off_target_kl;
            assert!(rel < 1e-3, "CG {} vs dense {}", cg.off_target_kl, fisher.off_target_kl);
        }
    }

    #[test]
    fn bad_steering_requests_are_errors() {
        let (m, ctx) = model();
        let opts = SteeringOptions { target_probability: 1.0, ..Default::default() };
        assert!(steer(&m, &ctx, 2, 1, &SteeringMethod::Euclidean, &opts).is_err());
        let opts = SteeringOptions::default();
        assert!(steer(&m, &ctx, 2, 40, &SteeringMethod::Euclidean, &opts).is_err());
        let zero = SteeringMethod::Fixed(vec![0.0; 12]);
        assert!(steer(&m, &ctx, 2, 1, &zero, &opts).is_err());
        let bad = SteeringMethod::Fisher { damping: 0.0, solver: FisherSolver::Exact };
        assert!(steer(&m, &ctx, 2, 1, &bad, &opts).is_err());
    }

    #[test]
    fn contrastive_direction_is_the_mean_difference() {
        let (m, _) = model();
        let pos = vec![vec![1u32, 2], vec![4u32]];
        let neg = vec![vec![5u32, 6, 7]];
        let v = contrastive_direction(&m, 0, &pos, &neg).unwrap();
        let act = |t: &[u32]| {
            let c = m.lower(t, 0).unwrap();
            m.activation(&c, t.len() - 1).unwrap()
        };
        let (a, b, c) = (act(&[1, 2]), act(&[4]), act(&[5, 6, 7]));
        for j in 0..12 {
            assert!((v[j] - ((a[j] + b[j]) / 2.0 - c[j])).abs() < 1e-12);
        }
        assert!(contrastive_direction(&m, 0, &[], &neg).is_err());
    }
}
