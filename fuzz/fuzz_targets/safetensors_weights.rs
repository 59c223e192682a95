//! `WeightStore::open` + `read_f32` of every tensor on a fuzzed single safetensors file, and the
//! same bytes as a sharded checkpoint's `model.safetensors.index.json` (resolved by
//! `resolve_model_in`, then every shard it names opened and read).
#![no_main]

use fs_checkpoint::{resolve_model_in, WeightStore};
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;

fn scratch() -> PathBuf {
    let dir = PathBuf::from(format!("/dev/shm/fs-fuzz-safetensors-{}", std::process::id()));
    let _ = std::fs::create_dir_all(dir.join("single"));
    let _ = std::fs::create_dir_all(dir.join("sharded"));
    dir
}

fn read_all(files: &[PathBuf]) {
    if let Ok(store) = WeightStore::open(files) {
        for name in store.names() {
            let shape = store.shape(&name).expect("listed");
            let _ = store.dtype(&name);
            let _ = store.read_f32_shaped(&name, &shape);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let dir = scratch();
    let single = dir.join("single/model.safetensors");
    std::fs::write(&single, data).unwrap();
    read_all(std::slice::from_ref(&single));

    // The bytes as a sharded checkpoint's index; the shard it most likely names holds them too.
    let sharded = dir.join("sharded");
    std::fs::write(sharded.join("config.json"), b"{}").unwrap();
    std::fs::write(sharded.join("model.safetensors.index.json"), data).unwrap();
    std::fs::write(sharded.join("model-00001-of-00001.safetensors"), data).unwrap();
    if let Ok(files) = resolve_model_in(sharded.to_str().unwrap(), &dir) {
        read_all(&files.weights);
    }
});
