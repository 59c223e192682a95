//! Bad input gets a typed error whose message names the value and the expected range; nothing
//! panics.

use fs_estimators::analytic::{LinearModel, TanhModel};
use fs_estimators::{
    centered_output_gram, closed_form_fisher, exact_fisher, exact_fisher_from_parts,
    normalized_probabilities, sample_tokens, sampled_fisher, spectrum, ExactOptions, FsError,
    GradientKind, Matrix, SampledOptions, SamplingOptions, SplitModel, Threads,
};

fn msg<T: std::fmt::Debug>(r: Result<T, FsError>) -> (FsError, String) {
    let e = r.expect_err("expected an error");
    let m = e.to_string();
    assert!(!m.contains('\n'), "error message must be one line: {m}");
    (e, m)
}

#[test]
fn layer_out_of_range() {
    let model = LinearModel::<f64>::random(10, 3, 4, 1.0, 0);
    let (e, m) = msg(model.lower(&[1, 2], 3));
    assert!(matches!(e, FsError::LayerOutOfRange { layer: 3, n_layers: 0 }));
    assert!(m.contains("layer 3") && m.contains("0..=0"), "{m}");
}

#[test]
fn tokens_out_of_range_empty_and_too_long() {
    let model = LinearModel::<f64>::random(10, 3, 4, 1.0, 0);
    let (_, m) = msg(model.lower(&[1, 10], 0));
    assert!(m.contains("token id 10") && m.contains("0..=9"), "{m}");
    let (e, _) = msg(model.lower(&[], 0));
    assert!(matches!(e, FsError::EmptySequence));
    let (_, m) = msg(model.lower(&[1; 5], 0));
    assert!(m.contains("5 tokens") && m.contains("at most 4"), "{m}");
}

#[test]
fn positions_out_of_range() {
    let model = TanhModel::<f32>::random(10, 3, 5, 4, 1.0, 0);
    let ctx = model.lower(&[1, 2], 0).unwrap();
    let (_, m) = msg(exact_fisher(&model, &ctx, &[0, 2], &ExactOptions::default()));
    assert!(m.contains("position 2") && m.contains("0..2"), "{m}");
    let (e, _) = msg(model.score_gradients(&ctx, 0, &[10]));
    assert!(matches!(e, FsError::TokenOutOfRange { token: 10, .. }));
}

#[test]
fn dimension_mismatches() {
    let w = Matrix::from_fn(6, 3, |i, j| (i + j) as f32);
    let a = Matrix::from_fn(3, 2, |i, j| (i * j) as f32);
    let p = vec![1.0 / 6.0; 6];
    assert!(exact_fisher_from_parts(a.view(), w.view(), &p, &ExactOptions::default()).is_ok());
    let (_, m) =
        msg(exact_fisher_from_parts(a.view(), w.view(), &p[..5], &ExactOptions::default()));
    assert!(m.contains("expected 6, got 5"), "{m}");
    let a_bad = Matrix::from_fn(2, 2, |_, _| 1.0f32);
    let (_, m) = msg(exact_fisher_from_parts(a_bad.view(), w.view(), &p, &ExactOptions::default()));
    assert!(m.contains("expected 3, got 2"), "{m}");
    let p32 = vec![1.0f32 / 6.0; 5];
    let (e, _) =
        msg(closed_form_fisher(w.view(), &p32, GradientKind::Logits, &ExactOptions::default()));
    assert!(matches!(e, FsError::DimensionMismatch { expected: 6, got: 5, .. }));
}

#[test]
fn probabilities_that_do_not_sum_to_one() {
    let w = Matrix::from_fn(3, 2, |i, j| (i + j) as f64);
    let (_, m) = msg(centered_output_gram(w.view(), &[0.5, 0.5, 0.5], 8, Threads(1)));
    assert!(m.contains("sums to 1.5"), "{m}");
    let (_, m) = msg(closed_form_fisher(
        w.view(),
        &[0.9f64, 0.2, -0.1],
        GradientKind::Logits,
        &ExactOptions::default(),
    ));
    assert!(m.contains("negative"), "{m}");
    let (e, _) = msg(normalized_probabilities("p", &[0.3f32, 0.3]));
    assert!(matches!(e, FsError::NotAProbability { .. }));
}

