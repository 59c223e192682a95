//! Finding a model's files: a local directory or a hub id in the Hugging Face cache.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

use crate::error::{CheckpointError, Result};

/// Where a model's files were found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelOrigin {
    /// A directory given on the command line.
    LocalDir {
        /// The directory that holds `config.json`.
        dir: PathBuf,
    },
    /// A snapshot in the Hugging Face hub cache.
    HubCache {
        /// The hub id, `org/name`.
        repo_id: String,
        /// The revision asked for (a branch, tag or commit; `main` by default).
        revision: String,
        /// The commit the revision resolved to (the snapshot directory's name).
        commit: String,
        /// `<cache>/models--org--name/snapshots/<commit>`.
        snapshot_dir: PathBuf,
    },
}

/// The tokenizer files of a model directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenizerFiles {
    /// A `tokenizer.json` (any tokenizer the `tokenizers` crate can deserialize).
    Json(PathBuf),
    /// GPT-2-style byte-level BPE files.
    VocabMerges {
        /// `vocab.json`: token → id.
        vocab: PathBuf,
        /// `merges.txt`: the BPE merges, one pair per line.
        merges: PathBuf,
    },
    /// The directory has no tokenizer files.
    Missing,
}

/// The files of one model, every one of them known to exist.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelFiles {
    /// `config.json`.
    pub config: PathBuf,
    /// The safetensors weight files: one `model.safetensors`, or the shards named by
    /// `model.safetensors.index.json` in sorted order.
    pub weights: Vec<PathBuf>,
    /// The tokenizer files, if any.
    pub tokenizer: TokenizerFiles,
    /// Where the files were found.
    pub origin: ModelOrigin,
}

/// Where the HF hub cache is: `$HF_HUB_CACHE`, else `$HUGGINGFACE_HUB_CACHE` (its older name),
/// else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
/// `$HOME/.cache/huggingface/hub` — the same order as the Python `huggingface_hub` package.
/// Empty variables count as unset. An error, not a panic, if none is set.
pub fn default_hub_cache() -> Result<PathBuf> {
    hub_cache_from(|name| std::env::var_os(name))
}

/// [`default_hub_cache`] with the environment as a function (testable without touching the
/// process environment).
pub(crate) fn hub_cache_from(env: impl Fn(&str) -> Option<OsString>) -> Result<PathBuf> {
    let var = |name: &str| env(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(p) = var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
        return Ok(p);
    }
    if let Some(p) = var("HF_HOME") {
        return Ok(p.join("hub"));
    }
    if let Some(p) = var("XDG_CACHE_HOME") {
        return Ok(p.join("huggingface").join("hub"));
    }
    if let Some(p) = var("HOME") {
        return Ok(p.join(".cache").join("huggingface").join("hub"));
    }
    Err(CheckpointError::NotFound {
        what: "the Hugging Face cache directory (none of HF_HUB_CACHE, HF_HOME, HOME is set)"
            .into(),
        path: PathBuf::new(),
        fix: "set HF_HUB_CACHE or HF_HOME to the cache directory, or pass a local model directory"
            .into(),
    })
}

/// Resolve a local directory or a hub id (`org/name`, optional `@revision`, default revision
/// `main`) with the default cache ([`default_hub_cache`], consulted only for hub ids).
///
/// A hub id whose files the cache holds completely is used as it is, without the network (a
/// cached `main` is not checked for newer commits). Otherwise, with the `download` feature and
/// unless `HF_HUB_OFFLINE` is set ([`hub_offline`](crate::hub_offline)), the missing files are
/// downloaded from the hub (`HF_ENDPOINT`, token from `HF_TOKEN` or the token file) into that
/// cache — only config.json, the safetensors weights and the tokenizer files; resumable; each
/// checked against the hash the hub announces — and then resolved from it. Without the
/// feature, or offline, a model not in the cache is a [`CheckpointError::NotInCache`].
pub fn resolve_model(spec: &str) -> Result<ModelFiles> {
    match classify(spec)? {
        Spec::Local(dir) => resolve_local_dir(&dir),
        Spec::Hub { repo_id, revision } => {
            let cache = default_hub_cache()?;
            let cached = resolve_hub(&repo_id, &revision, &cache);
            #[cfg(feature = "download")]
            if let Err(e) = &cached {
                if missing_files(e) && !crate::hub::hub_offline() {
                    let settings = crate::hub::HubSettings::from_env();
                    crate::download::fetch(&repo_id, &revision, &cache, &settings)?;
                    return resolve_hub(&repo_id, &revision, &cache);
                }
            }
            cached
        }
    }
}

