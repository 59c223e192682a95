//! Results directories, written atomically: everything goes to a hidden temporary directory next
//! to the target, which is renamed into place only once every file is complete. A failed or
//! killed run leaves no half-written results directory behind.

use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::{Dtype, View};
use std::borrow::Cow;
use std::path::{Path, PathBuf};

/// One tensor to be written to a safetensors file (little-endian bytes).
pub struct OwnedTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl OwnedTensor {
    /// An `f32` tensor.
    pub fn f32(shape: Vec<usize>, values: impl IntoIterator<Item = f32>) -> Self {
        let data = values.into_iter().flat_map(|v| v.to_le_bytes()).collect();
        OwnedTensor { dtype: Dtype::F32, shape, data }
    }
    /// An `f64` tensor.
    pub fn f64(shape: Vec<usize>, values: impl IntoIterator<Item = f64>) -> Self {
        let data = values.into_iter().flat_map(|v| v.to_le_bytes()).collect();
        OwnedTensor { dtype: Dtype::F64, shape, data }
    }
    /// An `i64` tensor.
    pub fn i64(shape: Vec<usize>, values: impl IntoIterator<Item = i64>) -> Self {
        let data = values.into_iter().flat_map(|v| v.to_le_bytes()).collect();
        OwnedTensor { dtype: Dtype::I64, shape, data }
    }
}

impl OwnedTensor {
    /// The element type.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }
    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// The little-endian bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }
}

impl View for &OwnedTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Serialise named tensors (and an optional `__metadata__` string map) into safetensors bytes,
/// with the header's keys sorted ([`canonical_safetensors`]): the same contents are always the
/// same bytes.
pub fn safetensors_bytes(
    tensors: &[(&str, OwnedTensor)],
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let raw = safetensors::tensor::serialize(tensors.iter().map(|(n, t)| (*n, t)), metadata)
        .context("serialising safetensors")?;
    canonical_safetensors(&raw)
}

/// The same safetensors file with its JSON header's keys sorted (and re-padded to 8 bytes), so
/// that equal contents are equal bytes: `safetensors` writes the `__metadata__` map in hash
/// order, which differs from process to process. Tensor data and offsets are unchanged.
pub fn canonical_safetensors(bytes: &[u8]) -> Result<Vec<u8>> {
    let n = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
        .filter(|&n| n <= bytes.len() - 8)
        .context("canonicalising a safetensors header: the file is shorter than its header")?;
    // serde_json's maps are sorted by key (no `preserve_order` feature in this workspace).
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n])
        .context("canonicalising a safetensors header: it is not JSON")?;
    let mut json = serde_json::to_vec(&header)?;
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[8 + n..]);
    Ok(out)
}

/// What to do with an existing results directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExistingDir {
    /// Refuse a non-empty directory.
    Refuse,
    /// Replace it (`--force`).
    Replace,
    /// Continue the run recorded in it (`--resume`).
    Resume,
}

/// Check, before any computation, that `dir` can receive results: it must not exist, or be an
/// empty directory, or `existing` must say what to do with it; its parent must be creatable and
/// writable. Returns `true` when an earlier run is to be resumed.
pub fn check_output_dir(dir: &Path, existing: ExistingDir) -> Result<bool> {
    if dir.exists() {
        if !dir.is_dir() {
            bail!(
                "output path {} exists and is not a directory: choose another --output",
                dir.display()
            );
        }
        // Temporaries of a killed run's atomic writes do not make a directory non-empty.
        let non_empty = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read output directory {}", dir.display()))?
            .filter_map(|e| e.ok())
            .any(|e| !is_temporary(&e.file_name().to_string_lossy()));
        if non_empty {
            match existing {
                ExistingDir::Refuse => bail!(
                    "output directory {} is not empty: pass --resume to continue the run in it, --force to replace it, or choose another --output",
                    dir.display()
                ),
                ExistingDir::Resume => {
                    if !dir.join(RUN_FILE).exists() {
                        bail!(
                            "--resume: {} holds no {RUN_FILE}, so it is not a fisher-stein results directory: choose another --output",
                            dir.display()
                        );
                    }
                    return Ok(true);
                }
                ExistingDir::Replace => {}
            }
        }
    }
    let parent = parent_of(dir);
    std::fs::create_dir_all(&parent).map_err(|e| {
        anyhow!("cannot create {} ({e}): choose a writable --output", parent.display())
    })?;
    let probe = parent.join(format!(".fisher-stein-probe-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|e| {
        anyhow!("cannot write in {} ({e}): choose a writable --output", parent.display())
    })?;
    std::fs::remove_file(&probe).ok();
    Ok(false)
}

/// Whether a file name is one of [`write_atomic`]'s temporaries (`.NAME.tmp-PID`).
fn is_temporary(name: &str) -> bool {
    name.starts_with('.') && name.contains(".tmp-")
}

