//! Validated safetensors reading into f32 host buffers.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{CheckpointError, Result};
use crate::stored::SharedBytes;
use crate::{GgmlType, StoredMatrix};

/// Largest safetensors JSON header accepted (the format's own limit).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor converted to f32, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// The tensor's name in the checkpoint.
    pub name: String,
    /// Its shape (empty for a scalar).
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values, row-major.
    pub data: Vec<f32>,
}

/// A safetensors element type: its name in the header and its size in bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Dtype {
    name: &'static str,
    bits: u64,
}

/// Every dtype of the safetensors format (0.8); only the floating ones convert to f32.
const DTYPES: &[Dtype] = &[
    Dtype { name: "BOOL", bits: 8 },
    Dtype { name: "F4", bits: 4 },
    Dtype { name: "F6_E2M3", bits: 6 },
    Dtype { name: "F6_E3M2", bits: 6 },
    Dtype { name: "U8", bits: 8 },
    Dtype { name: "I8", bits: 8 },
    Dtype { name: "F8_E5M2", bits: 8 },
    Dtype { name: "F8_E4M3", bits: 8 },
    Dtype { name: "F8_E8M0", bits: 8 },
    Dtype { name: "I16", bits: 16 },
    Dtype { name: "U16", bits: 16 },
    Dtype { name: "F16", bits: 16 },
    Dtype { name: "BF16", bits: 16 },
    Dtype { name: "I32", bits: 32 },
    Dtype { name: "U32", bits: 32 },
    Dtype { name: "F32", bits: 32 },
    Dtype { name: "C64", bits: 64 },
    Dtype { name: "F64", bits: 64 },
    Dtype { name: "I64", bits: 64 },
    Dtype { name: "U64", bits: 64 },
];

/// The dtypes [`WeightStore::read_f32`] converts.
const FLOAT_DTYPES: &str = "F32, F16, BF16, F64";

/// Where one tensor lives.
#[derive(Clone, Debug)]
struct Entry {
    /// Index into `WeightStore::files`.
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte offset of the tensor's data in its file.
    start: u64,
    /// Byte length, checked against shape × dtype size and the file size.
    len: u64,
}

/// The tensors of one or more safetensors files, headers parsed and validated, data read on
/// demand: one seek and read per tensor converted to f32, and for
/// [`WeightStore::read_stored`]'s f16/bf16 tensors a range of the file memory-mapped once
/// (no copy; the kernel pages it in as products read it).
///
/// A memory map shows the file as it is on disk: a weight file rewritten or truncated while a
/// model built from it is alive changes (or, past the new end, faults on) the mapped tensors —
/// as for every memory-mapping loader (candle, safetensors, llama.cpp).
#[derive(Clone, Debug)]
pub struct WeightStore {
    files: Vec<PathBuf>,
    tensors: BTreeMap<String, Entry>,
    /// Each file's memory map, made on its first stored read.
    maps: Vec<std::sync::OnceLock<std::sync::Arc<memmap2::Mmap>>>,
}

impl WeightStore {
    /// Parse and validate every file's header without reading tensor data: the 8-byte header
    /// length must fit in the file (and be ≤ 100 MB), the JSON must parse, every tensor's
    /// `data_offsets` must satisfy begin ≤ end ≤ data-section length, and (product of shape) ×
    /// dtype size must equal end − begin (checked arithmetic). Duplicate tensor names across
    /// files are an error. Nothing is allocated from a size the header declares before it is
    /// checked against the real file size.
    pub fn open(files: &[PathBuf]) -> Result<Self> {
        let mut tensors: BTreeMap<String, Entry> = BTreeMap::new();
        for (index, path) in files.iter().enumerate() {
            for (name, mut entry) in parse_header(path)? {
                entry.file = index;
                if let Some(previous) = tensors.get(&name) {
                    return Err(CheckpointError::safetensors(
                        path,
                        format!(
                            "tensor `{name}` is also in {}: each tensor must be in exactly one shard (re-export the checkpoint, or fix model.safetensors.index.json)",
                            files[previous.file].display()
                        ),
                    ));
                }
                tensors.insert(name, entry);
            }
        }
        let maps = files.iter().map(|_| std::sync::OnceLock::new()).collect();
        Ok(WeightStore { files: files.to_vec(), tensors, maps })
    }

