//! Candle-specific GPT-2 checks. The oracle fixtures, the SplitModel contract and the random
//! configurations run for every backend in `tests/backends.rs`.
#![cfg(feature = "candle")]
#![allow(clippy::needless_range_loop)] // index loops mirror the math

use backend_candle::{Device, Gpt2};
use fs_estimators::SplitModel;
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
