//! The backends under test, behind one object-safe face.
//!
//! [`SplitModel`] has associated types, so models of different engines cannot share a `Vec`.
//! [`Probe`] erases them: every `SplitModel` is a `Probe`, and [`load`] puts checkpoint files on
//! an engine through the registry (`fs-engines`, the same path as the CLI). Tests are written
//! once against [`compiled_backends`] (the engines this build of `fs-suite` was compiled with, by
//! its `candle` / `burn` / `dfdx` features) and instantiated per backend by
//! [`backend_suite!`](crate::backend_suite), as candle instantiates its tests per device.

use fs_checkpoint::ModelFiles;
use fs_estimators::{exact_fisher, ExactOptions, Matrix, Scalar, SplitModel};
use fs_traits::ModelDims;

use crate::{ContractReport, OracleTolerances, Tolerances};

/// A model under test with its types erased: the few questions the cross-backend suite asks.
pub trait Probe {
    /// The model's dimensions.
    fn dims(&self) -> ModelDims;
    /// Logits `[T, V]` at every position of `tokens`, read through the split at `layer`, in
    /// `f64`.
    fn all_logits(&self, tokens: &[u32], layer: usize) -> Result<Matrix<f64>, String>;
    /// The exact Fisher `F = Aᵀ G A` at `layer`, `position`, in `f64`.
    fn exact(&self, tokens: &[u32], layer: usize, position: usize) -> Result<Matrix<f64>, String>;
    /// The readout Jacobian `A = ∂u/∂h` (`d_u × d`) at `layer`, `position`, in `f64`.
    fn readout_jacobian(
        &self,
        tokens: &[u32],
        layer: usize,
        position: usize,
    ) -> Result<Matrix<f64>, String>;
    /// The full [`crate::check_split_model`] contract, and what it measured.
    fn contract(
        &self,
        tokens: &[u32],
        layer: usize,
        tol: Tolerances,
    ) -> Result<ContractReport, String>;
    /// [`crate::check_against_oracle_within`]: largest `(logit, exact F, sampled F)` errors.
    fn oracle(&self, fixture: &str, tol: OracleTolerances) -> Result<(f64, f64, f64), String>;
    /// The error message of a lower pass that must fail (`Ok(())` if it did not fail).
    fn lower_error(&self, tokens: &[u32], layer: usize) -> Result<(), String>;
    /// [`crate::check_attention_oracle`]: the attention distributions against the fixture's
    /// attention oracle.
    fn attention_oracle(
        &self,
        fixture: &str,
        tol: crate::AttentionTolerances,
    ) -> Result<crate::AttentionErrors, String>;
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

    fn readout_jacobian(
        &self,
        tokens: &[u32],
        layer: usize,
        position: usize,
    ) -> Result<Matrix<f64>, String> {
        let ctx = self.lower(tokens, layer).map_err(|e| e.to_string())?;
        let mut a = self.readout_jacobians(&ctx, &[position]).map_err(|e| e.to_string())?;
        Ok(a.remove(0).map(|x| x.as_f64()))
    }

    fn contract(
        &self,
        tokens: &[u32],
        layer: usize,
        tol: Tolerances,
    ) -> Result<ContractReport, String> {
        crate::check_split_model(self, tokens, layer, tol)
    }

    fn oracle(&self, fixture: &str, tol: OracleTolerances) -> Result<(f64, f64, f64), String> {
        crate::check_against_oracle_within(self, fixture, tol)
    }