#[test]
fn nan_and_inf() {
    let mut grad = Matrix::from_fn(3, 2, |i, j| (i + j) as f64);
    grad.set(2, 1, f64::NAN);
    let (e, m) = msg(closed_form_fisher(
        grad.view(),
        &[0.2, 0.3, 0.5],
        GradientKind::Logits,
        &ExactOptions::default(),
    ));
    assert!(matches!(e, FsError::NonFinite { index: 5, .. }), "{m}");
    let w = Matrix::from_fn(3, 2, |i, j| (i + j) as f64);
    let (e, _) = msg(closed_form_fisher(
        w.view(),
        &[0.2, f64::NAN, 0.5],
        GradientKind::Logits,
        &ExactOptions::default(),
    ));
    assert!(matches!(e, FsError::NonFinite { index: 1, .. }));
    let (e, _) = msg(centered_output_gram(w.view(), &[0.2, f64::INFINITY, 0.5], 8, Threads(1)));
    assert!(matches!(e, FsError::NonFinite { .. }));
    let nan = Matrix::from_vec(1, 1, vec![f64::NAN]).unwrap();
    assert!(matches!(spectrum(&nan, None), Err(FsError::NonFinite { .. })));
    // A model whose weights hold a NaN: the logits are rejected before any estimator runs.
    let mut model = LinearModel::<f64>::random(4, 2, 3, 1.0, 1);
    model.weights_mut().1[2] = f64::NAN;
    let ctx = model.lower(&[0, 1], 0).unwrap();
    let (e, m) = msg(exact_fisher(&model, &ctx, &[1], &ExactOptions::default()));
    assert!(matches!(e, FsError::NonFinite { index: 2, .. }), "{m}");
    assert!(m.contains("logits"), "{m}");
}

#[test]
fn sampling_arguments() {
    let model = LinearModel::<f64>::random(10, 3, 4, 1.0, 0);
    let ctx = model.lower(&[1, 2], 0).unwrap();
    let zero = SampledOptions { samples: 0, ..SampledOptions::default() };
    let (_, m) = msg(sampled_fisher(&model, &ctx, &[1], &zero));
    assert!(m.contains("samples = 0"), "{m}");
    for top_p in [0.0, -0.5, 1.5, f64::NAN] {
        let o = SampledOptions {
            sampling: SamplingOptions { temperature: 1.0, top_p },
            ..SampledOptions::default()
        };
        let (_, m) = msg(sampled_fisher(&model, &ctx, &[1], &o));
        assert!(m.contains("top_p") && m.contains("(0, 1]"), "{m}");
    }
    for temperature in [0.0, -1.0, f64::INFINITY] {
        let o = SampledOptions {
            sampling: SamplingOptions { temperature, top_p: 1.0 },
            ..SampledOptions::default()
        };
        let (_, m) = msg(sampled_fisher(&model, &ctx, &[1], &o));
        assert!(m.contains("temperature"), "{m}");
    }
    assert!(sample_tokens(&[0.5, 0.6], 3, 0, 0).is_err());
}

#[test]
fn log_prob_convention_is_checked() {
    // Passing a logit Jacobian as a log-prob Jacobian is caught (its rows do not average to 0).
    let j = Matrix::from_fn(4, 2, |i, j| (i as f64) + 2.0 * j as f64);
    let p = [0.1, 0.2, 0.3, 0.4];
    let (_, m) =
        msg(closed_form_fisher(j.view(), &p, GradientKind::LogProbs, &ExactOptions::default()));
    assert!(m.contains("GradientKind::Logits"), "{m}");
}
