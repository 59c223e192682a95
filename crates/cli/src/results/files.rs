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

/// Every array of a results file, by tensor name. [`read_results_bytes`] checks that `fisher`
/// (`[N, d, d]`), `layer` and `positions` (`[N]`) and `token_ids` are there, so their accessors
/// cannot fail.
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

    /// `fisher`: the matrices, `[N, d, d]`.
    pub fn fisher(&self) -> &Array {
        self.required("fisher")
    }

    /// `N`, the number of matrices.
    pub fn n(&self) -> usize {
        self.fisher().shape[0]
    }

    /// `d`.
    pub fn d(&self) -> usize {
        self.fisher().shape[1]
    }

    /// Matrix `i`'s values, row-major (`d × d`).
    pub fn matrix(&self, i: usize) -> &[f64] {
        let d = self.d();
        &self.fisher().data[i * d * d..(i + 1) * d * d]
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
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
        for (name, t) in st.tensors() {
            let v: Vec<f64> = match t.dtype() {
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
                d => return Err(bad(format!("tensor {name} has unexpected dtype {d:?}"))),
            };
            out.insert(name, Array { shape: t.shape().to_vec(), data: v });
        }
    }
    for required in ["fisher", "layer", "positions", "token_ids"] {
        if !out.contains_key(required) {
            return Err(bad(format!("tensor `{required}` is missing")));
        }
    }
    let arrays = Arrays { arrays: out };
    let Array { shape: fs, data: f } = arrays.fisher();
    if fs.len() != 3 || fs[1] != fs[2] || f.len() != fs.iter().product::<usize>() {
        return Err(bad(format!("`fisher` has shape {fs:?}, expected [N, d, d]")));
    }
    if arrays.required("layer").data.len() != fs[0]
        || arrays.required("positions").data.len() != fs[0]
    {
        return Err(bad("`layer` / `positions` do not have one entry per matrix".into()));
    }
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
