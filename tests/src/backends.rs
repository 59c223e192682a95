//! The backends under test, behind one object-safe face.
//!
//! [`SplitModel`] has associated types, so models of different engines cannot share a `Vec`.
//! [`Probe`] erases them: every `SplitModel` is a `Probe`, and a
//! [`Backend`] is a name plus loaders from checkpoint files to boxed probes. Tests are written
//! once against [`compiled_backends`] (the engines this build of `fs-suite` was compiled with, by
//! its `candle` / `burn` / `dfdx` features) and instantiated per backend by
//! [`backend_suite!`](crate::backend_suite), as candle instantiates its tests per device.

use fs_checkpoint::ModelFiles;
use fs_estimators::{exact_fisher, ExactOptions, Matrix, Scalar, SplitModel};
use fs_traits::ModelDims;

use crate::Tolerances;

/// A model under test with its types erased: the few questions the cross-backend suite asks.
pub trait Probe {
    /// The model's dimensions.
    fn dims(&self) -> ModelDims;
    /// Logits `[T, V]` at every position of `tokens`, read through the split at `layer`, in
    /// `f64`.
    fn all_logits(&self, tokens: &[u32], layer: usize) -> Result<Matrix<f64>, String>;
    /// The exact Fisher `F = Aᵀ G A` at `layer`, `position`, in `f64`.
    fn exact(&self, tokens: &[u32], layer: usize, position: usize) -> Result<Matrix<f64>, String>;
    /// The full [`crate::check_split_model`] contract.
    fn contract(&self, tokens: &[u32], layer: usize, tol: Tolerances) -> Result<(), String>;
    /// [`crate::check_against_oracle`]: largest `(logit, exact F, sampled F)` errors.
    fn oracle(&self, fixture: &str, logit_tol: f64) -> Result<(f64, f64, f64), String>;
    /// The error message of a lower pass that must fail (`Ok(())` if it did not fail).
    fn lower_error(&self, tokens: &[u32], layer: usize) -> Result<(), String>;
}

impl<M: SplitModel> Probe for M {
    fn dims(&self) -> ModelDims {
        SplitModel::dims(self)
    }

    fn all_logits(&self, tokens: &[u32], layer: usize) -> Result<Matrix<f64>, String> {
        let ctx = self.lower(tokens, layer).map_err(|e| e.to_string())?;
        let all: Vec<usize> = (0..tokens.len()).collect();
        Ok(self.logits(&ctx, &all).map_err(|e| e.to_string())?.map(|x| x.as_f64()))
    }

    fn exact(&self, tokens: &[u32], layer: usize, position: usize) -> Result<Matrix<f64>, String> {
        let ctx = self.lower(tokens, layer).map_err(|e| e.to_string())?;
        let mut f = exact_fisher(self, &ctx, &[position], &ExactOptions::default())
            .map_err(|e| e.to_string())?;
        Ok(f.remove(0))
    }

    fn contract(&self, tokens: &[u32], layer: usize, tol: Tolerances) -> Result<(), String> {
        crate::check_split_model(self, tokens, layer, tol)
    }

    fn oracle(&self, fixture: &str, logit_tol: f64) -> Result<(f64, f64, f64), String> {
        crate::check_against_oracle(self, fixture, logit_tol)
    }

