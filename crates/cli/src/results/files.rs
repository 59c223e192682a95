//! The per-sequence results files (`fisher*.safetensors` / `fisher*.npz`) read back: every array
//! as `f64`, with typed accessors for the tensors every file has.

use crate::npz::read_npz;
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One array of a results file, as `f64`.
#[derive(Clone, Debug, PartialEq)]
pub struct Array {
    /// Shape.
    pub shape: Vec<usize>,
    /// Values, row-major.
    pub data: Vec<f64>,
}

/// Every array of a results file, by tensor name. [`read_results_bytes`] checks that `layer` and
/// `positions` (`[N]`), `token_ids` and either `fisher` (`[N, d, d]`) or, for
/// `--estimator top-k`, `eigenvalues` (`[N, K]`), `eigenvectors` (`[N, d, K]`) and `trace`
/// (`[N]`) are there, so their accessors cannot fail.
#[derive(Clone, Debug, PartialEq)]
pub struct Arrays {
    arrays: HashMap<String, Array>,
}

impl Arrays {
    /// The array `name`, if the file has it.
    pub fn get(&self, name: &str) -> Option<&Array> {
        self.arrays.get(name)
    }

    fn required(&self, name: &str) -> &Array {
        self.arrays.get(name).unwrap_or_else(|| unreachable!("checked by read_results_bytes"))
    }

    /// `fisher`: the matrices, `[N, d, d]` (absent from `--estimator top-k` files).
    pub fn fisher(&self) -> Option<&Array> {
        self.get("fisher")
    }

    /// Whether this is an `--estimator top-k` file: eigenpairs, no matrices.
    pub fn is_top_k(&self) -> bool {
        self.fisher().is_none()
    }

    /// `N`, the number of analysed positions.
    pub fn n(&self) -> usize {
        self.required("layer").data.len()
    }

    /// `d`.
    pub fn d(&self) -> usize {
        match self.fisher() {
            Some(f) => f.shape[1],
            None => self.required("eigenvectors").shape[1],
        }
    }

    /// Matrix `i`'s values, row-major (`d × d`); `None` in a top-k file.
    pub fn matrix(&self, i: usize) -> Option<&[f64]> {
        let d = self.d();
        self.fisher().map(|f| &f.data[i * d * d..(i + 1) * d * d])
    }

    /// Position `i`'s spectrum: of its matrix (top `rank` pairs, at least 5), or as a top-k file
    /// stored it (the computed pairs and trace; effective rank and participation ratio NaN), with
    /// the trace's standard error where it is an estimate.
    pub fn spectrum(
        &self,
        i: usize,
        rank: usize,
    ) -> Result<(fs_estimators::Spectrum, Option<f64>)> {
        let d = self.d();
        if let Some(m) = self.matrix(i) {
            let m = fs_estimators::Matrix::from_vec(d, d, m.to_vec())?;
            return Ok((fs_estimators::spectrum(&m, Some(rank.max(5).min(d)))?, None));
        }
        let (values, vectors) =
            self.eigenpairs(i).unwrap_or_else(|| unreachable!("checked on read"));
        let se = self.get("trace_std_error").map(|a| a.data[i]).filter(|x| x.is_finite());
        let spectrum = fs_estimators::Spectrum {
            eigenvalues: values.to_vec(),
            eigenvectors: fs_estimators::Matrix::from_vec(d, values.len(), vectors.to_vec())?,
            trace: self.required("trace").data[i],
            effective_rank: f64::NAN,
            participation_ratio: f64::NAN,
            clamped_negative: 0,
            min_raw_eigenvalue: f64::NAN,
        };
        Ok((spectrum, se))
    }

    /// A top-k file's eigenpairs of position `i`: eigenvalues (`K`) and eigenvectors as the
    /// columns of a row-major `d × K` block; `None` in a file without stored eigenpairs.
    pub fn eigenpairs(&self, i: usize) -> Option<(&[f64], &[f64])> {
        let (values, vectors) = (self.get("eigenvalues")?, self.get("eigenvectors")?);
        let k = values.shape[1];
        let d = vectors.shape[1];
        Some((&values.data[i * k..(i + 1) * k], &vectors.data[i * d * k..(i + 1) * d * k]))
    }

    /// Matrix `i`'s split layer.
    pub fn layer(&self, i: usize) -> usize {
        self.required("layer").data[i] as usize
    }

    /// Matrix `i`'s position.
    pub fn position(&self, i: usize) -> usize {
        self.required("positions").data[i] as usize
    }

    /// The sequence's token ids.
    pub fn token_ids(&self) -> Vec<u32> {
        self.required("token_ids").data.iter().map(|&x| x as u32).collect()
    }

