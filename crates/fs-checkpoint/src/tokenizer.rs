//! Tokenizer loading.

use std::path::Path;
use std::str::FromStr;

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
            let text = std::fs::read_to_string(path).map_err(|e| {
                if e.kind() == std::io::ErrorKind::InvalidData {
                    CheckpointError::Tokenizer {
                        path: path.clone(),
                        message: "the file is not UTF-8 text (corrupt or not a tokenizer.json)".into(),
                    }
                } else {
                    CheckpointError::io(path, e)
                }
            })?;
            // tokenizers panics (`expect("Helper")` in its decoder deserializer) on some
            // malformed JSON instead of returning an error: check the syntax first.
            let value = serde_json::from_str::<serde_json::Value>(&text).map_err(|e| {
                CheckpointError::Tokenizer {
                    path: path.clone(),
                    message: format!("not valid JSON ({e})"),
                }
            })?;
            check_json_bpe(&value).map_err(|message| CheckpointError::Tokenizer {
                path: path.clone(),
                message,
            })?;
            Tokenizer::from_str(&text).map_err(|e| tokenizer_error(path, &*e))
        }
        TokenizerFiles::VocabMerges { vocab, merges } => {
            require(vocab)?;
            require(merges)?;
            let fail = |e: &dyn std::fmt::Display| CheckpointError::Tokenizer {
                path: vocab.clone(),
                message: format!(
                    "building byte-level BPE from it and {} failed: {e}",
                    merges.display()
                ),
            };
            // Read the files here (as `BPE::read_file` does) so that the merges are checked
            // before the builder, which panics on some merges (see `check_bpe_merges`).
            let (vocab_map, merge_list) = read_vocab_merges(vocab, merges)?;
            check_bpe_merges(&vocab_map, &merge_list, None).map_err(|e| fail(&e))?;
            let bpe = BPE::builder()
                .vocab_and_merges(vocab_map, merge_list)
                .build()
                .map_err(|e| fail(&e))?;
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
    check_bpe_merges(&vocab, &merges, None)
        .map_err(|message| CheckpointError::Tokenizer { path: source.to_path_buf(), message })?;
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

/// Check BPE merges before `tokenizers`' builder sees them: it copies `a` and `b` (less the
/// continuing-subword prefix) into a buffer as long as the longest vocabulary entry before it
/// looks the merged token up, so a merge whose result is longer than every token panics (and a
/// `b` shorter than the prefix underflows). Each merge must name two vocabulary tokens, `b` must
/// start with the prefix, and the merged token must be in the vocabulary.
fn check_bpe_merges(
    vocab: &tokenizers::models::bpe::Vocab,
    merges: &[(String, String)],
    prefix: Option<&str>,
) -> std::result::Result<(), String> {
    for (i, (a, b)) in merges.iter().enumerate() {
        for t in [a, b] {
            if !vocab.contains_key(t) {
                return Err(format!(
                    "merge {i} ({a:?} {b:?}) names {t:?}, which is not in the vocabulary"
                ));
            }
        }
        let rest = b.strip_prefix(prefix.unwrap_or("")).ok_or_else(|| {
            format!("merge {i} ({a:?} {b:?}): {b:?} lacks the continuing-subword prefix {prefix:?}")
        })?;
        let merged = format!("{a}{rest}");
        if !vocab.contains_key(&merged) {
            return Err(format!(
                "merge {i} ({a:?} {b:?}) makes {merged:?}, which is not in the vocabulary"
            ));
        }
    }
    Ok(())
}

/// [`check_bpe_merges`] on the model of a parsed `tokenizer.json`, when it has a vocabulary
/// object and a merges list in a form `tokenizers` reads (anything else it rejects itself).
fn check_json_bpe(value: &serde_json::Value) -> std::result::Result<(), String> {
    let Some(model) = value.get("model").and_then(serde_json::Value::as_object) else {
        return Ok(());
    };
    let (Some(vocab), Some(merges)) = (
        model.get("vocab").and_then(serde_json::Value::as_object),
        model.get("merges").and_then(serde_json::Value::as_array),
    ) else {
        return Ok(());
    };
    let Some(vocab) = vocab
        .iter()
        .map(|(k, v)| Some((k.clone(), u32::try_from(v.as_u64()?).ok()?)))
        .collect::<Option<tokenizers::models::bpe::Vocab>>()
    else {
        return Ok(());
    };
    let Some(merges) = merges
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => match s.split(' ').collect::<Vec<_>>()[..] {
                [a, b] => Some((a.to_string(), b.to_string())),
                _ => None,
            },
            serde_json::Value::Array(p) => match &p[..] {
                [serde_json::Value::String(a), serde_json::Value::String(b)] => {
                    Some((a.clone(), b.clone()))
                }
                _ => None,
            },
            _ => None,
        })
        .collect::<Option<Vec<_>>>()
    else {
        return Ok(());
    };
    let prefix = model.get("continuing_subword_prefix").and_then(serde_json::Value::as_str);
    check_bpe_merges(&vocab, &merges, prefix)
}

/// `vocab.json` and `merges.txt` read as `BPE::read_file` reads them: token → id (non-numeric
/// entries skipped), and one `a b` merge per line after `#version` lines.
fn read_vocab_merges(
    vocab: &Path,
    merges: &Path,
) -> Result<(tokenizers::models::bpe::Vocab, Vec<(String, String)>)> {
    let bad = |path: &Path, message: String| CheckpointError::Tokenizer {
        path: path.to_path_buf(),
        message,
    };
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::InvalidData {
                bad(path, "the file is not UTF-8 text".into())
            } else {
                CheckpointError::io(path, e)
            }
        })
    };
    let json: serde_json::Value = serde_json::from_str(&read(vocab)?)
        .map_err(|e| bad(vocab, format!("not valid JSON ({e})")))?;
    let obj =
        json.as_object().ok_or_else(|| bad(vocab, "not a JSON object of token → id".into()))?;
    let mut map = tokenizers::models::bpe::Vocab::default();
    for (token, id) in obj {
        if let serde_json::Value::Number(n) = id {
            let id = n.as_u64().and_then(|x| u32::try_from(x).ok()).ok_or_else(|| {
                bad(vocab, format!("token {token:?} has id {n}, not a 32-bit id"))
            })?;
            map.insert(token.clone(), id);
        }
    }
    let text = read(merges)?;
    let mut list = Vec::new();
    for (i, line) in text.lines().filter(|l| !l.starts_with("#version")).enumerate() {
        match line.split(' ').collect::<Vec<_>>()[..] {
            [a, b] => list.push((a.to_string(), b.to_string())),
            _ => {
                return Err(bad(
                    merges,
                    format!("merge {} ({line:?}) is not two tokens separated by a space", i + 1),
                ))
            }
        }
    }
    Ok((map, list))
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
