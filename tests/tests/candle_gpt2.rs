//! GPT-2 on candle against the torch/transformers oracle fixtures and the SplitModel contract.
//!
//! Tolerances (issue #3): logits ≤ 1e-4 absolute (the fixture logits are ~10 in size; f32
//! forward round-off is ~1e-5, see tools/README.md); exact F ≤ 1e-4 relative Frobenius.
#![cfg(feature = "candle")]
#![allow(clippy::needless_range_loop)] // index loops mirror the math

use backend_candle::{Device, Gpt2};
use fs_estimators::SplitModel;
use fs_suite::fixtures::{dir, Reference};
use fs_suite::{check_split_model, Tolerances};

fn load(name: &str) -> (Gpt2, Reference) {
    let files = fs_checkpoint::resolve_model(dir(name).to_str().unwrap()).expect("resolve fixture");
    (Gpt2::load(&files, &Device::Cpu).expect("load fixture"), Reference::load(name))
}

fn check_against_oracle(name: &str) {
    let (model, _) = load(name);
    let (z, f, s) =
        fs_suite::check_against_oracle(&model, name, 1e-4).unwrap_or_else(|e| panic!("{e}"));
    println!("{name}: max |Δlogit| {z:.2e}, max exact-F rel. error {f:.2e}, max sampled-F rel. error {s:.2e}");
}

#[test]
fn gpt2_tiny_a_matches_the_oracle() {
    check_against_oracle("gpt2-tiny-a");
}

#[test]
fn gpt2_tiny_b_matches_the_oracle() {
    check_against_oracle("gpt2-tiny-b");
}

#[test]
fn gpt2_fixtures_satisfy_the_split_model_contract() {
    for name in ["gpt2-tiny-a", "gpt2-tiny-b"] {
        let (model, r) = load(name);
        for k in 0..=r.n_layers {
            check_split_model(&model, &r.input_ids, k, Tolerances::F32)
                .unwrap_or_else(|e| panic!("{name} layer {k}: {e}"));
        }
    }
}

#[test]
fn batching_positions_does_not_change_the_result() {
    let (mut model, r) = load("gpt2-tiny-b");
    let ctx = model.lower(&r.input_ids, 1).unwrap();
    let all: Vec<usize> = (0..r.input_ids.len()).collect();
    model.set_position_batch(1);
    let one = model.readout_jacobians(&ctx, &all).unwrap();
    model.set_position_batch(7);
    let many = model.readout_jacobians(&ctx, &all).unwrap();
    for (a, b) in one.iter().zip(&many) {
        let worst =
            a.as_slice().iter().zip(b.as_slice()).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-5, "batched readout Jacobian differs by {worst}");
    }
}

mod random_configs {
    use super::*;
    use fs_checkpoint::Gpt2Config;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

        /// Random tiny GPT-2s (layers 1–3, heads 1–4, d 8–64, vocab 5–300, T 1–16) satisfy the
        /// SplitModel contract at a random layer.
        #[test]
        fn random_gpt2_satisfies_the_contract(
            n_layer in 1usize..=3, n_head in 1usize..=4, head_dim in 2usize..=16, vocab in 5usize..=300,
            len in 1usize..=16, layer_frac in 0.0f64..1.0, seed in any::<u64>(),
        ) {
            let d = (n_head * head_dim).clamp(8, 64) / n_head * n_head;
            let cfg = Gpt2Config {
                vocab_size: vocab, n_positions: 32, n_embd: d, n_layer, n_head,
                layer_norm_epsilon: 1e-5, activation_function: "gelu_new".into(),
                tie_word_embeddings: true, n_inner: None,
            };
            let model = Gpt2::random(cfg, 0.3, seed, &Device::Cpu).unwrap();
            let tokens: Vec<u32> = (0..len).map(|i| ((seed as usize >> (i % 16)) + 7 * i) as u32 % vocab as u32).collect();
            let layer = ((n_layer + 1) as f64 * layer_frac) as usize;
            check_split_model(&model, &tokens, layer.min(n_layer), Tolerances::F32).map_err(TestCaseError::fail)?;
        }
    }
}
