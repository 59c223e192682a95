//! Tokenizer loading.

use std::path::Path;

use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{CheckpointError, Result};
use crate::resolve::TokenizerFiles;

/// GPT-2's end-of-text token, registered as special when a `vocab.json` holds it.
const GPT2_EOT: &str = "<|endoftext|>";

/// Load a tokenizer: `tokenizer.json` via [`Tokenizer::from_file`]; `vocab.json` +
/// `merges.txt` as GPT-2 byte-level BPE (BPE model from the files, ByteLevel pre-tokenizer
/// with `add_prefix_space = false`, ByteLevel decoder, ByteLevel post-processor with
/// `trim_offsets = false`; `<|endoftext|>` becomes a special token when the vocabulary has it,
/// as in HF's GPT-2 tokenizer). [`TokenizerFiles::Missing`] or an absent file →
/// [`CheckpointError::NotFound`] naming the expected files.
pub fn load_tokenizer(files: &TokenizerFiles) -> Result<Tokenizer> {
    match files {
        TokenizerFiles::Json(path) => {
            require(path)?;
            Tokenizer::from_file(path).map_err(|e| tokenizer_error(path, &*e))
        }
        TokenizerFiles::VocabMerges { vocab, merges } => {
            require(vocab)?;
            require(merges)?;
            let bpe = BPE::from_file(utf8(vocab)?, utf8(merges)?).build().map_err(|e| {
                CheckpointError::Tokenizer {
                    path: vocab.clone(),
                    message: format!(
                        "building byte-level BPE from it and {} failed: {e}",
                        merges.display()
                    ),
                }
            })?;
            let has_eot = bpe.get_vocab().contains_key(GPT2_EOT);
            let mut tok = Tokenizer::new(bpe);
            tok.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
            tok.with_decoder(Some(ByteLevel::default()));
            tok.with_post_processor(Some(
                ByteLevel::default().add_prefix_space(false).trim_offsets(false),
            ));
            if has_eot {
                tok.add_special_tokens([AddedToken::from(GPT2_EOT, true)])
                    .map_err(|e| tokenizer_error(vocab, &*e))?;
            }
            Ok(tok)
        }
        TokenizerFiles::Missing => Err(CheckpointError::NotFound {
            what: "a tokenizer (tokenizer.json, or vocab.json + merges.txt)".into(),
            path: Default::default(),
            fix: "put tokenizer.json, or vocab.json and merges.txt, next to config.json, or pass token ids instead of text".into(),
        }),
    }
}

/// Rebuild a byte-level BPE tokenizer from GGUF tokenizer metadata
/// (`tokenizer.ggml.model = "gpt2"`): `tokens` in id order, `merges` as `"a b"` pairs, and
/// `token_types` (3 = control tokens, made special so they are never split). Pre-tokenizer and
/// decoder are GPT-2's byte-level ones (no prefix space). `source` names the file in messages.
pub fn tokenizer_from_gguf_bpe(
    tokens: &[String],
    merges: &[String],
    token_types: &[i64],
    source: &Path,
) -> Result<Tokenizer> {
    let vocab: tokenizers::models::bpe::Vocab =
        tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let merges = merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())).ok_or_else(|| {
                CheckpointError::Tokenizer {
                    path: source.to_path_buf(),
                    message: format!("merge {i} ({m:?}) is not two tokens separated by a space"),
                }
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| tokenizer_error(source, &*e))?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
    tok.with_decoder(Some(ByteLevel::default()));
    tok.with_post_processor(Some(ByteLevel::default().add_prefix_space(false).trim_offsets(false)));
    let special: Vec<AddedToken> = tokens
        .iter()
        .zip(token_types)
        .filter(|(_, &t)| t == 3)
        .map(|(s, _)| AddedToken::from(s.clone(), true))
        .collect();
    if !special.is_empty() {
        tok.add_special_tokens(special).map_err(|e| tokenizer_error(source, &*e))?;
    }
    Ok(tok)
}

