//! `config.json` parsing: `Gpt2Config::from_json` + `validate` + `inner_dim`, and
//! `DecoderConfig::from_json` + `inv_freq` (the RoPE table every backend builds from it).
#![no_main]

use fs_checkpoint::{Gpt2Config, DecoderConfig};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = Path::new("config.json");
    if let Ok(cfg) = Gpt2Config::from_json(text, path) {
        cfg.validate(path).expect("from_json validates");
        let _ = cfg.inner_dim();
    }
    if let Ok(cfg) = DecoderConfig::from_json(text, path) {
        let _ = cfg.inv_freq();
    }
});
