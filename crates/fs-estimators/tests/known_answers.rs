//! The estimators against models whose Fisher matrix is known in closed form.
//!
//! Tolerances: in f64 every path is a few thousand flops deep per entry, so 1e-10 relative
//! Frobenius leaves ~5 orders of margin over round-off; in f32 the big products round at
//! ~6e-8 per operation with f64 accumulation across chunks, so 1e-5 leaves ~2 orders.

mod common;

use common::{asymmetry, log_prob_jacobian, min_eigenvalue_over_trace, to_f32};
use fs_estimators::analytic::{LinearModel, TanhModel};
use fs_estimators::{
    closed_form_fisher, closed_form_fisher_at, exact_fisher, relative_frobenius, softmax,
    ExactOptions, GradientKind, Matrix, SplitModel, Threads,
};
use proptest::prelude::*;

fn opts(chunk: usize) -> ExactOptions {
    ExactOptions { vocab_chunk: chunk, threads: Threads(1) }
}

/// Random tokens for a model with `vocab` tokens.
fn tokens(vocab: usize, len: usize, seed: u64) -> Vec<u32> {
    (0..len as u64)
        .map(|i| {
            ((seed.wrapping_mul(6364136223846793005).wrapping_add(i * 1442695040888963407) >> 33)
                % vocab as u64) as u32
        })
        .collect()
}

#[derive(Debug, Clone)]
struct Shape {
    vocab: usize,
    d: usize,
    hidden: usize,
    len: usize,
    w_scale: f64,
    chunk: usize,
    seed: u64,
}

