//! GGUF files (llama.cpp): the header read and validated without trusting any size it declares,
//! metadata as typed values, tensors read one at a time and dequantised to f32 by
//! [`crate::dequant`].
//!
//! The reader makes one pass over the header. Every count, string length and array length is
//! checked against the bytes left in the file (and the limits below) before anything is
//! allocated from it; every tensor's rank, dimensions, type and byte range must lie inside the
//! data section. Tensor data is read only by [`GgufFile::read_f32`], one tensor at a time, so
//! [`GgufFile::open`] costs the header alone (`fisher-stein info` on a GGUF answers from it).
//!
//! What the architectures make of the metadata and the tensor names (llama.cpp's converter
//! conventions, e.g. the q/k row permutation) lives with each architecture
//! (`crate::arch`), not here.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::dequant::{dequantize, GgmlType};
use crate::error::{CheckpointError, Result};
use crate::StoredMatrix;

/// The GGUF tensor types this crate dequantises, as listed in error messages.
pub const GGUF_TYPES: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K";

/// Longest GGUF string accepted (a key, a value, or one element of a string array): 16 MiB.
const MAX_STRING_BYTES: u64 = 1 << 24;
/// Most metadata values accepted in all (scalars and array elements together; SmolLM2 has
/// ≈ 150 k, a 262 k-token vocabulary with scores and types ≈ 800 k): bounds the memory of the
/// in-memory metadata (≈ 32 bytes a value) whatever the file says.
const MAX_METADATA_VALUES: u64 = 1 << 23;
/// Most tensors and metadata entries accepted.
const MAX_ENTRIES: u64 = 1 << 20;
/// Deepest nesting of arrays accepted (llama.cpp writes none).
const MAX_NESTING: u32 = 4;

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    /// `u8`.
    U8(u8),
    /// `i8`.
    I8(i8),
    /// `u16`.
    U16(u16),
    /// `i16`.
    I16(i16),
    /// `u32`.
    U32(u32),
    /// `i32`.
    I32(i32),
    /// `f32`.
    F32(f32),
    /// `bool`.
    Bool(bool),
    /// A string (trailing NUL bytes removed, invalid UTF-8 replaced).
    String(String),
    /// An array of values.
    Array(Vec<GgufValue>),
    /// `u64`.
    U64(u64),
    /// `i64`.
    I64(i64),
    /// `f64`.
    F64(f64),
}

impl GgufValue {
    /// An integer value as `u64` (`None` for negative numbers and non-integers).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(x) => Some(x.into()),
            GgufValue::U16(x) => Some(x.into()),
            GgufValue::U32(x) => Some(x.into()),
            GgufValue::U64(x) => Some(x),
            GgufValue::I8(x) => u64::try_from(x).ok(),
            GgufValue::I16(x) => u64::try_from(x).ok(),
            GgufValue::I32(x) => u64::try_from(x).ok(),
            GgufValue::I64(x) => u64::try_from(x).ok(),
            _ => None,
        }
    }

    /// An integer value as `i64` (`None` for a `u64` above `i64::MAX` and non-integers).
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(x) => Some(x.into()),
            GgufValue::I16(x) => Some(x.into()),
            GgufValue::I32(x) => Some(x.into()),
            GgufValue::I64(x) => Some(x),
            _ => self.as_u64().and_then(|x| i64::try_from(x).ok()),
        }
    }

    /// A float value (`f32` widened) as `f64`; `None` for anything else.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(x) => Some(x.into()),
            GgufValue::F64(x) => Some(x),
            _ => None,
        }
    }

    /// A string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// An array value.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lives and how it is stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufTensorInfo {
    /// Shape, outermost dimension first (GGUF lists `ne[0]`, the innermost, first: this is that
    /// list reversed, so a row-major `[rows, cols]` matrix reads as `[rows, cols]`).
    pub shape: Vec<usize>,
    /// Element type.
    pub ggml_type: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Byte length of the data.
    pub len: u64,
}