    /// The tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the files hold no tensors at all.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The files, in the order given to [`WeightStore::open`].
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// A tensor's shape.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|e| e.shape.clone())
    }

    /// A tensor's dtype as the header spells it (`"F32"`, `"BF16"`, …).
    pub fn dtype(&self, name: &str) -> Option<&'static str> {
        self.tensors.get(name).map(|e| e.dtype.name)
    }

    /// The first of `candidates` present in the store (for prefixed / unprefixed key names).
    pub fn find(&self, candidates: &[&str]) -> Option<String> {
        candidates.iter().find(|c| self.contains(c)).map(|c| c.to_string())
    }

    /// The file that holds `name`.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.tensors.get(name).map(|e| self.files[e.file].as_path())
    }

    /// Read one tensor's bytes (seek + read of just its range) and convert F32, F16, BF16 or
    /// F64 to f32. [`CheckpointError::MissingTensor`] if absent; a
    /// [`CheckpointError::Safetensors`] error naming the tensor for any other dtype, and for a
    /// NaN or infinite value.
    pub fn read_f32(&self, name: &str) -> Result<HostTensor> {
        let (entry, bytes) = self.read_bytes(name)?;
        let path = &self.files[entry.file];
        let width = match entry.dtype.name {
            "F32" => 4,
            "F16" | "BF16" => 2,
            _ => 8,
        };
        let chunks = bytes.chunks_exact(width);
        let data: Vec<f32> = match entry.dtype.name {
            "F32" => chunks.map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            "F16" => chunks.map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            "BF16" => chunks.map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            _ => chunks
                .map(|c| {
                    f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
                })
                .collect(),
        };
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(CheckpointError::safetensors(
                path,
                format!("tensor `{name}` holds {} at flat index {i} (as f32): the weights are corrupt or overflowed, re-export them", data[i]),
            ));
        }
        Ok(HostTensor { name: name.to_string(), shape: entry.shape.clone(), data })
    }

    /// One tensor's entry and raw bytes (one seek and read of just its range); an error naming
    /// the tensor for a dtype that is not F32, F16, BF16 or F64.
    fn read_bytes(&self, name: &str) -> Result<(&Entry, Vec<u8>)> {
        let entry = self.tensors.get(name).ok_or_else(|| CheckpointError::MissingTensor {
            name: name.to_string(),
            files: self.file_list(),
        })?;
        let path = &self.files[entry.file];
        if !matches!(entry.dtype.name, "F32" | "F16" | "BF16" | "F64") {
            return Err(CheckpointError::safetensors(
                path,
                format!("tensor `{name}` has dtype {}, which cannot be read as f32 weights (readable: {FLOAT_DTYPES}): use a checkpoint with floating-point weights", entry.dtype.name),
            ));
        }
        let len = usize::try_from(entry.len).map_err(|_| {
            CheckpointError::safetensors(
                path,
                format!("tensor `{name}` is too large for this machine"),
            )
        })?;
        let mut bytes = vec![0u8; len];
        let mut file = File::open(path).map_err(|e| CheckpointError::io(path, e))?;
        file.seek(SeekFrom::Start(entry.start)).map_err(|e| CheckpointError::io(path, e))?;
        file.read_exact(&mut bytes).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                CheckpointError::safetensors(
                    path,
                    format!("the file ended inside tensor `{name}` (it changed or was truncated after it was opened): re-download it"),
                )
            } else {
                CheckpointError::io(path, e)
            }
        })?;
        Ok((entry, bytes))
    }

    /// One tensor in the precision it is stored in (F32, F16 and BF16 kept; F64 narrowed to f32)
    /// as a [`StoredMatrix`] of `expected[0]` rows (1 for a scalar) — a vector is a column —
    /// after checking its shape is `expected` ([`CheckpointError::ShapeMismatch`]). Values are
    /// not checked for NaN/±∞ here: [`StoredMatrix::check_finite`] does that.
    pub fn read_stored(&self, name: &str, expected: &[usize]) -> Result<StoredMatrix> {
        self.check_shape(name, expected)?;
        if let Some(entry) = self.tensors.get(name) {
            let ty = match entry.dtype.name {
                "F16" => Some(GgmlType::F16),
                "BF16" => Some(GgmlType::BF16),
                _ => None,
            };
            if let Some(ty) = ty {
                let path = &self.files[entry.file];
                let bytes = self.mapped(entry.file, name, entry.start, entry.len)?;
                let (rows, cols) = crate::stored::matrix_dims(&entry.shape);
                return StoredMatrix::from_shared_bytes(rows, cols, ty, bytes).map_err(|m| {
                    CheckpointError::safetensors(path, format!("tensor `{name}`: {m}"))
                });
            }
        }
        let (entry, bytes) = self.read_bytes(name)?;
        let (rows, cols) = crate::stored::matrix_dims(&entry.shape);
        let ty = match entry.dtype.name {
            "F32" => GgmlType::F32,
            "F16" => GgmlType::F16,
            "BF16" => GgmlType::BF16,
            _ => {
                let data = bytes
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                    .collect();
                return Ok(StoredMatrix::from_f32(rows, cols, data));
            }
        };
        StoredMatrix::from_bytes(rows, cols, ty, bytes).map_err(|m| {
            CheckpointError::safetensors(&self.files[entry.file], format!("tensor `{name}`: {m}"))
        })
    }

    /// Bytes `start..start + len` of file `file`, from its memory map (made on first use).
    fn mapped(&self, file: usize, name: &str, start: u64, len: u64) -> Result<SharedBytes> {
        let path = &self.files[file];
        let map = match self.maps[file].get() {
            Some(map) => map.clone(),
            None => {
                let f = File::open(path).map_err(|e| CheckpointError::io(path, e))?;
                // SAFETY: the map is read only; see the type's docs for a file changed on disk
                // while mapped.
                let map =
                    unsafe { memmap2::Mmap::map(&f) }.map_err(|e| CheckpointError::io(path, e))?;
                self.maps[file].get_or_init(|| std::sync::Arc::new(map)).clone()
            }
        };
        let range = usize::try_from(start)
            .ok()
            .zip(usize::try_from(start.saturating_add(len)).ok())
            .map(|(a, b)| a..b);
        range.and_then(|r| SharedBytes::new(map, r)).ok_or_else(|| {
            CheckpointError::safetensors(
                path,
                format!("the file ended inside tensor `{name}` (it changed or was truncated after it was opened): re-download it"),
            )
        })
    }

    /// As [`WeightStore::read_f32`], and [`CheckpointError::ShapeMismatch`] (naming the tensor,
    /// both shapes and the file) unless the tensor's shape is `expected`. The shape is checked
    /// before any data is read.
    pub fn read_f32_shaped(&self, name: &str, expected: &[usize]) -> Result<HostTensor> {
        self.check_shape(name, expected)?;
        self.read_f32(name)
    }

    /// [`CheckpointError::ShapeMismatch`] (naming the tensor, both shapes and the file) when a
    /// tensor `name` exists with another shape than `expected`; absent tensors pass (the read
    /// names them).
    fn check_shape(&self, name: &str, expected: &[usize]) -> Result<()> {
        match self.tensors.get(name) {
            Some(entry) if entry.shape != expected => Err(CheckpointError::ShapeMismatch {
                name: name.to_string(),
                expected: expected.to_vec(),
                got: entry.shape.clone(),
                path: self.files[entry.file].clone(),
            }),
            _ => Ok(()),
        }
    }

    fn file_list(&self) -> String {
        if self.files.is_empty() {
            return "no weight files".to_string();
        }
        self.files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    }
}

