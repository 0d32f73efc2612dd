//! Tests of the SSH scripts: run with `sh` against folders made here.

use super::*;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

fn sh(script: &str, stdin: &[u8]) -> (Option<i32>, String, String) {
    let mut child = Command::new("sh")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sh");
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin).expect("feed");
    drop(input);
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("list")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn ls_modes_are_read() {
    assert_eq!(mode_from_ls("drwx------"), Some(0o700));
    assert_eq!(mode_from_ls("drwxrwxrwx."), Some(0o777));
    assert_eq!(mode_from_ls("drwxrwxrwt"), Some(0o1777));
    assert_eq!(mode_from_ls("-rwsr-Sr-T"), Some(0o7744));
    assert_eq!(mode_from_ls("drwx"), None);
}

#[rstest::rstest]
fn an_upload_is_kept_only_when_its_hash_matches(
    #[values(Codec::Zstd, Codec::Gzip)] codec: Codec,
    #[values(true, false)] openssl: bool,
) {
    let tools = Tools { codec, openssl };
    let tmp = tempfile::tempdir().expect("tempdir");
    let runtime = b"#!/bin/sh\necho the runtime\n";
    let sha = crate::engine::sha256_hex(runtime);
    let bin = tmp.path().join(format!("matryoshka-{sha}"));
    let bin = bin.to_str().expect("utf-8");
    let pack = |bytes: &[u8]| codec.compress(bytes).expect("compress");

    // Another binary under the runtime's name: refused, nothing left.
    let (code, out, err) = sh(
        &upload(bin, &sha, tools),
        &pack(b"#!/bin/sh\necho another\n"),
    );
    assert_eq!(code, Some(4), "{out} {err}");
    let why = upload_failure(Some(4), &out, &err, bin, &sha, ("/x/matryoshka", codec));
    assert!(
        why.starts_with(&format!("the runtime copied to {bin} hashes to ")),
        "{why}"
    );
    assert!(
        why.contains(&format!("not {sha}, so it was not kept")),
        "{why}"
    );
    assert!(names(tmp.path()).is_empty(), "{:?}", names(tmp.path()));

    // The runtime cut short on the way: refused, with what the unpacker said.
    let packed = pack(runtime);
    let (code, out, err) = sh(&upload(bin, &sha, tools), &packed[..packed.len() / 2]);
    assert_eq!(code, Some(4), "{out} {err}");
    let why = upload_failure(Some(4), &out, &err, bin, &sha, ("/x/matryoshka", codec));
    assert!(why.contains("did not unpack ("), "{why}");
    assert!(names(tmp.path()).is_empty(), "{:?}", names(tmp.path()));

    // The runtime itself: kept, with its compressed copy.
    let (code, out, err) = sh(&upload(bin, &sha, tools), &packed);
    assert_eq!(code, Some(0), "{out} {err}");
    assert_eq!(
        names(tmp.path()),
        [
            format!("matryoshka-{sha}"),
            format!("matryoshka-{sha}{}", codec.suffix())
        ]
    );
    assert_eq!(std::fs::read(bin).expect("kept"), runtime);
}

#[test]
fn without_sha256sum_the_upload_fails_clearly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // A PATH with what the script needs except a hasher.
    let tools = tmp.path().join("tools");
    std::fs::create_dir(&tools).expect("tools");
    for tool in ["mktemp", "cat", "gzip", "rm", "chmod", "mv"] {
        let path = which(tool).expect("the upload's tools");
        std::os::unix::fs::symlink(path, tools.join(tool)).expect("link");
    }
    let bin = tmp.path().join("matryoshka-ab");
    let bin = bin.to_str().expect("utf-8");
    let script = format!(
        "PATH={}; {}",
        tools.display(),
        upload(
            bin,
            "ab",
            Tools {
                codec: Codec::Gzip,
                openssl: false
            }
        )
    );
    let (code, out, err) = sh(&script, &Codec::Gzip.compress(b"x").expect("compress"));
    assert_eq!(code, Some(3), "{out} {err}");
    let why = upload_failure(
        Some(3),
        &out,
        &err,
        bin,
        "ab",
        ("/x/matryoshka", Codec::Gzip),
    );
    assert!(
        why.contains("the target has neither `sha256sum` nor `openssl` to check the runtime"),
        "{why}"
    );
    assert_eq!(names(tmp.path()), ["tools"]);
}

/// Runs the first exec against the cache `dir`, for a runtime `sha`.
fn first_exec(dir: &Path, sha: &str) -> (Option<i32>, String) {
    let cache = super::super::sh_quote(dir.to_str().expect("utf-8"));
    let (code, out, _) = sh(&warm_or_probe(&cache, sha, std::env::consts::ARCH, ""), b"");
    (code, out)
}

/// Where this machine's `tool` is, as the shell finds it.
fn which(tool: &str) -> Option<String> {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .ok()?;
    found
        .status
        .success()
        .then(|| String::from_utf8_lossy(&found.stdout).trim().to_string())
}

/// Whether this machine has `tool`.
fn has(tool: &str) -> bool {
    which(tool).is_some()
}

