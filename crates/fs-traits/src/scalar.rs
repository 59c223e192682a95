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
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}