/// Whether a hub resolution failed because files are missing from the cache (what a download
/// can fix), not because a cached file is malformed.
#[cfg(feature = "download")]
fn missing_files(e: &CheckpointError) -> bool {
    matches!(e, CheckpointError::NotInCache { .. } | CheckpointError::NotFound { .. })
}

/// [`resolve_model`] with an explicit hub cache directory (no environment access, never the
/// network).
pub fn resolve_model_in(spec: &str, hub_cache: &Path) -> Result<ModelFiles> {
    match classify(spec)? {
        Spec::Local(dir) => resolve_local_dir(&dir),
        Spec::Hub { repo_id, revision } => resolve_hub(&repo_id, &revision, hub_cache),
    }
}

enum Spec {
    Local(PathBuf),
    Hub { repo_id: String, revision: String },
}

const SPEC_FIX: &str = "pass a directory containing config.json, or a hub id (org/name, optionally @revision) in the HF cache";

fn classify(spec: &str) -> Result<Spec> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(Spec::Local(path.to_path_buf()));
    }
    if path.is_file() {
        let what = if spec.to_ascii_lowercase().ends_with(".gguf") {
            format!("the GGUF file {spec} (GGUF is not supported yet)")
        } else {
            format!("the file {spec} as a model")
        };
        return Err(CheckpointError::Unsupported {
            what,
            supported: "a directory holding config.json and safetensors weights (pass the \
                        directory, not a file), or a hub id in the HF cache"
                .into(),
        });
    }
    let (id, revision) = match spec.split_once('@') {
        Some((id, rev)) => (id, rev),
        None => (spec, "main"),
    };
    if is_hub_id(id) && is_revision(revision) {
        return Ok(Spec::Hub { repo_id: id.to_string(), revision: revision.to_string() });
    }
    Err(CheckpointError::NotFound {
        what: format!("model `{spec}`"),
        path: path.to_path_buf(),
        fix: SPEC_FIX.into(),
    })
}

/// `name` or `org/name`, each part of letters, digits, `-`, `_`, `.` (not starting with `.`).
fn is_hub_id(id: &str) -> bool {
    let parts: Vec<&str> = id.split('/').collect();
    parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.len() <= 96
                && !p.starts_with(['.', '-'])
                && !p.contains("--")
                && !p.contains("..")
                && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}

/// A branch, tag or commit: non-empty, relative, no `..` (it becomes a path under `refs/`).
fn is_revision(rev: &str) -> bool {
    !rev.is_empty()
        && !rev.contains('\\')
        && Path::new(rev).components().all(|c| matches!(c, Component::Normal(_)))
}