/// Remove the temporaries a killed run's atomic writes left in `dir` (call with the directory's
/// [`OutputLock`] held, so that no live run owns them).
pub fn remove_stale_temporaries(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    for e in entries.filter_map(|e| e.ok()) {
        if is_temporary(&e.file_name().to_string_lossy()) {
            std::fs::remove_file(e.path())
                .with_context(|| format!("removing the stale temporary {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// An exclusive advisory lock (`flock`) on a results directory, held for the whole run so that
/// two runs pointed at the same `--output` cannot interleave their writes. The lock lives in a
/// hidden sibling file `.NAME.fisher-stein.lock` (the directory itself may not exist yet, and
/// `--force` replaces it); the operating system releases it when the process ends, however it
/// ends, so a killed run never leaves a stale lock. The file is removed when the lock is dropped.
pub struct OutputLock {
    path: PathBuf,
    _file: std::fs::File,
}

impl OutputLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed while still locked: a run that opened the old file sees, after locking it,
        // that the path no longer names it, and retries on a fresh file (see `lock_output`).
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Take the [`OutputLock`] of `dir`, or fail at once (one line, naming the other run's pid)
/// when another run holds it.
pub fn lock_output(dir: &Path) -> Result<OutputLock> {
    use std::io::Write;
    let parent = parent_of(dir);
    std::fs::create_dir_all(&parent).map_err(|e| {
        anyhow!("cannot create {} ({e}): choose a writable --output", parent.display())
    })?;
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
    let path = parent.join(format!(".{}.fisher-stein.lock", name.as_deref().unwrap_or("output")));
    loop {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| {
                anyhow!(
                    "cannot create the lock file {} ({e}): choose a writable --output",
                    path.display()
                )
            })?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = holder.trim();
                let who =
                    if holder.is_empty() { String::new() } else { format!(" (pid {holder})") };
                bail!(
                    "{} is in use by another fisher-stein run{who}: wait for it to finish, or choose another --output",
                    dir.display()
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()))
            }
        }
        if same_file(&file, &path) {
            file.set_len(0).ok();
            let _ = write!(file, "{}", std::process::id());
            return Ok(OutputLock { path, _file: file });
        }
        // The holder removed the file between our open and our lock: try again on a new one.
    }
}

#[cfg(unix)]
fn same_file(file: &std::fs::File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_file: &std::fs::File, path: &Path) -> bool {
    path.exists()
}

/// The file a run records its settings in (checked by `--resume`).
pub const RUN_FILE: &str = "run.json";

fn parent_of(dir: &Path) -> PathBuf {
    match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Create (or, with `replace`, empty and re-create) the results directory.
pub fn create_results_dir(dir: &Path, replace: bool) -> Result<()> {
    if replace && dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("replacing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

/// Write a file atomically: to a hidden temporary file in the same directory, flushed, then
/// renamed over `path`. A reader (or a resumed run) never sees a half-written file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = parent_of(path);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn existing_directories() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("out");
        assert!(!check_output_dir(&dir, ExistingDir::Refuse).unwrap());
        create_results_dir(&dir, false).unwrap();
        write_atomic(&dir.join("a.txt"), b"1").unwrap();
        assert_eq!(std::fs::read(dir.join("a.txt")).unwrap(), b"1");
        let e = check_output_dir(&dir, ExistingDir::Refuse).unwrap_err();
        assert!(e.to_string().contains("--force"), "{e}");
        let e = check_output_dir(&dir, ExistingDir::Resume).unwrap_err();
        assert!(e.to_string().contains(RUN_FILE), "{e}");
        write_atomic(&dir.join(RUN_FILE), b"{}").unwrap();
        assert!(check_output_dir(&dir, ExistingDir::Resume).unwrap());
        assert!(!check_output_dir(&dir, ExistingDir::Replace).unwrap());
        create_results_dir(&dir, true).unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        // Nothing temporary left behind.
        let left: Vec<_> =
            std::fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("out")]);
    }

    #[test]
    fn canonical_safetensors_are_the_same_bytes_for_the_same_contents() {
        let t = OwnedTensor::f64(vec![2], [1.0, 2.0]);
        let bytes = |keys: &[usize]| {
            let meta: std::collections::HashMap<String, String> =
                keys.iter().map(|k| (format!("key{k}"), format!("value {k}"))).collect();
            let raw = safetensors::tensor::serialize([("x", &t)], Some(meta)).unwrap();
            canonical_safetensors(&raw).unwrap()
        };
        let a = bytes(&(0..16).collect::<Vec<_>>());
        let b = bytes(&(0..16).rev().collect::<Vec<_>>());
        assert_eq!(a, b);
        let (_, header) = safetensors::SafeTensors::read_metadata(&a).unwrap();
        assert_eq!(header.metadata().as_ref().unwrap()["key7"], "value 7");
        let st = safetensors::SafeTensors::deserialize(&a).unwrap();
        assert_eq!(st.tensor("x").unwrap().data(), t.bytes());
    }

    #[test]
    fn a_second_lock_on_the_same_directory_is_refused_until_the_first_is_dropped() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("out");
        let first = lock_output(&dir).unwrap();
        let e = lock_output(&dir).err().unwrap().to_string();
        assert!(e.contains("in use by another fisher-stein run"), "{e}");
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        let path = first.path().to_path_buf();
        drop(first);
        assert!(!path.exists());
        let again = lock_output(&dir).unwrap();
        drop(again);
        // Stale temporaries do not make a directory non-empty, and are removed.
        create_results_dir(&dir, false).unwrap();
        std::fs::write(dir.join(".run.json.tmp-1"), b"half").unwrap();
        assert!(!check_output_dir(&dir, ExistingDir::Refuse).unwrap());
        remove_stale_temporaries(&dir).unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    }
}
