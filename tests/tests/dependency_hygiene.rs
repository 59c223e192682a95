//! `fs-estimators` must build with no tensor framework in its dependency tree: that is what lets
//! a user link only it into a custom model (DESIGN §3).

use std::process::Command;

#[test]
fn fs_estimators_has_no_tensor_framework_dependency() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let out = Command::new(cargo)
        .current_dir(root)
        .args([
            "tree",
            "-p",
            "fs-estimators",
            "-e",
            "normal,build",
            "--prefix",
            "none",
            "--offline",
            "--locked",
        ])
        .output()
        .expect("run cargo tree");
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(tree.contains("faer v") && tree.contains("fs-traits v"), "unexpected tree:\n{tree}");
    for forbidden in ["candle", "burn", "dfdx", "tch", "ndarray"] {
        let hit: Vec<&str> = tree.lines().filter(|l| l.starts_with(forbidden)).collect();
        assert!(hit.is_empty(), "fs-estimators depends on {forbidden}: {hit:?}");
    }
}
