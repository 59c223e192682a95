//! Derivative checks that can see a 1e-4 relative error.
//!
//! In f32, the finite-difference Jacobian of a transformer is only good to ~1e-3 (round-off
//! `~u·|z|/ε` at a step large enough to keep truncation small), so the f32 contract
//! (`Tolerances::F32`, Jacobian within 2e-2) cannot tell a correct derivative from one that is
//! 1e-4 off. Here the derivatives are checked where they can be checked tightly:
//!
//! 1. candle's models computing in f64 (`backend_candle::Float`) satisfy the whole `SplitModel`
//!    contract at `Tolerances::F64` — Jacobian against f64 central differences within 1e-6
//!    relative, score gradients and batched JVP/VJP within 1e-9, exact == closed form within
//!    1e-10 — on random tiny configurations of every family, and match the transformers
//!    float64 oracle fixtures at every layer and position to the tolerances below;
//! 2. every f32 engine's readout Jacobian `A` and exact `F` match that f64 reference on random
//!    tiny configurations within tolerances set from the measured error distribution with a ≥ 10×
//!    margin ([`F32_VS_F64_JACOBIAN`], [`F32_VS_F64_FISHER`]): a 1e-4 relative error in any
//!    engine's derivative exceeds them;
//! 3. a model whose derivatives are all 1e-4 off (consistently, so only finite differences can
//!    see it) fails the f64 contract.
#![cfg(feature = "candle")]

use fs_estimators::relative_frobenius;
use fs_suite::backends::{compiled_backends, load, load_candle_f64};
use fs_suite::random_models::{decoder_case, gpt2_case};
use fs_suite::{OracleTolerances, Tolerances};
use proptest::prelude::*;

use fs_suite::fixtures::ALL as FIXTURES;

/// The f64 models against the float64 oracle. Both sides compute in f64 from the same
/// f32-representable weights (Gemma's `1 + w` and `√d` formed in f64 on both), so what remains
/// is summation order. Measured over every fixture, layer and position (2026-11-30): logits
/// ≤ 4.5e-14 absolute, exact F ≤ 4.3e-14 and sampled F ≤ 3.9e-14 relative; 1e-12 is a 22×
/// margin. Closed form vs exact keeps the contract's f64 bound.
const F64_ORACLE: OracleTolerances = OracleTolerances {
    logits: 1e-12,
    hidden: 1e-12,
    fisher: 1e-12,
    closed_form: Tolerances::F64.fisher,
    sampled: 1e-12,
};

/// Largest relative Frobenius difference of an f32 engine's readout Jacobian `A` from the f64
/// reference's. Measured over 300 random GPT-2s (candle, burn, dfdx) and 300 random decoders
/// (candle, burn) at the fixed seed, `FS_PRINT_F32_VS_F64=1` (2026-11-30): median 2.7e-7, p99
/// 2.6e-6, max 8.2e-6 (candle, a decoder); 9e-5 is an 11× margin, and a derivative 1e-4 off is
/// outside it.
const F32_VS_F64_JACOBIAN: f64 = 9e-5;
/// Largest relative Frobenius difference of an f32 engine's exact F from the f64 reference's.
/// Measured as above: median 4.8e-7, p99 5.5e-6, max 8.7e-6 (candle, a decoder); 1e-4 is an
/// 11.5× margin, and a Jacobian 1e-4 off moves F by 2e-4.
const F32_VS_F64_FISHER: f64 = 1e-4;

#[test]
fn f64_models_match_the_float64_oracle_and_the_f64_contract_on_every_fixture() {
    for name in FIXTURES {
        let files = fs_checkpoint::resolve_model(fs_suite::fixtures::dir(name).to_str().unwrap())
            .expect("resolve fixture");
        let model = load_candle_f64(&files).unwrap_or_else(|e| panic!("{name}: {e}"));
        let (z, f, s) = model.oracle(name, F64_ORACLE).unwrap_or_else(|e| panic!("f64 {e}"));
        println!(
            "candle f64 {name}: max |Δlogit| {z:.2e}, max exact-F rel. error {f:.2e}, max sampled-F rel. error {s:.2e}"
        );
        let a = model
            .attention_oracle(name, fs_suite::AttentionTolerances::F64)
            .unwrap_or_else(|e| panic!("f64 attention {e}"));
        assert!(a.compared > 0, "{name}: no attention distribution compared");
        let r = fs_suite::fixtures::Reference::load(name);
        for k in 0..=r.n_layers {
            model
                .contract(&r.input_ids, k, Tolerances::F64)
                .unwrap_or_else(|e| panic!("candle f64 {name} layer {k}: {e}"));
        }
    }
}

