//! `fs_checkpoint::load_tokenizer` on a fuzzed `tokenizer.json`, and on `vocab.json` +
//! `merges.txt` (the input split at its first NUL byte); each loaded tokenizer encodes and
//! decodes a short text.
#![no_main]

use fs_checkpoint::{load_tokenizer, TokenizerFiles};
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;

fn exercise(files: &TokenizerFiles) {
    if let Ok(tok) = load_tokenizer(files) {
        if let Ok(enc) = tok.encode("Hello wörld <|endoftext|> 12", false) {
            let _ = tok.decode(enc.get_ids(), false);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let dir = PathBuf::from(format!("/dev/shm/fs-fuzz-tokenizer-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let json = dir.join("tokenizer.json");
    std::fs::write(&json, data).unwrap();
    exercise(&TokenizerFiles::Json(json));

    let (vocab_bytes, merges_bytes) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let vocab = dir.join("vocab.json");
    let merges = dir.join("merges.txt");
    std::fs::write(&vocab, vocab_bytes).unwrap();
    std::fs::write(&merges, merges_bytes).unwrap();
    exercise(&TokenizerFiles::VocabMerges { vocab, merges });
});
