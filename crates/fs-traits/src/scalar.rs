//! The scalar types models may use.

/// A real floating-point element type of the arrays a model hands out: `f32` or `f64`.
///
/// Sealed: the estimators' precision analysis (accumulate `d × d` results in `f64`, big GEMMs in
/// the native type) is written for these two.
pub trait Scalar:
    num_traits::Float
    + Default
    + Send
    + Sync
    + std::fmt::Debug
    + std::fmt::Display
    + std::iter::Sum
    + 'static
    + sealed::Sealed
{
    /// `"f32"` or `"f64"`, for metadata.
    const NAME: &'static str;
    /// Widen to `f64` (exact).
    fn as_f64(self) -> f64;
    /// Narrow from `f64` (round to nearest).
    fn round_from_f64(v: f64) -> Self;
    /// The slice at its concrete type: code generic over `Scalar` dispatches on it to a kernel
    /// written for `f32` and `f64` (the estimators' matrix products), so no numerical library's
    /// trait bound appears in a caller's signature.
    fn typed(values: &[Self]) -> TypedSlice<'_>;
    /// [`Scalar::typed`] for a mutable slice.
    fn typed_mut(values: &mut [Self]) -> TypedSliceMut<'_>;
}

/// A slice of a [`Scalar`] at its concrete type.
#[derive(Debug)]
pub enum TypedSlice<'a> {
    /// `f32` values.
    F32(&'a [f32]),
    /// `f64` values.
    F64(&'a [f64]),
}

/// A mutable slice of a [`Scalar`] at its concrete type.
#[derive(Debug)]
pub enum TypedSliceMut<'a> {
    /// `f32` values.
    F32(&'a mut [f32]),
    /// `f64` values.
    F64(&'a mut [f64]),
}

impl Scalar for f32 {
    const NAME: &'static str = "f32";
    #[inline]
    fn as_f64(self) -> f64 {
        self as f64
    }
    #[inline]
    fn round_from_f64(v: f64) -> Self {
        v as f32
    }
    fn typed(values: &[Self]) -> TypedSlice<'_> {
        TypedSlice::F32(values)
    }
    fn typed_mut(values: &mut [Self]) -> TypedSliceMut<'_> {
        TypedSliceMut::F32(values)
    }
}

impl Scalar for f64 {
    const NAME: &'static str = "f64";
    #[inline]
    fn as_f64(self) -> f64 {
        self
    }
    #[inline]
    fn round_from_f64(v: f64) -> Self {
        v
    }
    fn typed(values: &[Self]) -> TypedSlice<'_> {
        TypedSlice::F64(values)
    }
    fn typed_mut(values: &mut [Self]) -> TypedSliceMut<'_> {
        TypedSliceMut::F64(values)
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}
