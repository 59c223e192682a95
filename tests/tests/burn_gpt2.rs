//! GPT-2 on burn: the torch/transformers oracle fixtures and the `SplitModel` contract at every
//! layer, the contract on random tiny configurations, `Gpt2::random` against a written
//! checkpoint, batching invariance, typed errors, and agreement with candle on the same random
//! model (when both engines are compiled in).
#![cfg(feature = "burn")]

use backend_burn::{device, Device, Error, Gpt2};
use fs_checkpoint::Gpt2Config;
use fs_estimators::SplitModel;
use fs_suite::fixtures::{dir, Reference};
use fs_suite::random_models::{gpt2_case, WEIGHT_STD};
use fs_suite::{check_against_oracle, check_split_model, Tolerances};
use proptest::prelude::*;

fn cpu() -> Device {
    device("cpu").expect("the cpu device")
}

fn load(name: &str) -> (Gpt2, Reference) {
    let files = fs_checkpoint::resolve_model(dir(name).to_str().unwrap()).expect("resolve fixture");
    (Gpt2::load(&files, &cpu()).expect("load fixture"), Reference::load(name))
}

fn tiny_config(tied: bool) -> Gpt2Config {
    Gpt2Config {
        vocab_size: 37,
        n_positions: 16,
        n_embd: 24,
        n_layer: 3,
        n_head: 3,
        layer_norm_epsilon: 1e-5,
        activation_function: "gelu_new".into(),
        tie_word_embeddings: tied,
        n_inner: None,
    }
}

