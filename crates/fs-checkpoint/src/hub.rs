//! Fetching a model from the Hugging Face Hub, the parts that need no network: whether the
//! network may be used (`HF_HUB_OFFLINE`), the endpoint and token, which files of a repository
//! a model needs, and whether a downloaded file is the one the hub announced. The transfers
//! themselves are in `download.rs` (feature `download`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use sha1::{Digest, Sha1};

use crate::error::{CheckpointError, Result};

/// The hub's address unless `HF_ENDPOINT` says otherwise.
pub(crate) const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

static PROGRESS: AtomicBool = AtomicBool::new(true);

/// Turn the download progress bar on or off for this process (on by default; `fisher-stein
/// --quiet` turns it off). Even when on, the bar is drawn only when stderr is a terminal and
/// `HF_HUB_DISABLE_PROGRESS_BARS` is not set. Without the `download` feature this does nothing.
pub fn set_download_progress(enabled: bool) {
    PROGRESS.store(enabled, Ordering::Relaxed);
}

/// Whether the progress bar was asked for ([`set_download_progress`] and
/// `HF_HUB_DISABLE_PROGRESS_BARS`), before the terminal check.
#[cfg_attr(not(feature = "download"), allow(dead_code))]
pub(crate) fn progress_wanted() -> bool {
    PROGRESS.load(Ordering::Relaxed)
        && !is_true(std::env::var_os("HF_HUB_DISABLE_PROGRESS_BARS").as_deref())
}

/// Whether `HF_HUB_OFFLINE` forbids the network: `1`, `true`, `yes` or `on` in any case (the
/// Python `huggingface_hub` package's rule). Then a hub id resolves from the cache only, exactly
/// as without the `download` feature.
pub fn hub_offline() -> bool {
    offline_from(|name| std::env::var_os(name))
}

/// [`hub_offline`] with the environment as a function.
pub(crate) fn offline_from(env: impl Fn(&str) -> Option<OsString>) -> bool {
    is_true(env("HF_HUB_OFFLINE").as_deref())
}

fn is_true(value: Option<&std::ffi::OsStr>) -> bool {
    value.and_then(|v| v.to_str()).is_some_and(|v| {
        let v = v.trim();
        ["1", "true", "yes", "on"].iter().any(|t| v.eq_ignore_ascii_case(t))
    })
}

/// Where and as whom to download.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "download"), allow(dead_code))]
pub(crate) struct HubSettings {
    /// `HF_ENDPOINT` without a trailing `/`, else [`DEFAULT_ENDPOINT`].
    pub endpoint: String,
    /// The access token, if any (see [`HubSettings::from_env_fn`]).
    pub token: Option<String>,
}

#[cfg_attr(not(feature = "download"), allow(dead_code))]
impl HubSettings {
    /// From the process environment (and the token file).
    pub fn from_env() -> Self {
        Self::from_env_fn(|name| std::env::var_os(name), |path| std::fs::read_to_string(path).ok())
    }

