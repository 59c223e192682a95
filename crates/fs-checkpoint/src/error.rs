//! The error type of checkpoint loading.

use fs_traits::engine::one_line;
use std::path::{Path, PathBuf};

/// `Result` with [`CheckpointError`].
pub type Result<T, E = CheckpointError> = std::result::Result<T, E>;

/// Everything that can go wrong while finding and reading a model. Every message is one line,
/// names the file, tensor or value at fault and says how to fix it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// A path that does not exist, or a directory that lacks a required file.
    #[error("{what} not found{}: {fix}", at(path))]
    NotFound {
        /// What was looked for (e.g. "config.json", "model weights").
        what: String,
        /// Where it was looked for (empty when there is no single place).
        path: PathBuf,
        /// How to fix it.
        fix: String,
    },
    /// A hub id that is neither a local directory nor in the Hugging Face cache.
    #[error(
        "`{repo_id}` (revision `{revision}`) is neither a local directory nor in the Hugging Face \
         cache at {}: fetch it with `{}` (or `{}`), or set HF_HUB_CACHE / HF_HOME to the cache \
         that holds it",
        cache_dir.display(),
        cli_fetch_command(repo_id, revision),
        python_fetch_command(repo_id, revision)
    )]
    NotInCache {
        /// The hub id, `org/name`.
        repo_id: String,
        /// The revision asked for (`main` unless given as `id@revision`).
        revision: String,
        /// The cache directory that was searched.
        cache_dir: PathBuf,
    },
    /// A hub model that could not be downloaded: the hub has no such model or revision, refuses
    /// access (gated or private), cannot be reached, the transfer broke off, or the repository
    /// holds no weights that can be read. The message names the cause and the fix.
    #[error("{}", one_line(message))]
    Download {
        /// The hub id, `org/name`.
        repo_id: String,
        /// What went wrong and how to fix it.
        message: String,
    },
    /// A downloaded file whose content does not hash to what the hub announced (its ETag); it
    /// has been removed from the cache.
    #[error(
        "{file} of `{repo_id}` arrived corrupt: its {algorithm} is {actual}, the hub announced \
         {expected}; the copy was removed from the cache: re-run to download it again (if this \
         recurs, something between you and the hub — a proxy, or the mirror HF_ENDPOINT names \
         — alters the file)"
    )]
    HashMismatch {
        /// The hub id, `org/name`.
        repo_id: String,
        /// The file within the repository.
        file: String,
        /// `sha256` (LFS files) or `git blob sha1`.
        algorithm: &'static str,
        /// The hash the hub announced.
        expected: String,
        /// The hash of what arrived.
        actual: String,
    },
    /// An I/O failure on a file that exists.
    #[error("cannot read {}: {}: check that the file is readable and complete", path.display(), one_line(&source.to_string()))]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A JSON file (config.json, model.safetensors.index.json) that does not parse or has the
    /// wrong structure.
    #[error("{} is not valid: {}: re-download or re-export the file", path.display(), one_line(message))]
    Json {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A config.json field that is missing or out of range.
    #[error("{}: field `{field}` {}", path.display(), one_line(message))]
    Config {
        /// The config file.
        path: PathBuf,
        /// The field at fault.
        field: String,
        /// What is wrong and what is expected.
        message: String,
    },
    /// A malformed safetensors file (corrupt header, offsets beyond the file, size mismatch) or
    /// a tensor whose dtype cannot be read.
    #[error("safetensors file {}: {}", path.display(), one_line(message))]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong, and the fix.
        message: String,
    },
    /// A GGUF file that cannot be used (corrupt header, tensor outside the file, metadata the
    /// architecture needs missing or inconsistent).
    #[error("GGUF file {}: {}", path.display(), one_line(message))]
    Gguf {
        /// The file.
        path: PathBuf,
        /// What is wrong, and the fix.
        message: String,
    },
    /// A NaN or infinity in a weight (or another array that must be finite).
    #[error("{what} holds {value} at flat index {index}: the weights are corrupt or overflowed, re-export them")]
    NonFinite {
        /// Which array (`weight NAME`).
        what: String,
        /// First bad index.
        index: usize,
        /// The value (NaN or ±inf).
        value: f64,
    },
    /// A tensor the model needs that no weight file holds.
    #[error("tensor `{name}` is not in {files}: the weights do not match the architecture in config.json (use the config.json that came with them)")]
    MissingTensor {
        /// The tensor name.
        name: String,
        /// The files searched, comma-separated.
        files: String,
    },
    /// A tensor whose shape differs from the one config.json implies.
    #[error("tensor `{name}` in {} has shape {got:?}, expected {expected:?}: config.json does not match the weights (use the config.json that came with them)", path.display())]
    ShapeMismatch {
        /// The tensor name.
        name: String,
        /// The shape config.json implies.
        expected: Vec<usize>,
        /// The shape in the file.
        got: Vec<usize>,
        /// The file that holds the tensor.
        path: PathBuf,
    },
    /// A tokenizer file that cannot be loaded.
    #[error("cannot load tokenizer {}: {}: re-download it, or pass a directory with a valid tokenizer.json or vocab.json + merges.txt", path.display(), one_line(message))]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// The tokenizer library's message.
        message: String,
    },
    /// Something valid but not supported (yet).
    #[error("{what} is not supported: supported are {supported}")]
    Unsupported {
        /// What was asked for, naming the file or value.
        what: String,
        /// What is supported instead.
        supported: String,
    },
}

