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
use std::sync::Arc;

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
