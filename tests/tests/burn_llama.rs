//! The Llama family on burn: the torch/transformers oracle fixtures (tied and untied heads) and
//! the `SplitModel` contract at every layer, the contract on random tiny configurations (GQA,
//! biases, Llama-3 RoPE scaling), and agreement with candle on the same random checkpoints (when
//! both engines are compiled in).
#![cfg(feature = "burn")]

use backend_burn::{device, Device, Llama};
use fs_estimators::SplitModel;
use fs_suite::fixtures::{dir, Reference};
use fs_suite::random_models::llama_case;
use fs_suite::{check_against_oracle, check_split_model, Tolerances};
use proptest::prelude::*;

fn cpu() -> Device {
    device("cpu").expect("the cpu device")
}

#[test]
fn fixtures_match_the_oracle_and_the_contract_at_every_layer() {
    for name in ["llama-tiny-tied", "llama-tiny-untied"] {
        let files =
            fs_checkpoint::resolve_model(dir(name).to_str().unwrap()).expect("resolve fixture");
        let model = Llama::load(&files, &cpu()).expect("load fixture");
        let r = Reference::load(name);
        let (z, f, s) = check_against_oracle(&model, name, 1e-4).unwrap_or_else(|e| panic!("{e}"));
        println!(
            "burn {name}: max |Δlogit| {z:.2e}, max exact-F rel. error {f:.2e}, max sampled-F rel. error {s:.2e}"
        );
        for k in 0..=r.n_layers {
            check_split_model(&model, &r.input_ids, k, Tolerances::F32)
                .unwrap_or_else(|e| panic!("{name} layer {k}: {e}"));
        }
        let n: usize =
            model.config().tensor_specs().iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        assert_eq!(model.parameter_count(), n);
    }
}

#[test]
fn batching_positions_does_not_change_the_result() {
    let name = "llama-tiny-untied";
    let files = fs_checkpoint::resolve_model(dir(name).to_str().unwrap()).unwrap();
    let mut model = Llama::load(&files, &cpu()).unwrap();
    let r = Reference::load(name);
    let ctx = model.lower(&r.input_ids, 1).unwrap();
    let all: Vec<usize> = (0..r.input_ids.len()).collect();
    model.set_position_batch(1);
    let one = model.readout_jacobians(&ctx, &all).unwrap();
    model.set_position_batch(5);
    let many = model.readout_jacobians(&ctx, &all).unwrap();
    for (a, b) in one.iter().zip(&many) {
        let worst =
            a.as_slice().iter().zip(b.as_slice()).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-5, "batched readout Jacobian differs by {worst}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Random tiny Llamas (GQA, llama / mistral / qwen2 biases, tied or untied, Llama-3 RoPE
    /// scaling) satisfy the SplitModel contract at a random layer.
    #[test]
    fn random_llama_satisfies_the_contract(case in llama_case()) {
        let tmp = tempfile::tempdir().unwrap();
        let files = case.write(tmp.path());
        let model = Llama::load(&files, &cpu()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        check_split_model(&model, &case.tokens, case.layer, Tolerances::F32)
            .map_err(TestCaseError::fail)?;
    }
}

#[cfg(all(feature = "burn", feature = "candle"))]
proptest! {
    #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]

    /// burn and candle load the same random Llama checkpoint into the same model: logits agree
    /// to 1e-4 and the exact Fisher to 1e-4 relative Frobenius at the last position.
    #[test]
    fn burn_and_candle_agree_on_random_llamas(case in llama_case()) {
        use fs_estimators::{exact_fisher, relative_frobenius, ExactOptions};
        let tmp = tempfile::tempdir().unwrap();
        let files = case.write(tmp.path());
        let b = Llama::load(&files, &cpu()).unwrap();
        let c = backend_candle::Llama::load(&files, &backend_candle::Device::Cpu).unwrap();
        let (cb, cc) = (b.lower(&case.tokens, case.layer).unwrap(), c.lower(&case.tokens, case.layer).unwrap());
        let all: Vec<usize> = (0..case.tokens.len()).collect();
        let (zb, zc) = (b.logits(&cb, &all).unwrap(), c.logits(&cc, &all).unwrap());
        let dz = zb.as_slice().iter().zip(zc.as_slice()).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        prop_assert!(dz <= 1e-4, "logits differ by {dz:.3e}");
        let t = [case.tokens.len() - 1];
        let fb = exact_fisher(&b, &cb, &t, &ExactOptions::default()).unwrap();
        let fc = exact_fisher(&c, &cc, &t, &ExactOptions::default()).unwrap();
        let df = relative_frobenius(&fb[0], &fc[0]);
        prop_assert!(df <= 1e-4, "exact F differs by {df:.3e}");
    }
}
