//! The Llama family on candle against the torch/transformers oracle fixtures (GQA, tied and
//! untied heads, attention biases, Llama-3 RoPE scaling) and the SplitModel contract.
#![cfg(feature = "candle")]

use backend_candle::{Device, Llama};
use fs_suite::fixtures::{dir, Reference};
use fs_suite::{check_split_model, Tolerances};

fn load(name: &str) -> Llama {
    let files = fs_checkpoint::resolve_model(dir(name).to_str().unwrap()).expect("resolve fixture");
    Llama::load(&files, &Device::Cpu).expect("load fixture")
}

fn check(name: &str) {
    let model = load(name);
    let (z, f, s) =
        fs_suite::check_against_oracle(&model, name, 1e-4).unwrap_or_else(|e| panic!("{e}"));
    println!("{name}: max |Δlogit| {z:.2e}, max exact-F rel. error {f:.2e}, max sampled-F rel. error {s:.2e}");
    let r = Reference::load(name);
    for k in 0..=r.n_layers {
        check_split_model(&model, &r.input_ids, k, Tolerances::F32)
            .unwrap_or_else(|e| panic!("{name} layer {k}: {e}"));
    }
}

#[test]
fn llama_tiny_tied_matches_the_oracle() {
    check("llama-tiny-tied");
}

#[test]
fn llama_tiny_untied_matches_the_oracle() {
    check("llama-tiny-untied");
}
