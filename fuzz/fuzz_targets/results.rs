//! The results readers of `inspect` / `report` / `merge`: `read_results_bytes` as safetensors
//! and as npz, `read_npz`, and the mean accumulator `MeanState::from_bytes`.
#![no_main]

use fisher_stein::dataset::MeanState;
use fisher_stein::inspect::read_results_bytes;
use fisher_stein::npz::read_npz;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let _ = read_results_bytes(Path::new("fisher.safetensors"), data);
    let _ = read_results_bytes(Path::new("fisher.npz"), data);
    let _ = read_npz(data);
    if let Ok(state) = MeanState::from_bytes(Path::new("mean.safetensors"), data) {
        let _ = state.dim();
    }
});
