//! The crate on real files: the repository's model fixtures and the vendored GPT-2 tokenizer.

use std::path::{Path, PathBuf};

use fs_checkpoint::{
    load_tokenizer, resolve_model, sha256_file, Gpt2Config, ModelOrigin, TokenizerFiles,
    WeightStore,
};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(name)
}

/// Every fixture tensor reads back exactly as the `safetensors` crate (an independent parser)
/// sees it.
#[test]
fn fixtures_match_the_safetensors_crate() {
    for name in ["gpt2-tiny-a", "gpt2-tiny-b", "llama-tiny-tied", "llama-tiny-untied"] {
        let path = fixture(name).join("model.safetensors");
        let store = WeightStore::open(std::slice::from_ref(&path)).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let reference = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut names: Vec<String> = reference.names().into_iter().map(str::to_string).collect();
        names.sort();
        assert_eq!(store.names(), names, "{name}");
        for n in &names {
            let view = reference.tensor(n).unwrap();
            assert_eq!(view.dtype(), safetensors::Dtype::F32);
            let expected: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let t = store.read_f32_shaped(n, view.shape()).unwrap();
            assert_eq!(t.data, expected, "{name}: {n}");
            assert_eq!(store.file_of(n), Some(path.as_path()));
        }
    }
}

#[test]
fn gpt2_fixture_names_and_shapes() {
    let files = resolve_model(fixture("gpt2-tiny-a").to_str().unwrap()).unwrap();
    assert!(matches!(files.origin, ModelOrigin::LocalDir { .. }));
    assert_eq!(files.tokenizer, TokenizerFiles::Missing);
    let cfg = Gpt2Config::from_file(&files.config).unwrap();
    assert_eq!((cfg.vocab_size, cfg.n_embd, cfg.n_layer, cfg.n_head), (101, 32, 2, 2));
    assert_eq!((cfg.n_positions, cfg.inner_dim()), (32, 128));
    let store = WeightStore::open(&files.weights).unwrap();
    assert_eq!(store.shape("transformer.wte.weight"), Some(vec![101, 32]));
    assert_eq!(store.shape("transformer.h.0.attn.c_attn.weight"), Some(vec![32, 96]));
    assert_eq!(
        store.find(&["wte.weight", "transformer.wte.weight"]).as_deref(),
        Some("transformer.wte.weight")
    );
    // Tied: no lm_head.
    assert!(!store.contains("lm_head.weight"));
    let wte = store.read_f32_shaped("transformer.wte.weight", &[101, 32]).unwrap();
    assert_eq!(wte.data.len(), 101 * 32);
    let e = store.read_f32_shaped("transformer.wte.weight", &[32, 101]).unwrap_err();
    assert!(e.to_string().contains("transformer.wte.weight"), "{e}");

    let b = Gpt2Config::from_file(&fixture("gpt2-tiny-b").join("config.json")).unwrap();
    assert_eq!((b.vocab_size, b.n_embd, b.n_layer, b.n_head), (256, 48, 3, 4));
    let store = WeightStore::open(&[fixture("gpt2-tiny-b").join("model.safetensors")]).unwrap();
    assert_eq!(store.shape("transformer.wte.weight"), Some(vec![256, 48]));
}

#[test]
fn llama_fixtures_are_not_gpt2() {
    let e = Gpt2Config::from_file(&fixture("llama-tiny-tied").join("config.json")).unwrap_err();
    assert!(e.to_string().contains("model_type"), "{e}");
    let store =
        WeightStore::open(&[fixture("llama-tiny-untied").join("model.safetensors")]).unwrap();
    assert_eq!(store.shape("lm_head.weight"), Some(vec![211, 48]));
    assert_eq!(store.shape("model.layers.0.self_attn.q_proj.bias"), Some(vec![48]));
}

fn gpt2_tokenizer_files() -> TokenizerFiles {
    let dir = repo_root().join("assets/gpt2-tokenizer");
    TokenizerFiles::VocabMerges { vocab: dir.join("vocab.json"), merges: dir.join("merges.txt") }
}

#[test]
fn vendored_gpt2_tokenizer_is_the_pinned_one() {
    let TokenizerFiles::VocabMerges { vocab, merges } = gpt2_tokenizer_files() else {
        unreachable!()
    };
    assert_eq!(
        sha256_file(&vocab).unwrap(),
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
    );
    assert_eq!(
        sha256_file(&merges).unwrap(),
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
    );
}

#[test]
fn vendored_gpt2_tokenizer_encodes_known_ids() {
    let tok = load_tokenizer(&gpt2_tokenizer_files()).unwrap();
    assert_eq!(tok.get_vocab_size(true), 50257);
    let text = "Hello world, the quick brown fox";
    let enc = tok.encode(text, false).unwrap();
    assert_eq!(enc.get_ids(), [15496, 995, 11, 262, 2068, 7586, 21831]);
    assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
    // Offsets are not trimmed: " world" spans its leading space.
    assert_eq!(enc.get_offsets()[1], (5, 11));
    // Adding special tokens changes nothing for GPT-2 (no BOS/EOS template).
    assert_eq!(tok.encode(text, true).unwrap().get_ids(), enc.get_ids());
    // The end-of-text marker is one special token, as in HF's GPT-2 tokenizer.
    let enc = tok.encode("Hello<|endoftext|> world", false).unwrap();
    assert_eq!(enc.get_ids(), [15496, 50256, 995]);
    // Byte-level BPE round-trips any UTF-8, including characters outside the vocabulary.
    let odd = "naïve café — 東京 🚀\n\ttabs";
    let ids = tok.encode(odd, false).unwrap().get_ids().to_vec();
    assert_eq!(tok.decode(&ids, false).unwrap(), odd);
}
