//! The Fisher information of an **attention distribution** with respect to a split activation.
//!
//! For the query at position `t` of head `j` of block `ℓ ≥ k`, with scores `s` over the keys
//! the query may see and weights `a = softmax(s)` ([`SplitModel::attention_scores`]), and the
//! score Jacobian `J = ∂s/∂h` at `h = H_k[t]` ([`SplitModel::attention_jacobian`]):
//!
//! ```text
//!     ∇_h log a_i = J_iᵀ − Jᵀa = (J_i − m)ᵀ,     m = Jᵀa,
//!     F = E_{i~a}[∇ log a_i ∇ log a_iᵀ] = Jᵀ(diag a − a aᵀ)J = Σ_i a_i (J_i − m)(J_i − m)ᵀ,
//! ```
//!
//! the next-token Fisher's form with the rows of `J` as the "output embeddings" and no readout
//! Jacobian in between: the exact estimator is [`centered_output_gram`](crate::centered_output_gram)
//! of `J` and `a` (cost `n·d²` for `n ≤ t + 1` keys — cheap next to the next-token Fisher), the
//! sampled one the mean of `(J_i − m)(J_i − m)ᵀ` over keys `i ~ a`. Keys the query may not attend
//! to (outside a sliding window) have `a_i = 0` and are left out.
//!
//! [`attention_direction_effects`] reads out what a direction does to the attention: the score
//! change `J v`, the weight change `∂a_i/∂ε = a_i((Jv)_i − aᵀJv)` per key, `vᵀFv`, and the KL
//! between the head's attention at `h` and at `h + εv` measured with the model's own scores.

use crate::readouts::{effect_along, nonzero_column};
use crate::{
    centered_output_gram, kl_from_logits, outer_product_mean, sample_tokens, softmax,
    DirectionEffect, DirectionOptions, FsError, Matrix, Result, Scalar, SplitContext, SplitModel,
    Threads,
};
use fs_traits::{check_attention_head, AttentionHead};

/// One head's attention at one query position, restricted to the keys the query may see.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionDistribution {
    /// The query position `t`.
    pub position: usize,
    /// The visible key positions, ascending (`0 ..= t`, fewer under a sliding window).
    pub keys: Vec<usize>,
    /// The scores `s_i` of those keys (as the model's softmax sees them), `f64`.
    pub scores: Vec<f64>,
    /// `a = softmax(s)` over those keys.
    pub weights: Vec<f64>,
    /// `J = ∂s/∂h`, one row of length `d` per visible key, `f64`.
    pub jacobian: Matrix<f64>,
}

impl AttentionDistribution {
    /// `m = Jᵀa` (length `d`).
    fn mean_row(&self) -> Vec<f64> {
        let d = self.jacobian.cols();
        let mut m = vec![0.0; d];
        for (i, &a) in self.weights.iter().enumerate() {
            m.iter_mut().zip(self.jacobian.row(i)).for_each(|(m, j)| *m += a * j);
        }
        m
    }

    /// The score gradients `∇_h log a_i = J_i − Jᵀa` of the keys at indices `rows` (indices into
    /// [`keys`](Self::keys)), one row of length `d` each.
    pub fn score_gradients(&self, rows: &[usize]) -> Result<Matrix<f64>> {
        let m = self.mean_row();
        let n = self.keys.len();
        if let Some(&bad) = rows.iter().find(|&&i| i >= n) {
            return Err(FsError::invalid("key index", bad, format!("below the {n} visible keys")));
        }
        Ok(Matrix::from_fn(rows.len(), m.len(), |r, c| self.jacobian.get(rows[r], c) - m[c]))
    }

    /// `H(a)` in nats.
    pub fn entropy(&self) -> f64 {
        crate::entropy(&self.weights)
    }
}

