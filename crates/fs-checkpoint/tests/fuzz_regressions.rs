//! Replays the inputs the fuzz targets (`fuzz/`) found crashing, and their seed corpus, through
//! the same entry points: `tests/fixtures/fuzz-regressions/{safetensors_weights,config_json,
//! tokenizer}/*` and `fuzz/seeds/<target>/*`. Every file must give `Ok` or an `Err` whose
//! message is one line — never a panic or an allocation the file cannot back.

use fs_checkpoint::{load_tokenizer, resolve_model_in, DecoderConfig, Gpt2Config, TokenizerFiles};
use fs_checkpoint::{CheckpointError, WeightStore};
use std::path::{Path, PathBuf};

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut files = Vec::new();
    for dir in [
        root.join("tests/fixtures/fuzz-regressions").join(target),
        root.join("fuzz/seeds").join(target),
    ] {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_file() && path.file_name().is_some_and(|n| n != ".gitkeep") {
                files.push(path);
            }
        }
    }
    files.sort();
    assert!(!files.is_empty(), "no inputs for {target}");
    files
}

fn one_line<T>(input: &Path, r: Result<T, CheckpointError>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            let m = e.to_string();
            assert!(!m.contains('\n'), "{}: multi-line error {m:?}", input.display());
            None
        }
    }
}

fn read_all(input: &Path, files: &[PathBuf]) {
    if let Some(store) = one_line(input, WeightStore::open(files)) {
        for name in store.names() {
            let shape = store.shape(&name).unwrap();
            one_line(input, store.read_f32_shaped(&name, &shape));
        }
    }
}

#[test]
fn safetensors_weights() {
    let t = tempfile::tempdir().unwrap();
    for input in inputs("safetensors_weights") {
        let data = std::fs::read(&input).unwrap();
        let single = t.path().join("model.safetensors");
        std::fs::write(&single, &data).unwrap();
        read_all(&input, std::slice::from_ref(&single));
        let sharded = t.path().join("sharded");
        std::fs::create_dir_all(&sharded).unwrap();
        std::fs::write(sharded.join("config.json"), b"{}").unwrap();
        std::fs::write(sharded.join("model.safetensors.index.json"), &data).unwrap();
        std::fs::write(sharded.join("model-00001-of-00001.safetensors"), &data).unwrap();
        if let Some(files) = one_line(&input, resolve_model_in(sharded.to_str().unwrap(), t.path()))
        {
            read_all(&input, &files.weights);
        }
    }
}

#[test]
fn config_json() {
    let path = Path::new("config.json");
    for input in inputs("config_json") {
        let data = std::fs::read(&input).unwrap();
        let Ok(text) = std::str::from_utf8(&data) else { continue };
        if let Some(cfg) = one_line(&input, Gpt2Config::from_json(text, path)) {
            cfg.validate(path).unwrap();
            let _ = cfg.inner_dim();
        }
        if let Some(cfg) = one_line(&input, DecoderConfig::from_json(text, path)) {
            let _ = cfg.inv_freq();
        }
    }
}

#[test]
fn tokenizer() {
    let t = tempfile::tempdir().unwrap();
    let exercise = |input: &Path, files: &TokenizerFiles| {
        if let Some(tok) = one_line(input, load_tokenizer(files)) {
            if let Ok(enc) = tok.encode("Hello wörld <|endoftext|> 12", false) {
                let _ = tok.decode(enc.get_ids(), false);
            }
        }
    };
    for input in inputs("tokenizer") {
        let data = std::fs::read(&input).unwrap();
        let json = t.path().join("tokenizer.json");
        std::fs::write(&json, &data).unwrap();
        exercise(&input, &TokenizerFiles::Json(json));
        let (v, m) = match data.iter().position(|&b| b == 0) {
            Some(i) => (&data[..i], &data[i + 1..]),
            None => (&data[..], &[][..]),
        };
        let vocab = t.path().join("vocab.json");
        let merges = t.path().join("merges.txt");
        std::fs::write(&vocab, v).unwrap();
        std::fs::write(&merges, m).unwrap();
        exercise(&input, &TokenizerFiles::VocabMerges { vocab, merges });
    }
}

