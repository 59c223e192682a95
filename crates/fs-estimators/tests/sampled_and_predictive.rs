//! The sampled estimator converges to the exact Fisher like 1/√S; the predictive average is the
//! mean of exact Fishers at the appended token's own position.

use fs_estimators::analytic::TanhModel;
use fs_estimators::{
    exact_fisher, outer_product_mean, predictive_fisher, relative_frobenius, sampled_fisher,
    ExactOptions, FsError, Matrix, PredictiveOptions, SampledOptions, SamplingOptions, SplitModel,
};

fn model() -> TanhModel<f64> {
    // V = 40, d = 6, hidden 10: small enough for 10⁴ draws × several seeds in well under a second.
    TanhModel::<f64>::random(40, 6, 10, 16, 0.6, 5)
}

fn mean(ms: &[Matrix<f64>]) -> Matrix<f64> {
    let mut out = Matrix::zeros(ms[0].rows(), ms[0].cols());
    for m in ms {
        out.as_mut_slice()
            .iter_mut()
            .zip(m.as_slice())
            .for_each(|(o, x)| *o += x / ms.len() as f64);
    }
    out
}

#[test]
fn sampled_converges_like_one_over_sqrt_s() {
    let model = model();
    let ctx = model.lower(&[3, 17, 29], 0).unwrap();
    let t = 2;
    let exact = exact_fisher(&model, &ctx, &[t], &ExactOptions::default()).unwrap().pop().unwrap();
    let seeds = 0..8u64;
    let run = |samples: usize| -> Vec<Matrix<f64>> {
        seeds
            .clone()
            .map(|seed| {
                let o = SampledOptions { samples, seed, ..SampledOptions::default() };
                sampled_fisher(&model, &ctx, &[t], &o).unwrap().pop().unwrap().fisher
            })
            .collect()
    };
    let small = run(100);
    let large = run(10_000);
    let err = |ms: &[Matrix<f64>]| {
        ms.iter().map(|m| relative_frobenius(m, &exact)).sum::<f64>() / ms.len() as f64
    };
    let (e_small, e_large) = (err(&small), err(&large));
    // 100× more draws → 10× smaller error for an unbiased estimator; allow a factor ~2 either way.
    let ratio = e_small / e_large;
    println!("mean relative error: S=100 {e_small:.4}, S=10^4 {e_large:.4}, ratio {ratio:.2}");
    assert!((5.0..20.0).contains(&ratio), "ratio {ratio}");
    assert!(e_large < 0.05, "S=10^4 error {e_large}");
    let mean_err = relative_frobenius(&mean(&large), &exact);
    println!("mean over 8 seeds at S=10^4: relative error {mean_err:.4}");
    assert!(mean_err < 0.05, "mean over seeds {mean_err}");
}

#[test]
fn biased_sampling_does_not_converge_to_the_fisher() {
    let model = model();
    let ctx = model.lower(&[3, 17, 29], 0).unwrap();
    let exact = exact_fisher(&model, &ctx, &[2], &ExactOptions::default()).unwrap().pop().unwrap();
    let biased = |sampling: SamplingOptions| {
        let o = SampledOptions { samples: 40_000, seed: 1, sampling };
        relative_frobenius(&sampled_fisher(&model, &ctx, &[2], &o).unwrap()[0].fisher, &exact)
    };
    let unbiased = biased(SamplingOptions::default());
    let cold = biased(SamplingOptions { temperature: 0.5, top_p: 1.0 });
    let nucleus = biased(SamplingOptions { temperature: 1.0, top_p: 0.5 });
    println!("relative error at S=40000: unbiased {unbiased:.4}, T=0.5 {cold:.4}, top-p 0.5 {nucleus:.4}");
    assert!(unbiased < 0.03);
    assert!(cold > 3.0 * unbiased && nucleus > 3.0 * unbiased);
}

