//! Weight matrices kept in the precision they are stored in, rows widened to f32 on demand.
//!
//! A big model's weights do not fit in memory as f32 (Llama-3.1-8B: 32 GB), but they do as
//! stored (bf16: 16 GB; a 4-bit GGUF: under 5 GB). A [`StoredMatrix`] holds one matrix as its
//! file stores it — f32, f16, bf16 or llama.cpp's quantised blocks ([`GgmlType`]) — and widens
//! rows to f32 when a pass needs them: a backend widens one layer's matrices for the duration of
//! one pass, an estimator reads the unembedding in vocabulary chunks. Widening is exact for f16
//! and bf16 and bit-identical to [`crate::dequantize`] for the quantised types, so the values a
//! pass sees are the ones an eager f32 load would have produced.
//!
//! Rows can be reordered or selected without touching the stored bytes (a row index): that is
//! how the llama.cpp converter's q/k permutation is undone and fused `[q|k|v]` tensors are split
//! for quantised files, whose rows are whole blocks.

use std::ops::Range;
use std::sync::{Arc, Weak};

use rayon::prelude::*;

use crate::dequant::{dequantize_into, GgmlType};
use crate::error::{CheckpointError, Result};

/// The `(rows, cols)` a tensor of `shape` is held as: a matrix as is, a vector as a column
/// (`[n]` → `n × 1`, so its entries can be selected like rows), a scalar as `1 × 1`, and a
/// higher-rank tensor as its first dimension by the product of the others.
pub fn matrix_dims(shape: &[usize]) -> (usize, usize) {
    match shape {
        [] => (1, 1),
        [n] => (*n, 1),
        [rows, rest @ ..] => (*rows, rest.iter().product()),
    }
}

/// How the values of a [`StoredMatrix`] are held.
#[derive(Clone)]
enum Data {
    /// f32, used as is (borrowed by [`StoredMatrix::f32_rows`]).
    F32(Arc<Vec<f32>>),
    /// Raw little-endian bytes of a [`GgmlType`] other than f32: stored rows of `row_bytes`.
    Bytes { bytes: SharedBytes, ty: GgmlType, row_bytes: usize },
}

/// Bytes shared by reference count without a copy: an owned buffer, or a range of a
/// memory-mapped file (the safetensors reader hands out f16/bf16 tensors this way). One pointer
/// wide, so a [`StoredMatrix`] stays small.
#[derive(Clone)]
pub struct SharedBytes(Arc<SharedRange>);

/// The owner of the bytes and the range of them shared.
struct SharedRange {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    range: std::ops::Range<usize>,
}

impl SharedBytes {
    /// The bytes `range` of `owner` (e.g. a `memmap2::Mmap`); `None` when `range` is not inside
    /// it.
    pub fn new(
        owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
        range: std::ops::Range<usize>,
    ) -> Option<Self> {
        let len = (*owner).as_ref().len();
        (range.start <= range.end && range.end <= len)
            .then(|| SharedBytes(Arc::new(SharedRange { owner, range })))
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &(*self.0.owner).as_ref()[self.0.range.clone()]
    }
}

impl From<Vec<u8>> for SharedBytes {
    fn from(v: Vec<u8>) -> Self {
        let range = 0..v.len();
        SharedBytes(Arc::new(SharedRange { owner: Arc::new(v), range }))
    }
}

impl std::ops::Deref for SharedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

/// A row-major `rows × cols` matrix in its stored element type, rows widened to f32 on demand.
///
/// Cloning shares the data (reference-counted). For a linear layer the rows are the output
/// features (HF's `[out, in]` orientation), the orientation every stored format shares: a
/// quantised block never spans two rows.
#[derive(Clone)]
pub struct StoredMatrix {
    rows: usize,
    cols: usize,
    data: Data,
    /// Logical row `r` is stored row `index[r]`; `None` is the identity.
    index: Option<Arc<[u32]>>,
}

