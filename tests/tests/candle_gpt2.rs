//! Candle-specific GPT-2 checks. The oracle fixtures, the SplitModel contract and the random
//! configurations run for every backend in `tests/backends.rs`.
#![cfg(feature = "candle")]
#![allow(clippy::needless_range_loop)] // index loops mirror the math

use backend_candle::{Device, Gpt2};
use fs_estimators::{exact_fisher, ExactOptions, FisherOperator, Matrix, SplitModel};
use fs_suite::fixtures::{dir, Reference};

fn load(name: &str) -> (Gpt2, Reference) {
    let files = fs_checkpoint::resolve_model(dir(name).to_str().unwrap()).expect("resolve fixture");
    (
        fs_checkpoint::Gpt2Weights::load(&files)
            .map_err(Into::into)
            .and_then(|w| Gpt2::new(w, &Device::Cpu))
            .expect("load fixture"),
        Reference::load(name),
    )
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

/// The exact Fisher formed on the model's device (`SplitModel::device_exact_fisher`: readout
/// Jacobians kept on the device, the Gram and the sandwich there, f64 accumulation) run on the
/// CPU device, against the host estimators, at every position of every layer. (A quantised,
/// stored unembedding widened chunk by chunk, and a vocabulary of many chunks: `smollm2_gguf.rs`,
/// 1.25e-6.) With these vocabularies of one chunk both paths form the same products — the same
/// readout Jacobian, the same f32 rounding of the centered rows — and differ in the f64 summation
/// order only: measured ≤ 2.4e-16 (f32 models) and 1.2e-15 (f64); bound 1e-12.
fn compare_fisher<M: SplitModel>(model: &M, on_device: &M, name: &str, label: &str) {
    let r = Reference::load(name);
    let all: Vec<usize> = (0..r.input_ids.len()).collect();
    let mut worst = 0.0f64;
    for layer in 0..=r.n_layers {
        let ctx = model.lower(&r.input_ids, layer).unwrap();
        assert!(model.device_exact_fisher(&ctx, &all).unwrap().is_none(), "{label}: host path");
        let ctx = on_device.lower(&r.input_ids, layer).unwrap();
        assert!(on_device.device_exact_fisher(&ctx, &all).unwrap().is_some(), "{label}");
        worst =
            worst.max(fs_suite::device_vs_host_fisher(model, on_device, &r.input_ids, layer, &all));
    }
    println!("{label}: device vs host exact F, max relative difference {worst:.2e}");
    assert!(worst < 1e-12, "{label}: {worst:e}");
}

/// The output Gram applied on the model's device (`SplitModel::device_output_gram`, used by the
/// matrix-free `FisherOperator` instead of the host's pass over `W_U`), run on the CPU device:
/// `F X` of the operator against the exact Fisher (host estimator) times `X`, for a block of 5
/// fixed vectors at every layer and three positions. The f32 error is the JVP's rounding (the
/// device `G` is f64 throughout): measured 2.7e-6, bound 1e-5; f64: measured 1.6e-15, bound
/// 1e-12.
fn compare_gram<M: SplitModel>(host: &M, on_device: &M, name: &str, label: &str, bound: f64) {
    let r = Reference::load(name);
    let d = r.d;
    let last = r.input_ids.len() - 1;
    let x = Matrix::from_fn(5, d, |i, j| ((i * 31 + j * 17) % 23) as f64 / 11.0 - 1.0);
    let mut worst = 0.0f64;
    for layer in 0..=r.n_layers {
        let ctx = on_device.lower(&r.input_ids, layer).unwrap();
        for t in [0, last / 2, last] {
            let z = on_device.logits(&ctx, &[t]).unwrap();
            let p = fs_estimators::softmax(z.row(0)).unwrap();
            assert!(host.device_output_gram(&p, None).unwrap().is_none(), "{label}: host");
            assert!(on_device.device_output_gram(&p, None).unwrap().is_some(), "{label}");
            let got = FisherOperator::new(on_device, &ctx, t).unwrap().apply(&x).unwrap();
            let hctx = host.lower(&r.input_ids, layer).unwrap();
            let f = exact_fisher(host, &hctx, &[t], &ExactOptions::default()).unwrap();
            let want = Matrix::from_fn(5, d, |i, j| {
                (0..d).map(|k| f[0].get(j, k) * x.get(i, k)).sum::<f64>()
            });
            worst = worst.max(fs_estimators::relative_frobenius(&got, &want));
        }
    }
    println!("{label}: device-G operator vs exact F·X, max relative difference {worst:.2e}");
    assert!(worst < bound, "{label}: {worst:e}");
}

/// Both device paths of candle against the host, on GPT-2, Gemma-2 (final soft-cap: the slopes)
/// and candle's f64 model of Gemma-2 ([`compare_fisher`], [`compare_gram`]).
#[test]
fn device_paths_equal_the_host_estimators() {
    use fs_checkpoint::{Checkpoint, ModelWeights};
    fn both<M: SplitModel>(host: &M, device: &M, name: &str, label: &str, bound: f64) {
        compare_fisher(host, device, name, label);
        compare_gram(host, device, name, label, bound);
    }
    for name in ["gpt2-tiny-b", "gemma2-tiny"] {
        let read =
            || Checkpoint::open(dir(name).to_str().unwrap()).unwrap().read_weights().unwrap();
        match read() {
            ModelWeights::Gpt2(w) => {
                let host = Gpt2::new(w.clone(), &Device::Cpu).unwrap();
                let mut device = Gpt2::new(w, &Device::Cpu).unwrap();
                device.set_fisher_on_device(true);
                both(&host, &device, name, name, 1e-5);
            }
            ModelWeights::Decoder(w) => {
                let host = backend_candle::Decoder::new(w.clone(), &Device::Cpu).unwrap();
                let mut device = backend_candle::Decoder::new(w.clone(), &Device::Cpu).unwrap();
                device.set_fisher_on_device(true);
                both(&host, &device, name, name, 1e-5);
                let host =
                    backend_candle::Decoder::<f64>::with_scalar(w.clone(), &Device::Cpu).unwrap();
                let mut device =
                    backend_candle::Decoder::<f64>::with_scalar(w, &Device::Cpu).unwrap();
                device.set_fisher_on_device(true);
                both(&host, &device, name, &format!("{name} (f64)"), 1e-12);
            }
        }
    }
}
