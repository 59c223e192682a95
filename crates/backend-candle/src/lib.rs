//! # backend-candle
//!
//! [`fs_traits::SplitModel`] implementations on the candle engine. This crate is an empty shell in
//! the foundation milestone: it only fixes its place in the workspace and the dependency arrow
//! `backend-candle -> fs-traits` (never `fs-estimators -> backend-candle`). The models arrive with
//! their issues (GPT-2 and the Llama family), without changing the seam.

pub use fs_traits::SplitModel;
