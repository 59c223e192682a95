//! The results readers of `inspect` / `report` / `merge` / `compute --resume`:
//! `read_results_bytes` as safetensors and as npz, `read_npz`, the mean accumulator
//! `MeanState::from_bytes`, and the typed JSON readers `MetadataView::from_json` (metadata.json)
//! and `SequenceState::from_bytes` (`.state/seq_NNNNNN.json`).
#![no_main]

use fisher_stein::dataset::MeanState;
use fisher_stein::npz::read_npz;
use fisher_stein::results::{read_results_bytes, MetadataView, SequenceState};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let _ = read_results_bytes(Path::new("fisher.safetensors"), data);
    let _ = read_results_bytes(Path::new("fisher.npz"), data);
    let _ = read_npz(data);
    if let Ok(state) = MeanState::from_bytes(Path::new("mean.safetensors"), data) {
        let _ = state.dim();
    }
    if let Ok(meta) = MetadataView::from_json(data) {
        let _ = (meta.model_spec(), meta.estimator());
    }
    let _ = SequenceState::from_bytes(Path::new("seq_000000.json"), data);
});
