//! Burn-specific GPT-2 checks: batching invariance, typed errors. The oracle fixtures, the
//! contract and the agreement with the other engines run for every backend in
//! `tests/backends.rs`.
#![cfg(feature = "burn")]

use backend_burn::{device, Device, Error, Gpt2};
use fs_checkpoint::Gpt2Config;
use fs_estimators::SplitModel;
use fs_suite::fixtures::{dir, Reference};
use fs_suite::random_models::WEIGHT_STD;

fn cpu() -> Device {
    device("cpu").expect("the cpu device")
}

fn load(name: &str) -> (Gpt2, Reference) {
    let files = fs_checkpoint::resolve_model(dir(name).to_str().unwrap()).expect("resolve fixture");
    (
        fs_checkpoint::Gpt2Weights::load(&files)
            .map_err(Into::into)
            .and_then(|w| Gpt2::new(w, &cpu()))
            .expect("load fixture"),
        Reference::load(name),
    )
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
fn bad_weights_and_devices_are_typed_errors() {
    let cfg = tiny_config(true);
    let mut w = fs_checkpoint::random_gpt2_weights(&cfg, WEIGHT_STD, 2);
    w[5].2[3] = f32::NAN;
    let tmp = tempfile::tempdir().unwrap();
    let files = fs_checkpoint::write_checkpoint(tmp.path(), &cfg.to_json(), &w).unwrap();
    let e = fs_checkpoint::Gpt2Weights::load(&files)
        .map_err(Into::into)
        .and_then(|w| Gpt2::new(w, &cpu()))
        .err()
        .expect("NaN weights are rejected");
    // fs-checkpoint checks values as it reads them; the model checks them again (the random path).
    assert!(matches!(e, Error::Checkpoint(_) | Error::Model(_)), "{e}");
    let msg = e.to_string();
    assert!(msg.contains(&w[5].0) && msg.contains("NaN") && !msg.contains('\n'), "{msg}");
    let e = device("tpu").unwrap_err();
    assert!(matches!(e, Error::Device { .. }), "{e}");
    assert!(!e.to_string().contains('\n'));
    // An autodiff device is accepted too: the model keeps its weights off the tape.
    let m = fs_checkpoint::Gpt2Weights::random(cfg, WEIGHT_STD, 2)
        .map_err(Into::into)
        .and_then(|w| Gpt2::new(w, &cpu().autodiff()))
        .unwrap();
    assert!(!m.device().is_autodiff());
}
