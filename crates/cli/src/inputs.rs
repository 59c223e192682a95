//! Input documents: `--text`, `--tokens`, or `--input FILE` (plain text, one document per line,
//! or JSONL with a `text` field), tokenised and checked before any computation.

use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;

/// One input sequence.
#[derive(Clone, Debug)]
pub struct Document {
    /// Index of the document in the input (0 for --text / --tokens).
    pub index: usize,
    /// Token ids (after truncation).
    pub tokens: Vec<u32>,
    /// The text it came from, if any.
    pub text: Option<String>,
    /// How many tokens `--max-seq-len` cut off.
    pub truncated: usize,
}

/// The token ids of `text` as `compute --text` makes them: special tokens as the tokenizer's own
/// configuration adds them (`add_special_tokens`, transformers' default: BOS for Gemma and
/// Llama 3, nothing for GPT-2 or SmolLM2). `what` names the text in messages; no tokens is an
/// error.
pub fn token_ids(
    tok: &fs_checkpoint::tokenizers::Tokenizer,
    text: &str,
    what: &str,
) -> Result<Vec<u32>> {
    let ids = tok
        .encode(text, true)
        .map_err(|e| anyhow!("tokenizing {what} failed: {e}"))?
        .get_ids()
        .to_vec();
    if ids.is_empty() {
        bail!("{what} has no tokens after tokenization: give non-empty text");
    }
    Ok(ids)
}

/// Read the documents of `--input FILE`: JSONL (extension `.jsonl`/`.json`, or first non-empty
/// line starting with `{`) with a string `text` field per line, else one document per non-empty
/// line of plain text.
pub fn read_input_file(path: &Path) -> Result<Vec<String>> {
    let content = std::fs::read_to_string(path).map_err(|e| {
        anyhow!(
            "cannot read --input {} ({e}): check the path (UTF-8 text or JSONL)",
            path.display()
        )
    })?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let first = content.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let jsonl = ext == "jsonl" || ext == "json" || first.trim_start().starts_with('{');
    let mut docs = Vec::new();
    for (i, line) in content.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if jsonl {
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("line {} of {} is not valid JSON: fix the line or use plain text, one document per line", i + 1, path.display()))?;
            match v.get("text").and_then(|t| t.as_str()) {
                Some(t) if !t.is_empty() => docs.push(t.to_string()),
                Some(_) => bail!("line {} of {} has an empty \"text\" field: remove the line or fill it", i + 1, path.display()),
                None => bail!(
                    "line {} of {} has no string \"text\" field: every JSONL line needs {{\"text\": \"...\"}}",
                    i + 1,
                    path.display()
                ),
            }
        } else {
            docs.push(line.to_string());
        }
    }
    if docs.is_empty() {
        bail!(
            "--input {} holds no documents: put one text per line (or JSONL with a \"text\" field)",
            path.display()
        );
    }
    Ok(docs)
}

/// Apply `--max-seq-len`: cut every document to at most `max` tokens.
pub fn truncate(docs: &mut [Document], max: Option<usize>) {
    if let Some(max) = max {
        for d in docs.iter_mut() {
            if d.tokens.len() > max {
                d.truncated = d.tokens.len() - max;
                d.tokens.truncate(max);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("a.txt");
        std::fs::write(&plain, "first doc\n\nsecond doc\n").unwrap();
        assert_eq!(read_input_file(&plain).unwrap(), vec!["first doc", "second doc"]);
        let jl = dir.path().join("b.jsonl");
        std::fs::write(&jl, "{\"text\": \"one\"}\n{\"text\": \"two\", \"id\": 3}\n").unwrap();
        assert_eq!(read_input_file(&jl).unwrap(), vec!["one", "two"]);
        std::fs::write(&jl, "{\"text\": \"one\"}\n{\"body\": \"two\"}\n").unwrap();
        let e = read_input_file(&jl).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("\"text\""), "{e}");
        std::fs::write(&plain, "\n\n").unwrap();
        assert!(read_input_file(&plain).is_err());
    }

    #[test]
    fn truncation_counts() {
        let mut d = vec![Document { index: 0, tokens: vec![1, 2, 3, 4], text: None, truncated: 0 }];
        truncate(&mut d, Some(3));
        assert_eq!((d[0].tokens.len(), d[0].truncated), (3, 1));
    }
}
