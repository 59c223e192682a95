//! Results directories, written atomically: everything goes to a hidden temporary directory next
//! to the target, which is renamed into place only once every file is complete. A failed or
//! killed run leaves no half-written results directory behind.

use anyhow::{bail, Context, Result};
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

/// Serialise named tensors into safetensors bytes.
pub fn safetensors_bytes(tensors: &[(&str, OwnedTensor)]) -> Result<Vec<u8>> {
    safetensors::tensor::serialize(tensors.iter().map(|(n, t)| (*n, t)), None)
        .context("serialising the results as safetensors")
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
        let non_empty = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read output directory {}", dir.display()))?
            .next()
            .is_some();
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
    std::fs::create_dir_all(&parent).with_context(|| {
        format!("cannot create {}: choose a writable --output", parent.display())
    })?;
    let probe = parent.join(format!(".fisher-stein-probe-{}", std::process::id()));
    std::fs::write(&probe, b"").with_context(|| {
        format!("cannot write in {}: choose a writable --output", parent.display())
    })?;
    std::fs::remove_file(&probe).ok();
    Ok(false)
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
}