#[test]
fn fixtures_match_the_oracle_and_the_contract_at_every_layer() {
    for name in ["gpt2-tiny-a", "gpt2-tiny-b"] {
        let (model, r) = load(name);
        let (z, f, s) = check_against_oracle(&model, name, 1e-4).unwrap_or_else(|e| panic!("{e}"));
        println!(
            "burn {name}: max |Δlogit| {z:.2e}, max exact-F rel. error {f:.2e}, max sampled-F rel. error {s:.2e}"
        );
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
    // A budget far below one position's rows splits each position over several passes.
    model.set_activation_budget(1);
    let split = model.readout_jacobians(&ctx, &all).unwrap();
    for ((a, b), c) in one.iter().zip(&many).zip(&split) {
        for other in [b, c] {
            let worst = a
                .as_slice()
                .iter()
                .zip(other.as_slice())
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(worst <= 1e-5, "batched readout Jacobian differs by {worst}");
        }
    }
}

#[test]
fn random_is_the_model_of_the_written_checkpoint() {
    for tied in [true, false] {
        let cfg = tiny_config(tied);
        let w = fs_checkpoint::random_gpt2_weights(&cfg, WEIGHT_STD, 11);
        let tmp = tempfile::tempdir().unwrap();
        let files = fs_checkpoint::write_checkpoint(tmp.path(), &cfg.to_json(), &w).unwrap();
        let loaded = Gpt2::load(&files, &cpu()).unwrap();
        let random = Gpt2::random(cfg.clone(), WEIGHT_STD, 11, &cpu()).unwrap();
        assert_eq!(loaded.parameter_count(), random.parameter_count());
        let n: usize = w.iter().map(|t| t.2.len()).sum();
        assert_eq!(random.parameter_count(), n, "tied {tied}");
        assert_eq!(random.config(), &cfg);
        let tokens = [3u32, 1, 4, 1, 5, 9, 2, 6];
        let all: Vec<usize> = (0..tokens.len()).collect();
        let a = loaded.logits(&loaded.lower(&tokens, 2).unwrap(), &all).unwrap();
        let b = random.logits(&random.lower(&tokens, 2).unwrap(), &all).unwrap();
        assert_eq!(a.as_slice(), b.as_slice());
        assert_eq!(loaded.unembedding().as_slice(), random.unembedding().as_slice());
    }
}

#[test]
fn bad_weights_and_devices_are_typed_errors() {
    let cfg = tiny_config(true);
    let mut w = fs_checkpoint::random_gpt2_weights(&cfg, WEIGHT_STD, 2);
    w[5].2[3] = f32::NAN;
    let tmp = tempfile::tempdir().unwrap();
    let files = fs_checkpoint::write_checkpoint(tmp.path(), &cfg.to_json(), &w).unwrap();
    let e = Gpt2::load(&files, &cpu()).err().expect("NaN weights are rejected");
    assert!(matches!(e, Error::Model(fs_traits::FsError::NonFinite { index: 3, .. })), "{e}");
    assert!(e.to_string().contains(&w[5].0), "{e}");
    let e = device("tpu").unwrap_err();
    assert!(matches!(e, Error::Device { .. }), "{e}");
    assert!(!e.to_string().contains('\n'));
    // An autodiff device is accepted too: the model keeps its weights off the tape.
    let m = Gpt2::random(cfg, WEIGHT_STD, 2, &cpu().autodiff()).unwrap();
    assert!(!m.device().is_autodiff());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Random tiny GPT-2s (layers 1–3, heads 1–4, d 8–64, vocab 5–300, T 1–16, tied or untied)
    /// satisfy the SplitModel contract at a random layer.
    #[test]
    fn random_gpt2_satisfies_the_contract(case in gpt2_case()) {
        let tmp = tempfile::tempdir().unwrap();
        let files = case.write(tmp.path());
        let model = Gpt2::load(&files, &cpu()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        check_split_model(&model, &case.tokens, case.layer, Tolerances::F32)
            .map_err(TestCaseError::fail)?;
    }
}

/// burn and candle build the same model from `Gpt2::random(cfg, 0.3, seed)`: logits agree to
/// 1e-4 and the exact Fisher to 1e-4 relative Frobenius, at every layer and several positions.
#[cfg(all(feature = "burn", feature = "candle"))]
#[test]
fn burn_and_candle_agree_on_the_same_random_model() {
    use fs_estimators::{exact_fisher, relative_frobenius, ExactOptions};
    let mut worst = (0.0f64, 0.0f64);
    for (seed, tied) in [(1u64, true), (7, false), (42, true)] {
        let cfg = Gpt2Config { n_positions: 32, n_embd: 32, n_head: 4, ..tiny_config(tied) };
        let b = Gpt2::random(cfg.clone(), 0.3, seed, &cpu()).unwrap();
        let c = backend_candle::Gpt2::random(cfg.clone(), 0.3, seed, &backend_candle::Device::Cpu)
            .unwrap();
        assert_eq!(b.parameter_count(), c.parameter_count());
        let tokens: Vec<u32> = (0..12u32).map(|i| (i * 7 + seed as u32) % 37).collect();
        let all: Vec<usize> = (0..tokens.len()).collect();
        for layer in 0..=cfg.n_layer {
            let (cb, cc) = (b.lower(&tokens, layer).unwrap(), c.lower(&tokens, layer).unwrap());
            let (zb, zc) = (b.logits(&cb, &all).unwrap(), c.logits(&cc, &all).unwrap());
            let dz = zb
                .as_slice()
                .iter()
                .zip(zc.as_slice())
                .map(|(x, y)| (x - y).abs() as f64)
                .fold(0.0, f64::max);
            assert!(dz <= 1e-4, "seed {seed} layer {layer}: logits differ by {dz:.3e}");
            let positions = [0, 5, tokens.len() - 1];
            let fb = exact_fisher(&b, &cb, &positions, &ExactOptions::default()).unwrap();
            let fc = exact_fisher(&c, &cc, &positions, &ExactOptions::default()).unwrap();
            for (t, (x, y)) in positions.iter().zip(fb.iter().zip(&fc)) {
                let df = relative_frobenius(x, y);
                assert!(
                    df <= 1e-4,
                    "seed {seed} layer {layer} position {t}: F differs by {df:.3e}"
                );
                worst.1 = worst.1.max(df);
            }
            worst.0 = worst.0.max(dz);
        }
    }
    println!(
        "burn vs candle (Gpt2::random): max |Δlogit| {:.2e}, max exact-F rel. difference {:.2e}",
        worst.0, worst.1
    );
}
