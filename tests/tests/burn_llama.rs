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