impl CheckpointError {
    /// Shorthand for [`CheckpointError::Io`].
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        CheckpointError::Io { path: path.to_path_buf(), source }
    }

    /// Shorthand for [`CheckpointError::Safetensors`].
    pub(crate) fn safetensors(path: &Path, message: impl Into<String>) -> Self {
        CheckpointError::Safetensors { path: path.to_path_buf(), message: message.into() }
    }

    /// Shorthand for [`CheckpointError::Gguf`].
    pub(crate) fn gguf(path: &Path, message: impl Into<String>) -> Self {
        CheckpointError::Gguf { path: path.to_path_buf(), message: message.into() }
    }

    /// Shorthand for [`CheckpointError::Json`].
    pub(crate) fn json(path: &Path, message: impl Into<String>) -> Self {
        CheckpointError::Json { path: path.to_path_buf(), message: message.into() }
    }

    /// Shorthand for [`CheckpointError::Config`].
    pub(crate) fn config(path: &Path, field: &str, message: impl Into<String>) -> Self {
        CheckpointError::Config {
            path: path.to_path_buf(),
            field: field.to_string(),
            message: message.into(),
        }
    }
}

/// " at PATH", or nothing for an empty path.
fn at(path: &Path) -> String {
    if path.as_os_str().is_empty() {
        String::new()
    } else {
        format!(" at {}", path.display())
    }
}

fn revision_suffix(revision: &str, flag: &str) -> String {
    if revision == "main" {
        String::new()
    } else {
        format!("{flag}{revision}")
    }
}

/// `huggingface-cli download ID [--revision REV]`.
fn cli_fetch_command(repo_id: &str, revision: &str) -> String {
    format!("huggingface-cli download {repo_id}{}", revision_suffix(revision, " --revision "))
}

/// The same with the Python API.
fn python_fetch_command(repo_id: &str, revision: &str) -> String {
    let rev = if revision == "main" { String::new() } else { format!(", revision='{revision}'") };
    format!(
        "python -c \"from huggingface_hub import snapshot_download; snapshot_download('{repo_id}'{rev})\""
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_one_line() {
        let errors = vec![
            CheckpointError::NotFound {
                what: "config.json".into(),
                path: "/m".into(),
                fix: "pass a directory containing config.json".into(),
            },
            CheckpointError::NotFound { what: "x".into(), path: PathBuf::new(), fix: "y".into() },
            CheckpointError::NotInCache {
                repo_id: "org/name".into(),
                revision: "v1".into(),
                cache_dir: "/c".into(),
            },
            CheckpointError::io(Path::new("/f"), std::io::Error::other("boom\nsecond line")),
            CheckpointError::json(Path::new("/f"), "a\nb"),
            CheckpointError::config(Path::new("/f"), "n_head", "must be > 0"),
            CheckpointError::safetensors(Path::new("/f"), "bad\r\nheader"),
            CheckpointError::MissingTensor { name: "w".into(), files: "/a, /b".into() },
            CheckpointError::ShapeMismatch {
                name: "w".into(),
                expected: vec![1, 2],
                got: vec![2, 1],
                path: "/f".into(),
            },
            CheckpointError::Tokenizer { path: "/t".into(), message: "x\ny".into() },
            CheckpointError::Unsupported { what: "a".into(), supported: "b".into() },
            CheckpointError::Download { repo_id: "o/n".into(), message: "a\nb".into() },
            CheckpointError::HashMismatch {
                repo_id: "o/n".into(),
                file: "model.safetensors".into(),
                algorithm: "sha256",
                expected: "a".repeat(64),
                actual: "b".repeat(64),
            },
        ];
        for e in errors {
            let m = e.to_string();
            assert!(!m.contains('\n') && !m.contains('\r'), "{m:?}");
        }
    }

    #[test]
    fn not_in_cache_says_how_to_fetch() {
        let e = CheckpointError::NotInCache {
            repo_id: "org/name".into(),
            revision: "main".into(),
            cache_dir: "/c".into(),
        };
        let m = e.to_string();
        assert!(m.contains("huggingface-cli download org/name`"), "{m}");
        assert!(m.contains("snapshot_download('org/name')"), "{m}");
        assert!(m.contains("HF_HOME") && m.contains("HF_HUB_CACHE") && m.contains("/c"), "{m}");
        let e = CheckpointError::NotInCache {
            repo_id: "org/name".into(),
            revision: "v2".into(),
            cache_dir: "/c".into(),
        };
        let m = e.to_string();
        assert!(m.contains("huggingface-cli download org/name --revision v2`"), "{m}");
        assert!(m.contains("snapshot_download('org/name', revision='v2')"), "{m}");
    }
}
