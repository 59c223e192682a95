//! Runs `examples/custom_model.rs` under `cargo test`, so CI runs the example (it asserts its own
//! results: closed form == exact, sampled within 5% of exact).

#[path = "../examples/custom_model.rs"]
mod custom_model;

#[test]
fn custom_model_example_runs() {
    custom_model::main();
}
