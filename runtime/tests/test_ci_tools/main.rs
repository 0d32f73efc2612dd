//! Matryoshka's reports as the CI tools people run read them, each tool's own verdict
//! and counts asserted: meson and prove read its TAP, avocado (103 LTS and current)
//! its TAP and one test per listed test, tmt its results.json, and xmllint checks its
//! JUnit files against the Jenkins xunit plugin's junit-10.xsd.
//!
//! The tools, at pinned versions, come from `bash tests-ci/setup.sh`, which installs
//! them into $MATRYOSHKA_CI_TOOLS (default target/ci-tools); a missing tool fails its
//! test with that command. The files these tests give the tools (meson.build, the
//! avocado hint and scripts) are the snippets of docs/ci.md, checked word for word.

#[allow(dead_code, reason = "shared by several test crates, each using a part")]
#[path = "../common/mod.rs"]
mod common;

mod avocado;
mod docs;
mod junit;
mod meson;
mod prove;
mod tmt;

use std::collections::BTreeMap;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::Run;
use matryoshka_test_programs::{CI, HOSTILE};

const SETUP: &str = "bash tests-ci/setup.sh";

/// The matryoshka binary under test.
const MATRYOSHKA: &str = env!("CARGO_BIN_EXE_matryoshka");

/// The repository's root.
fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("runtime/ has a parent")
        .to_path_buf()
}

/// Where `tests-ci/setup.sh` installs the tools.
fn tools_dir() -> PathBuf {
    let dir = std::env::var_os("MATRYOSHKA_CI_TOOLS")
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from("target/ci-tools"), PathBuf::from);
    if dir.is_absolute() {
        dir
    } else {
        repo().join(dir)
    }
}

/// A tool that `tests-ci/setup.sh` installs: a path under the tools folder, or an
/// absolute one (Debian's packages). Fails, naming the set-up command, when missing.
#[track_caller]
fn tool(path: &str) -> PathBuf {
    let found = tools_dir().join(path);
    assert!(
        found.exists(),
        "{} is missing: install the CI tools with `{SETUP}` (it installs into \
         $MATRYOSHKA_CI_TOOLS, default target/ci-tools; looked in {})",
        found.display(),
        tools_dir().display()
    );
    found
}

/// Runs a tool to its end, with matryoshka's compile cache shared with the other tests.
fn exec(cmd: &mut Command) -> Run {
    cmd.env("MATRYOSHKA_CACHE_DIR", common::cache_dir())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    Run::from(out)
}

/// Both output streams, for tools that print their summary on either.
fn both(r: &Run) -> String {
    format!("{}\n{}", r.stdout, r.stderr)
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// An executable shell script.
fn script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    write(path, &format!("#!/bin/sh\n{body}\n"));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// A fresh folder for `fails_once`'s mark, granted as `/state`.
fn state_grant(dir: &Path) -> String {
    let state = dir.join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    format!("fs={}:/state:rw", state.display())
}
