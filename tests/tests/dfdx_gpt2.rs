//! dfdx-specific GPT-2 checks: batching invariance, `extend` reusing the prefix, typed errors.
//! The oracle fixtures, the contract and the agreement with the other engines run for every
//! backend in `tests/backends.rs`.
#![cfg(feature = "dfdx")]

use backend_dfdx::{device, Device, Error, Gpt2};
use fs_checkpoint::Gpt2Config;
use fs_estimators::{SplitContext, SplitModel};
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

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
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
    // A budget far below one position's rows splits each position over several passes (and the
    // score gradients over one pass per token).
    model.set_activation_budget(1);
    let split = model.readout_jacobians(&ctx, &all).unwrap();
    for ((a, b), c) in one.iter().zip(&many).zip(&split) {
        for other in [b, c] {
            let worst = max_abs_diff(a.as_slice(), other.as_slice());
            assert!(worst <= 1e-5, "batched readout Jacobian differs by {worst}");
        }
    }
    let ys = [0u32, 3, 3, (r.vocab - 1) as u32];
    let g_split = model.score_gradients(&ctx, 4, &ys).unwrap();
    model.set_position_batch(1);
    let g_one = model.score_gradients(&ctx, 4, &ys).unwrap();
    let worst = max_abs_diff(g_split.as_slice(), g_one.as_slice());
    assert!(worst <= 1e-5, "batched score gradients differ by {worst}");
    assert_eq!(g_one.row(1), g_one.row(2), "repeated tokens give the same gradient");
}

#[test]
fn extend_reuses_the_prefix_with_the_right_position() {
    let model = fs_checkpoint::Gpt2Weights::random(tiny_config(true), WEIGHT_STD, 5)
        .map_err(Into::into)
        .and_then(|w| Gpt2::new(w, &cpu()))
        .unwrap();
    let tokens = [3u32, 1, 4, 1, 5, 9];
    for layer in [0, 2, 3] {
        let ctx = model.lower(&tokens, layer).unwrap();
        // Extend in the middle of the sequence: positions >= prefix_len of the old context are
        // dropped, the new token sits at position 3 (never position 0).
        let ext = model.extend(&ctx, 3, 30).unwrap();
        let fresh = model.lower(&[3, 1, 4, 30], layer).unwrap();
        assert_eq!(ext.tokens(), fresh.tokens());
        let all = [0usize, 1, 2, 3];
        let (ze, zf) = (model.logits(&ext, &all).unwrap(), model.logits(&fresh, &all).unwrap());
        let dz = max_abs_diff(ze.as_slice(), zf.as_slice());
        assert!(dz <= 1e-4, "layer {layer}: extend vs fresh logits differ by {dz}");
        let (he, hf) = (model.activation(&ext, 3).unwrap(), model.activation(&fresh, 3).unwrap());
        assert!(max_abs_diff(&he, &hf) <= 1e-4, "layer {layer}: activations differ");
        let ae = model.readout_jacobians(&ext, &[3]).unwrap();
        let af = model.readout_jacobians(&fresh, &[3]).unwrap();
        assert!(
            max_abs_diff(ae[0].as_slice(), af[0].as_slice()) <= 1e-4,
            "layer {layer}: A differs"
        );
    }
    assert!(model.extend(&model.lower(&tokens, 1).unwrap(), 7, 1).is_err());
    assert!(model.extend(&model.lower(&tokens, 1).unwrap(), 2, 37).is_err());
}