    fn lower_error(&self, tokens: &[u32], layer: usize) -> Result<(), String> {
        match self.lower(tokens, layer) {
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Loads checkpoint files as a model of one architecture on one backend (CPU); the error is the
/// backend's one-line message.
pub type Loader = fn(&ModelFiles) -> Result<Box<dyn Probe>, String>;

/// One engine under test.
#[derive(Clone, Copy)]
pub struct Backend {
    /// `candle`, `burn` or `dfdx`.
    pub name: &'static str,
    /// GPT-2 loader.
    pub gpt2: Loader,
    /// Llama-family loader, if the backend implements the Llama family.
    pub llama: Option<Loader>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// Box a loaded model as a [`Probe`].
#[cfg(any(feature = "candle", feature = "burn", feature = "dfdx"))]
fn boxed<M: Probe + 'static, E: std::fmt::Display>(
    model: Result<M, E>,
) -> Result<Box<dyn Probe>, String> {
    model.map(|m| Box::new(m) as Box<dyn Probe>).map_err(|e| e.to_string())
}

/// The candle backend.
#[cfg(feature = "candle")]
pub const CANDLE: Backend = Backend {
    name: "candle",
    gpt2: |f| {
        boxed(
            fs_checkpoint::Gpt2Weights::load(f)
                .map_err(Into::into)
                .and_then(|w| backend_candle::Gpt2::new(w, &backend_candle::Device::Cpu)),
        )
    },
    llama: Some(|f| {
        boxed(
            fs_checkpoint::LlamaWeights::load(f)
                .map_err(Into::into)
                .and_then(|w| backend_candle::Llama::new(w, &backend_candle::Device::Cpu)),
        )
    }),
};

/// The burn backend.
#[cfg(feature = "burn")]
pub const BURN: Backend = Backend {
    name: "burn",
    gpt2: |f| {
        boxed(
            fs_checkpoint::Gpt2Weights::load(f)
                .map_err(Into::into)
                .and_then(|w| backend_burn::Gpt2::new(w, &backend_burn::device("cpu").unwrap())),
        )
    },
    llama: Some(|f| {
        boxed(
            fs_checkpoint::LlamaWeights::load(f)
                .map_err(Into::into)
                .and_then(|w| backend_burn::Llama::new(w, &backend_burn::device("cpu").unwrap())),
        )
    }),
};

/// The dfdx backend (GPT-2 only).
#[cfg(feature = "dfdx")]
pub const DFDX: Backend = Backend {
    name: "dfdx",
    gpt2: |f| {
        boxed(
            fs_checkpoint::Gpt2Weights::load(f)
                .map_err(Into::into)
                .and_then(|w| backend_dfdx::Gpt2::new(w, &backend_dfdx::device("cpu").unwrap())),
        )
    },
    llama: None,
};

/// Every backend this build was compiled with, candle first.
pub fn compiled_backends() -> Vec<Backend> {
    [
        #[cfg(feature = "candle")]
        CANDLE,
        #[cfg(feature = "burn")]
        BURN,
        #[cfg(feature = "dfdx")]
        DFDX,
    ]
    .to_vec()
}

/// Largest absolute difference of two equally shaped matrices.
pub fn max_abs_diff(a: &Matrix<f64>, b: &Matrix<f64>) -> f64 {
    a.as_slice().iter().zip(b.as_slice()).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

/// Instantiate the per-backend half of the suite for one [`Backend`] constant: a module of tests
/// that every engine must pass on its own (oracle fixtures, the `SplitModel` contract on
/// fixtures and on random tiny configs). The cross-backend half (every pair agrees; same error
/// for the same bad input) lives in `tests/cross_backend.rs`.
#[macro_export]
macro_rules! backend_suite {
    ($module:ident, $backend:expr $(, $llama:ident)?) => {
        mod $module {
            use $crate::backends::{Backend, Probe};
            use $crate::fixtures::{dir, Reference};
            use $crate::Tolerances;

            const BACKEND: Backend = $backend;

            fn load(name: &str, llama: bool) -> Box<dyn Probe> {
                let files = fs_checkpoint::resolve_model(dir(name).to_str().unwrap())
                    .expect("resolve fixture");
                let loader = if llama { BACKEND.llama.expect("backend has Llama") } else { BACKEND.gpt2 };
                loader(&files).unwrap_or_else(|e| panic!("{}: load {name}: {e}", BACKEND.name))
            }

            fn oracle_and_contract(name: &str, llama: bool) {
                let model = load(name, llama);
                let (z, f, s) = model.oracle(name, 1e-4).unwrap_or_else(|e| panic!("{}: {e}", BACKEND.name));
                println!(
                    "{} {name}: max |Δlogit| {z:.2e}, max exact-F rel. error {f:.2e}, max sampled-F rel. error {s:.2e}",
                    BACKEND.name
                );
                let r = Reference::load(name);
                for k in 0..=r.n_layers {
                    model
                        .contract(&r.input_ids, k, Tolerances::F32)
                        .unwrap_or_else(|e| panic!("{} {name} layer {k}: {e}", BACKEND.name));
                }
            }

            #[test]
            fn gpt2_fixtures_match_the_oracle_and_the_contract() {
                for name in ["gpt2-tiny-a", "gpt2-tiny-b"] {
                    oracle_and_contract(name, false);
                }
            }

            $($crate::backend_suite_llama!($llama);)?

            mod random_configs {
                use super::*;
                use proptest::prelude::*;

                proptest! {
                    #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]

                    /// Random tiny GPT-2s (layers 1–3, heads 1–4, d 8–64, vocab 5–300, T 1–16)
                    /// satisfy the SplitModel contract at a random layer.
                    #[test]
                    fn random_gpt2_satisfies_the_contract(
                        case in $crate::random_models::gpt2_case()
                    ) {
                        let dir = tempfile::tempdir().unwrap();
                        let files = case.write(dir.path());
                        let model = (BACKEND.gpt2)(&files).map_err(TestCaseError::fail)?;
                        model.contract(&case.tokens, case.layer, Tolerances::F32).map_err(TestCaseError::fail)?;
                    }

                }
            }
        }
    };
}

/// The Llama-family half of [`backend_suite!`], instantiated only for engines that have the
/// family (`backend_suite!(candle, CANDLE, llama)`): an engine without it gets no Llama tests at
/// all, rather than tests that return early and count as passes.
#[macro_export]
#[doc(hidden)]
macro_rules! backend_suite_llama {
    (llama) => {
        #[test]
        fn llama_fixtures_match_the_oracle_and_the_contract() {
            for name in ["llama-tiny-tied", "llama-tiny-untied"] {
                oracle_and_contract(name, true);
            }
        }

        mod random_llama_configs {
            use super::*;
            use proptest::prelude::*;

            proptest! {
                #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]

                /// Random tiny Llamas (GQA, biases, tied or not) satisfy the contract.
                #[test]
                fn random_llama_satisfies_the_contract(
                    case in $crate::random_models::llama_case()
                ) {
                    let loader = BACKEND.llama.expect("instantiated for engines with the Llama family");
                    let dir = tempfile::tempdir().unwrap();
                    let files = case.write(dir.path());
                    let model = loader(&files).map_err(TestCaseError::fail)?;
                    model.contract(&case.tokens, case.layer, Tolerances::F32).map_err(TestCaseError::fail)?;
                }
            }
        }
    };
}
