//! Replays the inputs the fuzz targets (`fuzz/`) found crashing, and their seed corpus, through
//! the same entry points: `tests/fixtures/fuzz-regressions/{safetensors_weights,config_json,
//! tokenizer}/*` and `fuzz/seeds/<target>/*`. Every file must give `Ok` or an `Err` whose
//! message is one line — never a panic or an allocation the file cannot back.

use fs_checkpoint::{load_tokenizer, resolve_model_in, Gpt2Config, LlamaConfig, TokenizerFiles};
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
        if let Some(cfg) = one_line(&input, LlamaConfig::from_json(text, path)) {
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
    let e = LlamaConfig::from_json(&text, path).expect_err("an error").to_string();
    assert!(e.contains("`head_dim` is 80000000000000000, over the 16777216"), "{e}");
    let at_limit = text.replace("80000000000000000", &fs_checkpoint::MAX_CONFIG_WIDTH.to_string());
    assert!(LlamaConfig::from_json(&at_limit, path).is_ok());
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