    fn lower_error(&self, tokens: &[u32], layer: usize) -> Result<(), String> {
        match self.lower(tokens, layer) {
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    fn attention_oracle(
        &self,
        fixture: &str,
        tol: crate::AttentionTolerances,
    ) -> Result<crate::AttentionErrors, String> {
        crate::check_attention_oracle(self, fixture, tol)
    }
}

/// An engine of the registry ([`fs_engines::Backend`]): the suite runs on the engines this build
/// of `fs-suite` was compiled with (its `candle` / `burn` / `dfdx` features, forwarded to
/// `fs-engines`).
pub use fs_engines::Backend;

/// The registry's job that keeps the model, type-erased.
struct KeepProbe;

impl fs_engines::EngineJob for KeepProbe {
    type Output = Box<dyn Probe>;
    fn run<M: SplitModel + 'static>(self, model: M) -> anyhow::Result<Box<dyn Probe>> {
        Ok(Box::new(model))
    }
}

/// The environment variable that moves the suite onto a device: `FS_TEST_DEVICE=wgpu` (burn on
/// any Vulkan/Metal/DX12 adapter, Mesa's lavapipe included: `tools/test_wgpu.sh`),
/// `FS_TEST_DEVICE=cuda:0`. Unset or empty: `cpu`.
pub const TEST_DEVICE: &str = "FS_TEST_DEVICE";

/// The device the suite's models are loaded on ([`TEST_DEVICE`], default `cpu`).
pub fn test_device() -> String {
    std::env::var(TEST_DEVICE).ok().filter(|d| !d.trim().is_empty()).unwrap_or_else(|| "cpu".into())
}

/// Load checkpoint `files` on `backend` and the suite's device ([`test_device`]) the way the
/// CLI does: engine-free checkpoint, typed host weights, then the registry uploads them as the
/// engine's model of their architecture. The error is the one-line message a user would see.
pub fn load(backend: Backend, files: &ModelFiles) -> Result<Box<dyn Probe>, String> {
    load_on(backend, files, &test_device())
}

/// [`load`] on an explicit `device`.
pub fn load_on(
    backend: Backend,
    files: &ModelFiles,
    device: &str,
) -> Result<Box<dyn Probe>, String> {
    (|| {
        let weights = fs_checkpoint::Checkpoint::from_files(files.clone())?.read_weights()?;
        fs_engines::Engine::open(backend, device)?.run(weights, None, KeepProbe)
    })()
    .map_err(|e: anyhow::Error| e.to_string())
}

/// Load checkpoint `files` as candle's f64 reference model (`backend_candle::Float`: every
/// weight widened to f64 once, every pass, tangent and gradient computed in f64): the model whose
/// derivatives the f64 contract checks against f64 finite differences, and which the f32
/// engines are compared with.
#[cfg(feature = "candle")]
pub fn load_candle_f64(files: &ModelFiles) -> Result<Box<dyn Probe>, String> {
    use fs_checkpoint::ModelWeights;
    let cpu = backend_candle::Device::Cpu;
    (|| -> anyhow::Result<Box<dyn Probe>> {
        Ok(match fs_checkpoint::Checkpoint::from_files(files.clone())?.read_weights()? {
            ModelWeights::Gpt2(w) => Box::new(backend_candle::Gpt2::<f64>::with_scalar(w, &cpu)?),
            ModelWeights::Decoder(w) => {
                Box::new(backend_candle::Decoder::<f64>::with_scalar(w, &cpu)?)
            }
        })
    })()
    .map_err(|e| e.to_string())
}

/// Every engine this build has, candle first.
pub fn compiled_backends() -> Vec<Backend> {
    Backend::compiled_in()
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

            fn load(name: &str) -> Box<dyn Probe> {
                let files = fs_checkpoint::resolve_model(dir(name).to_str().unwrap())
                    .expect("resolve fixture");
                $crate::backends::load(BACKEND, &files)
                    .unwrap_or_else(|e| panic!("{}: load {name}: {e}", BACKEND.name()))
            }

            fn oracle_and_contract(name: &str) {
                let model = load(name);
                let (z, f, s) = model.oracle(name, $crate::OracleTolerances::F32).unwrap_or_else(|e| panic!("{}: {e}", BACKEND.name()));
                println!(
                    "{} {name}: max |Δlogit| {z:.2e}, max exact-F rel. error {f:.2e}, max sampled-F rel. error {s:.2e}",
                    BACKEND.name()
                );
                let a = model
                    .attention_oracle(name, $crate::AttentionTolerances::F32)
                    .unwrap_or_else(|e| panic!("{}: {e}", BACKEND.name()));
                assert!(a.compared > 0, "{name}: no attention distribution compared");
                let r = Reference::load(name);
                for k in 0..=r.n_layers {
                    let report = model
                        .contract(&r.input_ids, k, Tolerances::F32)
                        .unwrap_or_else(|e| panic!("{} {name} layer {k}: {e}", BACKEND.name()));
                    $crate::print_contract(&format!("{} fixture", BACKEND.name()), &report);
                }
            }

            #[test]
            fn gpt2_fixtures_match_the_oracle_and_the_contract() {
                for name in ["gpt2-tiny-a", "gpt2-tiny-b"] {
                    oracle_and_contract(name);
                }
            }

            $($crate::backend_suite_llama!($llama);)?

            mod random_configs {
                use super::*;
                use proptest::prelude::*;

                proptest! {
                    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

                    /// Random tiny GPT-2s (layers 1–3, heads 1–4, d 8–64, vocab 5–300, T 1–16)
                    /// satisfy the SplitModel contract at a random layer.
                    #[test]
                    fn random_gpt2_satisfies_the_contract(
                        case in $crate::random_models::gpt2_case()
                    ) {
                        let dir = tempfile::tempdir().unwrap();
                        let files = case.write(dir.path());
                        let model = $crate::backends::load(BACKEND, &files).map_err(TestCaseError::fail)?;
                        let r = model.contract(&case.tokens, case.layer, Tolerances::F32).map_err(TestCaseError::fail)?;
                        $crate::print_contract(&format!("{} gpt2", BACKEND.name()), &r);
                    }

                }
            }
        }
    };
}