/// The identity of a [`StoredMatrix`]'s values, without holding them: a cache keyed by weight
/// (e.g. a memo of products with it) compares it with [`StorageId::is_of`] or `==`.
///
/// It holds [`Weak`] references to the reference-counted allocations of the matrix's data (the
/// f32 values, or the shared byte range) and of its row index, plus the element type and the
/// shape. Equal handles, or a handle [`StorageId::is_of`] a matrix, mean the very same
/// allocations: the same stored values read through the same row index, so the same logical
/// matrix. That is sound because
///
/// * a `Weak` keeps the `Arc`'s allocation block allocated after the last strong reference is
///   gone (for the data a few dozen bytes: the `Vec` or range header, whose contents are freed;
///   for a row index its `u32`s, which live in the block), so while a handle exists no new `Arc`
///   can be placed at its addresses: a pointer match is never a newer matrix that reuses a
///   dropped one's memory;
/// * the data behind those `Arc`s is never written after construction (a [`StoredMatrix`] has no
///   mutating method; clones and row selections share it read-only), so the same allocation
///   means the same values — for memory-mapped bytes, as for every read, provided the file is
///   not modified underneath.
///
/// A handle does not keep the values alive: when the last [`StoredMatrix`] sharing them is
/// dropped they are freed as usual (the handle then matches no live matrix). Matrices with equal
/// values in different allocations have different handles, and so does every
/// [`StoredMatrix::select_rows`] other than the identity (its index is a new allocation): the
/// identity is conservative, never wrong.
#[derive(Clone, Debug)]
pub struct StorageId {
    data: WeakData,
    /// `None`: the identity order.
    index: Option<Weak<[u32]>>,
    rows: usize,
    cols: usize,
}

/// [`Data`] by weak reference.
#[derive(Clone, Debug)]
enum WeakData {
    F32(Weak<Vec<f32>>),
    Bytes(Weak<SharedRange>, GgmlType),
}

impl StorageId {
    /// Whether `m` is a matrix this handle was taken from, or shares its data, row index, type
    /// and shape (a clone of it): then `m`'s values are the ones it identifies.
    pub fn is_of(&self, m: &StoredMatrix) -> bool {
        let data = match (&self.data, &m.data) {
            (WeakData::F32(w), Data::F32(a)) => std::ptr::eq(w.as_ptr(), Arc::as_ptr(a)),
            (WeakData::Bytes(w, ty), Data::Bytes { bytes, ty: t, .. }) => {
                ty == t && std::ptr::eq(w.as_ptr(), Arc::as_ptr(&bytes.0))
            }
            _ => false,
        };
        let index = match (&self.index, &m.index) {
            (None, None) => true,
            (Some(w), Some(a)) => std::ptr::addr_eq(w.as_ptr(), Arc::as_ptr(a)),
            _ => false,
        };
        data && index && self.rows == m.rows && self.cols == m.cols
    }

    /// The addresses the handle compares (kept allocated by its `Weak`s; never dereferenced).
    fn addresses(&self) -> (usize, usize) {
        let data = match &self.data {
            WeakData::F32(w) => w.as_ptr() as usize,
            WeakData::Bytes(w, _) => w.as_ptr() as usize,
        };
        let index = self.index.as_ref().map_or(0, |w| w.as_ptr() as *const u32 as usize);
        (data, index)
    }
}

impl PartialEq for StorageId {
    /// The same allocations, element type and shape ([`StorageId::is_of`] the same matrices).
    fn eq(&self, other: &Self) -> bool {
        let data = match (&self.data, &other.data) {
            (WeakData::F32(a), WeakData::F32(b)) => a.ptr_eq(b),
            (WeakData::Bytes(a, s), WeakData::Bytes(b, t)) => s == t && a.ptr_eq(b),
            _ => false,
        };
        let index = match (&self.index, &other.index) {
            (None, None) => true,
            (Some(a), Some(b)) => a.ptr_eq(b),
            _ => false,
        };
        data && index && self.rows == other.rows && self.cols == other.cols
    }
}

impl Eq for StorageId {}

impl std::hash::Hash for StorageId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.addresses().hash(state);
        self.rows.hash(state);
        self.cols.hash(state);
    }
}

impl std::fmt::Debug for StoredMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoredMatrix({} × {}, {})", self.rows, self.cols, self.dtype().name())
    }
}

impl PartialEq for StoredMatrix {
    /// Equal shapes and equal widened values (for tests; widens both).
    fn eq(&self, other: &Self) -> bool {
        self.shape() == other.shape() && self.to_f32() == other.to_f32()
    }
}

/// Rows widened per parallel task: enough work to amortise the task, few enough rows that a
/// 128k-row unembedding chunk splits across every core.
const ROWS_PER_TASK: usize = 64;