#[test]
fn bad_weights_configs_and_devices_are_typed_errors() {
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
    assert!(matches!(e, Error::Checkpoint(_) | Error::Model(_)), "{e}");
    let msg = e.to_string();
    assert!(msg.contains(&w[5].0) && msg.contains("NaN") && !msg.contains('\n'), "{msg}");

    // A Llama checkpoint is not a GPT-2: fs-checkpoint's config error.
    let json = r#"{"model_type": "llama", "vocab_size": 19, "hidden_size": 16,
        "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 8}"#;
    let lcfg =
        fs_checkpoint::DecoderConfig::from_json(json, std::path::Path::new("config.json")).unwrap();
    let lw = fs_checkpoint::random_decoder_weights(&lcfg, WEIGHT_STD, 1);
    let ltmp = tempfile::tempdir().unwrap();
    let lfiles = fs_checkpoint::write_checkpoint(ltmp.path(), &lcfg.to_json(), &lw).unwrap();
    let e = fs_checkpoint::Gpt2Weights::load(&lfiles)
        .map_err(Into::into)
        .and_then(|w| Gpt2::new(w, &cpu()))
        .err()
        .expect("a Llama checkpoint is rejected");
    assert!(matches!(e, Error::Checkpoint(_)), "{e}");
    assert!(!e.to_string().contains('\n'), "{e}");

    let e = device("tpu").unwrap_err();
    assert!(matches!(e, Error::Device { .. }), "{e}");
    assert!(!e.to_string().contains('\n'));
    // Without the `cuda` feature (or without a GPU) a CUDA device is a typed, one-line error
    // naming the fix.
    if let Err(e) = device("cuda:0") {
        assert!(matches!(e, Error::Device { .. }), "{e}");
        assert!(e.to_string().contains("cuda") && !e.to_string().contains('\n'), "{e}");
    }

    // Bad requests are typed errors, not panics.
    let model = fs_checkpoint::Gpt2Weights::random(cfg, WEIGHT_STD, 2)
        .map_err(Into::into)
        .and_then(|w| Gpt2::new(w, &cpu()))
        .unwrap();
    let ctx = model.lower(&[1, 2, 3], 1).unwrap();
    assert!(matches!(
        model.upper_logits(&ctx, 1, &[0.0; 3]),
        Err(fs_estimators::FsError::DimensionMismatch { .. })
    ));
    assert!(matches!(
        model.upper_logits(&ctx, 1, &[f32::NAN; 24]),
        Err(fs_estimators::FsError::NonFinite { .. })
    ));
    assert!(matches!(
        model.readout_jacobians(&ctx, &[3]),
        Err(fs_estimators::FsError::PositionOutOfRange { .. })
    ));
    assert!(matches!(
        model.score_gradients(&ctx, 0, &[37]),
        Err(fs_estimators::FsError::TokenOutOfRange { .. })
    ));
    assert!(matches!(
        model.lower(&(0..17).collect::<Vec<u32>>(), 1),
        Err(fs_estimators::FsError::SequenceTooLong { .. })
    ));
}

/// dfdx's device-side exact Fisher (`SplitModel::device_exact_fisher`: the readout Jacobians
/// left on the device, the Gram in f32 chunk products summed in f64, the sandwich in f64) run on
/// the CPU device, against the host estimator (f64 Gram), every layer and position of both GPT-2
/// fixtures; then a random GPT-2 with a vocabulary of two device chunks (8192 + 808 rows) and an
/// activation budget that splits each position's `A` over several backward passes (the
/// concatenation path). Measured 1.5e-7 relative (f32 chunk products against f64 ones); bound
/// 1e-6. On CUDA the same path is the default.
#[test]
fn fisher_formed_on_the_device_equals_the_host_estimator() {
    let mut worst = 0.0f64;
    for name in ["gpt2-tiny-a", "gpt2-tiny-b"] {
        let files = fs_checkpoint::resolve_model(dir(name).to_str().unwrap()).unwrap();
        let w = fs_checkpoint::Gpt2Weights::load(&files).unwrap();
        let host = Gpt2::new(w.clone(), &cpu()).unwrap();
        let mut on_device = Gpt2::new(w, &cpu()).unwrap();
        on_device.set_fisher_on_device(true);
        let r = Reference::load(name);
        let all: Vec<usize> = (0..r.input_ids.len()).collect();
        for layer in 0..=r.n_layers {
            let ctx = on_device.lower(&r.input_ids, layer).unwrap();
            assert!(on_device.device_exact_fisher(&ctx, &all).unwrap().is_some());
            assert!(host.device_exact_fisher(&ctx, &all).unwrap().is_none(), "off on the CPU");
            let e = fs_suite::device_vs_host_fisher(&host, &on_device, &r.input_ids, layer, &all);
            worst = worst.max(e);
        }
    }
    let cfg = Gpt2Config { vocab_size: 9000, ..tiny_config(true) };
    let w = fs_checkpoint::Gpt2Weights::random(cfg, WEIGHT_STD, 7).unwrap();
    let host = Gpt2::new(w.clone(), &cpu()).unwrap();
    let mut on_device = Gpt2::new(w, &cpu()).unwrap();
    on_device.set_fisher_on_device(true);
    // A few rows per pass: each position's 24 rows of A come from several passes.
    on_device.set_activation_budget(40_000);
    let tokens: Vec<u32> = (0..10).map(|i| (i * 811 + 5) % 9000).collect();
    let positions = [0, 3, 9];
    for layer in [0, 2, 3] {
        let e = fs_suite::device_vs_host_fisher(&host, &on_device, &tokens, layer, &positions);
        worst = worst.max(e);
    }
    println!("dfdx: device vs host exact F, max relative difference {worst:.2e}");
    assert!(worst < 1e-6, "{worst:e}");
}