/// Every compiled f32 engine that implements `family` against the f64 reference on one model:
/// the readout Jacobian and the exact F at `position`. Returns the largest differences seen.
fn f32_engines_match_f64(
    files: &fs_checkpoint::ModelFiles,
    family: &str,
    tokens: &[u32],
    layer: usize,
    position: usize,
) -> Result<(f64, f64), String> {
    let reference = load_candle_f64(files)?;
    let a64 = reference.readout_jacobian(tokens, layer, position)?;
    let f64_ = reference.exact(tokens, layer, position)?;
    let (mut worst_a, mut worst_f) = (0.0f64, 0.0f64);
    for b in compiled_backends().into_iter().filter(|b| b.implements(family)) {
        let m = load(b, files)?;
        let ea = relative_frobenius(&m.readout_jacobian(tokens, layer, position)?, &a64);
        let ef = relative_frobenius(&m.exact(tokens, layer, position)?, &f64_);
        if std::env::var_os("FS_PRINT_F32_VS_F64").is_some() {
            println!("f32-vs-f64 {} {family} A {ea:.3e} F {ef:.3e}", b.name());
        }
        if ea > F32_VS_F64_JACOBIAN || ef > F32_VS_F64_FISHER {
            return Err(format!(
                "{} at layer {layer}, position {position}: readout Jacobian {ea:.3e}, exact F {ef:.3e} relative to the f64 reference",
                b.name()
            ));
        }
        worst_a = worst_a.max(ea);
        worst_f = worst_f.max(ef);
    }
    Ok((worst_a, worst_f))
}

proptest! {
    // ~0.2 s a case on the 2-core machine.
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Random tiny GPT-2s in f64 satisfy the contract at `Tolerances::F64`.
    #[test]
    fn f64_random_gpt2_satisfies_the_f64_contract(case in gpt2_case()) {
        let dir = tempfile::tempdir().unwrap();
        let model = load_candle_f64(&case.write(dir.path())).map_err(TestCaseError::fail)?;
        let r = model.contract(&case.tokens, case.layer, Tolerances::F64).map_err(TestCaseError::fail)?;
        fs_suite::print_contract("candle-f64 gpt2", &r);
    }

    /// Random tiny decoders of every family in f64 satisfy the contract at `Tolerances::F64`.
    #[test]
    fn f64_random_decoder_satisfies_the_f64_contract(case in decoder_case()) {
        let dir = tempfile::tempdir().unwrap();
        let model = load_candle_f64(&case.write(dir.path())).map_err(TestCaseError::fail)?;
        let r = model.contract(&case.tokens, case.layer, Tolerances::F64).map_err(TestCaseError::fail)?;
        fs_suite::print_contract("candle-f64 decoder", &r);
    }
}

proptest! {
    // ~10 ms a case.
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Every f32 engine's derivatives match the f64 reference on random tiny GPT-2s.
    #[test]
    fn f32_engines_match_the_f64_reference_on_random_gpt2(case in gpt2_case(), pos in 0.0f64..1.0) {
        let dir = tempfile::tempdir().unwrap();
        let position = ((case.tokens.len() as f64 * pos) as usize).min(case.tokens.len() - 1);
        f32_engines_match_f64(&case.write(dir.path()), "gpt2", &case.tokens, case.layer, position)
            .map_err(TestCaseError::fail)?;
    }

    /// Every f32 engine's derivatives match the f64 reference on random tiny decoders.
    #[test]
    fn f32_engines_match_the_f64_reference_on_random_decoders(case in decoder_case(), pos in 0.0f64..1.0) {
        let dir = tempfile::tempdir().unwrap();
        let position = ((case.tokens.len() as f64 * pos) as usize).min(case.tokens.len() - 1);
        f32_engines_match_f64(&case.write(dir.path()), "decoder", &case.tokens, case.layer, position)
            .map_err(TestCaseError::fail)?;
    }
}

/// A model whose derivatives — readout Jacobians, JVPs, VJPs, score gradients — are all
/// `factor` times the true ones, and whose attention score Jacobians are `attention_factor`
/// times theirs, while its logits and scores are right: the error a wrong tangent rule of a
/// uniformly scaled kind would make, visible only against finite differences.
struct ScaledDerivatives<M> {
    model: M,
    factor: f64,
    attention_factor: f64,
}