impl StoredMatrix {
    /// A `rows × cols` f32 matrix (`data.len() == rows · cols`, checked by every caller here).
    pub fn from_f32(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        debug_assert_eq!(data.len(), rows * cols);
        StoredMatrix { rows, cols, data: Data::F32(Arc::new(data)), index: None }
    }

    /// A `rows × cols` matrix of element type `ty` from its little-endian bytes. An f32 matrix is
    /// converted to f32 values once. Errors (one line) when a row is not a whole number of
    /// `ty`'s blocks or the byte count is not `rows` such rows.
    pub fn from_bytes(
        rows: usize,
        cols: usize,
        ty: GgmlType,
        bytes: Vec<u8>,
    ) -> std::result::Result<Self, String> {
        Self::from_shared_bytes(rows, cols, ty, bytes.into())
    }

    /// [`StoredMatrix::from_bytes`] on bytes shared without a copy (e.g. a range of a
    /// memory-mapped file); an f32 matrix is still converted to f32 values once.
    pub fn from_shared_bytes(
        rows: usize,
        cols: usize,
        ty: GgmlType,
        bytes: SharedBytes,
    ) -> std::result::Result<Self, String> {
        let row_bytes = ty.bytes_for(cols as u64).ok_or_else(|| {
            format!(
                "a row of {cols} values is not a whole number of {} blocks of {} values",
                ty.name(),
                ty.block_size()
            )
        })?;
        if Some(bytes.len() as u64) != row_bytes.checked_mul(rows as u64) {
            return Err(format!(
                "{} bytes cannot hold {rows} × {cols} {} values ({row_bytes} bytes per row)",
                bytes.len(),
                ty.name()
            ));
        }
        Ok(match ty {
            GgmlType::F32 => {
                let data =
                    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
                StoredMatrix::from_f32(rows, cols, data.collect())
            }
            _ => StoredMatrix {
                rows,
                cols,
                data: Data::Bytes { bytes, ty, row_bytes: row_bytes as usize },
                index: None,
            },
        })
    }