/// 40 hex digits: a full git commit id.
pub(crate) fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn resolve_hub(repo_id: &str, revision: &str, cache: &Path) -> Result<ModelFiles> {
    let not_in_cache = || CheckpointError::NotInCache {
        repo_id: repo_id.to_string(),
        revision: revision.to_string(),
        cache_dir: cache.to_path_buf(),
    };
    let repo = hf_hub::Repo::with_revision(
        repo_id.to_string(),
        hf_hub::RepoType::Model,
        revision.to_string(),
    );
    let repo_dir = cache.join(repo.folder_name());
    // hf-hub's lookup reads `refs/<revision>` untrimmed, so a ref written with a trailing newline
    // (as some tools do) defeats it; read the ref ourselves as the fallback, and accept a
    // commit hash that names a snapshot directly.
    let from_hf_hub = hf_hub::Cache::new(cache.to_path_buf())
        .repo(repo)
        .get("config.json")
        .and_then(|p| p.parent().map(Path::to_path_buf));
    let snapshot_dir = match from_hf_hub {
        Some(dir) => dir,
        None => {
            let ref_path = repo_dir.join("refs").join(revision);
            let commit = match std::fs::read_to_string(&ref_path) {
                Ok(s) if !s.trim().is_empty() => s.trim().to_string(),
                _ if is_commit_hash(revision) => revision.to_string(),
                _ => return Err(not_in_cache()),
            };
            if !is_revision(&commit) {
                return Err(CheckpointError::NotFound {
                    what: format!(
                        "a valid commit hash in {} (it holds {commit:?})",
                        ref_path.display()
                    ),
                    path: ref_path,
                    fix: format!("re-download the model (`huggingface-cli download {repo_id}`)"),
                });
            }
            repo_dir.join("snapshots").join(commit)
        }
    };
    if !snapshot_dir.join("config.json").is_file() {
        return Err(not_in_cache());
    }
    let commit =
        snapshot_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let origin = ModelOrigin::HubCache {
        repo_id: repo_id.to_string(),
        revision: revision.to_string(),
        commit,
        snapshot_dir: snapshot_dir.clone(),
    };
    let fix = format!(
        "the cache holds only part of `{repo_id}`: fetch the whole snapshot with `huggingface-cli download {repo_id}{}`",
        if revision == "main" { String::new() } else { format!(" --revision {revision}") }
    );
    resolve_dir(&snapshot_dir, origin, &fix)
}

fn resolve_local_dir(dir: &Path) -> Result<ModelFiles> {
    let origin = ModelOrigin::LocalDir { dir: dir.to_path_buf() };
    resolve_dir(dir, origin, "pass the directory that holds the model's config.json and weights")
}

/// The files of a model directory (local, or a cache snapshot). `fix` is the advice for a
/// missing file.
fn resolve_dir(dir: &Path, origin: ModelOrigin, fix: &str) -> Result<ModelFiles> {
    let config = dir.join("config.json");
    if !config.is_file() {
        return Err(CheckpointError::NotFound {
            what: "config.json".into(),
            path: config,
            fix: fix.to_string(),
        });
    }
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let weights = if single.is_file() {
        vec![single]
    } else if index.is_file() {
        shards_from_index(&index, dir, fix)?
    } else {
        let mut what = format!(
            "model weights (looked for model.safetensors and model.safetensors.index.json in {})",
            dir.display()
        );
        if dir.join("pytorch_model.bin").is_file() {
            what.push_str("; pytorch_model.bin is there but PyTorch pickles are not read, convert it to safetensors");
        }
        return Err(CheckpointError::NotFound { what, path: single, fix: fix.to_string() });
    };
    let tokenizer_json = dir.join("tokenizer.json");
    let vocab = dir.join("vocab.json");
    let merges = dir.join("merges.txt");
    let tokenizer = if tokenizer_json.is_file() {
        TokenizerFiles::Json(tokenizer_json)
    } else if vocab.is_file() && merges.is_file() {
        TokenizerFiles::VocabMerges { vocab, merges }
    } else {
        TokenizerFiles::Missing
    };
    Ok(ModelFiles { config, weights, tokenizer, origin })
}

/// The distinct shard files named by an index's `weight_map`, sorted, each checked to exist.
fn shards_from_index(index: &Path, dir: &Path, fix: &str) -> Result<Vec<PathBuf>> {
    shard_names(index)?
        .into_iter()
        .map(|file| {
            let path = dir.join(&file);
            if path.is_file() {
                Ok(path)
            } else {
                Err(CheckpointError::NotFound {
                    what: format!("weight shard {file} (named by {})", index.display()),
                    path,
                    fix: fix.to_string(),
                })
            }
        })
        .collect()
}