impl GgufTensorInfo {
    /// Number of elements.
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A GGUF file with a validated header: metadata and tensor table in memory, tensor data read on
/// demand.
#[derive(Clone, Debug)]
pub struct GgufFile {
    path: PathBuf,
    size: u64,
    metadata: BTreeMap<String, GgufValue>,
    tensors: BTreeMap<String, GgufTensorInfo>,
}

/// Why a header could not be read: an I/O failure, or a file that is not a usable GGUF.
enum HeaderError {
    Io(std::io::Error),
    Bad(String),
}

impl From<std::io::Error> for HeaderError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            HeaderError::Bad("the header ends early".into())
        } else {
            HeaderError::Io(e)
        }
    }
}

fn bad<T>(message: String) -> Result<T, HeaderError> {
    Err(HeaderError::Bad(message))
}

// GGUF metadata value types.
const GGUF_U8: u32 = 0;
const GGUF_I8: u32 = 1;
const GGUF_U16: u32 = 2;
const GGUF_I16: u32 = 3;
const GGUF_U32: u32 = 4;
const GGUF_I32: u32 = 5;
const GGUF_F32: u32 = 6;
const GGUF_BOOL: u32 = 7;
const GGUF_STRING: u32 = 8;
const GGUF_ARRAY: u32 = 9;
const GGUF_U64: u32 = 10;
const GGUF_I64: u32 = 11;
const GGUF_F64: u32 = 12;

/// The size in bytes of a fixed-size GGUF value type (integers, floats, bool).
fn fixed_size(value_type: u32) -> Option<u64> {
    match value_type {
        GGUF_U8 | GGUF_I8 | GGUF_BOOL => Some(1),
        GGUF_U16 | GGUF_I16 => Some(2),
        GGUF_U32 | GGUF_I32 | GGUF_F32 => Some(4),
        GGUF_U64 | GGUF_I64 | GGUF_F64 => Some(8),
        _ => None,
    }
}

/// A position-tracking reader over the header of a file of known size.
struct HeaderReader<R> {
    inner: R,
    pos: u64,
    size: u64,
    /// GGUF v1 writes lengths as u32, later versions as u64.
    v1: bool,
    /// Metadata values read so far.
    values: u64,
}