fn shapes() -> impl Strategy<Value = Shape> {
    (2usize..300, 1usize..40, 1usize..40, 1usize..8, 0.2f64..2.0, 1usize..400, any::<u64>())
        .prop_map(|(vocab, d, hidden, len, w_scale, chunk, seed)| Shape {
            vocab,
            d,
            hidden,
            len,
            w_scale,
            chunk,
            seed,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// exact == known answer == closed form (both conventions, host arrays and model), in f64.
    #[test]
    fn tanh_model_f64_exact_equals_known_and_closed_form(s in shapes()) {
        let model = TanhModel::<f64>::random(s.vocab, s.d, s.hidden, 8, s.w_scale / (s.hidden as f64).sqrt(), s.seed);
        let ctx = model.lower(&tokens(s.vocab, s.len, s.seed), 0).unwrap();
        let positions: Vec<usize> = (0..s.len).collect();
        let exact = exact_fisher(&model, &ctx, &positions, &opts(s.chunk)).unwrap();
        let cf_logits = closed_form_fisher_at(&model, &ctx, &positions, GradientKind::Logits, &opts(s.chunk)).unwrap();
        let cf_logp = closed_form_fisher_at(&model, &ctx, &positions, GradientKind::LogProbs, &opts(s.chunk)).unwrap();
        for (i, &t) in positions.iter().enumerate() {
            let known = model.known_fisher(&ctx, t).unwrap();
            prop_assert!(relative_frobenius(&exact[i], &known) <= 1e-10, "exact vs known {}", relative_frobenius(&exact[i], &known));
            prop_assert!(relative_frobenius(&cf_logits[i], &exact[i]) <= 1e-10);
            prop_assert!(relative_frobenius(&cf_logp[i], &exact[i]) <= 1e-10);

            // Host-array entry point, both conventions.
            let h = model.activation(&ctx, t).unwrap();
            let z = model.upper_logits(&ctx, t, &h).unwrap();
            let p = softmax(&z).unwrap();
            let j = model.logit_jacobian(&h).unwrap();
            let host_logits = closed_form_fisher(j.view(), &p, GradientKind::Logits, &opts(s.chunk)).unwrap();
            let host_logp = closed_form_fisher(log_prob_jacobian(&j, &p).view(), &p, GradientKind::LogProbs, &opts(s.chunk)).unwrap();
            prop_assert!(relative_frobenius(&host_logits, &exact[i]) <= 1e-10);
            prop_assert!(relative_frobenius(&host_logp, &exact[i]) <= 1e-10);
            prop_assert!(asymmetry(&exact[i]) == 0.0);
            prop_assert!(min_eigenvalue_over_trace(&exact[i]) >= -1e-12);
        }
    }

    /// The same identities in f32: ≤ 1e-5 relative Frobenius, symmetric, PSD to −1e-6·tr F.
    #[test]
    fn tanh_model_f32_exact_equals_closed_form(s in shapes()) {
        let model64 = TanhModel::<f64>::random(s.vocab, s.d, s.hidden, 8, s.w_scale / (s.hidden as f64).sqrt(), s.seed);
        let model = model64.cast::<f32>();
        let ctx = model.lower(&tokens(s.vocab, s.len, s.seed), 0).unwrap();
        let positions: Vec<usize> = (0..s.len).collect();
        let exact = exact_fisher(&model, &ctx, &positions, &opts(s.chunk)).unwrap();
        let cf_logits = closed_form_fisher_at(&model, &ctx, &positions, GradientKind::Logits, &opts(s.chunk)).unwrap();
        let cf_logp = closed_form_fisher_at(&model, &ctx, &positions, GradientKind::LogProbs, &opts(s.chunk)).unwrap();
        for (i, &t) in positions.iter().enumerate() {
            prop_assert!(relative_frobenius(&cf_logits[i], &exact[i]) <= 1e-5, "logits {}", relative_frobenius(&cf_logits[i], &exact[i]));
            prop_assert!(relative_frobenius(&cf_logp[i], &exact[i]) <= 1e-5, "logp {}", relative_frobenius(&cf_logp[i], &exact[i]));
            let h = model.activation(&ctx, t).unwrap();
            let p64 = softmax(&model.upper_logits(&ctx, t, &h).unwrap()).unwrap();
            let p32: Vec<f32> = p64.iter().map(|&x| x as f32).collect();
            let j = model.logit_jacobian(&h).unwrap();
            let host_logits = closed_form_fisher(to_f32(&j).view(), &p32, GradientKind::Logits, &opts(s.chunk)).unwrap();
            let host_logp = closed_form_fisher(to_f32(&log_prob_jacobian(&j, &p64)).view(), &p32, GradientKind::LogProbs, &opts(s.chunk)).unwrap();
            prop_assert!(relative_frobenius(&host_logits, &exact[i]) <= 1e-5, "host logits {}", relative_frobenius(&host_logits, &exact[i]));
            prop_assert!(relative_frobenius(&host_logp, &exact[i]) <= 1e-5, "host logp {}", relative_frobenius(&host_logp, &exact[i]));
            prop_assert!(asymmetry(&exact[i]) == 0.0);
            prop_assert!(min_eigenvalue_over_trace(&exact[i]) >= -1e-6, "λ_min/tr = {}", min_eigenvalue_over_trace(&exact[i]));
            // And the f32 pipeline stays close to the f64 model's known answer.
            let ctx64 = model64.lower(ctx_tokens(&ctx), 0).unwrap();
            let known = model64.known_fisher(&ctx64, t).unwrap();
            prop_assert!(relative_frobenius(&exact[i], &known) <= 1e-4, "f32 vs f64 model {}", relative_frobenius(&exact[i], &known));
        }
    }

    /// The linear model: F = Wᵀ(diag p − ppᵀ)W exactly; adding a constant to every logit (or
    /// the same vector to every row of W, a constant that depends on h) changes nothing.
    #[test]
    fn linear_model_known_answer_and_logit_shift_invariance(
        s in shapes(), shift in -50.0f64..50.0, row_shift_scale in 0.0f64..5.0,
    ) {
        let model = LinearModel::<f64>::random(s.vocab, s.d, 8, s.w_scale / (s.d as f64).sqrt(), s.seed);
        let toks = tokens(s.vocab, s.len, s.seed);
        let ctx = model.lower(&toks, 0).unwrap();
        let positions: Vec<usize> = (0..s.len).collect();
        let exact = exact_fisher(&model, &ctx, &positions, &opts(s.chunk)).unwrap();

        let mut shifted = model.clone();
        let r: Vec<f64> = (0..s.d).map(|j| row_shift_scale * ((j as f64) * 0.7).cos()).collect();
        {
            let (w, c) = shifted.weights_mut();
            c.iter_mut().for_each(|x| *x += shift);
            for y in 0..s.vocab {
                for (x, rj) in w.row_mut(y).iter_mut().zip(&r) {
                    *x += rj;
                }
            }
        }
        let ctx_s = shifted.lower(&toks, 0).unwrap();
        let exact_shifted = exact_fisher(&shifted, &ctx_s, &positions, &opts(s.chunk)).unwrap();
        for (i, &t) in positions.iter().enumerate() {
            let known = model.known_fisher(&ctx, t).unwrap();
            prop_assert!(relative_frobenius(&exact[i], &known) <= 1e-10);
            prop_assert!(relative_frobenius(&exact_shifted[i], &exact[i]) <= 1e-10,
                "shift changed F by {}", relative_frobenius(&exact_shifted[i], &exact[i]));
        }
    }
}

fn ctx_tokens<C: fs_estimators::SplitContext>(ctx: &C) -> &[u32] {
    ctx.tokens()
}

/// A deterministic regression point: the exact estimator is independent of the chunk size and
/// of the thread count, to round-off.
#[test]
fn chunking_and_threads_do_not_change_the_result() {
    let model = TanhModel::<f32>::random(257, 24, 16, 4, 0.5, 11);
    let ctx = model.lower(&[1, 200, 3], 0).unwrap();
    let reference = exact_fisher(&model, &ctx, &[2], &opts(257)).unwrap();
    for (chunk, threads) in [(1, 1), (7, 2), (64, 0), (10_000, 2)] {
        let o = ExactOptions { vocab_chunk: chunk, threads: Threads(threads) };
        let f = exact_fisher(&model, &ctx, &[2], &o).unwrap();
        assert!(relative_frobenius(&f[0], &reference[0]) < 1e-6, "chunk {chunk} threads {threads}");
    }
    let none: Vec<Matrix<f64>> = exact_fisher(&model, &ctx, &[], &opts(8)).unwrap();
    assert!(none.is_empty());
}
