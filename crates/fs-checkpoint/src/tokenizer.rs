//! Tokenizer loading.

use std::path::Path;
use std::str::FromStr;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{
    NormalizerWrapper, Prepend, Replace, Sequence as NormalizerSequence,
};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::sequence::Sequence as ProcessorSequence;
use tokenizers::processors::template::{SpecialToken, TemplateProcessing};
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{CheckpointError, Result};
use crate::gguf::{GgufFile, GgufValue};
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

/// llama.cpp's token types (`tokenizer.ggml.token_type`, `llama_token_type`).
const TOKEN_UNKNOWN: i64 = 2;
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// Which tokenizer a GGUF file's `tokenizer.ggml.model` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufTokenizerKind {
    /// `"gpt2"`: byte-level BPE from `tokenizer.ggml.tokens` and `tokenizer.ggml.merges`
    /// (SmolLM2, Llama 3, Qwen2).
    Bpe,
    /// `"llama"`: SentencePiece from `tokenizer.ggml.tokens`, `.scores` and `.token_type`
    /// (Llama 1/2, Mistral v0.1, Gemma).
    Spm,
}

/// A tokenizer rebuilt from a GGUF file's metadata ([`tokenizer_from_gguf`]), with what the
/// metadata says about BOS and EOS.
///
/// `tokenizer.encode(text, true)` gives the ids of llama.cpp's `llama_tokenize(text,
/// add_special = true, parse_special = true)`: BOS first when [`add_bos`](Self::add_bos), EOS
/// last when [`add_eos`](Self::add_eos) (a `TemplateProcessing` post-processor holds them);
/// `tokenizer.encode(text, false)` gives the text's ids alone. Gemma needs its BOS (2): a
/// prompt without it is out of distribution.
#[derive(Clone, Debug)]
pub struct GgufTokenizer {
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// BPE or SentencePiece.
    pub kind: GgufTokenizerKind,
    /// `tokenizer.ggml.bos_token_id` (SentencePiece without the key: 1, as llama.cpp).
    pub bos_token_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id` (SentencePiece without the key: 2, as llama.cpp).
    pub eos_token_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token` (absent: true for SentencePiece, false for BPE, as
    /// llama.cpp): prepend BOS to a text.
    pub add_bos: bool,
    /// `tokenizer.ggml.add_eos_token` (absent: false): append EOS to a text.
    pub add_eos: bool,
}

/// The tokenizer in a GGUF file's metadata, whichever kind `tokenizer.ggml.model` names:
/// `"gpt2"` → [`tokenizer_from_gguf_bpe`], `"llama"` → [`tokenizer_from_gguf_spm`] (with
/// `tokenizer.ggml.add_space_prefix`, absent: true, as llama.cpp). Any other kind is refused
/// with a one-line [`CheckpointError::Unsupported`]; a file without tokenizer metadata, or with
/// arrays of the wrong type or length, or special token ids out of range, with a one-line
/// [`CheckpointError::Gguf`].
pub fn tokenizer_from_gguf(file: &GgufFile) -> Result<GgufTokenizer> {
    let path = file.path();
    let kind = match file.get("tokenizer.ggml.model").and_then(GgufValue::as_str) {
        Some("gpt2") => GgufTokenizerKind::Bpe,
        Some("llama") => GgufTokenizerKind::Spm,
        Some(other) => {
            return Err(CheckpointError::Unsupported {
                what: format!("GGUF tokenizer model {other:?} in {}", path.display()),
                supported: "\"gpt2\" (byte-level BPE) and \"llama\" (SentencePiece); pass token ids instead of text".into(),
            })
        }
        None => {
            return Err(CheckpointError::gguf(
                path,
                "has no tokenizer (no string tokenizer.ggml.model): pass token ids instead of text",
            ))
        }
    };
    let tokens = gguf_strings(file, "tokenizer.ggml.tokens")?;
    let n = tokens.len();
    let array = |key: &str| -> Result<Option<&[GgufValue]>> {
        match file.get(key) {
            None => Ok(None),
            Some(v) => match v.as_array() {
                Some(a) if a.len() == n => Ok(Some(a)),
                Some(a) => Err(CheckpointError::gguf(
                    path,
                    format!(
                        "{key} has {} entries for {n} tokens: the tokenizer metadata is corrupt",
                        a.len()
                    ),
                )),
                None => Err(CheckpointError::gguf(path, format!("{key} is not an array"))),
            },
        }
    };
    let types = match array("tokenizer.ggml.token_type")? {
        Some(a) => a
            .iter()
            .map(|v| {
                v.as_i64().ok_or_else(|| {
                    CheckpointError::gguf(
                        path,
                        "tokenizer.ggml.token_type: an entry is not an integer",
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?,
        None => vec![1; n],
    };
    let id = |key: &str, default: Option<u32>| -> Result<Option<u32>> {
        let Some(v) = file.get(key) else { return Ok(default.filter(|&d| (d as usize) < n)) };
        match v.as_u64() {
            Some(i) if (i as usize) < n => Ok(Some(i as u32)),
            _ => Err(CheckpointError::gguf(
                path,
                format!("{key} is {v:?}, not a token id below the vocabulary size {n}"),
            )),
        }
    };
    let flag = |key: &str, default: bool| match file.get(key) {
        Some(GgufValue::Bool(b)) => *b,
        Some(v) => v.as_u64().map_or(default, |x| x != 0),
        None => default,
    };
    let spm = kind == GgufTokenizerKind::Spm;
    // llama.cpp's defaults for a missing key: SentencePiece BOS 1, EOS 2, adds BOS.
    let bos_token_id = id("tokenizer.ggml.bos_token_id", spm.then_some(1))?;
    let eos_token_id = id("tokenizer.ggml.eos_token_id", spm.then_some(2))?;
    let add_bos = flag("tokenizer.ggml.add_bos_token", spm);
    let add_eos = flag("tokenizer.ggml.add_eos_token", false);
    for (add, tok, what) in [(add_bos, bos_token_id, "bos"), (add_eos, eos_token_id, "eos")] {
        if add && tok.is_none() {
            return Err(CheckpointError::gguf(
                path,
                format!("says add_{what}_token but has no tokenizer.ggml.{what}_token_id"),
            ));
        }
    }
    let mut tokenizer = match kind {
        GgufTokenizerKind::Bpe => {
            let merges = gguf_strings(file, "tokenizer.ggml.merges")?;
            tokenizer_from_gguf_bpe(&tokens, &merges, &types, path)?
        }
        GgufTokenizerKind::Spm => {
            let scores = match array("tokenizer.ggml.scores")? {
                Some(a) => a
                    .iter()
                    .map(|v| {
                        v.as_f64().map(|x| x as f32).ok_or_else(|| {
                            CheckpointError::gguf(
                                path,
                                "tokenizer.ggml.scores: an entry is not a float",
                            )
                        })
                    })
                    .collect::<Result<Vec<_>>>()?,
                None => vec![0.0; n],
            };
            let add_space_prefix = flag("tokenizer.ggml.add_space_prefix", true);
            tokenizer_from_gguf_spm(&tokens, &scores, &types, add_space_prefix, path)?
        }
    };
    let bos = bos_token_id.filter(|_| add_bos).map(|i| (i, tokens[i as usize].clone()));
    let eos = eos_token_id.filter(|_| add_eos).map(|i| (i, tokens[i as usize].clone()));
    if let Some(template) =
        special_tokens_template(bos, eos).map_err(|e| tokenizer_error(path, &*e))?
    {
        let template = PostProcessorWrapper::Template(template);
        match kind {
            GgufTokenizerKind::Bpe => {
                tokenizer.with_post_processor(Some(ProcessorSequence::new(vec![
                    PostProcessorWrapper::ByteLevel(
                        ByteLevel::default().add_prefix_space(false).trim_offsets(false),
                    ),
                    template,
                ])))
            }
            GgufTokenizerKind::Spm => tokenizer.with_post_processor(Some(template)),
        };
    }
    Ok(GgufTokenizer { tokenizer, kind, bos_token_id, eos_token_id, add_bos, add_eos })
}

/// A string array of the metadata (required).
fn gguf_strings(file: &GgufFile, key: &str) -> Result<Vec<String>> {
    let path = file.path();
    let arr = file
        .get(key)
        .and_then(GgufValue::as_array)
        .ok_or_else(|| CheckpointError::gguf(path, format!("lacks the array {key}")))?;
    arr.iter()
        .map(|v| {
            v.as_str().map(str::to_string).ok_or_else(|| {
                CheckpointError::gguf(path, format!("{key}: an element is not a string"))
            })
        })
        .collect()
}

/// `BOS $A EOS` (each part when given) as a post-processor; `None` when neither is added.
fn special_tokens_template(
    bos: Option<(u32, String)>,
    eos: Option<(u32, String)>,
) -> tokenizers::Result<Option<TemplateProcessing>> {
    if bos.is_none() && eos.is_none() {
        return Ok(None);
    }
    // The template names the tokens by placeholders, so that a token text with a space or a
    // colon cannot confuse the template syntax.
    let mut special = Vec::new();
    let (mut single, mut pair) = (Vec::new(), Vec::new());
    if let Some((id, text)) = bos {
        special.push(SpecialToken::new("BOS".into(), vec![id], vec![text])?);
        single.push("BOS");
        pair.push("BOS");
    }
    single.push("$A");
    pair.push("$A");
    if let Some((id, text)) = eos {
        special.push(SpecialToken::new("EOS".into(), vec![id], vec![text])?);
        single.push("EOS");
        pair.push("EOS");
    }
    let second: Vec<String> = pair.iter().map(|p| format!("{}:1", p.replace("$A", "$B"))).collect();
    let pair: Vec<String> = pair.iter().map(|p| p.to_string()).chain(second).collect();
    let template = TemplateProcessing::builder()
        .try_single(single)?
        .try_pair(pair)?
        .special_tokens(special)
        .build()?;
    Ok(Some(template))
}

/// Rebuild a SentencePiece tokenizer from GGUF tokenizer metadata
/// (`tokenizer.ggml.model = "llama"`) so that it gives the ids of llama.cpp's
/// `llm_tokenizer_spm` with `parse_special = true`: `tokens` in id order, their `scores`,
/// `token_types` (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte) and
/// `add_space_prefix` (`tokenizer.ggml.add_space_prefix`). `source` names the file in messages.
///
/// llama.cpp first splits control, unknown and user-defined tokens out of the raw text (longest
/// first), then in each remaining fragment (a space prepended when `add_space_prefix` and the
/// fragment starts the text or follows such a token) replaces ' ' by '▁', starts from its
/// characters and repeatedly merges the adjacent pair whose concatenation is a token with the
/// highest score (ties: the leftmost), and finally spells a symbol that is no token as
/// `<0xXX>` byte tokens. Here that is a `tokenizers` BPE: one merge `(a, b)` for every token
/// `a + b` and split point with both halves tokens, ranked by the score of `a + b` (highest
/// first; ties by id, then split), byte fallback on; the normalizer (`Prepend("▁")` when
/// `add_space_prefix`, `Replace(" ", "▁")`) runs on each fragment between added tokens; control
/// and unknown tokens are special added tokens, user-defined tokens non-special ones, all
/// matched in the raw text (leftmost-longest, which for Gemma's overlapping user-defined runs of
/// one character picks what llama.cpp's longest-first does). The decoder maps '▁' to ' ', byte
/// tokens to bytes and, with `add_space_prefix`, drops the first leading space.
///
/// Where the two can differ: the BPE's rank order differs from llama.cpp's queue only when two
/// merges of equal score are pending at once and which goes first changes a later merge; and a
/// character that is no token is spelled in bytes at once, where llama.cpp could still merge it
/// into a longer token (SentencePiece-trained vocabularies hold every character of their
/// pieces). `crates/fs-checkpoint/tests/gguf_tokenizers.rs` checks Gemma-3-270M against
/// llama.cpp's ids for a few hundred varied lines and against a direct port of
/// `llm_tokenizer_spm` on a large random text (4,000 lines, 270 k characters): identical.
pub fn tokenizer_from_gguf_spm(
    tokens: &[String],
    scores: &[f32],
    token_types: &[i64],
    add_space_prefix: bool,
    source: &Path,
) -> Result<Tokenizer> {
    let bad = |message: String| CheckpointError::Tokenizer { path: source.to_path_buf(), message };
    if scores.len() != tokens.len() || token_types.len() != tokens.len() {
        return Err(bad(format!(
            "{} tokens but {} scores and {} token types",
            tokens.len(),
            scores.len(),
            token_types.len()
        )));
    }
    // llama.cpp's text → id map: an empty token is renamed, a repeated text keeps its last id.
    let texts: Vec<String> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| if t.is_empty() { format!("[EMPTY_{i}]") } else { t.clone() })
        .collect();
    let vocab: tokenizers::models::bpe::Vocab =
        texts.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let merges = spm_merges(&vocab, &texts, scores);
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .build()
        .map_err(|e| tokenizer_error(source, &*e))?;
    let mut tok = Tokenizer::new(bpe);
    let escape = NormalizerWrapper::Replace(
        Replace::new(" ", "\u{2581}").map_err(|e| tokenizer_error(source, &*e))?,
    );
    let normalizer = if add_space_prefix {
        NormalizerWrapper::Sequence(NormalizerSequence::new(vec![
            NormalizerWrapper::Prepend(Prepend::new("\u{2581}".into())),
            escape,
        ]))
    } else {
        escape
    };
    tok.with_normalizer(Some(normalizer)).map_err(|e| tokenizer_error(source, &*e))?;
    let mut decoders = vec![
        DecoderWrapper::Replace(
            Replace::new("\u{2581}", " ").map_err(|e| tokenizer_error(source, &*e))?,
        ),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ];
    if add_space_prefix {
        decoders.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
    }
    tok.with_decoder(Some(DecoderSequence::new(decoders)));
    let (mut special, mut user) = (Vec::new(), Vec::new());
    for (text, &kind) in texts.iter().zip(token_types) {
        match kind {
            TOKEN_CONTROL | TOKEN_UNKNOWN => special.push(AddedToken::from(text.clone(), true)),
            TOKEN_USER_DEFINED => {
                user.push(AddedToken::from(text.clone(), false).normalized(false))
            }
            _ => {}
        }
    }
    if !user.is_empty() {
        tok.add_tokens(user).map_err(|e| tokenizer_error(source, &*e))?;
    }
    if !special.is_empty() {
        tok.add_special_tokens(special).map_err(|e| tokenizer_error(source, &*e))?;
    }
    Ok(tok)
}

/// The BPE merges equivalent to SentencePiece's score order: `(a, b)` for every vocabulary
/// token `a + b` split at a character boundary into two vocabulary tokens, highest score of
/// `a + b` first (NaN last, −0 = +0 as llama.cpp's comparison has it), then by the id of
/// `a + b`, then by the split.
fn spm_merges(
    vocab: &tokenizers::models::bpe::Vocab,
    texts: &[String],
    scores: &[f32],
) -> Vec<(String, String)> {
    let key = |s: f32| if s.is_nan() { f32::NEG_INFINITY } else { s + 0.0 };
    let mut found: Vec<(f32, u32, usize)> = Vec::new();
    for (text, &id) in vocab {
        for (k, _) in text.char_indices().skip(1) {
            if vocab.contains_key(&text[..k]) && vocab.contains_key(&text[k..]) {
                found.push((key(scores[id as usize]), id, k));
            }
        }
    }
    found.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    found
        .into_iter()
        .map(|(_, id, k)| {
            let (a, b) = texts[id as usize].split_at(k);
            (a.to_string(), b.to_string())
        })
        .collect()
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