/// Parse and validate one file's header; entries come back with `file` = 0.
fn parse_header(path: &Path) -> Result<Vec<(String, Entry)>> {
    let bad = |m: String| CheckpointError::safetensors(path, m);
    let mut file = File::open(path).map_err(|e| CheckpointError::io(path, e))?;
    let file_len = file.metadata().map_err(|e| CheckpointError::io(path, e))?.len();
    const REDOWNLOAD: &str = "re-download or re-export the file";
    if file_len < 8 {
        return Err(bad(format!(
            "the file is {file_len} bytes, too short for the 8-byte header length (truncated or not safetensors): {REDOWNLOAD}"
        )));
    }
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes).map_err(|e| CheckpointError::io(path, e))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES {
        return Err(bad(format!(
            "the header length is {header_len} bytes, over the {MAX_HEADER_BYTES}-byte limit (corrupt, or not a safetensors file): {REDOWNLOAD}"
        )));
    }
    let data_start = 8 + header_len; // ≤ 8 + 1e8: no overflow.
    if data_start > file_len {
        return Err(bad(format!(
            "the header length is {header_len} bytes but the file has only {} after it (truncated or not safetensors): {REDOWNLOAD}",
            file_len - 8
        )));
    }
    let data_len = file_len - data_start;
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(|e| CheckpointError::io(path, e))?;
    let header: serde_json::Map<String, Value> = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("the header is not a JSON object ({e}): {REDOWNLOAD}")))?;
    let mut entries = Vec::with_capacity(header.len());
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let bad_entry = |what: &str| bad(format!("tensor `{name}`: {what}: {REDOWNLOAD}"));
        let info =
            info.as_object().ok_or_else(|| bad_entry("its header entry is not an object"))?;
        let dtype_name = info
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad_entry("`dtype` is missing or not a string"))?;
        let dtype = *DTYPES
            .iter()
            .find(|d| d.name == dtype_name)
            .ok_or_else(|| bad_entry(&format!("unknown dtype {dtype_name:?}")))?;
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|a| {
                a.iter().map(|v| v.as_u64().and_then(|n| usize::try_from(n).ok())).collect()
            })
            .ok_or_else(|| {
                bad_entry("`shape` is missing or not a list of non-negative integers")
            })?;
        let offsets: Vec<u64> = info
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|a| a.len() == 2)
            .and_then(|a| a.iter().map(Value::as_u64).collect())
            .ok_or_else(|| bad_entry("`data_offsets` is missing or not [begin, end]"))?;
        let (begin, end) = (offsets[0], offsets[1]);
        if begin > end {
            return Err(bad_entry(&format!("data_offsets [{begin}, {end}] run backwards")));
        }
        if end > data_len {
            return Err(bad_entry(&format!(
                "data_offsets [{begin}, {end}] lie beyond the data section ({data_len} bytes; the file is truncated or the header corrupt)"
            )));
        }
        let bits = shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
            .and_then(|n| n.checked_mul(dtype.bits));
        let expected_bytes = match bits {
            Some(b) if b.is_multiple_of(8) => b / 8,
            Some(_) => {
                return Err(bad_entry(&format!(
                    "shape {shape:?} of {dtype_name} does not fill whole bytes"
                )));
            }
            None => {
                return Err(bad_entry(&format!(
                    "shape {shape:?} of {dtype_name} overflows 64-bit sizes"
                )));
            }
        };
        if expected_bytes != end - begin {
            return Err(bad_entry(&format!(
                "shape {shape:?} of {dtype_name} needs {expected_bytes} bytes but data_offsets [{begin}, {end}] give {}",
                end - begin
            )));
        }
        entries.push((
            name,
            Entry { file: 0, dtype, shape, start: data_start + begin, len: end - begin },
        ));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;
    use safetensors::Dtype as StDtype;
    use std::collections::HashMap;

    fn write(path: &Path, tensors: &[(&str, StDtype, Vec<usize>, Vec<u8>)]) {
        let views: HashMap<String, TensorView<'_>> = tensors
            .iter()
            .map(|(n, dt, shape, bytes)| {
                (n.to_string(), TensorView::new(*dt, shape.clone(), bytes).unwrap())
            })
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// A file from raw parts: header JSON and data bytes.
    fn raw(path: &Path, header: &str, declared_len: Option<u64>, data: &[u8]) {
        let mut bytes = declared_len.unwrap_or(header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        std::fs::write(path, bytes).unwrap();
    }

    fn open_err(path: &Path) -> String {
        let e = WeightStore::open(&[path.to_path_buf()]).unwrap_err();
        let m = e.to_string();
        assert!(matches!(e, CheckpointError::Safetensors { .. }), "{m}");
        assert!(!m.contains('\n'), "{m}");
        assert!(m.contains(&path.display().to_string()), "{m}");
        m
    }

    #[test]
    fn reads_f32_f16_bf16_f64_exactly() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("model.safetensors");
        let vals = [0.0f32, 1.0, -2.5, 0.1, 65504.0, 3.0e-5, -0.0, 1234.5];
        let f16: Vec<u8> =
            vals.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect();
        let bf16: Vec<u8> =
            vals.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect();
        let f64b: Vec<u8> = vals.iter().flat_map(|&v| f64::from(v).to_le_bytes()).collect();
        write(
            &path,
            &[
                ("a.f32", StDtype::F32, vec![2, 4], f32_bytes(&vals)),
                ("b.f16", StDtype::F16, vec![8], f16),
                ("c.bf16", StDtype::BF16, vec![4, 2], bf16),
                ("d.f64", StDtype::F64, vec![1, 8], f64b),
                ("e.scalar", StDtype::F32, vec![], f32_bytes(&[7.0])),
                ("f.empty", StDtype::F32, vec![0, 3], vec![]),
            ],
        );
        let s = WeightStore::open(std::slice::from_ref(&path)).unwrap();
        assert_eq!(s.names(), ["a.f32", "b.f16", "c.bf16", "d.f64", "e.scalar", "f.empty"]);
        assert_eq!(s.len(), 6);
        assert_eq!(s.shape("c.bf16"), Some(vec![4, 2]));
        assert_eq!(s.dtype("c.bf16"), Some("BF16"));
        assert_eq!(s.file_of("a.f32"), Some(path.as_path()));
        assert_eq!(s.find(&["x", "b.f16", "a.f32"]), Some("b.f16".into()));
        assert_eq!(s.find(&["x"]), None);
        let a = s.read_f32("a.f32").unwrap();
        assert_eq!(a, HostTensor { name: "a.f32".into(), shape: vec![2, 4], data: vals.to_vec() });
        let h: Vec<f32> = vals.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
        assert_eq!(s.read_f32("b.f16").unwrap().data, h);
        let b: Vec<f32> = vals.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
        assert_eq!(s.read_f32("c.bf16").unwrap().data, b);
        assert_eq!(s.read_f32("d.f64").unwrap().data, vals);
        assert_eq!(s.read_f32("e.scalar").unwrap().data, [7.0]);
        assert!(s.read_f32("f.empty").unwrap().data.is_empty());
        // Exact values survive the round trip where they are representable.
        assert_eq!(s.read_f32("b.f16").unwrap().data[..3], [0.0, 1.0, -2.5]);
        assert_eq!(s.read_f32("c.bf16").unwrap().data[..3], [0.0, 1.0, -2.5]);
        // Stored reads: f16/bf16 kept as stored (memory-mapped) and widened to the same values;
        // f32 and f64 as f32.
        for (name, shape, ty, want) in [
            ("b.f16", vec![8], GgmlType::F16, &h),
            ("c.bf16", vec![4, 2], GgmlType::BF16, &b),
            ("a.f32", vec![2, 4], GgmlType::F32, &vals.to_vec()),
            ("d.f64", vec![1, 8], GgmlType::F32, &vals.to_vec()),
        ] {
            let m = s.read_stored(name, &shape).unwrap();
            assert_eq!((m.dtype(), m.to_f32()), (ty, want.clone()), "{name}");
        }
        // A file truncated after the store was opened: a one-line error, not a fault.
        let t2 = tempfile::tempdir().unwrap();
        let cut = t2.path().join("cut.safetensors");
        std::fs::copy(&path, &cut).unwrap();
        let store = WeightStore::open(std::slice::from_ref(&cut)).unwrap();
        let inside = store.tensors["c.bf16"].start + 4;
        std::fs::OpenOptions::new().write(true).open(&cut).unwrap().set_len(inside).unwrap();
        let e = store.read_stored("c.bf16", &[4, 2]).unwrap_err().to_string();
        assert!(e.contains("the file ended inside tensor `c.bf16`"), "{e}");
    }

    #[test]
    fn shapes_and_missing_tensors() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("model.safetensors");
        write(&path, &[("w", StDtype::F32, vec![2, 3], f32_bytes(&[1.0; 6]))]);
        let s = WeightStore::open(std::slice::from_ref(&path)).unwrap();
        assert_eq!(s.read_f32_shaped("w", &[2, 3]).unwrap().data, [1.0; 6]);
        let e = s.read_f32_shaped("w", &[3, 2]).unwrap_err();
        match &e {
            CheckpointError::ShapeMismatch { name, expected, got, path: p } => {
                assert_eq!(
                    (name.as_str(), expected, got, p),
                    ("w", &vec![3, 2], &vec![2, 3], &path)
                );
            }
            other => panic!("{other}"),
        }
        let m = e.to_string();
        assert!(m.contains("`w`") && m.contains("[3, 2]") && m.contains("[2, 3]"), "{m}");
        let e = s.read_f32("nope").unwrap_err();
        assert!(matches!(e, CheckpointError::MissingTensor { .. }));
        assert!(e.to_string().contains("nope") && e.to_string().contains("model.safetensors"));
        let e = s.read_f32_shaped("nope", &[1]).unwrap_err();
        assert!(matches!(e, CheckpointError::MissingTensor { .. }));
    }

    #[test]
    fn unsupported_dtype_and_non_finite() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("model.safetensors");
        let ids: Vec<u8> = [1i64, 2, 3].iter().flat_map(|v| v.to_le_bytes()).collect();
        write(
            &path,
            &[
                ("position_ids", StDtype::I64, vec![1, 3], ids),
                ("nan", StDtype::F32, vec![3], f32_bytes(&[0.0, f32::NAN, 1.0])),
                ("inf", StDtype::F64, vec![1], 1e300f64.to_le_bytes().to_vec()),
            ],
        );
        // Opening succeeds: an integer buffer is legitimate, it just cannot be read as f32.
        let s = WeightStore::open(&[path]).unwrap();
        for (name, needle) in [("position_ids", "I64"), ("nan", "NaN"), ("inf", "inf")] {
            let e = s.read_f32(name).unwrap_err();
            let m = e.to_string();
            assert!(matches!(e, CheckpointError::Safetensors { .. }), "{m}");
            assert!(m.contains(name) && m.contains(needle), "{m}");
        }
    }

    #[test]
    fn duplicate_names_across_shards() {
        let t = tempfile::tempdir().unwrap();
        let a = t.path().join("a.safetensors");
        let b = t.path().join("b.safetensors");
        write(&a, &[("w", StDtype::F32, vec![1], f32_bytes(&[1.0]))]);
        write(&b, &[("w", StDtype::F32, vec![1], f32_bytes(&[2.0]))]);
        let e = WeightStore::open(&[a.clone(), b.clone()]).unwrap_err();
        let m = e.to_string();
        assert!(matches!(e, CheckpointError::Safetensors { .. }), "{m}");
        assert!(m.contains("`w`") && m.contains("a.safetensors") && m.contains("b.safetensors"));
        // Distinct names across shards are fine.
        write(&b, &[("v", StDtype::F32, vec![1], f32_bytes(&[2.0]))]);
        let s = WeightStore::open(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(s.file_of("v"), Some(b.as_path()));
        assert_eq!(s.read_f32("v").unwrap().data, [2.0]);
        assert_eq!(s.read_f32("w").unwrap().data, [1.0]);
    }

    #[test]
    fn corrupt_files_are_errors() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("bad.safetensors");
        let good_header = r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        // Too short for the length prefix.
        std::fs::write(&p, [1u8, 2, 3]).unwrap();
        assert!(open_err(&p).contains("too short"));
        // Empty file.
        std::fs::write(&p, []).unwrap();
        assert!(open_err(&p).contains("too short"));
        // Header length larger than the file.
        raw(&p, good_header, Some(1_000_000), &[0; 8]);
        assert!(open_err(&p).contains("1000000"));
        // Header length absurdly large (no allocation of it).
        raw(&p, good_header, Some(u64::MAX), &[0; 8]);
        assert!(open_err(&p).contains("limit"));
        // Truncated data section.
        raw(&p, good_header, None, &[0; 5]);
        assert!(open_err(&p).contains("beyond the data section"));
        // Offsets beyond the file.
        raw(&p, r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#, None, &[0; 8]);
        assert!(open_err(&p).contains("beyond"));
        // Huge offsets (no overflow).
        let h = format!(
            r#"{{"w":{{"dtype":"F32","shape":[2],"data_offsets":[{},{}]}}}}"#,
            u64::MAX - 1,
            u64::MAX
        );
        raw(&p, &h, None, &[0; 8]);
        open_err(&p);
        // Backwards offsets.
        raw(&p, r#"{"w":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}"#, None, &[0; 8]);
        assert!(open_err(&p).contains("backwards"));
        // Size ≠ shape × dtype.
        raw(&p, r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, None, &[0; 8]);
        assert!(open_err(&p).contains("needs 12 bytes"));
        // Shape product overflow.
        let h = format!(
            r#"{{"w":{{"dtype":"F32","shape":[{},{}],"data_offsets":[0,8]}}}}"#,
            u64::MAX / 2,
            4
        );
        raw(&p, &h, None, &[0; 8]);
        assert!(open_err(&p).contains("overflows"));
        // Unknown dtype, bad shape, bad JSON, non-object header.
        raw(&p, r#"{"w":{"dtype":"F3","shape":[2],"data_offsets":[0,8]}}"#, None, &[0; 8]);
        assert!(open_err(&p).contains("F3"));
        raw(&p, r#"{"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}"#, None, &[0; 8]);
        assert!(open_err(&p).contains("shape"));
        raw(&p, r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0]}}"#, None, &[0; 8]);
        assert!(open_err(&p).contains("data_offsets"));
        raw(&p, r#"{"w":{"dtype":"F32","shape":[2],"data_"#, None, &[0; 8]);
        assert!(open_err(&p).contains("JSON"));
        raw(&p, "[1,2]", None, &[]);
        assert!(open_err(&p).contains("JSON"));
        raw(&p, "\u{0}\u{1}\u{2}\n", None, &[]);
        open_err(&p);
        // A valid file, truncated by one byte.
        let good = t.path().join("good.safetensors");
        write(&good, &[("w", StDtype::F32, vec![4], f32_bytes(&[1.0, 2.0, 3.0, 4.0]))]);
        let mut bytes = std::fs::read(&good).unwrap();
        bytes.pop();
        std::fs::write(&p, &bytes).unwrap();
        assert!(open_err(&p).contains("beyond"));
        // A missing file is an I/O error naming it.
        let e = WeightStore::open(&[t.path().join("absent.safetensors")]).unwrap_err();
        assert!(matches!(e, CheckpointError::Io { .. }));
        assert!(e.to_string().contains("absent.safetensors"));
    }

    #[test]
    fn metadata_is_skipped_and_file_shrunk_after_open_is_an_error() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("m.safetensors");
        let views: HashMap<String, TensorView<'_>> = HashMap::new();
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(views, Some(meta), &p).unwrap();
        let s = WeightStore::open(std::slice::from_ref(&p)).unwrap();
        assert!(s.is_empty());

        let bytes = f32_bytes(&[1.0, 2.0, 3.0, 4.0]);
        write(&p, &[("w", StDtype::F32, vec![4], bytes)]);
        let s = WeightStore::open(std::slice::from_ref(&p)).unwrap();
        let mut all = std::fs::read(&p).unwrap();
        all.truncate(all.len() - 4);
        std::fs::write(&p, all).unwrap();
        let e = s.read_f32("w").unwrap_err();
        assert!(matches!(e, CheckpointError::Safetensors { .. }), "{e}");
        assert!(e.to_string().contains("`w`"), "{e}");
    }
}