#[test]
fn a_cold_first_exec_takes_the_runtime_on_its_stdin() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("cache");
    let cache = super::super::sh_quote(dir.to_str().expect("utf-8"));
    let runtime = b"#!/bin/sh\necho warm \"$@\"\n";
    let sha = crate::engine::sha256_hex(runtime);
    let script = warm_or_probe(&cache, &sha, std::env::consts::ARCH, "");
    let codec = if has("zstd") {
        Codec::Zstd
    } else {
        Codec::Gzip
    };
    let pack = |bytes: &[u8]| codec.compress(bytes).expect("compress");

    // Another binary under the runtime's name: refused, nothing left.
    let (code, out, err) = sh(&script, &pack(b"#!/bin/sh\necho another\n"));
    assert_eq!(code, Some(4), "{out} {err}");
    let report = out.strip_prefix(&format!("{PROBE_MARK}\n")).expect("probe");
    assert_eq!(receiving(report), Some(codec), "{report}");
    assert!(
        matches!(parse_probe(report), Probe::Ready { present, .. } if present.is_empty()),
        "{report}"
    );
    assert!(report.contains(&format!("\n{MISMATCH_MARK} ")), "{report}");
    assert!(
        names(&dir.join("bin")).is_empty(),
        "{:?}",
        names(&dir.join("bin"))
    );

    // The runtime: kept with its compressed copy, and the next first exec runs it.
    let (code, out, err) = sh(&script, &pack(runtime));
    assert_eq!(code, Some(0), "{out} {err}");
    assert_eq!(
        names(&dir.join("bin")),
        [
            format!("matryoshka-{sha}"),
            format!("matryoshka-{sha}{}", codec.suffix())
        ]
    );
    let (_, out) = first_exec(&dir, &sha);
    assert!(out.starts_with("warm serve --stdio --cache-dir"), "{out}");

    // A target of another architecture only reports: the client uploads
    // the runtime of that architecture in an exec of its own.
    let other = tmp.path().join("other");
    let (code, out, _) = sh(
        &warm_or_probe(
            &super::super::sh_quote(other.to_str().expect("utf-8")),
            &sha,
            "s390x-or-not",
            "",
        ),
        b"",
    );
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(receiving(&out), None, "{out}");
}

#[test]
fn the_warm_path_runs_a_cached_runtime_only_from_a_safe_folder() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("cache");
    let (_, out) = first_exec(&dir, "ab");
    let Some(report) = out.strip_prefix(&format!("{PROBE_MARK}\n")) else {
        panic!("no probe report: {out}");
    };
    assert_eq!(
        parse_probe(report),
        Probe::Ready {
            arch: std::env::consts::ARCH.into(),
            dir: dir.display().to_string(),
            tools: Tools {
                codec: if has("zstd") {
                    Codec::Zstd
                } else {
                    Codec::Gzip
                },
                openssl: has("openssl"),
            },
            present: vec![]
        }
    );
    for made in [&dir, &dir.join("bin")] {
        let mode = std::fs::metadata(made).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{}", made.display());
    }
    // A cached "runtime" that says who it is.
    let runtime = dir.join("bin/matryoshka-ab");
    std::fs::write(&runtime, "#!/bin/sh\necho warm \"$@\"\n").expect("plant");
    std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let (_, out) = first_exec(&dir, "ab");
    assert!(out.starts_with("warm serve --stdio --cache-dir"), "{out}");

    // The same with bin/ writable by others: not run, and the probe says why.
    let bin = dir.join("bin");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let (_, out) = first_exec(&dir, "ab");
    assert!(!out.contains("warm"), "{out}");
    let report = out.strip_prefix(&format!("{PROBE_MARK}\n")).unwrap_or(&out);
    let Probe::Unsafe(why) = parse_probe(report) else {
        panic!("not refused: {report}");
    };
    assert_eq!(
        why,
        [format!(
            "{0} is mode 0777 (writable by group and others) (fix: `chmod 700 {0}` there \
             once you trust what it holds, or another folder with --remote-cache-dir)",
            bin.display()
        )]
    );

    // A runtime file others can write to is not listed (so it is copied again).
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o757)).expect("chmod");
    let (_, out) = first_exec(&dir, "ab");
    assert!(!out.contains("warm"), "{out}");
    let report = out.strip_prefix(&format!("{PROBE_MARK}\n")).unwrap_or(&out);
    assert!(
        matches!(parse_probe(report), Probe::Ready { present, .. } if present.is_empty()),
        "{report}"
    );

    // Owned by another user (root too must not run it).
    std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::os::unix::fs::chown(&dir, Some(65534), None).expect("chown (tests run as root)");
    let (_, out) = first_exec(&dir, "ab");
    assert!(!out.contains("warm"), "{out}");
    let report = out.strip_prefix(&format!("{PROBE_MARK}\n")).unwrap_or(&out);
    let Probe::Unsafe(why) = parse_probe(report) else {
        panic!("not refused: {report}");
    };
    assert_eq!(why.len(), 1, "{why:?}");
    assert!(
        why[0].starts_with(&format!(
            "{} is owned by uid 65534, not by uid",
            dir.display()
        )),
        "{why:?}"
    );
}