impl<R: Read> HeaderReader<R> {
    fn remaining(&self) -> u64 {
        self.size.saturating_sub(self.pos)
    }

    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], HeaderError> {
        let mut b = [0u8; N];
        self.inner.read_exact(&mut b)?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32, HeaderError> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    fn u64(&mut self) -> Result<u64, HeaderError> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    fn length(&mut self) -> Result<u64, HeaderError> {
        if self.v1 {
            self.u32().map(u64::from)
        } else {
            self.u64()
        }
    }

    /// A string, its length checked against the limit and the bytes left before anything is
    /// read. Trailing NUL bytes are removed, as candle's and llama.cpp's readers do (some writers
    /// NUL-terminate GGUF strings; a key "general.alignment\0…" must still be the alignment).
    fn string(&mut self, what: &str) -> Result<String, HeaderError> {
        let len = self.length()?;
        if len > MAX_STRING_BYTES {
            return bad(format!("{what} declares a {len}-byte string (limit {MAX_STRING_BYTES})"));
        }
        if len > self.remaining() {
            return bad(format!(
                "{what} declares a {len}-byte string at offset {}, past the end of the {}-byte file",
                self.pos, self.size
            ));
        }
        let mut v = vec![0u8; len as usize];
        self.inner.read_exact(&mut v)?;
        self.pos += len;
        while v.last() == Some(&0) {
            v.pop();
        }
        Ok(match String::from_utf8(v) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    fn count_values(&mut self, n: u64, key: &str) -> Result<(), HeaderError> {
        self.values = self.values.saturating_add(n);
        if self.values > MAX_METADATA_VALUES {
            return bad(format!(
                "metadata {key:?} brings the metadata to over {MAX_METADATA_VALUES} values"
            ));
        }
        Ok(())
    }

    /// One metadata value of `value_type`.
    fn value(&mut self, value_type: u32, key: &str, depth: u32) -> Result<GgufValue, HeaderError> {
        self.count_values(1, key)?;
        Ok(match value_type {
            GGUF_U8 => GgufValue::U8(self.bytes::<1>()?[0]),
            GGUF_I8 => GgufValue::I8(i8::from_le_bytes(self.bytes()?)),
            GGUF_U16 => GgufValue::U16(u16::from_le_bytes(self.bytes()?)),
            GGUF_I16 => GgufValue::I16(i16::from_le_bytes(self.bytes()?)),
            GGUF_U32 => GgufValue::U32(self.u32()?),
            GGUF_I32 => GgufValue::I32(i32::from_le_bytes(self.bytes()?)),
            GGUF_F32 => GgufValue::F32(f32::from_le_bytes(self.bytes()?)),
            GGUF_BOOL => GgufValue::Bool(self.bytes::<1>()?[0] != 0),
            GGUF_U64 => GgufValue::U64(self.u64()?),
            GGUF_I64 => GgufValue::I64(i64::from_le_bytes(self.bytes()?)),
            GGUF_F64 => GgufValue::F64(f64::from_le_bytes(self.bytes()?)),
            GGUF_STRING => GgufValue::String(self.string(&format!("metadata {key:?}"))?),
            GGUF_ARRAY => {
                if depth >= MAX_NESTING {
                    return bad(format!("metadata {key:?} nests arrays over {MAX_NESTING} deep"));
                }
                let elem_type = self.u32()?;
                let len = self.length()?;
                let prefix = if self.v1 { 4 } else { 8 };
                // The smallest an element can be, so that the length is checked against the
                // bytes left before anything is allocated from it.
                let min = match elem_type {
                    GGUF_STRING => prefix,
                    GGUF_ARRAY => 4 + prefix,
                    t => fixed_size(t).ok_or_else(|| {
                        HeaderError::Bad(format!(
                            "metadata {key:?} is an array of unknown value type {t}"
                        ))
                    })?,
                };
                match len.checked_mul(min) {
                    Some(n) if n <= self.remaining() => {}
                    _ => {
                        return bad(format!(
                            "metadata {key:?} declares {len} array elements, more than the {} bytes left in the file hold",
                            self.remaining()
                        ))
                    }
                }
                // The limit must hold before the vector is allocated (each element then counts
                // itself as it is read).
                if self.values.saturating_add(len) > MAX_METADATA_VALUES {
                    return bad(format!(
                        "metadata {key:?} brings the metadata to over {MAX_METADATA_VALUES} values"
                    ));
                }
                let mut items = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    items.push(self.value(elem_type, key, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            t => return bad(format!("metadata {key:?} has unknown value type {t}")),
        })
    }
}

impl GgufFile {
    /// Read and validate the header of `path`: magic and version; the tensor and metadata
    /// counts against the bytes left; every string and array length against the bytes left and
    /// the limits above; `general.alignment` a power of two; every tensor's rank (≤ 4),
    /// dimensions (≥ 1, no overflow), type (one of [`GGUF_TYPES`]), and byte range
    /// `[offset, offset + size)` inside the data section. No tensor data is read.
    ///
    /// Errors: [`CheckpointError::Gguf`] ("not a readable GGUF file (…)") naming the file and
    /// what is wrong; [`CheckpointError::Io`] when the file cannot be opened.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| CheckpointError::io(path, e))?;
        let size = file.metadata().map_err(|e| CheckpointError::io(path, e))?.len();
        let unreadable = |reason: &str| {
            CheckpointError::gguf(
                path,
                format!(
                    "not a readable GGUF file ({reason}): it may be truncated, corrupt, or use an unsupported tensor type (supported: {GGUF_TYPES}); re-download it"
                ),
            )
        };
        let (metadata, tensors) = read_header(BufReader::new(file), size).map_err(|e| match e {
            HeaderError::Io(e) => unreadable(&e.to_string()),
            HeaderError::Bad(m) => unreadable(&m),
        })?;
        Ok(GgufFile { path: path.to_path_buf(), size, metadata, tensors })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// All metadata, by key.
    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    /// One metadata value.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// `general.architecture` (empty when absent or not a string).
    pub fn architecture(&self) -> &str {
        self.get("general.architecture").and_then(GgufValue::as_str).unwrap_or_default()
    }

    /// The tensor table, by name.
    pub fn tensors(&self) -> &BTreeMap<String, GgufTensorInfo> {
        &self.tensors
    }

    /// One tensor's entry.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.get(name)
    }

    /// Read one tensor (one seek and read of its byte range) and dequantise it to f32,
    /// row-major in [`GgufTensorInfo::shape`]. Errors name the file and the tensor: absent
    /// ([`CheckpointError::MissingTensor`]), the file shorter than when it was opened, or a value
    /// that is NaN or infinite after dequantisation.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let (info, bytes) = self.read_bytes(name)?;
        let path = &self.path;
        let data = dequantize(info.ggml_type, &bytes, info.elements()).map_err(|m| {
            CheckpointError::gguf(path, format!("tensor {name}: {m}: re-download it"))
        })?;
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(CheckpointError::gguf(
                path,
                format!("tensor {name} holds {} at flat index {i} (as f32): the weights are corrupt or overflowed, re-download them", data[i]),
            ));
        }
        Ok(data)
    }

    /// Read one tensor (one seek and read of its byte range) in the type it is stored in, as a
    /// [`StoredMatrix`] of its first dimension's rows (a vector is a column, see
    /// [`crate::matrix_dims`]). A tensor whose rows are not whole blocks of its type (possible
    /// only for odd shapes) is dequantised to f32 here. Values are not checked for NaN/±∞:
    /// [`StoredMatrix::check_finite`] does that.
    pub fn read_stored(&self, name: &str) -> Result<StoredMatrix> {
        let (info, bytes) = self.read_bytes(name)?;
        let path = &self.path;
        let (rows, cols) = crate::matrix_dims(&info.shape);
        let corrupt =
            |m: String| CheckpointError::gguf(path, format!("tensor {name}: {m}: re-download it"));
        if StoredMatrix::row_fits(info.ggml_type, cols) {
            StoredMatrix::from_bytes(rows, cols, info.ggml_type, bytes).map_err(corrupt)
        } else {
            let data = dequantize(info.ggml_type, &bytes, info.elements()).map_err(corrupt)?;
            Ok(StoredMatrix::from_f32(rows, cols, data))
        }
    }

    /// Tensor `name`'s table entry and raw bytes (one seek and read);
    /// [`CheckpointError::MissingTensor`] if absent.
    fn read_bytes(&self, name: &str) -> Result<(&GgufTensorInfo, Vec<u8>)> {
        let info = self.tensors.get(name).ok_or_else(|| CheckpointError::MissingTensor {
            name: name.to_string(),
            files: self.path.display().to_string(),
        })?;
        let path = &self.path;
        let mut bytes = vec![0u8; info.len as usize];
        let mut file = File::open(path).map_err(|e| CheckpointError::io(path, e))?;
        file.seek(SeekFrom::Start(info.offset)).map_err(|e| CheckpointError::io(path, e))?;
        file.read_exact(&mut bytes).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                CheckpointError::gguf(
                    path,
                    format!("the file ended inside tensor {name} (it changed or was truncated after it was opened): re-download it"),
                )
            } else {
                CheckpointError::io(path, e)
            }
        })?;
        Ok((info, bytes))
    }
}

