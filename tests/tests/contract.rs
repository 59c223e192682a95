//! The `SplitModel` contract on the analytic models, in f32 and f64, over random shapes.
//! Backends instantiate the same check as they land.

use fs_estimators::analytic::{LinearModel, TanhModel};
use fs_suite::{check_split_model, Tolerances};
use proptest::prelude::*;

fn tokens(vocab: usize, len: usize, seed: u64) -> Vec<u32> {
    (0..len).map(|i| ((seed >> (i % 8 * 8)) as usize + 31 * i) as u32 % vocab as u32).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn tanh_model_f64(vocab in 2usize..200, d in 1usize..24, hidden in 1usize..24, len in 1usize..7, seed in any::<u64>()) {
        let m = TanhModel::<f64>::random(vocab, d, hidden, 8, 1.0 / (hidden as f64).sqrt(), seed);
        check_split_model(&m, &tokens(vocab, len, seed), 0, Tolerances::F64).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn tanh_model_f32(vocab in 2usize..200, d in 1usize..24, hidden in 1usize..24, len in 1usize..7, seed in any::<u64>()) {
        let m = TanhModel::<f64>::random(vocab, d, hidden, 8, 1.0 / (hidden as f64).sqrt(), seed).cast::<f32>();
        check_split_model(&m, &tokens(vocab, len, seed), 0, Tolerances::F32_ROUNDED_ONCE).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn linear_model_f64(vocab in 2usize..200, d in 1usize..24, len in 1usize..7, seed in any::<u64>()) {
        let m = LinearModel::<f64>::random(vocab, d, 8, 1.0 / (d as f64).sqrt(), seed);
        check_split_model(&m, &tokens(vocab, len, seed), 0, Tolerances::F64).map_err(TestCaseError::fail)?;
    }
}
