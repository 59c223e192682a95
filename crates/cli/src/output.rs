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

/// Check, before any computation, that `dir` can receive results: it must not exist, or be an
/// empty directory, or `force` must be set; its parent must be creatable and writable.
pub fn check_output_dir(dir: &Path, force: bool) -> Result<()> {
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
        if non_empty && !force {
            bail!(
                "output directory {} is not empty: pass --force to replace it, or choose another --output",
                dir.display()
            );
        }
    }
    let parent = parent_of(dir);
    std::fs::create_dir_all(&parent).with_context(|| {
        format!("cannot create {}: choose a writable --output", parent.display())
    })?;
    let probe = tempdir_in(&parent, dir).with_context(|| {
        format!("cannot write in {}: choose a writable --output", parent.display())
    })?;
    std::fs::remove_dir(&probe).ok();
    Ok(())
}

fn parent_of(dir: &Path) -> PathBuf {
    match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Create a fresh hidden directory next to `target` in `parent`.
fn tempdir_in(parent: &Path, target: &Path) -> std::io::Result<PathBuf> {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "results".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = parent.join(format!(".{name}.tmp-{}-{nanos}", std::process::id()));
    std::fs::create_dir(&tmp)?;
    Ok(tmp)
}

/// Removes the temporary directory unless the results were committed.
struct TempDirGuard(Option<PathBuf>);

impl Drop for TempDirGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// Write `files` (name, bytes) into `dir` atomically: all into a temporary sibling directory,
/// then one rename. An existing empty `dir`, or any `dir` with `force`, is replaced.
pub fn write_results_dir(dir: &Path, force: bool, files: &[(&str, Vec<u8>)]) -> Result<()> {
    check_output_dir(dir, force)?;
    let parent = parent_of(dir);
    let tmp = tempdir_in(&parent, dir)
        .with_context(|| format!("cannot write in {}", parent.display()))?;
    let mut guard = TempDirGuard(Some(tmp.clone()));
    for (name, bytes) in files {
        let path = tmp.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("replacing {}", dir.display()))?;
    }
    std::fs::rename(&tmp, dir).with_context(|| format!("moving results into {}", dir.display()))?;
    guard.0 = None;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_and_refusal() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("out");
        write_results_dir(&dir, false, &[("a.txt", b"1".to_vec())]).unwrap();
        assert_eq!(std::fs::read(dir.join("a.txt")).unwrap(), b"1");
        let e = write_results_dir(&dir, false, &[("a.txt", b"2".to_vec())]).unwrap_err();
        assert!(e.to_string().contains("--force"), "{e}");
        write_results_dir(&dir, true, &[("b.txt", b"3".to_vec())]).unwrap();
        assert!(!dir.join("a.txt").exists() && dir.join("b.txt").exists());
        // Nothing temporary left behind.
        let left: Vec<_> =
            std::fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("out")]);
    }
}