type Header = (BTreeMap<String, GgufValue>, BTreeMap<String, GgufTensorInfo>);

fn read_header(inner: impl Read, size: u64) -> Result<Header, HeaderError> {
    let mut r = HeaderReader { inner, pos: 0, size, v1: false, values: 0 };
    let magic = r.bytes::<4>()?;
    if &magic != b"GGUF" {
        return bad(format!("the magic is {magic:02x?}, not \"GGUF\""));
    }
    let version = r.u32()?;
    if !(1..=3).contains(&version) {
        return bad(format!("GGUF version {version} (readable: 1, 2, 3)"));
    }
    r.v1 = version == 1;
    let n_tensors = r.length()?;
    let n_kv = r.length()?;
    let prefix = if r.v1 { 4 } else { 8 };
    // Smallest entries: a key, a type and one byte; a name, a rank, a type and an offset.
    let needed = n_kv
        .checked_mul(prefix + 4 + 1)
        .zip(n_tensors.checked_mul(prefix + 4 + 4 + 8))
        .and_then(|(a, b)| a.checked_add(b));
    if n_tensors > MAX_ENTRIES || n_kv > MAX_ENTRIES || needed.is_none_or(|n| n > r.remaining()) {
        return bad(format!(
            "the header declares {n_tensors} tensors and {n_kv} metadata entries, more than the {size}-byte file holds"
        ));
    }
    let mut metadata = BTreeMap::new();
    let mut alignment = 32u64;
    for _ in 0..n_kv {
        let key = r.string("a metadata key")?;
        let value_type = r.u32()?;
        let value = r.value(value_type, &key, 0)?;
        if key == "general.alignment" {
            // llama.cpp writes a u32; 8- to 32-bit integers are read as candle does, anything
            // else leaves the default.
            alignment = match (&value, value_type) {
                (v, GGUF_U8..=GGUF_I32) => v.as_u64().unwrap_or(32),
                _ => 32,
            };
            if !alignment.is_power_of_two() {
                return bad(format!("general.alignment is {alignment}, not a power of two"));
            }
        }
        metadata.insert(key, value);
    }
    let mut entries = Vec::with_capacity(n_tensors as usize);
    for _ in 0..n_tensors {
        let name = r.string("a tensor name")?;
        let rank = r.u32()?;
        if rank > 4 {
            return bad(format!("tensor {name:?} has {rank} dimensions (at most 4)"));
        }
        let mut dims = Vec::with_capacity(rank as usize);
        let mut elems = 1u64;
        for _ in 0..rank {
            let dim = r.length()?;
            if dim == 0 {
                return bad(format!("tensor {name:?} has an empty dimension"));
            }
            elems = elems
                .checked_mul(dim)
                .filter(|&n| n <= isize::MAX as u64 / 4)
                .ok_or_else(|| HeaderError::Bad(format!("tensor {name:?} is impossibly large")))?;
            dims.push(dim as usize);
        }
        let type_id = r.u32()?;
        let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| {
            HeaderError::Bad(format!("tensor {name:?} has tensor type {type_id}"))
        })?;
        let len = ggml_type.bytes_for(elems).ok_or_else(|| {
            HeaderError::Bad(format!(
                "tensor {name:?} has {elems} elements, not a whole number of {} blocks of {}",
                ggml_type.name(),
                ggml_type.block_size()
            ))
        })?;
        let offset = r.u64()?;
        dims.reverse();
        entries.push((name, dims, ggml_type, offset, len));
    }
    let data_start = r.pos.div_ceil(alignment) * alignment;
    // A file without tensors may end before the (aligned) data section would start.
    let data_len = size.checked_sub(data_start).or(entries.is_empty().then_some(0)).ok_or_else(|| {
        HeaderError::Bad(format!("the tensor data would start at byte {data_start}, past the end of the {size}-byte file"))
    })?;
    let mut tensors = BTreeMap::new();
    for (name, shape, ggml_type, offset, len) in entries {
        match offset.checked_add(len) {
            Some(end) if end <= data_len => {}
            _ => {
                return bad(format!(
                    "tensor {name:?} at data offset {offset} runs past the end of the file ({data_len} bytes of tensor data)"
                ))
            }
        }
        if tensors.contains_key(&name) {
            return bad(format!("tensor {name:?} appears twice"));
        }
        let info = GgufTensorInfo { shape, ggml_type, offset: data_start + offset, len };
        tensors.insert(name, info);
    }
    Ok((metadata, tensors))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal GGUF v3 writer for the tests: metadata (u32 / string / f32) and F32 tensors.
    pub(crate) struct Writer {
        kv: Vec<(String, Vec<u8>)>,
        tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
    }

    fn string(s: &str) -> Vec<u8> {
        let mut b = (s.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(s.as_bytes());
        b
    }

    impl Writer {
        pub(crate) fn new() -> Self {
            Writer { kv: Vec::new(), tensors: Vec::new() }
        }
        pub(crate) fn u32(mut self, key: &str, v: u32) -> Self {
            let mut b = GGUF_U32.to_le_bytes().to_vec();
            b.extend_from_slice(&v.to_le_bytes());
            self.kv.push((key.into(), b));
            self
        }
        pub(crate) fn string(mut self, key: &str, v: &str) -> Self {
            let mut b = GGUF_STRING.to_le_bytes().to_vec();
            b.extend(string(v));
            self.kv.push((key.into(), b));
            self
        }
        pub(crate) fn tensor(mut self, name: &str, shape: &[usize], data: Vec<f32>) -> Self {
            self.tensors.push((name.into(), shape.to_vec(), data));
            self
        }
        pub(crate) fn bytes(&self) -> Vec<u8> {
            let mut out = b"GGUF".to_vec();
            out.extend_from_slice(&3u32.to_le_bytes());
            out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
            out.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
            for (k, v) in &self.kv {
                out.extend(string(k));
                out.extend_from_slice(v);
            }
            let mut offset = 0u64;
            for (name, shape, data) in &self.tensors {
                out.extend(string(name));
                out.extend_from_slice(&(shape.len() as u32).to_le_bytes());
                for d in shape.iter().rev() {
                    out.extend_from_slice(&(*d as u64).to_le_bytes());
                }
                out.extend_from_slice(&0u32.to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
                offset += 4 * data.len() as u64;
                offset = offset.div_ceil(32) * 32;
            }
            while !out.len().is_multiple_of(32) {
                out.push(0);
            }
            for (_, _, data) in &self.tensors {
                let start = out.len();
                out.extend(data.iter().flat_map(|x| x.to_le_bytes()));
                while !(out.len() - start).is_multiple_of(32) {
                    out.push(0);
                }
            }
            out
        }
    }

    fn open_bytes(bytes: &[u8]) -> Result<GgufFile> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        std::fs::write(&p, bytes).unwrap();
        GgufFile::open(&p)
    }

    #[test]
    fn round_trip_metadata_and_tensors() {
        let w = Writer::new()
            .string("general.architecture", "llama")
            .u32("llama.block_count", 3)
            .tensor("a", &[2, 3], vec![1., 2., 3., 4., 5., 6.])
            .tensor("b", &[4], vec![-1., 0.5, 0.25, 8.]);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        std::fs::write(&p, w.bytes()).unwrap();
        let f = GgufFile::open(&p).unwrap();
        assert_eq!(f.architecture(), "llama");
        assert_eq!(f.get("llama.block_count").and_then(GgufValue::as_u64), Some(3));
        assert_eq!(f.tensor("a").unwrap().shape, vec![2, 3]);
        assert_eq!(f.read_f32("a").unwrap(), vec![1., 2., 3., 4., 5., 6.]);
        assert_eq!(f.read_f32("b").unwrap(), vec![-1., 0.5, 0.25, 8.]);
        let e = f.read_f32("c").unwrap_err();
        assert!(matches!(e, CheckpointError::MissingTensor { .. }), "{e}");
    }

    #[test]
    fn hostile_headers_are_refused_with_one_line() {
        let good = Writer::new().u32("x", 1).tensor("a", &[8], vec![1.0; 8]).bytes();
        let mut cases: Vec<(&str, Vec<u8>)> = vec![
            ("the header ends early", good[..20].to_vec()),
            ("more than the", good[..good.len() / 3].to_vec()),
            ("magic", b"NOPE\x03\0\0\0".to_vec()),
        ];
        let mut lying = b"GGUF".to_vec();
        lying.extend_from_slice(&3u32.to_le_bytes());
        lying.extend_from_slice(&u64::MAX.to_le_bytes());
        lying.extend_from_slice(&u64::MAX.to_le_bytes());
        cases.push(("more than the", lying));
        let mut far = good.clone();
        // The tensor's data offset: after magic, version and counts (24 bytes), the entry
        // "x" (8 + 1 + 4 + 4) and the tensor's name, rank, one dimension and type (9 + 4 + 8 + 4).
        let pos = 24 + 17 + 25;
        assert_eq!(far[pos..pos + 8], 0u64.to_le_bytes());
        far[pos..pos + 8].copy_from_slice(&1_000_000u64.to_le_bytes());
        cases.push(("runs past the end", far));
        for (want, bytes) in cases {
            let e = open_bytes(&bytes).unwrap_err().to_string();
            assert!(e.contains("not a readable GGUF file") && e.contains(want), "{want}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
