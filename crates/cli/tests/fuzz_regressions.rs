//! Replays the inputs the `results` fuzz target (`fuzz/`) found crashing, and its seed corpus
//! (`tests/fixtures/fuzz-regressions/results/*`, `fuzz/seeds/results/*`), through the results
//! readers of `inspect` / `report` / `merge`: each must give `Ok` or an `Err`, never a panic.

use fisher_stein::dataset::MeanState;
use fisher_stein::npz::read_npz;
use fisher_stein::results::read_results_bytes;
use std::path::{Path, PathBuf};

fn inputs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut files = Vec::new();
    for dir in
        [root.join("tests/fixtures/fuzz-regressions/results"), root.join("fuzz/seeds/results")]
    {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_file() && path.file_name().is_some_and(|n| n != ".gitkeep") {
                files.push(path);
            }
        }
    }
    files.sort();
    assert!(!files.is_empty());
    files
}

#[test]
fn results_readers() {
    for input in inputs() {
        let data = std::fs::read(&input).unwrap();
        let _ = read_results_bytes(Path::new("fisher.safetensors"), &data);
        let _ = read_results_bytes(Path::new("fisher.npz"), &data);
        let _ = read_npz(&data);
        if let Ok(state) = MeanState::from_bytes(Path::new("mean.safetensors"), &data) {
            let _ = state.dim();
        }
    }
}

#[test]
fn results_seeds_read() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/results");
    let st = read_results_bytes(
        Path::new("fisher.safetensors"),
        &std::fs::read(dir.join("fisher.safetensors")).unwrap(),
    )
    .unwrap();
    let npz = read_results_bytes(
        Path::new("fisher.npz"),
        &std::fs::read(dir.join("fisher.npz")).unwrap(),
    )
    .unwrap();
    assert_eq!(st, npz);
    let state = MeanState::from_bytes(
        Path::new("mean.safetensors"),
        &std::fs::read(dir.join("mean.safetensors")).unwrap(),
    )
    .unwrap();
    assert_eq!((state.dim(), state.layers.len()), (3, 2));
}