    /// The endpoint is `HF_ENDPOINT` (empty counts as unset). The token is `HF_TOKEN`, else
    /// `HUGGING_FACE_HUB_TOKEN` (its older name), else the content of the token file
    /// `huggingface-cli login` writes: `$HF_TOKEN_PATH`, else `$HF_HOME/token`, else
    /// `$XDG_CACHE_HOME/huggingface/token`, else `$HOME/.cache/huggingface/token` — the Python
    /// `huggingface_hub` package's order. Surrounding whitespace is dropped; empty means none.
    pub fn from_env_fn(
        env: impl Fn(&str) -> Option<OsString>,
        read: impl Fn(&Path) -> Option<String>,
    ) -> Self {
        let text = |name: &str| {
            env(name)
                .and_then(|v| v.into_string().ok())
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let endpoint = text("HF_ENDPOINT")
            .map(|e| e.trim_end_matches('/').to_string())
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let path = |name: &str| env(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        let token_file = path("HF_TOKEN_PATH")
            .or_else(|| path("HF_HOME").map(|h| h.join("token")))
            .or_else(|| path("XDG_CACHE_HOME").map(|x| x.join("huggingface").join("token")))
            .or_else(|| path("HOME").map(|h| h.join(".cache").join("huggingface").join("token")));
        let token = text("HF_TOKEN").or_else(|| text("HUGGING_FACE_HUB_TOKEN")).or_else(|| {
            token_file
                .and_then(|f| read(&f))
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        HubSettings { endpoint, token }
    }
}

/// The files of a hub repository that a model needs, in download order (small first).
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "download"), allow(dead_code))]
pub(crate) struct HubFiles {
    /// `config.json`, the tokenizer files, then `model.safetensors` or
    /// `model.safetensors.index.json`.
    pub files: Vec<String>,
    /// `model.safetensors.index.json` when the weights are sharded: its shards come after it.
    pub index: Option<String>,
}

/// Weight files of formats that are not read, for the error message.
const OTHER_WEIGHTS: [&str; 10] =
    [".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".tflite", ".ot", ".gguf"];

/// Choose from a repository's file list (the hub's `siblings`) the files a model needs:
/// `config.json`; `model.safetensors`, else `model.safetensors.index.json` (its shards are read
/// from it once downloaded); `tokenizer.json`, else `vocab.json` + `merges.txt` when both are
/// there, else no tokenizer. Nothing else (other weight formats, READMEs, optimizer states) is
/// fetched. The error (no config.json, no safetensors weights) says what the repository holds.
#[cfg_attr(not(feature = "download"), allow(dead_code))]
pub(crate) fn select_files(
    repo_id: &str,
    names: &[String],
) -> std::result::Result<HubFiles, String> {
    let has = |n: &str| names.iter().any(|x| x == n);
    let with_suffix = |suffix: &str| -> Vec<&str> {
        names
            .iter()
            .filter(|n| n.to_ascii_lowercase().ends_with(suffix))
            .map(String::as_str)
            .collect()
    };
    let gguf = with_suffix(".gguf");
    let single = has("model.safetensors");
    let index = has("model.safetensors.index.json");
    if !single && !index {
        if !gguf.is_empty() {
            return Err(format!(
                "`{repo_id}` holds GGUF files ({}) but no model.safetensors: download the one you \
                 want (`huggingface-cli download {repo_id} {}`) and pass the .gguf file's path to \
                 --model",
                list(&gguf),
                gguf[0]
            ));
        }
        let mut other: Vec<&str> =
            OTHER_WEIGHTS.iter().flat_map(|suffix| with_suffix(suffix)).collect();
        other.extend(with_suffix(".safetensors"));
        let holds = if other.is_empty() {
            format!(
                "it holds {}",
                if names.is_empty() { "no files".into() } else { list_all(names) }
            )
        } else {
            format!("its weights are {}", list(&other))
        };
        return Err(format!(
            "`{repo_id}` has no safetensors weights (neither model.safetensors nor \
             model.safetensors.index.json; {holds}): fisher-stein reads safetensors only — convert \
             the weights (transformers' `save_pretrained(dir, safe_serialization=True)`) and pass \
             the directory, or pick a repository that has model.safetensors"
        ));
    }
    if !has("config.json") {
        return Err(format!(
            "`{repo_id}` has no config.json at its top level (it holds {}): it is not a \
             transformers model repository fisher-stein can read; pass a directory with \
             config.json and the weights",
            list_all(names)
        ));
    }
    let mut files = vec!["config.json".to_string()];
    if has("tokenizer.json") {
        files.push("tokenizer.json".into());
    } else if has("vocab.json") && has("merges.txt") {
        files.extend(["vocab.json".into(), "merges.txt".into()]);
    }
    let index = if single {
        files.push("model.safetensors".into());
        None
    } else {
        files.push("model.safetensors.index.json".into());
        Some("model.safetensors.index.json".into())
    };
    Ok(HubFiles { files, index })
}

/// Up to five names, then how many more.
fn list(names: &[&str]) -> String {
    let mut s = names.iter().take(5).copied().collect::<Vec<_>>().join(", ");
    if names.len() > 5 {
        s.push_str(&format!(" and {} more", names.len() - 5));
    }
    s
}

fn list_all(names: &[String]) -> String {
    list(&names.iter().map(String::as_str).collect::<Vec<_>>())
}

/// The hash a hub ETag announces: 64 hex digits are the sha256 of an LFS file's content, 40 hex
/// digits the git blob id (sha1 of `blob LEN\0` + content) of a file stored in git. Quotes and a
/// weak-validator `W/` prefix are ignored; any other ETag announces nothing checkable.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "download"), allow(dead_code))]
pub(crate) enum Announced {
    /// SHA-256 of the content, lowercase hex.
    Sha256(String),
    /// Git blob SHA-1, lowercase hex.
    GitSha1(String),
}

#[cfg_attr(not(feature = "download"), allow(dead_code))]
impl Announced {
    /// What `etag` announces, if anything.
    pub fn from_etag(etag: &str) -> Option<Self> {
        let e = etag.trim().trim_start_matches("W/").trim_matches('"').to_ascii_lowercase();
        if !e.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        match e.len() {
            64 => Some(Announced::Sha256(e)),
            40 => Some(Announced::GitSha1(e)),
            _ => None,
        }
    }

    /// The hash's name in messages.
    pub fn algorithm(&self) -> &'static str {
        match self {
            Announced::Sha256(_) => "sha256",
            Announced::GitSha1(_) => "git blob sha1",
        }
    }

    /// The expected hex digest.
    pub fn hex(&self) -> &str {
        match self {
            Announced::Sha256(h) | Announced::GitSha1(h) => h,
        }
    }

    /// The same hash of the file at `path` (streamed).
    pub fn hash_of(&self, path: &Path) -> Result<String> {
        match self {
            Announced::Sha256(_) => crate::hash::sha256_file(path),
            Announced::GitSha1(_) => git_blob_sha1_file(path),
        }
    }
}

/// The git blob id of a file: sha1 of `blob {len}\0` followed by the content, lowercase hex.
pub(crate) fn git_blob_sha1_file(path: &Path) -> Result<String> {
    let len = std::fs::metadata(path).map_err(|e| CheckpointError::io(path, e))?.len();
    let mut hasher = Sha1::new();
    hasher.update(format!("blob {len}\0").as_bytes());
    crate::hash::digest_file(hasher, path)
}

#[cfg(test)]
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SHA-256 of bytes, lowercase hex.
    fn sha256_hex(bytes: &[u8]) -> String {
        hex(&sha2::Sha256::digest(bytes))
    }

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let vars: Vec<(String, String)> =
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| OsString::from(v))
    }

    #[test]
    fn offline_values() {
        for v in ["1", "true", "TRUE", "True", "yes", "YES", "on", " 1 "] {
            assert!(offline_from(env(&[("HF_HUB_OFFLINE", v)])), "{v:?}");
        }
        for v in ["", "0", "false", "no", "off", "2", "offline"] {
            assert!(!offline_from(env(&[("HF_HUB_OFFLINE", v)])), "{v:?}");
        }
        assert!(!offline_from(env(&[])));
    }

    #[test]
    fn endpoint_and_token() {
        let no_file = |_: &Path| None;
        let s = HubSettings::from_env_fn(env(&[]), no_file);
        assert_eq!(s, HubSettings { endpoint: DEFAULT_ENDPOINT.into(), token: None });
        let s = HubSettings::from_env_fn(
            env(&[("HF_ENDPOINT", "http://127.0.0.1:8080/"), ("HF_TOKEN", " hf_a\n")]),
            no_file,
        );
        assert_eq!(s.endpoint, "http://127.0.0.1:8080");
        assert_eq!(s.token.as_deref(), Some("hf_a"));
        let s = HubSettings::from_env_fn(
            env(&[("HF_ENDPOINT", ""), ("HF_TOKEN", ""), ("HUGGING_FACE_HUB_TOKEN", "hf_old")]),
            no_file,
        );
        assert_eq!(s.endpoint, DEFAULT_ENDPOINT);
        assert_eq!(s.token.as_deref(), Some("hf_old"));
    }

    #[test]
    fn token_file_order() {
        // The file read is the first of HF_TOKEN_PATH, HF_HOME/token, XDG…, HOME….
        let read = |p: &Path| Some(format!("tok:{}\n", p.display()));
        let token = |vars: &[(&str, &str)]| HubSettings::from_env_fn(env(vars), read).token;
        let all = [
            ("HF_TOKEN_PATH", "/t/tok"),
            ("HF_HOME", "/hf"),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(token(&all).as_deref(), Some("tok:/t/tok"));
        assert_eq!(token(&all[1..]).as_deref(), Some("tok:/hf/token"));
        assert_eq!(token(&all[2..]).as_deref(), Some("tok:/x/huggingface/token"));
        assert_eq!(token(&all[3..]).as_deref(), Some("tok:/h/.cache/huggingface/token"));
        assert_eq!(token(&[]), None);
        // HF_TOKEN wins over the file; an empty file is no token.
        let mut with_env = all.to_vec();
        with_env.push(("HF_TOKEN", "hf_env"));
        assert_eq!(token(&with_env).as_deref(), Some("hf_env"));
        let empty = HubSettings::from_env_fn(env(&all), |_| Some(" \n".into()));
        assert_eq!(empty.token, None);
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn selects_only_what_the_model_needs() {
        let all = names(&[
            ".gitattributes",
            "README.md",
            "config.json",
            "generation_config.json",
            "merges.txt",
            "model.safetensors",
            "pytorch_model.bin",
            "tf_model.h5",
            "tokenizer.json",
            "vocab.json",
            "onnx/model.onnx",
        ]);
        let f = select_files("o/n", &all).unwrap();
        assert_eq!(f.files, names(&["config.json", "tokenizer.json", "model.safetensors"]));
        assert_eq!(f.index, None);
        // vocab.json + merges.txt when there is no tokenizer.json; neither when one is missing.
        let f = select_files(
            "o/n",
            &names(&["config.json", "model.safetensors", "vocab.json", "merges.txt"]),
        )
        .unwrap();
        assert_eq!(
            f.files,
            names(&["config.json", "vocab.json", "merges.txt", "model.safetensors"])
        );
        let f = select_files("o/n", &names(&["config.json", "model.safetensors", "vocab.json"]))
            .unwrap();
        assert_eq!(f.files, names(&["config.json", "model.safetensors"]));
        // Sharded: the index (its shards follow from it); a single file wins over an index.
        let sharded = names(&[
            "config.json",
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "pytorch_model.bin.index.json",
        ]);
        let f = select_files("o/n", &sharded).unwrap();
        assert_eq!(f.files, names(&["config.json", "model.safetensors.index.json"]));
        assert_eq!(f.index.as_deref(), Some("model.safetensors.index.json"));
        let mut both = sharded.clone();
        both.push("model.safetensors".into());
        assert_eq!(select_files("o/n", &both).unwrap().index, None);
    }

    #[test]
    fn says_what_a_repo_without_safetensors_holds() {
        let e = select_files("o/n", &names(&["config.json", "pytorch_model.bin", "README.md"]))
            .unwrap_err();
        assert!(e.contains("no safetensors weights") && e.contains("pytorch_model.bin"), "{e}");
        assert!(!e.contains("README.md"), "{e}");
        let e = select_files("o/n", &names(&["README.md", "m-Q4_K_M.gguf", "m-Q8_0.gguf"]))
            .unwrap_err();
        assert!(e.contains("GGUF") && e.contains("m-Q4_K_M.gguf, m-Q8_0.gguf"), "{e}");
        assert!(e.contains("huggingface-cli download o/n m-Q4_K_M.gguf"), "{e}");
        let e =
            select_files("o/n", &names(&["config.json", "adapter_model.safetensors"])).unwrap_err();
        assert!(e.contains("adapter_model.safetensors"), "{e}");
        let e = select_files("o/n", &names(&["README.md"])).unwrap_err();
        assert!(e.contains("it holds README.md"), "{e}");
        let e = select_files("o/n", &[]).unwrap_err();
        assert!(e.contains("no files"), "{e}");
        let many: Vec<String> = (0..8).map(|i| format!("w{i}.bin")).collect();
        let e = select_files("o/n", &many).unwrap_err();
        assert!(e.contains("w4.bin and 3 more") && !e.contains("w5.bin"), "{e}");
        let e = select_files("o/n", &names(&["model.safetensors", "README.md"])).unwrap_err();
        assert!(e.contains("no config.json") && e.contains("README.md"), "{e}");
    }

    #[test]
    fn etags() {
        let sha = "a".repeat(64);
        assert_eq!(Announced::from_etag(&format!("\"{sha}\"")), Some(Announced::Sha256(sha)));
        let up = "ABCDEF0123".repeat(4);
        assert_eq!(
            Announced::from_etag(&format!("W/\"{up}\"")),
            Some(Announced::GitSha1(up.to_ascii_lowercase()))
        );
        for e in [
            "",
            "\"abc\"",
            &"g".repeat(64),
            &"a".repeat(63),
            "\"d41d8cd98f00b204e9800998ecf8427e\"",
        ] {
            assert_eq!(Announced::from_etag(e), None, "{e}");
        }
    }

    #[test]
    fn hashes_match_git_and_sha256() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f");
        // `printf 'hello\n' | git hash-object --stdin`, and the empty blob.
        std::fs::write(&p, b"hello\n").unwrap();
        assert_eq!(git_blob_sha1_file(&p).unwrap(), "ce013625030ba8dba906f756967f9e9ca394464a");
        let git = Announced::from_etag("\"ce013625030ba8dba906f756967f9e9ca394464a\"").unwrap();
        assert_eq!(git.hash_of(&p).unwrap(), git.hex());
        let lfs = Announced::from_etag(&sha256_hex(b"hello\n")).unwrap();
        assert_eq!(lfs.algorithm(), "sha256");
        assert_eq!(lfs.hash_of(&p).unwrap(), lfs.hex());
        // One byte changed: both differ.
        std::fs::write(&p, b"hellp\n").unwrap();
        assert_ne!(git.hash_of(&p).unwrap(), git.hex());
        assert_ne!(lfs.hash_of(&p).unwrap(), lfs.hex());
        std::fs::write(&p, b"").unwrap();
        assert_eq!(git_blob_sha1_file(&p).unwrap(), "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391");
        // Longer than one read buffer.
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &big).unwrap();
        let mut h = Sha1::new();
        h.update(format!("blob {}\0", big.len()).as_bytes());
        h.update(&big);
        assert_eq!(git_blob_sha1_file(&p).unwrap(), hex(&h.finalize()));
        let e = git_blob_sha1_file(&t.path().join("absent")).unwrap_err();
        assert!(matches!(e, CheckpointError::Io { .. }));
    }
}
