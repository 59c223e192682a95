//! A fuzzed GGUF file through everything `fs-checkpoint` does with one (engine-free): header
//! validation, metadata → config, every tensor read and dequantised, the tokenizer rebuilt from
//! the metadata and run on a short text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::PathBuf::from(format!("/dev/shm/fs-fuzz-{}.gguf", std::process::id()));
    std::fs::write(&path, data).unwrap();
    if let Ok(ckpt) = fs_checkpoint::Checkpoint::open_gguf(&path) {
        let _ = ckpt.read_weights();
        if let Ok(Some(tokenizer)) = ckpt.embedded_tokenizer() {
            let _ = tokenizer.encode("The capital of France is", false);
        }
    }
});
