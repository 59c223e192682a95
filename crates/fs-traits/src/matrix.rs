//! Plain row-major host matrices: the currency of the [`SplitModel`](crate::SplitModel) seam.

use crate::{FsError, Result};

/// An owned dense matrix, row-major: element `(i, j)` is `data[i * cols + j]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix<S> {
    rows: usize,
    cols: usize,
    data: Vec<S>,
}

/// A borrowed dense matrix, row-major, with the same layout as [`Matrix`].
#[derive(Clone, Copy, Debug)]
pub struct MatrixRef<'a, S> {
    rows: usize,
    cols: usize,
    data: &'a [S],
}

impl<S: Copy + Default> Matrix<S> {
    /// A `rows × cols` matrix of zeros (`S::default()`).
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Matrix { rows, cols, data: vec![S::default(); rows * cols] }
    }
}

impl<S> Matrix<S> {
    /// Wrap a row-major buffer; errors unless `data.len() == rows * cols`.
    pub fn from_vec(rows: usize, cols: usize, data: Vec<S>) -> Result<Self> {
        if rows.checked_mul(cols) != Some(data.len()) {
            return Err(FsError::DimensionMismatch {
                what: format!("{rows}x{cols} matrix buffer"),
                expected: rows.saturating_mul(cols),
                got: data.len(),
            });
        }
        Ok(Matrix { rows, cols, data })
    }

    /// Build from a function of `(row, col)`.
    pub fn from_fn(rows: usize, cols: usize, mut f: impl FnMut(usize, usize) -> S) -> Self {
        let mut data = Vec::with_capacity(rows * cols);
        for i in 0..rows {
            for j in 0..cols {
                data.push(f(i, j));
            }
        }
        Matrix { rows, cols, data }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// `(rows, cols)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }
    /// The row-major buffer.
    pub fn as_slice(&self) -> &[S] {
        &self.data
    }
    /// The row-major buffer, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [S] {
        &mut self.data
    }
    /// Take the row-major buffer.
    pub fn into_vec(self) -> Vec<S> {
        self.data
    }
    /// Row `i`.
    pub fn row(&self, i: usize) -> &[S] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }
    /// Row `i`, mutable.
    pub fn row_mut(&mut self, i: usize) -> &mut [S] {
        &mut self.data[i * self.cols..(i + 1) * self.cols]
    }
    /// A borrowed view.
    pub fn view(&self) -> MatrixRef<'_, S> {
        MatrixRef { rows: self.rows, cols: self.cols, data: &self.data }
    }
}

impl<S: Copy> Matrix<S> {
    /// Element `(i, j)`.
    #[inline]
    pub fn get(&self, i: usize, j: usize) -> S {
        self.data[i * self.cols + j]
    }
    /// Set element `(i, j)`.
    #[inline]
    pub fn set(&mut self, i: usize, j: usize, v: S) {
        self.data[i * self.cols + j] = v;
    }
    /// Element-wise conversion.
    pub fn map<T>(&self, f: impl FnMut(S) -> T) -> Matrix<T> {
        Matrix {
            rows: self.rows,
            cols: self.cols,
            data: self.data.iter().copied().map(f).collect(),
        }
    }
    /// The transpose, as a new matrix.
    pub fn transpose(&self) -> Matrix<S> {
        Matrix::from_fn(self.cols, self.rows, |i, j| self.get(j, i))
    }
}

impl<'a, S> MatrixRef<'a, S> {
    /// View a row-major buffer; errors unless `data.len() == rows * cols`.
    pub fn new(rows: usize, cols: usize, data: &'a [S]) -> Result<Self> {
        if rows.checked_mul(cols) != Some(data.len()) {
            return Err(FsError::DimensionMismatch {
                what: format!("{rows}x{cols} matrix view"),
                expected: rows.saturating_mul(cols),
                got: data.len(),
            });
        }
        Ok(MatrixRef { rows, cols, data })
    }
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// `(rows, cols)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }
    /// The row-major buffer.
    pub fn as_slice(&self) -> &'a [S] {
        self.data
    }
    /// Row `i`.
    pub fn row(&self, i: usize) -> &'a [S] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }
}

impl<S: Copy> MatrixRef<'_, S> {
    /// Element `(i, j)`.
    #[inline]
    pub fn get(&self, i: usize, j: usize) -> S {
        self.data[i * self.cols + j]
    }
    /// Copy into an owned matrix.
    pub fn to_owned(&self) -> Matrix<S> {
        Matrix { rows: self.rows, cols: self.cols, data: self.data.to_vec() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_row_major() {
        let m = Matrix::from_vec(2, 3, vec![1, 2, 3, 4, 5, 6]).unwrap();
        assert_eq!(m.get(1, 0), 4);
        assert_eq!(m.row(1), &[4, 5, 6]);
        assert_eq!(m.transpose().row(0), &[1, 4]);
        assert!(Matrix::from_vec(2, 2, vec![1, 2, 3]).is_err());
        assert!(MatrixRef::new(3, 1, &[1.0f32; 2]).is_err());
    }
}