    /// The sequence's document index (`sequence`; 0 if the file has none).
    pub fn sequence(&self) -> usize {
        self.get("sequence").and_then(|s| s.data.first().copied()).unwrap_or(0.0) as usize
    }

    /// `probs_entropy`: the next-token entropy per matrix, if stored.
    pub fn entropy(&self) -> Option<&Array> {
        self.get("probs_entropy")
    }

    /// `projections` (`--directions K`): `hᵀv` per matrix and direction, `[N, K]`.
    pub fn projections(&self) -> Option<&Array> {
        self.get("projections")
    }

    /// Whether the file carries `--directions` read-outs (`direction_kl`).
    pub fn has_directions(&self) -> bool {
        self.arrays.contains_key("direction_kl")
    }
}

/// Read every array of a results file (safetensors or npz) as `f64`.
pub fn read_results(path: &Path) -> Result<Arrays> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    read_results_bytes(path, &bytes)
}

/// Every tensor of a safetensors file (F32, F64 or I64), widened to `f64`; the error names
/// the problem (not the file).
pub(crate) fn safetensors_arrays(
    bytes: &[u8],
) -> std::result::Result<Vec<(String, Array)>, String> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    st.tensors()
        .into_iter()
        .map(|(name, t)| {
            let data: Vec<f64> = match t.dtype() {
                safetensors::Dtype::F32 => t
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                safetensors::Dtype::F64 => t
                    .data()
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                safetensors::Dtype::I64 => t
                    .data()
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                d => return Err(format!("tensor {name} has unexpected dtype {d:?}")),
            };
            Ok((name, Array { shape: t.shape().to_vec(), data }))
        })
        .collect()
}

/// [`read_results`] on the file's bytes: `path` chooses the format (`.npz`, else safetensors)
/// and names the file in messages.
pub fn read_results_bytes(path: &Path, bytes: &[u8]) -> Result<Arrays> {
    let bad = |e: String| {
        anyhow::anyhow!(
            "{} is not a valid results file ({e}): re-run compute to regenerate it",
            path.display()
        )
    };
    let mut out = HashMap::new();
    if path.extension().is_some_and(|e| e == "npz") {
        for (name, a) in read_npz(bytes).map_err(|e| bad(format!("{e:#}")))? {
            out.insert(name, Array { shape: a.shape, data: a.data });
        }
    } else {
        for (name, a) in safetensors_arrays(bytes).map_err(bad)? {
            out.insert(name, a);
        }
    }
    for required in ["layer", "positions", "token_ids"] {
        if !out.contains_key(required) {
            return Err(bad(format!("tensor `{required}` is missing")));
        }
    }
    let n = out["layer"].data.len();
    if out["positions"].data.len() != n {
        return Err(bad("`layer` / `positions` do not have one entry per matrix".into()));
    }
    match out.get("fisher") {
        Some(Array { shape: fs, data: f }) => {
            if fs.len() != 3
                || fs[1] != fs[2]
                || f.len() != fs.iter().product::<usize>()
                || fs[0] != n
            {
                return Err(bad(format!("`fisher` has shape {fs:?}, expected [{n}, d, d]")));
            }
        }
        None => {
            // An --estimator top-k file: its eigenpairs and traces instead.
            for required in ["eigenvalues", "eigenvectors", "trace"] {
                if !out.contains_key(required) {
                    return Err(bad(format!(
                        "tensor `fisher` is missing (and so is `{required}` of a top-k file)"
                    )));
                }
            }
            let (vs, es, ts) = (&out["eigenvalues"], &out["eigenvectors"], &out["trace"]);
            let k = vs.shape.get(1).copied().unwrap_or(0);
            let ok = vs.shape.len() == 2
                && vs.shape[0] == n
                && vs.data.len() == n * k
                && es.shape.len() == 3
                && es.shape[0] == n
                && es.shape[2] == k
                && es.data.len() == es.shape.iter().product::<usize>()
                && ts.data.len() == n;
            if !ok {
                return Err(bad(format!(
                    "top-k tensors have shapes {:?}, {:?}, {:?}: expected [{n}, K], [{n}, d, K], [{n}]",
                    vs.shape, es.shape, ts.shape
                )));
            }
        }
    }
    let arrays = Arrays { arrays: out };
    Ok(arrays)
}

/// The results files of a directory written by `compute`, in order (`fisher*.safetensors`,
/// `fisher*.npz`); an error if there are none.
pub fn results_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| {
            format!("cannot read results directory {}: check the path", dir.display())
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            name.starts_with("fisher") && (name.ends_with(".safetensors") || name.ends_with(".npz"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{} holds no fisher*.safetensors or fisher*.npz: point inspect at a directory written by compute", dir.display());
    }
    Ok(files)
}