/// The distinct shard files named by an index's `weight_map`, sorted; each a relative path
/// inside the model directory.
pub(crate) fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| CheckpointError::io(index, e))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| CheckpointError::json(index, e.to_string()))?;
    let map = value
        .get("weight_map")
        .and_then(serde_json::Value::as_object)
        .ok_or_else(|| CheckpointError::json(index, "no `weight_map` object"))?;
    let mut shards = BTreeSet::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            CheckpointError::json(index, format!("weight_map entry `{tensor}` is not a file name"))
        })?;
        let rel = Path::new(file);
        if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(CheckpointError::json(
                index,
                format!("weight_map entry `{tensor}` names `{file}`, outside the model directory"),
            ));
        }
        shards.insert(file.to_string());
    }
    if shards.is_empty() {
        return Err(CheckpointError::json(index, "`weight_map` is empty"));
    }
    Ok(shards.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    const HASH: &str = "0123456789abcdef0123456789abcdef01234567";

    fn touch(path: &Path) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, b"{}").unwrap();
    }

    fn s(p: &Path) -> &str {
        p.to_str().unwrap()
    }

    #[test]
    fn local_dir_single_file() {
        let t = tempfile::tempdir().unwrap();
        touch(&t.path().join("config.json"));
        touch(&t.path().join("model.safetensors"));
        touch(&t.path().join("tokenizer.json"));
        touch(&t.path().join("vocab.json"));
        touch(&t.path().join("merges.txt"));
        let m = resolve_model_in(s(t.path()), Path::new("/nonexistent")).unwrap();
        assert_eq!(m.config, t.path().join("config.json"));
        assert_eq!(m.weights, vec![t.path().join("model.safetensors")]);
        assert_eq!(m.tokenizer, TokenizerFiles::Json(t.path().join("tokenizer.json")));
        assert_eq!(m.origin, ModelOrigin::LocalDir { dir: t.path().to_path_buf() });
        // resolve_model never consults the cache for a local directory.
        assert_eq!(resolve_model(s(t.path())).unwrap(), m);
    }

    #[test]
    fn local_dir_vocab_merges_and_missing_tokenizer() {
        let t = tempfile::tempdir().unwrap();
        touch(&t.path().join("config.json"));
        touch(&t.path().join("model.safetensors"));
        let m = resolve_model_in(s(t.path()), Path::new("/nonexistent")).unwrap();
        assert_eq!(m.tokenizer, TokenizerFiles::Missing);
        touch(&t.path().join("vocab.json"));
        let m = resolve_model_in(s(t.path()), Path::new("/nonexistent")).unwrap();
        assert_eq!(m.tokenizer, TokenizerFiles::Missing, "vocab.json alone is not enough");
        touch(&t.path().join("merges.txt"));
        let m = resolve_model_in(s(t.path()), Path::new("/nonexistent")).unwrap();
        assert_eq!(
            m.tokenizer,
            TokenizerFiles::VocabMerges {
                vocab: t.path().join("vocab.json"),
                merges: t.path().join("merges.txt")
            }
        );
    }

    #[test]
    fn sharded_index() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        touch(&d.join("config.json"));
        fs::write(
            d.join("model.safetensors.index.json"),
            r#"{"metadata": {"total_size": 10}, "weight_map": {
                "b.weight": "model-00002-of-00002.safetensors",
                "a.weight": "model-00001-of-00002.safetensors",
                "c.weight": "model-00002-of-00002.safetensors"}}"#,
        )
        .unwrap();
        touch(&d.join("model-00001-of-00002.safetensors"));
        // The second shard is missing: the error names it.
        let e = resolve_model_in(s(d), Path::new("/x")).unwrap_err();
        assert!(matches!(e, CheckpointError::NotFound { .. }), "{e}");
        assert!(e.to_string().contains("model-00002-of-00002.safetensors"), "{e}");
        touch(&d.join("model-00002-of-00002.safetensors"));
        let m = resolve_model_in(s(d), Path::new("/x")).unwrap();
        assert_eq!(
            m.weights,
            vec![
                d.join("model-00001-of-00002.safetensors"),
                d.join("model-00002-of-00002.safetensors")
            ]
        );
    }

    #[test]
    fn bad_index() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        touch(&d.join("config.json"));
        let index = d.join("model.safetensors.index.json");
        for (text, needle) in [
            ("{not json", "model.safetensors.index.json"),
            (r#"{"metadata": {}}"#, "weight_map"),
            (r#"{"weight_map": {}}"#, "empty"),
            (r#"{"weight_map": {"a": 3}}"#, "`a`"),
            (r#"{"weight_map": {"a": "../x.safetensors"}}"#, "outside"),
        ] {
            fs::write(&index, text).unwrap();
            let e = resolve_model_in(s(d), Path::new("/x")).unwrap_err();
            assert!(matches!(e, CheckpointError::Json { .. }), "{e}");
            assert!(e.to_string().contains(needle), "{e}");
        }
    }

    #[test]
    fn missing_config_and_weights() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        let e = resolve_model_in(s(d), Path::new("/x")).unwrap_err();
        assert!(matches!(e, CheckpointError::NotFound { .. }));
        assert!(e.to_string().contains("config.json"), "{e}");
        touch(&d.join("config.json"));
        touch(&d.join("pytorch_model.bin"));
        let e = resolve_model_in(s(d), Path::new("/x")).unwrap_err();
        let m = e.to_string();
        assert!(matches!(e, CheckpointError::NotFound { .. }));
        assert!(
            m.contains("model.safetensors") && m.contains("model.safetensors.index.json"),
            "{m}"
        );
        assert!(m.contains("pytorch_model.bin"), "{m}");
    }

    #[test]
    fn file_is_unsupported_and_garbage_is_not_found() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("model.gguf");
        touch(&f);
        let e = resolve_model_in(s(&f), Path::new("/x")).unwrap_err();
        assert!(matches!(e, CheckpointError::Unsupported { .. }), "{e}");
        assert!(e.to_string().contains("GGUF is not supported yet"), "{e}");
        let f = t.path().join("config.json");
        touch(&f);
        let e = resolve_model_in(s(&f), Path::new("/x")).unwrap_err();
        assert!(e.to_string().contains("pass the directory"), "{e}");
        for spec in ["./no/such/dir", "/abs/missing", "a/b/c", "", "org/name@", "org/na me"] {
            let e = resolve_model_in(spec, Path::new("/x")).unwrap_err();
            assert!(matches!(e, CheckpointError::NotFound { .. }), "{spec}: {e}");
            assert!(e.to_string().contains("directory containing config.json"), "{e}");
        }
    }

    /// `<cache>/models--org--name/{refs/main, snapshots/HASH/{config.json, model.safetensors}}`.
    fn fake_cache(ref_text: Option<&str>) -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let repo = t.path().join("models--org--name");
        if let Some(r) = ref_text {
            fs::create_dir_all(repo.join("refs")).unwrap();
            fs::write(repo.join("refs").join("main"), r).unwrap();
        }
        let snap = repo.join("snapshots").join(HASH);
        touch(&snap.join("config.json"));
        touch(&snap.join("model.safetensors"));
        t
    }

    fn expect_hub(m: &ModelFiles, cache: &Path, revision: &str) {
        let snap = cache.join("models--org--name").join("snapshots").join(HASH);
        assert_eq!(m.config, snap.join("config.json"));
        assert_eq!(m.weights, vec![snap.join("model.safetensors")]);
        assert_eq!(m.tokenizer, TokenizerFiles::Missing);
        assert_eq!(
            m.origin,
            ModelOrigin::HubCache {
                repo_id: "org/name".into(),
                revision: revision.into(),
                commit: HASH.into(),
                snapshot_dir: snap,
            }
        );
    }

    #[test]
    fn hub_cache_ref_without_newline() {
        let c = fake_cache(Some(HASH));
        let m = resolve_model_in("org/name", c.path()).unwrap();
        expect_hub(&m, c.path(), "main");
        let m = resolve_model_in("org/name@main", c.path()).unwrap();
        expect_hub(&m, c.path(), "main");
    }

    #[test]
    fn hub_cache_ref_with_trailing_newline() {
        let c = fake_cache(Some(&format!("{HASH}\n")));
        let m = resolve_model_in("org/name", c.path()).unwrap();
        expect_hub(&m, c.path(), "main");
    }

    #[test]
    fn hub_cache_commit_revision() {
        let c = fake_cache(None);
        let m = resolve_model_in(&format!("org/name@{HASH}"), c.path()).unwrap();
        expect_hub(&m, c.path(), HASH);
        // Without refs/main the default revision is not in the cache.
        let e = resolve_model_in("org/name", c.path()).unwrap_err();
        assert!(matches!(e, CheckpointError::NotInCache { .. }), "{e}");
    }

    #[test]
    fn hub_cache_branch_with_slash() {
        let c = fake_cache(None);
        let r = c.path().join("models--org--name").join("refs").join("pr");
        fs::create_dir_all(&r).unwrap();
        fs::write(r.join("1"), HASH).unwrap();
        let m = resolve_model_in("org/name@pr/1", c.path()).unwrap();
        expect_hub(&m, c.path(), "pr/1");
    }

    #[test]
    fn hub_id_absent() {
        let c = fake_cache(Some(HASH));
        for spec in ["other/model", "gpt2", "org/name@v9"] {
            let e = resolve_model_in(spec, c.path()).unwrap_err();
            let m = e.to_string();
            assert!(matches!(e, CheckpointError::NotInCache { .. }), "{m}");
            assert!(m.contains("huggingface-cli download"), "{m}");
            assert!(m.contains("HF_HOME") && m.contains("HF_HUB_CACHE"), "{m}");
            assert!(m.contains(&c.path().display().to_string()), "{m}");
        }
        let e = resolve_model_in("org/name@v9", c.path()).unwrap_err();
        assert!(e.to_string().contains("--revision v9"), "{e}");
    }

    #[test]
    fn hub_snapshot_without_weights() {
        let c = fake_cache(Some(HASH));
        let snap = c.path().join("models--org--name").join("snapshots").join(HASH);
        fs::remove_file(snap.join("model.safetensors")).unwrap();
        let e = resolve_model_in("org/name", c.path()).unwrap_err();
        let m = e.to_string();
        assert!(matches!(e, CheckpointError::NotFound { .. }), "{m}");
        assert!(m.contains("model.safetensors") && m.contains("huggingface-cli download org/name"));
    }

    /// The real cache layout: snapshot files are symlinks into `blobs/`; a dangling one counts
    /// as missing.
    #[cfg(unix)]
    #[test]
    fn hub_cache_symlinked_blobs() {
        let c = fake_cache(Some(HASH));
        let repo = c.path().join("models--org--name");
        let snap = repo.join("snapshots").join(HASH);
        touch(&repo.join("blobs").join("abc123"));
        fs::remove_file(snap.join("model.safetensors")).unwrap();
        std::os::unix::fs::symlink("../../blobs/abc123", snap.join("model.safetensors")).unwrap();
        let m = resolve_model_in("org/name", c.path()).unwrap();
        expect_hub(&m, c.path(), "main");
        fs::remove_file(repo.join("blobs").join("abc123")).unwrap();
        let e = resolve_model_in("org/name", c.path()).unwrap_err();
        assert!(matches!(e, CheckpointError::NotFound { .. }), "{e}");
    }

    #[test]
    fn hub_cache_location() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| OsString::from(*v))
        };
        let all =
            &[("HF_HUB_CACHE", "/a"), ("HF_HOME", "/b"), ("XDG_CACHE_HOME", "/x"), ("HOME", "/h")];
        assert_eq!(hub_cache_from(env(all)).unwrap(), PathBuf::from("/a"));
        let no_hub = &[("HF_HUB_CACHE", ""), ("HF_HOME", "/b"), ("HOME", "/h")];
        assert_eq!(hub_cache_from(env(no_hub)).unwrap(), PathBuf::from("/b/hub"));
        let xdg = &[("XDG_CACHE_HOME", "/x"), ("HOME", "/h")];
        assert_eq!(hub_cache_from(env(xdg)).unwrap(), PathBuf::from("/x/huggingface/hub"));
        let home = &[("HOME", "/h")];
        assert_eq!(hub_cache_from(env(home)).unwrap(), PathBuf::from("/h/.cache/huggingface/hub"));
        let e = hub_cache_from(env(&[])).unwrap_err();
        assert!(matches!(e, CheckpointError::NotFound { .. }));
        assert!(e.to_string().contains("HF_HOME"), "{e}");
    }
}
