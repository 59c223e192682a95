//! `backend_candle::load_llama_gguf` (CPU) on a fuzzed GGUF file; on success, the rebuilt
//! tokenizer encodes a short text.
#![no_main]

use backend_candle::{load_llama_gguf, Device};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::PathBuf::from(format!("/dev/shm/fs-fuzz-{}.gguf", std::process::id()));
    std::fs::write(&path, data).unwrap();
    if let Ok((_model, tokenizer)) = load_llama_gguf(&path, &Device::Cpu) {
        let _ = tokenizer.encode("The capital of France is", false);
    }
});
