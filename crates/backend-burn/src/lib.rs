//! # backend-burn
//!
//! [`fs_traits::SplitModel`] implementations on the burn engine. This crate is an empty shell in
//! the foundation milestone: it only fixes its place in the workspace and the dependency arrow
//! `backend-burn -> fs-traits` (never `fs-estimators -> backend-burn`). The models arrive with
//! their issues (GPT-2 and the Llama family), without changing the seam.

pub use fs_traits::SplitModel;
