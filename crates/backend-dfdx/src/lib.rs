//! # backend-dfdx
//!
//! [`fs_traits::SplitModel`] implementations on the dfdx engine. This crate is an empty shell in
//! the foundation milestone: it only fixes its place in the workspace and the dependency arrow
//! `backend-dfdx -> fs-traits` (never `fs-estimators -> backend-dfdx`). The models arrive with
//! their issues (GPT-2 and the Llama family), without changing the seam.

pub use fs_traits::SplitModel;