/// The attention of `head` at `position` of `ctx`: scores, weights and score Jacobian over the
/// visible keys. Checks the head against the model and the context's split layer
/// ([`check_attention_head`]) and that the model returned `position + 1` scores and a
/// `(position + 1) × d` Jacobian, finite on the visible keys.
pub fn attention_distribution<M: SplitModel>(
    model: &M,
    ctx: &M::Context,
    position: usize,
    head: AttentionHead,
) -> Result<AttentionDistribution> {
    let dims = model.dims();
    check_attention_head(head, ctx.layer(), dims.n_layers, model.attention_heads())?;
    fs_traits::check_position(position, ctx.seq_len())?;
    let h = model.activation(ctx, position)?;
    let scores = model.attention_scores(ctx, position, head, &h)?;
    fs_traits::check_len(
        "attention scores (one per key 0..=position)",
        scores.len(),
        position + 1,
    )?;
    let j = model.attention_jacobian(ctx, position, head)?;
    crate::exact::check_shape("attention score Jacobian", j.shape(), (position + 1, dims.d_model))?;
    let keys: Vec<usize> =
        (0..=position).filter(|&i| scores[i].as_f64() != f64::NEG_INFINITY).collect();
    if !keys.contains(&position) {
        return Err(FsError::Backend(format!(
            "attention {head}: the query at {position} does not see its own key (score −∞)"
        )));
    }
    let s: Vec<f64> = keys.iter().map(|&i| scores[i].as_f64()).collect();
    fs_traits::check_finite("attention scores", &s)?;
    let jacobian = Matrix::from_fn(keys.len(), dims.d_model, |r, c| j.get(keys[r], c).as_f64());
    fs_traits::check_finite("attention score Jacobian", jacobian.as_slice())?;
    let weights = softmax(&s)?;
    Ok(AttentionDistribution { position, keys, scores: s, weights, jacobian })
}

/// An attention Fisher matrix and the distribution it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionFisher {
    /// `F`, `d × d`, symmetric PSD.
    pub fisher: Matrix<f64>,
    /// The keys, weights and score Jacobian.
    pub distribution: AttentionDistribution,
    /// The sampled estimator's draws, as key positions (in draw order); `None` for the exact one.
    pub draws: Option<Vec<usize>>,
}

/// The exact Fisher of the attention of `head` at each of `positions`:
/// `F = Σ_i a_i (J_i − m)(J_i − m)ᵀ`, `m = Jᵀa` (centered: every term PSD), accumulated in `f64`.
pub fn exact_attention_fisher<M: SplitModel>(
    model: &M,
    ctx: &M::Context,
    positions: &[usize],
    head: AttentionHead,
) -> Result<Vec<AttentionFisher>> {
    positions
        .iter()
        .map(|&t| {
            let distribution = attention_distribution(model, ctx, t, head)?;
            let fisher = centered_output_gram(
                &distribution.jacobian,
                &distribution.weights,
                256,
                Threads(0),
            )?;
            Ok(AttentionFisher { fisher, distribution, draws: None })
        })
        .collect()
}

/// The sampled Fisher of the attention of `head` at each of `positions`:
/// `F̂ = (1/S) Σ_s ∇ log a_{i_s} ∇ log a_{i_s}ᵀ` with keys `i_s ~ a` i.i.d. — unbiased, like the
/// next-token sampled estimator (the draws use stream `t` of `seed`, so they do not depend on
/// which other positions are computed).
pub fn sampled_attention_fisher<M: SplitModel>(
    model: &M,
    ctx: &M::Context,
    positions: &[usize],
    head: AttentionHead,
    samples: usize,
    seed: u64,
) -> Result<Vec<AttentionFisher>> {
    if samples == 0 {
        return Err(FsError::invalid("samples", 0, "at least 1 draw per position"));
    }
    positions
        .iter()
        .map(|&t| {
            let distribution = attention_distribution(model, ctx, t, head)?;
            let rows: Vec<usize> = sample_tokens(&distribution.weights, samples, seed, t as u64)?
                .into_iter()
                .map(|i| i as usize)
                .collect();
            let scores = distribution.score_gradients(&rows)?;
            let fisher = outer_product_mean(scores.view())?;
            let draws = rows.iter().map(|&i| distribution.keys[i]).collect();
            Ok(AttentionFisher { fisher, distribution, draws: Some(draws) })
        })
        .collect()
}

