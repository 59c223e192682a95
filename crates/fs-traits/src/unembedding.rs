//! The unembedding `W_U` as a model hands it to the estimators: whole, or rows on demand.
//!
//! A small model holds `W_U` (`V × d_u`) in its own scalar and lends it whole
//! ([`Unembedding::Dense`]). A big one keeps it as the checkpoint stores it — bf16, or llama.cpp's
//! quantised blocks — because an f32 copy of a 262,144-row unembedding is most of the memory a
//! run would need; it lends a reader that widens rows on demand ([`Unembedding::Rows`]), and the
//! estimators stream it in vocabulary chunks ([`Unembedding::for_each_chunk`]).

use std::ops::Range;

use crate::{check_len, FsError, Matrix, MatrixRef, Result};

/// Rows of an unembedding held in another form than the model's scalar, widened on demand.
pub trait UnembeddingRows<S>: Sync {
    /// `(V, d_u)`.
    fn shape(&self) -> (usize, usize);

    /// Rows `rows` of `W_U` into `out` (`rows.len() · d_u` values, row-major). Callers pass
    /// `rows.end ≤ V` and an `out` of exactly that length.
    fn read_rows(&self, rows: Range<usize>, out: &mut [S]) -> Result<()>;
}

/// The unembedding `W_U` (`V × d_u`, row `y` = output embedding `w_y`) as a model lends it.
#[derive(Clone, Copy)]
pub enum Unembedding<'a, S> {
    /// Held whole in the model's scalar: rows are borrowed.
    Dense(MatrixRef<'a, S>),
    /// Held in another form (e.g. bf16 or quantised blocks): rows are widened on demand.
    Rows(&'a dyn UnembeddingRows<S>),
}

impl<'a, S> From<MatrixRef<'a, S>> for Unembedding<'a, S> {
    fn from(m: MatrixRef<'a, S>) -> Self {
        Unembedding::Dense(m)
    }
}

impl<'a, S> From<&'a Matrix<S>> for Unembedding<'a, S> {
    fn from(m: &'a Matrix<S>) -> Self {
        Unembedding::Dense(m.view())
    }
}

/// Default rows per chunk when an estimator streams `W_U`: about 16 MB of f32 at `d_u = 2048`.
pub const UNEMBEDDING_CHUNK_ROWS: usize = 2048;

impl<'a, S: Copy + Default> Unembedding<'a, S> {
    /// `(V, d_u)`.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            Unembedding::Dense(m) => m.shape(),
            Unembedding::Rows(r) => r.shape(),
        }
    }

    /// `V`.
    pub fn rows(&self) -> usize {
        self.shape().0
    }

    /// `d_u`.
    pub fn cols(&self) -> usize {
        self.shape().1
    }

    /// Rows `rows` (`rows.len() · d_u` values): borrowed from a dense `W_U`, else widened into
    /// `buf` (resized as needed). An error for rows past `V`.
    pub fn read<'b>(&'b self, rows: Range<usize>, buf: &'b mut Vec<S>) -> Result<&'b [S]> {
        let (v, du) = self.shape();
        if rows.start > rows.end || rows.end > v {
            return Err(FsError::invalid(
                "unembedding rows",
                format!("{rows:?}"),
                format!("a range within 0..{v}"),
            ));
        }
        match self {
            Unembedding::Dense(m) => Ok(&m.as_slice()[rows.start * du..rows.end * du]),
            Unembedding::Rows(r) => {
                buf.resize(rows.len() * du, S::default());
                r.read_rows(rows, buf)?;
                Ok(buf)
            }
        }
    }

    /// Call `f(first_row, rows)` on consecutive chunks of at most `chunk_rows` rows covering
    /// `W_U` in order (one widening buffer reused across chunks).
    pub fn for_each_chunk(
        &self,
        chunk_rows: usize,
        mut f: impl FnMut(usize, &[S]) -> Result<()>,
    ) -> Result<()> {
        let v = self.rows();
        let mut buf = Vec::new();
        for start in (0..v).step_by(chunk_rows.max(1)) {
            let end = (start + chunk_rows.max(1)).min(v);
            f(start, self.read(start..end, &mut buf)?)?;
        }
        Ok(())
    }

    /// The rows `ids` (e.g. sampled tokens) as an `ids.len() × d_u` matrix.
    pub fn gather(&self, ids: &[usize]) -> Result<Matrix<S>> {
        let du = self.cols();
        let mut out = Vec::with_capacity(ids.len() * du);
        let mut buf = Vec::new();
        for &y in ids {
            out.extend_from_slice(self.read(y..y + 1, &mut buf)?);
        }
        Matrix::from_vec(ids.len(), du, out)
    }

    /// The whole matrix, owned (widened when not dense): for small models and tests.
    pub fn to_matrix(&self) -> Result<Matrix<S>> {
        let (v, du) = self.shape();
        let mut buf = Vec::new();
        let data = self.read(0..v, &mut buf)?.to_vec();
        Matrix::from_vec(v, du, data)
    }

    /// An error unless `W_U` is `vocab × readout_dim`.
    pub fn check_shape(&self, vocab: usize, readout_dim: usize) -> Result<()> {
        let (v, du) = self.shape();
        check_len("unembedding W_U rows (V)", v, vocab)?;
        check_len("unembedding W_U columns (d_u)", du, readout_dim)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `W_U` whose row `y` is `[y, y + 0.5]`, read only through [`UnembeddingRows`].
    struct Widened;
    impl UnembeddingRows<f32> for Widened {
        fn shape(&self) -> (usize, usize) {
            (5, 2)
        }
        fn read_rows(&self, rows: Range<usize>, out: &mut [f32]) -> Result<()> {
            for (y, row) in rows.zip(out.chunks_exact_mut(2)) {
                row.copy_from_slice(&[y as f32, y as f32 + 0.5]);
            }
            Ok(())
        }
    }

    #[test]
    fn dense_and_widened_read_the_same_rows() {
        let dense = Matrix::from_fn(5, 2, |y, j| y as f32 + 0.5 * j as f32);
        for w in [Unembedding::from(&dense), Unembedding::Rows(&Widened)] {
            let mut seen = vec![];
            w.for_each_chunk(2, |start, rows| {
                seen.push((start, rows.to_vec()));
                Ok(())
            })
            .unwrap();
            assert_eq!(seen.len(), 3);
            assert_eq!(seen[2], (4, vec![4.0, 4.5]));
            assert_eq!(w.gather(&[3, 0]).unwrap().as_slice(), &[3.0, 3.5, 0.0, 0.5]);
            assert_eq!(w.to_matrix().unwrap(), dense);
            assert!(w.read(4..6, &mut vec![]).is_err());
            assert!(w.check_shape(5, 2).is_ok() && w.check_shape(5, 3).is_err());
        }
    }
}
