//! Builds every suite under `tests-wasm/suites` into a `wasm32-wasip2`
//! component and writes one path constant per suite into `$OUT_DIR/suites.rs`.
//!
//! Each component is placed in its own folder together with the suite's
//! `matryoshka.toml` (if any) and `data/` folder, the way a user ships one.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Variables a parent cargo sets that must not leak into the nested build.
const SCRUB: &[&str] = &[
    "CARGO_ENCODED_RUSTFLAGS",
    "RUSTFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_MANIFEST_PATH",
    "CARGO_PROFILE_RELEASE_DEBUG",
];

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let suites = manifest
        .join("../suites")
        .canonicalize()
        .expect("tests-wasm/suites");
    let sdk = manifest
        .join("../../guest-sdk")
        .canonicalize()
        .expect("guest-sdk");
    let target_root = manifest.join("../../target");
    let target_dir = target_root.join("wasm-suites");
    let out_root = target_dir.join("components");

    for dir in [&suites, &sdk] {
        println!("cargo:rerun-if-changed={}", dir.display());
    }

    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&suites)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--target-dir",
        ])
        .arg(&target_dir);
    for var in SCRUB {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("running cargo for the wasm suites");
    assert!(
        status.success(),
        "building the wasm suites failed ({status})"
    );

    let built = target_dir.join("wasm32-wasip2/release");
    let mut consts = String::new();
    let mut names: Vec<String> = Vec::new();
    for entry in fs::read_dir(&suites).expect("read suites") {
        let path = entry.expect("suite entry").path();
        if !path.join("Cargo.toml").exists() {
            continue;
        }
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .to_string();
        let file_stem = name.replace('-', "_");
        let dest_dir = out_root.join(&name);
        fs::create_dir_all(&dest_dir).expect("component dir");
        let dest = dest_dir.join(format!("{file_stem}.wasm"));
        copy_if_changed(&built.join(format!("{file_stem}.wasm")), &dest);
        let toml = path.join("matryoshka.toml");
        if toml.exists() {
            copy_if_changed(&toml, &dest_dir.join("matryoshka.toml"));
        }
        let data = path.join("data");
        if data.is_dir() {
            copy_tree(&data, &dest_dir.join("data"));
        }
        let konst = file_stem.to_uppercase();
        consts.push_str(&format!(
            "/// Path of the `{name}` suite component.\npub const {konst}: &str = {:?};\n",
            dest.display().to_string()
        ));
        names.push(konst);
    }
    names.sort();
    consts.push_str(&format!(
        "/// Every suite component, by constant name.\npub const ALL: &[(&str, &str)] = &[{}];\n",
        names
            .iter()
            .map(|n| format!("({n:?}, {n})"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR")).join("suites.rs");
    fs::write(out, consts).expect("write suites.rs");
}

fn copy_if_changed(from: &Path, to: &Path) {
    let new = fs::read(from).unwrap_or_else(|e| panic!("reading {}: {e}", from.display()));
    if fs::read(to).ok().as_deref() != Some(&new[..]) {
        fs::write(to, new).unwrap_or_else(|e| panic!("writing {}: {e}", to.display()));
    }
}

fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("create data dir");
    for entry in fs::read_dir(from).expect("read data dir") {
        let path = entry.expect("data entry").path();
        let dest = to.join(path.file_name().expect("name"));
        if path.is_dir() {
            copy_tree(&path, &dest);
        } else {
            copy_if_changed(&path, &dest);
        }
    }
}