    /// Whether `ty` can hold rows of `cols` values (a row is a whole number of blocks).
    pub fn row_fits(ty: GgmlType, cols: usize) -> bool {
        ty.bytes_for(cols as u64).is_some()
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `[rows, cols]`.
    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    /// The stored element type.
    pub fn dtype(&self) -> GgmlType {
        match &self.data {
            Data::F32(_) => GgmlType::F32,
            Data::Bytes { ty, .. } => *ty,
        }
    }

    /// Whether rows are held as f32 (widening is a copy, or a borrow: [`Self::f32_rows`]).
    pub fn is_f32(&self) -> bool {
        matches!(self.data, Data::F32(_))
    }

    /// Bytes this matrix's values take in memory (shared bytes counted in full).
    pub fn stored_bytes(&self) -> usize {
        match &self.data {
            Data::F32(v) => v.len() * 4,
            Data::Bytes { bytes, .. } => bytes.len(),
        }
    }

    /// Rows `rows` as a borrowed f32 slice (`rows.len() · cols` values), when the matrix is held
    /// in f32 in stored order; `None` otherwise (widen with [`Self::widen_rows_into`]).
    pub fn f32_rows(&self, rows: Range<usize>) -> Option<&[f32]> {
        match (&self.data, &self.index) {
            (Data::F32(v), None) if rows.end <= self.rows => {
                Some(&v[rows.start * self.cols..rows.end * self.cols])
            }
            _ => None,
        }
    }

    /// The matrix of logical rows `rows` of this one (`rows[i]` becomes row `i`), sharing the
    /// stored data. Panics on an index ≥ [`Self::rows`] (callers pass indices they derived from
    /// the shape).
    pub fn select_rows(&self, rows: &[usize]) -> StoredMatrix {
        assert!(rows.iter().all(|&r| r < self.rows), "row index out of range");
        let index: Arc<[u32]> = rows.iter().map(|&r| self.stored_row(r) as u32).collect();
        let identity =
            index.len() == self.rows && index.iter().enumerate().all(|(i, &r)| i == r as usize);
        StoredMatrix {
            rows: rows.len(),
            cols: self.cols,
            data: self.data.clone(),
            index: if identity { None } else { Some(index) },
        }
    }

    /// The identity of this matrix's values ([`StorageId`]): equal for its clones, different
    /// for any other allocation; it does not keep the values alive.
    pub fn storage_id(&self) -> StorageId {
        let data = match &self.data {
            Data::F32(v) => WeakData::F32(Arc::downgrade(v)),
            Data::Bytes { bytes, ty, .. } => WeakData::Bytes(Arc::downgrade(&bytes.0), *ty),
        };
        StorageId {
            data,
            index: self.index.as_ref().map(Arc::downgrade),
            rows: self.rows,
            cols: self.cols,
        }
    }

    fn stored_row(&self, r: usize) -> usize {
        self.index.as_ref().map_or(r, |ix| ix[r] as usize)
    }

    /// Widen one stored row into `out` (`cols` values).
    fn widen_stored_row(&self, stored: usize, out: &mut [f32]) {
        match &self.data {
            Data::F32(v) => out.copy_from_slice(&v[stored * self.cols..(stored + 1) * self.cols]),
            Data::Bytes { bytes, ty, row_bytes } => {
                let src = &bytes[stored * row_bytes..(stored + 1) * row_bytes];
                dequantize_into(*ty, src, out).expect("row sizes were checked on construction");
            }
        }
    }

    /// Widen logical rows `rows` into `out` (`rows.len() · cols` values, row-major), in parallel
    /// over row groups. Panics if `rows` is out of range or `out` has the wrong length (callers
    /// size both from the shape).
    pub fn widen_rows_into(&self, rows: Range<usize>, out: &mut [f32]) {
        assert!(rows.end <= self.rows, "rows {rows:?} of a {}-row matrix", self.rows);
        assert_eq!(out.len(), rows.len() * self.cols, "output buffer length");
        if self.cols == 0 {
            return;
        }
        let cols = self.cols;
        out.par_chunks_mut(ROWS_PER_TASK * cols).enumerate().for_each(|(task, block)| {
            let first = rows.start + task * ROWS_PER_TASK;
            for (i, row) in block.chunks_exact_mut(cols).enumerate() {
                self.widen_stored_row(self.stored_row(first + i), row);
            }
        });
    }

    /// Logical rows `rows` widened to f32, row-major (`rows.len() · cols` values).
    pub fn widen_rows(&self, rows: Range<usize>) -> Vec<f32> {
        let mut out = vec![0f32; rows.len() * self.cols];
        self.widen_rows_into(rows, &mut out);
        out
    }

    /// The logical rows listed in `rows` (e.g. the tokens of a sequence) widened to f32,
    /// row-major. Panics on an index ≥ [`Self::rows`].
    pub fn gather_rows(&self, rows: &[u32]) -> Vec<f32> {
        let cols = self.cols;
        let mut out = vec![0f32; rows.len() * cols];
        if cols > 0 {
            out.par_chunks_mut(cols).zip(rows.par_iter()).for_each(|(row, &r)| {
                assert!((r as usize) < self.rows, "row {r} of a {}-row matrix", self.rows);
                self.widen_stored_row(self.stored_row(r as usize), row);
            });
        }
        out
    }

    /// The whole matrix widened to f32, row-major `rows × cols`.
    pub fn to_f32(&self) -> Vec<f32> {
        self.widen_rows(0..self.rows)
    }

    /// The same matrix held in f32 (widened now; an f32 matrix is shared, not copied).
    pub fn to_f32_matrix(&self) -> StoredMatrix {
        if self.is_f32() && self.index.is_none() {
            return self.clone();
        }
        StoredMatrix::from_f32(self.rows, self.cols, self.to_f32())
    }

    /// The whole matrix widened to f32 and transposed: the `cols × rows` [`crate::HostMatrix`]
    /// (a linear layer's `[in, out]` weight from its stored `[out, in]` rows).
    pub fn to_host_transposed(&self) -> crate::HostMatrix {
        crate::HostMatrix::transposed(self.rows, self.cols, &self.to_f32())
    }

    /// Refuse a NaN or ±∞ anywhere in the widened values, naming `name` and the first bad flat
    /// index ([`CheckpointError::NonFinite`]). Widens in row groups (never the whole matrix at
    /// once); f16 and bf16 are checked on their exponent bits without widening.
    pub fn check_finite(&self, name: &str) -> Result<()> {
        let bad = |index: usize, value: f64| CheckpointError::NonFinite {
            what: format!("weight {name}"),
            index,
            value,
        };
        let cols = self.cols.max(1);
        const GROUP: usize = 1024;
        let first_bad = (0..self.rows.div_ceil(GROUP)).into_par_iter().find_map_first(|g| {
            let rows = g * GROUP..((g + 1) * GROUP).min(self.rows);
            let mut buf = vec![0f32; cols];
            for r in rows {
                let stored = self.stored_row(r);
                if let Data::Bytes { bytes, ty: ty @ (GgmlType::F16 | GgmlType::BF16), row_bytes } =
                    &self.data
                {
                    // Non-finite ⇔ all exponent bits set (f16: 0x7C00, bf16: 0x7F80).
                    let mask: u16 = if *ty == GgmlType::F16 { 0x7C00 } else { 0x7F80 };
                    let row = &bytes[stored * row_bytes..(stored + 1) * row_bytes];
                    let hit = row
                        .chunks_exact(2)
                        .position(|c| u16::from_le_bytes([c[0], c[1]]) & mask == mask);
                    if let Some(c) = hit {
                        self.widen_stored_row(stored, &mut buf[..self.cols]);
                        return Some((r * self.cols + c, buf[c] as f64));
                    }
                    continue;
                }
                self.widen_stored_row(stored, &mut buf[..self.cols]);
                if let Some(c) = buf[..self.cols].iter().position(|v| !v.is_finite()) {
                    return Some((r * self.cols + c, buf[c] as f64));
                }
            }
            None
        });
        match first_bad {
            None => Ok(()),
            Some((index, value)) => Err(bad(index, value)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    fn bf16_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect()
    }

    #[test]
    fn widening_bf16_and_f16_is_exact_and_rows_select_without_copying() {
        let values: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 2.0).collect();
        let m = StoredMatrix::from_bytes(4, 3, GgmlType::BF16, bf16_bytes(&values)).unwrap();
        assert_eq!(m.dtype(), GgmlType::BF16);
        assert_eq!(m.stored_bytes(), 24);
        assert_eq!(m.to_f32(), values);
        assert_eq!(m.widen_rows(1..3), values[3..9].to_vec());
        let picked = m.select_rows(&[3, 0]);
        assert_eq!(picked.to_f32(), [&values[9..12], &values[0..3]].concat());
        // A selection of a selection composes; gather reads logical rows.
        assert_eq!(picked.select_rows(&[1]).to_f32(), values[0..3].to_vec());
        assert_eq!(
            m.gather_rows(&[2, 2, 0]),
            [&values[6..9], &values[6..9], &values[0..3]].concat()
        );
        let halves: Vec<u8> = values.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect();
        let h = StoredMatrix::from_bytes(4, 3, GgmlType::F16, halves).unwrap();
        assert_eq!(h.to_f32(), values);
        // Transposed to [in, out].
        let t = m.to_host_transposed();
        assert_eq!((t.rows, t.cols), (3, 4));
        assert_eq!(t.data[1], values[3]);
    }

    #[test]
    fn f32_rows_borrow_only_in_stored_order() {
        let m = StoredMatrix::from_f32(3, 2, vec![1., 2., 3., 4., 5., 6.]);
        assert_eq!(m.f32_rows(1..3), Some(&[3., 4., 5., 6.][..]));
        assert!(m.select_rows(&[2, 1]).f32_rows(0..1).is_none());
        assert_eq!(m.select_rows(&[0, 1, 2]).f32_rows(0..1), Some(&[1., 2.][..]), "identity");
        let b = StoredMatrix::from_bytes(1, 2, GgmlType::BF16, bf16_bytes(&[1., 2.])).unwrap();
        assert!(b.f32_rows(0..1).is_none());
    }

    #[test]
    fn quantised_rows_widen_as_the_eager_dequantisation() {
        // Q8_0: 32 values per 34-byte block (f16 scale, 32 i8).
        let (rows, cols) = (5, 64);
        let mut bytes = Vec::new();
        for b in 0..rows * cols / 32 {
            bytes.extend(f16::from_f32(0.01 * (b + 1) as f32).to_le_bytes());
            bytes.extend((0..32).map(|i| ((i * 7 + b * 3) % 256) as u8));
        }
        let eager = crate::dequantize(GgmlType::Q8_0, &bytes, rows * cols).unwrap();
        let m = StoredMatrix::from_bytes(rows, cols, GgmlType::Q8_0, bytes).unwrap();
        assert_eq!(m.to_f32(), eager);
        assert_eq!(m.select_rows(&[4, 1]).to_f32(), [&eager[256..320], &eager[64..128]].concat());
        assert!(StoredMatrix::from_bytes(1, 48, GgmlType::Q8_0, vec![0; 51]).is_err(), "48 % 32");
        assert!(StoredMatrix::from_bytes(2, 32, GgmlType::Q8_0, vec![0; 34]).is_err(), "short");
        assert!(!StoredMatrix::row_fits(GgmlType::Q4K, 100));
    }

    /// A [`StorageId`] matches the matrix it was taken from and its clones, not a matrix of
    /// equal values elsewhere, another row order, or the same bytes read as another type; it
    /// does not keep the values alive.
    #[test]
    fn storage_ids_identify_allocations_without_keeping_them() {
        let values: Vec<f32> = (0..6).map(|i| i as f32 - 2.5).collect();
        let owner: Arc<Vec<u8>> = Arc::new(bf16_bytes(&values));
        let shared = || SharedBytes::new(owner.clone(), 0..owner.len()).unwrap();
        let bytes = shared();
        let m = StoredMatrix::from_shared_bytes(3, 2, GgmlType::BF16, bytes.clone()).unwrap();
        let id = m.storage_id();
        assert!(id.is_of(&m) && id.is_of(&m.clone()) && id == m.clone().storage_id());
        assert!(id.is_of(&m.select_rows(&[0, 1, 2])), "the identity selection shares everything");
        let permuted = m.select_rows(&[2, 1, 0]);
        assert!(!id.is_of(&permuted) && id != permuted.storage_id());
        let p = permuted.storage_id();
        assert!(p.is_of(&permuted) && !p.is_of(&m.select_rows(&[2, 1, 0])), "a new index");
        let equal = StoredMatrix::from_bytes(3, 2, GgmlType::BF16, bf16_bytes(&values)).unwrap();
        assert!(equal == m && !id.is_of(&equal) && id != equal.storage_id());
        let other_range = StoredMatrix::from_shared_bytes(3, 2, GgmlType::BF16, shared()).unwrap();
        assert!(!id.is_of(&other_range), "another SharedBytes of the same owner");
        let as_f16 = StoredMatrix::from_shared_bytes(3, 2, GgmlType::F16, bytes).unwrap();
        assert!(!id.is_of(&as_f16) && id != as_f16.storage_id(), "the same bytes as f16");
        let f = StoredMatrix::from_f32(2, 2, vec![1., 2., 3., 4.]);
        let fid = f.storage_id();
        assert!(fid.is_of(&f.to_f32_matrix()) && !fid.is_of(&m) && fid != id);
        assert!(!fid.is_of(&StoredMatrix::from_f32(2, 2, vec![1., 2., 3., 4.])));
        // Dropping every matrix frees the bytes while the handles live on (and match nothing).
        drop((m, permuted, other_range, as_f16));
        assert_eq!(Arc::strong_count(&owner), 1, "no handle holds the data");
        assert!(
            !id.is_of(&StoredMatrix::from_shared_bytes(3, 2, GgmlType::BF16, shared()).unwrap())
        );
        let fresh = StoredMatrix::from_f32(2, 2, vec![1., 2., 3., 4.]);
        drop(f);
        assert!(!fid.is_of(&fresh) && fid != fresh.storage_id());
    }

    #[test]
    fn non_finite_values_are_named_by_flat_index() {
        let mut values = vec![1f32; 2 * 1500];
        // Row 1200 (the second group of 1024 rows), column 1.
        values[2401] = f32::INFINITY;
        let m = StoredMatrix::from_bytes(1500, 2, GgmlType::BF16, bf16_bytes(&values)).unwrap();
        let e = m.check_finite("w").unwrap_err().to_string();
        assert!(e.contains("weight w holds inf at flat index 2401"), "{e}");
        let mut values = vec![0.5f32; 8];
        values[5] = f32::NAN;
        let f = StoredMatrix::from_f32(2, 4, values);
        assert!(f.check_finite("w").unwrap_err().to_string().contains('5'));
        assert!(f.select_rows(&[0]).check_finite("w").is_ok(), "the bad row is not selected");
    }
}
