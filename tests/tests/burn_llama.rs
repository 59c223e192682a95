//! Burn-specific Llama checks: batching invariance. The oracle fixtures, the contract and the
//! agreement with the other engines run for every backend in `tests/backends.rs`; that random
//! weights are the model of the written checkpoint is checked engine-free there too.
#![cfg(feature = "burn")]

use backend_burn::{device, Decoder, Device};
use fs_estimators::SplitModel;
use fs_suite::fixtures::{dir, Reference};

fn cpu() -> Device {
    device("cpu").expect("the cpu device")
}

#[test]
fn batching_positions_does_not_change_the_result() {
    let name = "llama-tiny-untied";
    let files = fs_checkpoint::resolve_model(dir(name).to_str().unwrap()).unwrap();
    let mut model = fs_checkpoint::DecoderWeights::load(&files)
        .map_err(Into::into)
        .and_then(|w| Decoder::new(w, &cpu()))
        .unwrap();
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

/// burn's device-side exact Fisher (`SplitModel::device_exact_fisher`: Jacobians left on the
/// device, the Gram and the sandwich there in f32) run on the CPU backend, against the host
/// estimator (f64 accumulation), every layer and position of a Llama, a soft-capped Gemma-2 and
/// a sliding-window Mistral fixture: f32 sums against f64 ones, measured ≤ 2.9e-7 relative;
/// bound 3e-6. On wgpu the same path runs by default and `device_agrees_with_cpu`
/// (tools/test_wgpu.sh) compares it with the CPU backend's host path.
#[test]
fn fisher_formed_on_the_device_equals_the_host_estimator() {
    for name in ["llama-tiny-untied", "gemma2-tiny", "mistral-window-tiny"] {
        let files = fs_checkpoint::resolve_model(dir(name).to_str().unwrap()).unwrap();
        let w = fs_checkpoint::DecoderWeights::load(&files).unwrap();
        let host = Decoder::new(w.clone(), &cpu()).unwrap();
        let mut on_device = Decoder::new(w, &cpu()).unwrap();
        on_device.set_fisher_on_device(true);
        let r = Reference::load(name);
        let all: Vec<usize> = (0..r.input_ids.len()).collect();
        let mut worst = 0.0f64;
        for layer in 0..=r.n_layers {
            let ctx = on_device.lower(&r.input_ids, layer).unwrap();
            assert!(on_device.device_exact_fisher(&ctx, &all).unwrap().is_some());
            let e = fs_suite::device_vs_host_fisher(&host, &on_device, &r.input_ids, layer, &all);
            worst = worst.max(e);
        }
        println!("burn {name}: device vs host exact F, max relative difference {worst:.2e}");
        assert!(worst < 3e-6, "{name}: {worst:e}");
    }
}