impl<M: fs_estimators::SplitModel<Scalar = f64>> fs_estimators::SplitModel
    for ScaledDerivatives<M>
{
    type Scalar = f64;
    type Context = M::Context;
    fn dims(&self) -> fs_traits::ModelDims {
        self.model.dims()
    }
    fn lower(&self, tokens: &[u32], layer: usize) -> Result<M::Context, fs_traits::FsError> {
        self.model.lower(tokens, layer)
    }
    fn activation(&self, ctx: &M::Context, t: usize) -> Result<Vec<f64>, fs_traits::FsError> {
        self.model.activation(ctx, t)
    }
    fn upper_logits(
        &self,
        ctx: &M::Context,
        t: usize,
        h: &[f64],
    ) -> Result<Vec<f64>, fs_traits::FsError> {
        self.model.upper_logits(ctx, t, h)
    }
    fn logits(
        &self,
        ctx: &M::Context,
        positions: &[usize],
    ) -> Result<fs_traits::Matrix<f64>, fs_traits::FsError> {
        self.model.logits(ctx, positions)
    }
    fn score_gradients(
        &self,
        ctx: &M::Context,
        t: usize,
        tokens: &[u32],
    ) -> Result<fs_traits::Matrix<f64>, fs_traits::FsError> {
        Ok(self.model.score_gradients(ctx, t, tokens)?.map(|x| x * self.factor))
    }
    fn readout_jacobians(
        &self,
        ctx: &M::Context,
        positions: &[usize],
    ) -> Result<Vec<fs_traits::Matrix<f64>>, fs_traits::FsError> {
        let a = self.model.readout_jacobians(ctx, positions)?;
        Ok(a.into_iter().map(|a| a.map(|x| x * self.factor)).collect())
    }
    fn readout_jvp(
        &self,
        ctx: &M::Context,
        t: usize,
        v: fs_traits::MatrixRef<'_, f64>,
    ) -> Result<fs_traits::Matrix<f64>, fs_traits::FsError> {
        Ok(self.model.readout_jvp(ctx, t, v)?.map(|x| x * self.factor))
    }
    fn native_readout_jvp(&self) -> bool {
        self.model.native_readout_jvp()
    }
    fn readout_vjp(
        &self,
        ctx: &M::Context,
        t: usize,
        w: fs_traits::MatrixRef<'_, f64>,
    ) -> Result<fs_traits::Matrix<f64>, fs_traits::FsError> {
        Ok(self.model.readout_vjp(ctx, t, w)?.map(|x| x * self.factor))
    }
    fn unembedding(&self) -> fs_traits::Unembedding<'_, f64> {
        self.model.unembedding()
    }
    fn final_logit_softcap(&self) -> Option<f64> {
        self.model.final_logit_softcap()
    }
    fn extend(
        &self,
        ctx: &M::Context,
        prefix_len: usize,
        token: u32,
    ) -> Result<M::Context, fs_traits::FsError> {
        self.model.extend(ctx, prefix_len, token)
    }
    fn attention_heads(&self) -> usize {
        self.model.attention_heads()
    }
    fn attention_scores(
        &self,
        ctx: &M::Context,
        t: usize,
        head: fs_traits::AttentionHead,
        h: &[f64],
    ) -> Result<Vec<f64>, fs_traits::FsError> {
        self.model.attention_scores(ctx, t, head, h)
    }
    fn attention_jacobian(
        &self,
        ctx: &M::Context,
        t: usize,
        head: fs_traits::AttentionHead,
    ) -> Result<fs_traits::Matrix<f64>, fs_traits::FsError> {
        Ok(self.model.attention_jacobian(ctx, t, head)?.map(|x| x * self.attention_factor))
    }
}

/// The f64 contract sees a derivative 1e-4 too large or too small (against finite
/// differences: the scaled derivatives agree with each other) — of the logits or of the
/// attention scores; the unscaled model passes.
#[test]
fn a_derivative_1e4_off_fails_the_f64_contract() {
    let files =
        fs_checkpoint::resolve_model(fs_suite::fixtures::dir("llama-tiny-tied").to_str().unwrap())
            .unwrap();
    let weights = || match fs_checkpoint::Checkpoint::from_files(files.clone())
        .and_then(|c| c.read_weights())
        .unwrap()
    {
        fs_checkpoint::ModelWeights::Decoder(w) => w,
        _ => unreachable!("a Llama fixture"),
    };
    let cpu = backend_candle::Device::Cpu;
    let tokens = fs_suite::fixtures::Reference::load("llama-tiny-tied").input_ids;
    let cases = [
        (1.0, 1.0, true),
        (1.0 + 1e-4, 1.0, false),
        (1.0 - 1e-4, 1.0, false),
        (1.0, 1.0 + 1e-4, false),
        (1.0, 1.0 - 1e-4, false),
    ];
    for (factor, attention_factor, should_pass) in cases {
        let model = ScaledDerivatives {
            model: backend_candle::Decoder::<f64>::with_scalar(weights(), &cpu).unwrap(),
            factor,
            attention_factor,
        };
        let r = fs_suite::check_split_model(&model, &tokens, 1, Tolerances::F64);
        assert_eq!(r.is_ok(), should_pass, "factors {factor}, {attention_factor}: {r:?}");
        if let Err(e) = r {
            assert!(e.contains("finite differences"), "factor {factor}: {e}");
            assert_eq!(e.contains("attention"), attention_factor != 1.0, "{e}");
        }
    }
}