fn require(path: &Path) -> Result<()> {
    if path.is_file() {
        Ok(())
    } else {
        Err(CheckpointError::NotFound {
            what: "tokenizer file".into(),
            path: path.to_path_buf(),
            fix: "put tokenizer.json, or vocab.json and merges.txt, next to config.json".into(),
        })
    }
}

fn utf8(path: &Path) -> Result<&str> {
    path.to_str().ok_or_else(|| CheckpointError::Tokenizer {
        path: path.to_path_buf(),
        message: "the path is not valid UTF-8, which the tokenizers library needs (rename or move the file)".into(),
    })
}

fn tokenizer_error(path: &Path, e: &(dyn std::error::Error + Send + Sync)) -> CheckpointError {
    CheckpointError::Tokenizer { path: path.to_path_buf(), message: e.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn missing_files() {
        let e = load_tokenizer(&TokenizerFiles::Missing).unwrap_err();
        let m = e.to_string();
        assert!(matches!(e, CheckpointError::NotFound { .. }), "{m}");
        assert!(
            m.contains("tokenizer.json") && m.contains("vocab.json") && m.contains("merges.txt")
        );
        let e = load_tokenizer(&TokenizerFiles::Json("/no/tokenizer.json".into())).unwrap_err();
        assert!(e.to_string().contains("/no/tokenizer.json"), "{e}");
        let t = tempfile::tempdir().unwrap();
        let vocab = t.path().join("vocab.json");
        fs::write(&vocab, "{}").unwrap();
        let e = load_tokenizer(&TokenizerFiles::VocabMerges {
            vocab,
            merges: t.path().join("merges.txt"),
        })
        .unwrap_err();
        assert!(matches!(e, CheckpointError::NotFound { .. }));
        assert!(e.to_string().contains("merges.txt"), "{e}");
    }

    #[test]
    fn corrupt_files() {
        let t = tempfile::tempdir().unwrap();
        let json = t.path().join("tokenizer.json");
        fs::write(&json, "{\"model\": 3").unwrap();
        let e = load_tokenizer(&TokenizerFiles::Json(json)).unwrap_err();
        let m = e.to_string();
        assert!(matches!(e, CheckpointError::Tokenizer { .. }) && !m.contains('\n'), "{m}");
        assert!(m.contains("tokenizer.json"), "{m}");

        let vocab = t.path().join("vocab.json");
        let merges = t.path().join("merges.txt");
        fs::write(&vocab, r#"{"a": 0, "b": 1, "ab": 2}"#).unwrap();
        fs::write(&merges, "#version: 0.2\na b c\n").unwrap();
        let e = load_tokenizer(&TokenizerFiles::VocabMerges { vocab, merges }).unwrap_err();
        let m = e.to_string();
        assert!(matches!(e, CheckpointError::Tokenizer { .. }) && !m.contains('\n'), "{m}");
        assert!(m.contains("merges.txt"), "{m}");
    }

    #[test]
    fn tiny_byte_level_bpe() {
        // "Ġ" is the byte-level image of a space.
        let t = tempfile::tempdir().unwrap();
        let vocab = t.path().join("vocab.json");
        let merges = t.path().join("merges.txt");
        fs::write(&vocab, r#"{"a": 0, "b": 1, "Ġ": 2, "ab": 3, "Ġab": 4, "<|endoftext|>": 5}"#)
            .unwrap();
        fs::write(&merges, "#version: 0.2\na b\nĠ ab\n").unwrap();
        let tok = load_tokenizer(&TokenizerFiles::VocabMerges { vocab, merges }).unwrap();
        let enc = tok.encode("ab ab<|endoftext|>", false).unwrap();
        assert_eq!(enc.get_ids(), [3, 4, 5]);
        assert_eq!(tok.decode(&[3, 4], false).unwrap(), "ab ab");
    }
}