/// What each column `v` of `directions` (`d × K`) does to the attention of `head` at the query
/// position of `distribution` (from [`attention_distribution`] on the same `ctx`): the exact
/// score change `J v` and weight change `∂a_i/∂ε = a_i((Jv)_i − aᵀJv)` (indexed like
/// `distribution.keys`), `vᵀFv = Var_{i~a}[(Jv)_i]`, and `KL(a ‖ a(h + εv))` measured with
/// [`SplitModel::attention_scores`] against `½ε²vᵀFv` (`ε` as for the next-token read-outs,
/// [`DirectionOptions`]). [`DirectionEffect::pushed_up`] then names key *indices*; map them
/// through `distribution.keys`.
pub fn attention_direction_effects<M: SplitModel>(
    model: &M,
    ctx: &M::Context,
    head: AttentionHead,
    distribution: &AttentionDistribution,
    directions: &Matrix<f64>,
    opts: &DirectionOptions,
) -> Result<Vec<DirectionEffect>> {
    opts.validate()?;
    let d = model.dims().d_model;
    fs_traits::check_len("direction length", directions.rows(), d)?;
    fs_traits::check_finite("directions", directions.as_slice())?;
    let t = distribution.position;
    let h = model.activation(ctx, t)?;
    let keys = &distribution.keys;
    let visible = |s: Vec<M::Scalar>| -> Result<Vec<f64>> {
        fs_traits::check_len("attention scores", s.len(), t + 1)?;
        Ok(keys.iter().map(|&i| s[i].as_f64()).collect())
    };
    (0..directions.cols())
        .map(|k| {
            let v = nonzero_column(directions, k)?;
            let jv: Vec<f64> = (0..keys.len())
                .map(|r| distribution.jacobian.row(r).iter().zip(&v).map(|(j, v)| j * v).sum())
                .collect();
            effect_along(&distribution.weights, jv, &h, &v, opts, |shifted| {
                let s1 = visible(model.attention_scores(ctx, t, head, shifted)?)?;
                kl_from_logits(&distribution.scores, &s1)
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model whose one "attention head" has scores `s_i = c_iᵀ tanh(W h)` over `t + 1` keys
    /// (key `i`'s vector `c_i` fixed, the query a nonlinear function of `h`), with a window of
    /// `w` keys: the estimators and read-outs only see `attention_scores` and
    /// `attention_jacobian`, which are checked here against the closed form.
    struct ToyAttention {
        d: usize,
        w: Vec<f64>,    // d × d
        keys: Vec<f64>, // T × d
        h: Vec<f64>,    // T × d
        window: Option<usize>,
    }

    struct ToyContext(Vec<u32>);
    impl SplitContext for ToyContext {
        fn layer(&self) -> usize {
            0
        }
        fn tokens(&self) -> &[u32] {
            &self.0
        }
    }

    impl ToyAttention {
        fn new(d: usize, t: usize, window: Option<usize>) -> Self {
            let mut x = 0.37f64;
            let mut next = || {
                x = (x * 7919.0 + 0.123).fract();
                2.0 * x - 1.0
            };
            ToyAttention {
                d,
                w: (0..d * d).map(|_| next()).collect(),
                keys: (0..t * d).map(|_| 2.0 * next()).collect(),
                h: (0..t * d).map(|_| next()).collect(),
                window,
            }
        }
        fn query(&self, h: &[f64]) -> Vec<f64> {
            (0..self.d)
                .map(|i| (0..self.d).map(|j| self.w[i * self.d + j] * h[j]).sum::<f64>().tanh())
                .collect()
        }
    }

    impl SplitModel for ToyAttention {
        type Scalar = f64;
        type Context = ToyContext;
        fn dims(&self) -> fs_traits::ModelDims {
            fs_traits::ModelDims {
                d_model: self.d,
                readout_dim: self.d,
                vocab_size: 4,
                n_layers: 1,
                max_seq_len: None,
            }
        }
        fn lower(&self, tokens: &[u32], _layer: usize) -> Result<ToyContext> {
            Ok(ToyContext(tokens.to_vec()))
        }
        fn activation(&self, _ctx: &ToyContext, t: usize) -> Result<Vec<f64>> {
            Ok(self.h[t * self.d..(t + 1) * self.d].to_vec())
        }
        // The next-token half is not used by the attention estimators.
        fn upper_logits(&self, _: &ToyContext, _: usize, _: &[f64]) -> Result<Vec<f64>> {
            Err(FsError::Unsupported("next-token logits of the toy attention".into()))
        }
        fn readout_jacobians(&self, _: &ToyContext, _: &[usize]) -> Result<Vec<Matrix<f64>>> {
            Err(FsError::Unsupported("readout Jacobians of the toy attention".into()))
        }
        fn unembedding(&self) -> fs_traits::Unembedding<'_, f64> {
            fs_traits::MatrixRef::new(0, self.d, &[]).expect("an empty W_U").into()
        }
        fn attention_heads(&self) -> usize {
            1
        }
        fn attention_scores(
            &self,
            _: &ToyContext,
            t: usize,
            _: AttentionHead,
            h: &[f64],
        ) -> Result<Vec<f64>> {
            let q = self.query(h);
            Ok((0..=t)
                .map(|i| {
                    if fs_traits::key_visible(t, i, self.window) {
                        q.iter().zip(&self.keys[i * self.d..]).map(|(a, b)| a * b).sum()
                    } else {
                        f64::NEG_INFINITY
                    }
                })
                .collect())
        }
        fn attention_jacobian(
            &self,
            ctx: &ToyContext,
            t: usize,
            _: AttentionHead,
        ) -> Result<Matrix<f64>> {
            let h = self.activation(ctx, t)?;
            let q = self.query(&h);
            let d = self.d;
            Ok(Matrix::from_fn(t + 1, d, |i, c| {
                if !fs_traits::key_visible(t, i, self.window) {
                    return 0.0;
                }
                (0..d).map(|r| self.keys[i * d + r] * (1.0 - q[r] * q[r]) * self.w[r * d + c]).sum()
            }))
        }
    }

    const HEAD: AttentionHead = AttentionHead { layer: 0, head: 0 };

    /// `F` from its definition `Σ_i a_i ∇log a_i ∇log a_iᵀ` with `∇ log a_i` by central
    /// differences of `log softmax(s(h))` — independent of the centered-Gram code path.
    fn fisher_by_differences(m: &ToyAttention, ctx: &ToyContext, t: usize) -> Matrix<f64> {
        let h = m.activation(ctx, t).unwrap();
        // a over every key 0..=t, masked keys (score −∞) at 0.
        let weights = |h: &[f64]| -> Vec<f64> {
            let s = m.attention_scores(ctx, t, HEAD, h).unwrap();
            let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
            let total: f64 = e.iter().sum();
            e.iter().map(|x| x / total).collect()
        };
        let log_a = |h: &[f64]| -> Vec<f64> { weights(h).iter().map(|x| x.ln()).collect() };
        let a = weights(&h);
        let eps = 1e-6;
        let grads: Vec<Vec<f64>> = (0..m.d)
            .map(|c| {
                let mut hp = h.clone();
                let mut hm = h.clone();
                hp[c] += eps;
                hm[c] -= eps;
                let (p, q) = (log_a(&hp), log_a(&hm));
                p.iter().zip(&q).map(|(x, y)| (x - y) / (2.0 * eps)).collect()
            })
            .collect(); // grads[c][i] = ∂ log a_i / ∂h_c
        Matrix::from_fn(m.d, m.d, |r, c| {
            (0..=t).filter(|&i| a[i] > 0.0).map(|i| a[i] * grads[r][i] * grads[c][i]).sum()
        })
    }

    #[test]
    fn exact_attention_fisher_equals_its_definition() {
        for window in [None, Some(3)] {
            let m = ToyAttention::new(6, 7, window);
            let ctx = m.lower(&[0; 7], 0).unwrap();
            let got = exact_attention_fisher(&m, &ctx, &[6, 2], HEAD).unwrap();
            for (f, t) in got.iter().zip([6, 2]) {
                let want = fisher_by_differences(&m, &ctx, t);
                let err = crate::relative_frobenius(&f.fisher, &want);
                assert!(err < 1e-7, "window {window:?} t {t}: {err}");
                let n = if window.is_some() && t == 6 { 3 } else { t + 1 };
                assert_eq!(f.distribution.keys.len(), n);
                assert!((f.distribution.weights.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn a_single_key_carries_no_information() {
        let m = ToyAttention::new(4, 3, None);
        let ctx = m.lower(&[0; 3], 0).unwrap();
        let f = exact_attention_fisher(&m, &ctx, &[0], HEAD).unwrap().remove(0);
        assert_eq!(f.distribution.weights, vec![1.0]);
        assert!(f.fisher.as_slice().iter().all(|&x| x == 0.0));
    }

    #[test]
    fn sampled_attention_fisher_converges_to_the_exact_one() {
        let m = ToyAttention::new(5, 6, None);
        let ctx = m.lower(&[0; 6], 0).unwrap();
        let exact = exact_attention_fisher(&m, &ctx, &[5], HEAD).unwrap().remove(0).fisher;
        let err = |s: usize| {
            let f = sampled_attention_fisher(&m, &ctx, &[5], HEAD, s, 7).unwrap().remove(0);
            assert_eq!(f.draws.as_ref().unwrap().len(), s);
            crate::relative_frobenius(&f.fisher, &exact)
        };
        let (few, many) = (err(20), err(20_000));
        // 1/√S: 20 draws are far off, 20 000 within a few percent.
        assert!(many < 0.05 && many < few / 5.0, "S=20: {few}, S=20000: {many}");
    }

    #[test]
    fn attention_readouts_match_the_model() {
        let m = ToyAttention::new(6, 5, None);
        let ctx = m.lower(&[0; 5], 0).unwrap();
        let f = exact_attention_fisher(&m, &ctx, &[4], HEAD).unwrap().remove(0);
        let spec = crate::spectrum(&f.fisher, Some(2)).unwrap();
        let v = Matrix::from_fn(6, 2, |i, c| spec.eigenvectors.get(i, c));
        let effects = attention_direction_effects(
            &m,
            &ctx,
            HEAD,
            &f.distribution,
            &v,
            &DirectionOptions::default(),
        )
        .unwrap();
        for (e, &lambda) in effects.iter().zip(&spec.eigenvalues) {
            assert!((e.fisher_quadratic - lambda).abs() < 1e-10 * lambda.max(1e-300));
            assert!((e.kl_ratio() - 1.0).abs() < 0.05, "KL ratio {}", e.kl_ratio());
            assert!(e.prob_change.iter().sum::<f64>().abs() < 1e-12);
        }
        let zero = Matrix::zeros(6, 1);
        assert!(attention_direction_effects(
            &m,
            &ctx,
            HEAD,
            &f.distribution,
            &zero,
            &DirectionOptions::default()
        )
        .is_err());
    }

    #[test]
    fn heads_are_checked() {
        let m = ToyAttention::new(4, 3, None);
        let ctx = m.lower(&[0; 3], 0).unwrap();
        let bad = AttentionHead { layer: 0, head: 1 };
        assert!(exact_attention_fisher(&m, &ctx, &[2], bad).is_err());
        let bad = AttentionHead { layer: 1, head: 0 };
        assert!(exact_attention_fisher(&m, &ctx, &[2], bad).is_err());
        assert!(exact_attention_fisher(&m, &ctx, &[3], HEAD).is_err());
    }
}
