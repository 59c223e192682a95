//! Replays the inputs the `gguf` fuzz target (`fuzz/`) found crashing
//! (`tests/fixtures/fuzz-regressions/gguf/*`) through `load_llama_gguf`: each must give `Ok` or
//! a one-line `Err`, never a panic or an allocation the file cannot back. The seed corpus
//! (`fuzz/seeds/gguf/*`, tiny valid Llama GGUFs v1–v3) must load, which checks that the header
//! pre-validation accepts well-formed files.

use backend_candle::{load_llama_gguf, Device};
use std::path::{Path, PathBuf};

fn files(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.file_name().is_some_and(|n| n != ".gitkeep"))
        .collect();
    files.sort();
    files
}

#[test]
fn gguf_regressions_are_errors_not_crashes() {
    for input in files("tests/fixtures/fuzz-regressions/gguf") {
        if let Err(e) = load_llama_gguf(&input, &Device::Cpu) {
            let m = e.to_string();
            assert!(!m.contains('\n'), "{}: multi-line error {m:?}", input.display());
        }
    }
}

/// A key written as "general.alignment" plus NUL padding, with value 0: candle strips trailing
/// NULs from strings and then divides by the alignment, so the header check must strip them too
/// and refuse the 0.
#[test]
fn nul_padded_alignment_key_is_checked() {
    let e = regression_error("alignment-key-nul-terminated-zero.gguf");
    assert!(e.contains("general.alignment is 0"), "{e}");
}

/// The one-line error `load_llama_gguf` gives for the regression input `name`.
fn regression_error(name: &str) -> String {
    let input = files("tests/fixtures/fuzz-regressions/gguf")
        .into_iter()
        .find(|p| p.ends_with(name))
        .unwrap_or_else(|| panic!("regression input {name}"));
    load_llama_gguf(&input, &Device::Cpu).err().expect("an error").to_string()
}

#[test]
fn gguf_seeds_load() {
    let seeds = files("fuzz/seeds/gguf");
    assert!(!seeds.is_empty());
    for input in seeds {
        let (model, tokenizer) = load_llama_gguf(&input, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{}: {e}", input.display()));
        let ids = tokenizer.encode("ab ab<|endoftext|>", false).unwrap().get_ids().to_vec();
        assert_eq!(ids, [3, 4, 5], "{}", input.display());
        drop(model);
    }
}

/// `llama.rope.dimension_count` = 4294967294 (even, 2 heads: no overflow) would make the RoPE
/// table 2³¹ f64 entries before any tensor is read: refused by the config size limits.
#[test]
fn huge_rope_dimension_is_refused_before_allocating() {
    let e = regression_error("rope-dimension-count-4294967294.gguf");
    assert!(e.contains("head_dim is 4294967294") && e.contains("re-download"), "{e}");
}