/// The Llama-family half of [`backend_suite!`], instantiated only for engines that have the
/// family (`backend_suite!(candle, Backend::Candle, llama)`): an engine without it gets no Llama tests at
/// all, rather than tests that return early and count as passes.
#[macro_export]
#[doc(hidden)]
macro_rules! backend_suite_llama {
    (llama) => {
        #[test]
        fn llama_fixtures_match_the_oracle_and_the_contract() {
            for name in ["llama-tiny-tied", "llama-tiny-untied", "mistral-window-tiny"] {
                oracle_and_contract(name);
            }
        }

        /// The transformers oracle of every new decoder family: logits and hidden states at
        /// every layer and position (`OracleTolerances::F32`), exact F at every layer and
        /// position, and the contract at every layer.
        #[test]
        fn gemma_fixtures_match_the_oracle_and_the_contract() {
            for name in ["gemma2-tiny", "gemma3-tiny"] {
                oracle_and_contract(name);
            }
        }

        #[test]
        fn qwen3_olmo2_phi3_fixtures_match_the_oracle_and_the_contract() {
            for name in ["qwen3-tiny", "olmo2-tiny", "phi3-tiny"] {
                oracle_and_contract(name);
            }
        }

        #[test]
        fn gpt_neox_fixtures_match_the_oracle_and_the_contract() {
            for name in ["pythia-tiny", "gptneox-sequential-tiny"] {
                oracle_and_contract(name);
            }
        }

        mod random_decoder_configs {
            use super::*;
            use proptest::prelude::*;

            proptest! {
                #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

                /// Random tiny decoders of every family (GQA, biases, tied or not, windows,
                /// soft-caps, partial rotary, parallel residual) satisfy the contract.
                #[test]
                fn random_decoder_satisfies_the_contract(
                    case in $crate::random_models::decoder_case()
                ) {
                    let dir = tempfile::tempdir().unwrap();
                    let files = case.write(dir.path());
                    let model = $crate::backends::load(BACKEND, &files).map_err(TestCaseError::fail)?;
                    let r = model.contract(&case.tokens, case.layer, Tolerances::F32).map_err(TestCaseError::fail)?;
                    $crate::print_contract(&format!("{} decoder", BACKEND.name()), &r);
                }
            }
        }
    };
}