#[test]
fn sampled_draws_are_recorded_reproducible_and_per_position() {
    let model = model();
    let ctx = model.lower(&[1, 2, 3, 4], 0).unwrap();
    let o = SampledOptions { samples: 25, seed: 42, ..SampledOptions::default() };
    let both = sampled_fisher(&model, &ctx, &[1, 3], &o).unwrap();
    let alone = sampled_fisher(&model, &ctx, &[3], &o).unwrap();
    assert_eq!(both[1], alone[0], "a position's draws must not depend on the others computed");
    assert_ne!(both[0].tokens, both[1].tokens);
    // The estimate is exactly the mean outer product of the recorded tokens' scores.
    let scores = model.score_gradients(&ctx, 3, &alone[0].tokens).unwrap();
    assert_eq!(outer_product_mean(scores.view()).unwrap(), alone[0].fisher);
    let other_seed = SampledOptions { seed: 43, ..o };
    assert_ne!(sampled_fisher(&model, &ctx, &[3], &other_seed).unwrap()[0].tokens, alone[0].tokens);
}

#[test]
fn predictive_average_is_the_mean_of_exact_fishers_at_the_next_position() {
    let model = model();
    let toks = [5u32, 9, 13, 21];
    let ctx = model.lower(&toks, 0).unwrap();
    let t = 1;
    let o = PredictiveOptions { draws: 12, seed: 3, ..PredictiveOptions::default() };
    let pred = predictive_fisher(&model, &ctx, t, &o).unwrap();
    assert_eq!(pred.tokens.len(), 12);
    // Independent recomputation: a fresh lower pass over x_0..x_t, a at position t+1.
    let mut manual = Matrix::<f64>::zeros(6, 6);
    for &a in &pred.tokens {
        let seq = [toks[0], toks[1], a];
        let c = model.lower(&seq, 0).unwrap();
        let f =
            exact_fisher(&model, &c, &[t + 1], &ExactOptions::default()).unwrap().pop().unwrap();
        manual.as_mut_slice().iter_mut().zip(f.as_slice()).for_each(|(m, x)| *m += x / 12.0);
    }
    assert!(relative_frobenius(&pred.fisher, &manual) < 1e-12);
    // Position matters in this model (learned position embeddings): giving the appended token
    // position 0 — the original script's bug — yields a different matrix.
    let mut at_zero = Matrix::<f64>::zeros(6, 6);
    for &a in &pred.tokens {
        let c = model.lower(&[a], 0).unwrap();
        let f = exact_fisher(&model, &c, &[0], &ExactOptions::default()).unwrap().pop().unwrap();
        at_zero.as_mut_slice().iter_mut().zip(f.as_slice()).for_each(|(m, x)| *m += x / 12.0);
    }
    assert!(relative_frobenius(&at_zero, &manual) > 1e-3);
}

#[test]
fn extend_equals_a_fresh_lower_pass() {
    let model = model();
    let ctx = model.lower(&[5, 9, 13, 21], 0).unwrap();
    let ext = model.extend(&ctx, 2, 7).unwrap();
    let fresh = model.lower(&[5, 9, 7], 0).unwrap();
    assert_eq!(ext.activations(), fresh.activations());
    assert!(model.extend(&ctx, 5, 7).is_err());
}

#[test]
fn predictive_rejects_bad_arguments() {
    let model = model();
    let ctx = model.lower(&[1, 2], 0).unwrap();
    let zero = PredictiveOptions { draws: 0, ..PredictiveOptions::default() };
    assert!(matches!(
        predictive_fisher(&model, &ctx, 0, &zero),
        Err(FsError::InvalidArgument { .. })
    ));
    let o = PredictiveOptions::default();
    assert!(matches!(
        predictive_fisher(&model, &ctx, 2, &o),
        Err(FsError::PositionOutOfRange { .. })
    ));
    // max_seq_len = 16: the last position of a full sequence has no room for a next token.
    let full: Vec<u32> = (0..16).collect();
    let ctx = model.lower(&full, 0).unwrap();
    let e = predictive_fisher(&model, &ctx, 15, &o).unwrap_err();
    assert!(matches!(e, FsError::SequenceTooLong { len: 17, max: 16 }), "{e}");
}