/// A Llama config with `head_dim` 8·10¹⁶ (4 heads: the products stay representable) made
/// `inv_freq` allocate 4·10¹⁶ f64 (found by the config_json fuzz target); GPT-2 sizes have the
/// same limits.
#[test]
fn sizes_beyond_the_limits_are_config_errors() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let text =
        std::fs::read_to_string(root.join(
            "tests/fixtures/fuzz-regressions/config_json/llama-head-dim-8e16-rope-table.json",
        ))
        .unwrap();
    let path = Path::new("config.json");
    let e = DecoderConfig::from_json(&text, path).expect_err("an error").to_string();
    assert!(e.contains("`head_dim` is 80000000000000000, over the 16777216"), "{e}");
    let at_limit = text.replace("80000000000000000", &fs_checkpoint::MAX_CONFIG_WIDTH.to_string());
    assert!(DecoderConfig::from_json(&at_limit, path).is_ok());
    let gpt2 = |n_layer: usize| {
        format!(
            r#"{{"model_type": "gpt2", "vocab_size": 10, "n_positions": 8, "n_embd": 8, "n_layer": {n_layer}, "n_head": 2}}"#
        )
    };
    let layers = fs_checkpoint::MAX_CONFIG_LAYERS;
    let ok = Gpt2Config::from_json(&gpt2(layers), path).and_then(|c| c.validate(path).map(|_| c));
    assert!(ok.is_ok(), "{ok:?}");
    let e = Gpt2Config::from_json(&gpt2(layers + 1), path)
        .and_then(|c| c.validate(path))
        .expect_err("an error")
        .to_string();
    assert!(e.contains("`n_layer` is 65537"), "{e}");
}

/// What the `gguf` fuzz target runs: header, metadata → config, every tensor read and
/// dequantised, the tokenizer rebuilt from the metadata.
fn load_gguf(
    path: &Path,
) -> Result<(fs_checkpoint::ModelWeights, fs_checkpoint::tokenizers::Tokenizer), CheckpointError> {
    let ckpt = fs_checkpoint::Checkpoint::open_gguf(path)?;
    let weights = ckpt.read_weights()?;
    let tokenizer = ckpt.embedded_tokenizer()?.expect("a GGUF checkpoint carries a tokenizer");
    Ok((weights, tokenizer))
}

/// The regression inputs of the `gguf` target (`tests/fixtures/fuzz-regressions/gguf/*`): each
/// must give `Ok` or a one-line `Err`, never a panic or an allocation the file cannot back.
#[test]
fn gguf_regressions_are_errors_not_crashes() {
    for input in inputs("gguf") {
        one_line(&input, load_gguf(&input));
    }
}

/// The seed corpus (`fuzz/seeds/gguf/*`, tiny valid Llama GGUFs v1–v3) must load, which checks
/// that the header validation accepts well-formed files.
#[test]
fn gguf_seeds_load() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/gguf");
    let mut seeds = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let input = entry.unwrap().path();
        let (weights, tokenizer) =
            load_gguf(&input).unwrap_or_else(|e| panic!("{}: {e}", input.display()));
        let ids = tokenizer.encode("ab ab<|endoftext|>", false).unwrap().get_ids().to_vec();
        assert_eq!(ids, [3, 4, 5], "{}", input.display());
        assert!(weights.parameter_count() > 0);
        seeds += 1;
    }
    assert!(seeds >= 3, "{seeds} seeds");
}

/// The one-line error loading the regression input `name` gives.
fn gguf_regression_error(name: &str) -> String {
    let root =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/fuzz-regressions/gguf");
    load_gguf(&root.join(name)).expect_err("an error").to_string()
}

/// A key written as "general.alignment" plus NUL padding, with value 0: readers strip trailing
/// NULs from strings, so the header check must strip them too and refuse the 0 (found by the
/// fuzzer as a division by zero in candle's reader, which this crate no longer uses).
#[test]
fn nul_padded_alignment_key_is_checked() {
    let e = gguf_regression_error("alignment-key-nul-terminated-zero.gguf");
    assert!(e.contains("general.alignment is 0"), "{e}");
}

/// `llama.rope.dimension_count` = 4294967294 (even, 2 heads: no overflow) would make the RoPE
/// table 2³¹ f64 entries before any tensor is read: refused by the config size limits.
#[test]
fn huge_rope_dimension_is_refused_before_allocating() {
    let e = gguf_regression_error("rope-dimension-count-4294967294.gguf");
    assert!(e.contains("4294967294 rotary dimensions") && e.contains("re-download"), "{e}");
}
