//! The nonlinear model's exact Fisher against `Jᵀ(diag p − ppᵀ)J` with `J` from central finite
//! differences of the upper half, in f64: an independent path that uses only `upper_logits`.
//!
//! Step `ε = 1e-5`: truncation error `ε²/6 · |z'''| ≈ 1e-11`, round-off `eps·|z|/ε ≈ 1e-11`, so
//! `J` is good to ~1e-10 relative and 1e-6 on F leaves four orders of margin.

use fs_estimators::analytic::{reference_fisher, TanhModel};
use fs_estimators::{exact_fisher, relative_frobenius, softmax, ExactOptions, Matrix, SplitModel};
use proptest::prelude::*;

fn fd_jacobian(
    model: &TanhModel<f64>,
    ctx: &<TanhModel<f64> as SplitModel>::Context,
    t: usize,
) -> Matrix<f64> {
    let h = model.activation(ctx, t).unwrap();
    let v = model.dims().vocab_size;
    let eps = 1e-5;
    let mut j = Matrix::zeros(v, h.len());
    for c in 0..h.len() {
        let mut hp = h.clone();
        let mut hm = h.clone();
        hp[c] += eps;
        hm[c] -= eps;
        let zp = model.upper_logits(ctx, t, &hp).unwrap();
        let zm = model.upper_logits(ctx, t, &hm).unwrap();
        for y in 0..v {
            j.set(y, c, (zp[y] - zm[y]) / (2.0 * eps));
        }
    }
    j
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn exact_matches_finite_difference_fisher(
        vocab in 2usize..120, d in 1usize..24, hidden in 1usize..24, seed in any::<u64>(), len in 1usize..5,
    ) {
        let model = TanhModel::<f64>::random(vocab, d, hidden, 6, 1.5 / (hidden as f64).sqrt(), seed);
        let toks: Vec<u32> = (0..len).map(|i| ((seed >> (8 * i)) % vocab as u64) as u32).collect();
        let ctx = model.lower(&toks, 0).unwrap();
        for t in 0..len {
            let f = exact_fisher(&model, &ctx, &[t], &ExactOptions::default()).unwrap().pop().unwrap();
            let h = model.activation(&ctx, t).unwrap();
            let p = softmax(&model.upper_logits(&ctx, t, &h).unwrap()).unwrap();
            let f_fd = reference_fisher(&fd_jacobian(&model, &ctx, t), &p);
            let err = relative_frobenius(&f, &f_fd);
            prop_assert!(err <= 1e-6, "relative error {err}");
        }
    }

    /// Score gradients `∇_h log p_y` against finite differences of `log softmax(z(h))_y`.
    #[test]
    fn score_gradients_match_finite_differences(
        vocab in 2usize..60, d in 1usize..16, hidden in 1usize..16, seed in any::<u64>(),
    ) {
        let model = TanhModel::<f64>::random(vocab, d, hidden, 4, 1.0, seed);
        let ctx = model.lower(&[0, (vocab - 1) as u32], 0).unwrap();
        let t = 1;
        let ys: Vec<u32> = vec![0, (vocab / 2) as u32, (vocab - 1) as u32];
        let g = model.score_gradients(&ctx, t, &ys).unwrap();
        let h = model.activation(&ctx, t).unwrap();
        let logp = |h: &[f64], y: usize| softmax(&model.upper_logits(&ctx, t, h).unwrap()).unwrap()[y].ln();
        for (i, &y) in ys.iter().enumerate() {
            for c in 0..d {
                let (mut hp, mut hm) = (h.clone(), h.clone());
                hp[c] += 1e-5;
                hm[c] -= 1e-5;
                let fd = (logp(&hp, y as usize) - logp(&hm, y as usize)) / 2e-5;
                prop_assert!((g.get(i, c) - fd).abs() <= 1e-7 * (1.0 + fd.abs()), "g {} fd {fd}", g.get(i, c));
            }
        }
    }
}
