//! The `matryoshka` command line.
//!
//! Exit codes: 0 when every selected test passed (or with `--exit-zero` once the
//! run completed), [`EXIT_TESTS_FAILED`] when a test failed,
//! [`EXIT_COULD_NOT_RUN`] when the suite could not be run at all (unreadable or
//! malformed component, wrong world, a failing `tests` export), 2 for an
//! invalid command line, grant or config file, [`EXIT_NO_TESTS`] when the filters
//! select no test to run, 130 when interrupted (SIGINT) and
//! 143 when stopped by SIGTERM.

use std::io::{self, IsTerminal};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{AccelPolicy, NestLimits, SshSettings};
use crate::engine::CacheDir;
use crate::reporter::Format;
use crate::runner;
use crate::serve::{ServeOptions, serve_stdio};

mod keep;
mod test;

/// Some selected test failed.
pub const EXIT_TESTS_FAILED: u8 = 100;
/// The suite could not be run: the fault is in the component or the infrastructure.
pub const EXIT_COULD_NOT_RUN: u8 = 101;
/// The command line, a grant or the config file is invalid.
pub const EXIT_USAGE: u8 = 2;
/// No test was selected to run (with `--no-tests=fail`, the default).
pub const EXIT_NO_TESTS: u8 = 4;
/// The run was interrupted (SIGINT).
pub const EXIT_INTERRUPTED: u8 = 130;
/// The run was stopped by SIGTERM.
pub const EXIT_TERMINATED: u8 = 143;

/// Test runner for nested virtualization: WebAssembly component tests, run at
/// every level of a chain of guests.
#[derive(Debug, Parser)]
#[command(name = "matryoshka", version, about, long_about = None)]
pub struct Cli {
    /// More diagnostics on stderr (-v, -vv); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run (or list) the tests of a suite component.
    Test(Box<TestArgs>),
    /// Serve a parent level over the relay protocol (started by another runtime).
    Serve(ServeArgs),
    /// Connect this terminal to a QEMU human monitor socket (the commands
    /// --keep-failed prints use it at every level).
    Monitor(MonitorArgs),
}

#[derive(Debug, Args)]
struct MonitorArgs {
    /// The monitor's Unix socket.
    socket: PathBuf,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Speak the protocol on stdin and stdout.
    #[arg(long, required = true)]
    stdio: bool,
    /// Folder for cached components and precompiled artifacts.
    #[arg(long, value_name = "PATH")]
    cache_dir: Option<PathBuf>,
    /// Folder of the images the levels below this one boot from (default:
    /// `$MATRYOSHKA_IMAGE_DIR`, the image this level booted from, or
    /// `target/images`).
    #[arg(long, value_name = "PATH")]
    image_dir: Option<PathBuf>,
    /// Announce another protocol version (for testing version checks).
    #[arg(long, hide = true, default_value_t = crate::wire::PROTOCOL_VERSION)]
    protocol_version: u32,
    /// Misbehave towards the parent once ready (for testing how parents cope).
    #[arg(long, hide = true, value_enum)]
    inject: Option<crate::serve::Inject>,
}

#[derive(Debug, Args)]
struct TestArgs {
    /// The suite component (`.wasm`, targeting matryoshka:test/suite).
    component: PathBuf,
    /// Run only tests whose name contains one of these strings.
    filters: Vec<String>,
    /// List the tests instead of running them.
    #[arg(long)]
    list: bool,
    /// Filters match whole test names only.
    #[arg(long)]
    exact: bool,
    /// Leave out tests whose name contains this string (repeatable).
    #[arg(long, value_name = "PATTERN")]
    skip: Vec<String>,
    /// Run only ignored tests.
    #[arg(long, conflicts_with = "include_ignored")]
    ignored: bool,
    /// Run ignored tests as well.
    #[arg(long)]
    include_ignored: bool,
    /// Leave ignored tests out of every report instead of reporting them skipped
    /// (avocado 103 takes a TAP stream's first SKIP for the verdict of the run).
    #[arg(long, conflicts_with_all = ["ignored", "include_ignored"])]
    omit_ignored: bool,
    /// Run only tests this filter expression selects, e.g. `tag(exec) and not
    /// test(slow)` (matchers test(..), tag(..), all(), none(); `=NAME` matches a
    /// whole name; and, or, not, parentheses). Several are or'ed.
    #[arg(short = 'E', long = "expr", value_name = "EXPR")]
    exprs: Vec<String>,
    /// Run only tests with this tag (repeatable: any of them).
    #[arg(long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    /// Run only this shard of the selected tests: count:M/N deals them out in turn,
    /// hash:M/N by a hash of each name (stable when tests are added).
    #[arg(long, value_name = "KIND:M/N")]
    partition: Option<runner::Partition>,
    /// What a run that selects no test does: fail (exit 4), warn, or pass.
    #[arg(long, value_enum, value_name = "WHAT", default_value_t = NoTests::Fail)]
    no_tests: NoTests,
    /// Deadline of each test that sets none itself: seconds, or with a unit (500ms, 5s, 2m, 1h).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    timeout: Duration,
    /// Largest linear memory a test may grow, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 512)]
    memory_limit: usize,
    /// Bytes of log, stdout and stderr a test may write (suffixes K, M).
    #[arg(long, value_name = "BYTES", default_value = "4M", value_parser = parse_size)]
    max_output: usize,
    /// Tests run at once (default: number of CPUs).
    #[arg(short = 'j', long, value_name = "N")]
    jobs: Option<usize>,
    /// Output format on stdout.
    #[arg(long, value_enum, default_value_t = Format::Human)]
    format: Format,
    /// Also write a JUnit XML report to this file.
    #[arg(long, value_name = "PATH")]
    junit: Option<PathBuf>,
    /// Also write tmt's results.json to this file (with `result: custom`, e.g.
    /// $TMT_TEST_DATA/results.json), and each test's log into logs/ beside it.
    #[arg(long, value_name = "PATH")]
    tmt_results: Option<PathBuf>,
    /// Grant a capability: exec=CMD[,CMD...], fs=PATH[:GUEST_PATH][:ro|:rw], nest or image=PATH (repeatable).
    #[arg(long, value_name = "GRANT")]
    grant: Vec<String>,
    /// Read grants from this file instead of the matryoshka.toml beside the component.
    #[arg(long, value_name = "PATH", conflicts_with = "no_config")]
    config: Option<PathBuf>,
    /// Ignore the matryoshka.toml beside the component.
    #[arg(long)]
    no_config: bool,
    /// Folder for precompiled components [default: $MATRYOSHKA_CACHE_DIR, $XDG_CACHE_HOME/matryoshka or ~/.cache/matryoshka].
    #[arg(long, value_name = "PATH", conflicts_with = "no_cache")]
    cache_dir: Option<PathBuf>,
    /// Compile the component without reading or writing the cache.
    #[arg(long)]
    no_cache: bool,
    /// Show output as it is written, for every test and every level.
    #[arg(long, alias = "show-output")]
    nocapture: bool,
    /// Fail a test that passed while a VM level's kernel printed signs of trouble
    /// (BUG:, WARNING:, Oops, lockups, stalls, Call Trace:); by default they are
    /// warnings in the test's output.
    #[arg(long)]
    fail_on_kernel_warnings: bool,
    /// When a test fails on a chain (--levels, --target), keep the chain up, print
    /// a command that opens a shell at each level (and its QEMU monitor), and wait
    /// for Enter before going on; Ctrl-C ends the run.
    #[arg(long)]
    keep_failed: bool,
    /// With --levels N (the default there): boot the chain once with no
    /// component, save it (QEMU's whole state, the levels inside L1 with it)
    /// into the cache folder for later runs, which restore it in seconds
    /// instead of booting; and run each test after the first on a fresh copy
    /// restored from a save. Without a cache folder (--no-cache) the save is
    /// this run's only.
    #[arg(long, conflicts_with = "no_snapshot")]
    snapshot: bool,
    /// With --levels N: boot the chain for this run and let its tests share it
    /// as booted, one after the other; nothing is saved.
    #[arg(long)]
    no_snapshot: bool,
    /// Like --keep-failed, going on after this long at most (also without a terminal).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    keep_failed_for: Option<Duration>,
    /// Report a test still running after this long as SLOW, and again at each
    /// multiple (0 never).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_slow)]
    slow_timeout: Duration,
    /// Run a failed test up to N more times; one that passes on a retry is reported
    /// flaky. With --levels, a retry after a lost level boots the chain again.
    #[arg(long, value_name = "N", default_value_t = 0)]
    retries: u32,
    /// Exit 0 once the run completed even if tests failed (for TAP harnesses such as meson).
    #[arg(long)]
    exit_zero: bool,
    /// Set an environment variable for the component, at every level (repeatable).
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Private key (OpenSSH format) used to reach SSH levels; handed down the chain.
    #[arg(long, value_name = "FILE", requires = "ssh_known_hosts")]
    ssh_key: Option<PathBuf>,
    /// Hand the --ssh-key down to the levels below, so they can reach SSH levels
    /// further down (only for a key made for this chain, never a personal one).
    #[arg(long, requires = "ssh_key")]
    hand_down_ssh_key: bool,
    /// Pinned host keys of SSH levels (known_hosts format); nothing else is trusted.
    #[arg(long, value_name = "FILE", requires = "ssh_key")]
    ssh_known_hosts: Option<PathBuf>,
    /// Cache folder on SSH levels; `{depth}` is replaced by the level's depth [default: ~/.cache/matryoshka there].
    #[arg(long, value_name = "PATH")]
    remote_cache_dir: Option<String>,
    /// Accelerator of VM levels: `auto` uses KVM where a guest really boots with it, else TCG.
    #[arg(long, value_enum, default_value_t = AccelPolicy::Auto)]
    accel: AccelPolicy,
    /// Folder with the image VM levels boot (kernel, initrd, root.img) [default: $MATRYOSHKA_IMAGE_DIR or target/images/<arch>].
    #[arg(long, value_name = "PATH")]
    image_dir: Option<PathBuf>,
    /// Make this machine L1 and run every test there: `ssh://user@host[:port]` (with
    /// --ssh-key and --ssh-known-hosts) or `local` (a child runtime here). With
    /// --levels N, L2 .. LN are VMs booted below it.
    #[arg(long, value_name = "TARGET", value_parser = parse_target)]
    target: Option<crate::level::Target>,
    /// Run each test at the deepest level of a chain of N VM levels booted for the run
    /// (L0 -> L1 -> ... -> LN, each booted by the level above from the same image).
    #[arg(long, value_name = "N", default_value_t = 0)]
    levels: u32,
    /// Architectures of the levels `--levels` boots, from L1 down (`s390x`, or
    /// `x86_64,s390x`); a level past the list is of its parent's [default: L0's].
    #[arg(long, value_name = "ARCH", value_delimiter = ',', requires = "levels")]
    level_arch: Vec<String>,
    /// Deepest level a test may reach (L0 is 0); deeper is a `denied` error.
    #[arg(long, value_name = "N", default_value_t = NestLimits::DEFAULT_MAX_DEPTH)]
    max_depth: u32,
    /// Levels a test may hold at once over its whole chain; more is a `denied` error.
    #[arg(long, value_name = "N", default_value_t = NestLimits::DEFAULT_MAX_LEVELS)]
    max_levels: u32,
    /// Folder for this run's consoles, QEMU logs and SSH key [default: target/matryoshka/<run>].
    #[arg(long, value_name = "PATH")]
    run_dir: Option<PathBuf>,
}

/// Parses the command line, runs it and returns the exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.verbose);
    // A level serving over a pipe (a local parent, an SSH exec channel) relays one
    // call at a time, and every call crosses the tasks of the hop (reader, instance,
    // writer): on one thread those hand-offs wake no other thread (the depth-3 round
    // trip over SSH went from 608-709 µs to 464-547 µs). A VM level's port is read
    // and written through blocking threads anyway, and keeps the measured setup.
    let mut builder = match cli.command {
        Command::Serve(_) if !crate::serve::stdin_is_serial_port() => {
            tokio::runtime::Builder::new_current_thread()
        }
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_COULD_NOT_RUN);
        }
    };
    let code = match cli.command {
        Command::Test(args) => runtime.block_on(test::test(*args)),
        Command::Monitor(args) => runtime.block_on(keep::monitor(&args.socket)),
        Command::Serve(args) => {
            let opts = ServeOptions {
                cache: args
                    .cache_dir
                    .map(CacheDir::At)
                    .unwrap_or_else(CacheDir::default_location),
                image_dir: args.image_dir,
                protocol_version: args.protocol_version,
                inject: args.inject,
            };
            runtime.block_on(serve_stdio(opts))
        }
    };
    // Do not wait for blocked stdin readers or lingering tasks: every child
    // process was started with kill-on-drop and is gone with its owner.
    runtime.shutdown_timeout(Duration::from_millis(200));
    // Whatever VM is still registered now was left by a path that skipped its owner's drop.
    crate::process::kill_all();
    ExitCode::from(code)
}

/// Run folders kept in `target/matryoshka/`; older ones are removed when a run starts.
const RUNS_KEPT: usize = 20;

/// Removes all but the newest `keep - 1` run folders (named by [`default_run_dir`],
/// so their names sort by time) in `parent`, making room for one more.
fn prune_runs(parent: &Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    let mut runs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(is_run_folder_name)
        })
        .collect();
    runs.sort();
    let excess = runs.len().saturating_sub(keep.saturating_sub(1));
    for old in &runs[..excess] {
        if let Err(e) = std::fs::remove_dir_all(old) {
            tracing::warn!("cannot remove the old run folder {}: {e}", old.display());
        }
    }
}

/// `YYYYMMDD-HHMMSS-PID`.
fn is_run_folder_name(name: &str) -> bool {
    let parts: Vec<&str> = name.split('-').collect();
    parts.len() == 3
        && parts[0].len() == 8
        && parts[1].len() == 6
        && !parts[2].is_empty()
        && parts.iter().all(|p| p.bytes().all(|b| b.is_ascii_digit()))
}

/// `target/matryoshka/<UTC date and time>-<pid>`, after removing all but the
/// newest [`RUNS_KEPT`] - 1 run folders there.
fn default_run_dir() -> PathBuf {
    let dir = default_run_dir_name();
    if let Some(parent) = dir.parent() {
        prune_runs(parent, RUNS_KEPT);
    }
    dir
}

fn default_run_dir_name() -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    PathBuf::from("target/matryoshka").join(format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}-{}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        std::process::id()
    ))
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

fn ssh_settings(args: &TestArgs) -> Result<Option<SshSettings>, String> {
    let (Some(key), Some(known)) = (&args.ssh_key, &args.ssh_known_hosts) else {
        return Ok(None);
    };
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
    };
    Ok(Some(SshSettings {
        private_key: Some(read(key)?),
        public_key: None,
        hand_down: args.hand_down_ssh_key,
        known_hosts: read(known)?,
        remote_cache_dir: args.remote_cache_dir.clone(),
        key_path: std::path::absolute(key)
            .ok()
            .map(|p| p.display().to_string()),
    }))
}

fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(
            io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .try_init();
}

/// What a run that selects no test does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum NoTests {
    /// Exit with code 4: a filter with a typo fails CI.
    Fail,
    /// Say so on stderr and exit 0.
    Warn,
    /// Exit 0.
    Pass,
}

/// A duration: plain seconds (`90`, `0.5`) or with units (`500ms`, `5s`, `2m`, `1h 30m`).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let parsed = match s.parse::<f64>() {
        Ok(secs) => Duration::try_from_secs_f64(secs).map_err(|e| e.to_string()),
        Err(_) => humantime::parse_duration(s).map_err(|e| e.to_string()),
    };
    match parsed {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err(format!(
            "`{s}` is no time at all: give a duration above zero"
        )),
        Err(e) => Err(format!(
            "`{s}` is not a duration ({e}): use seconds or a unit, e.g. 90, 500ms, 5s, 2m, 1h"
        )),
    }
}

/// `--target`: an SSH host or `local`; VMs are asked for with --levels.
fn parse_target(s: &str) -> Result<crate::level::Target, String> {
    match crate::level::Target::parse(s)? {
        crate::level::Target::Vm(_) => Err(format!("`{s}`: boot VM levels with --levels N")),
        target => Ok(target),
    }
}

/// `--slow-timeout`: a duration, or 0 for never.
fn parse_slow(s: &str) -> Result<Duration, String> {
    if matches!(s.trim(), "0" | "0s") {
        return Ok(Duration::ZERO);
    }
    parse_duration(s)
}

fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (digits, mult) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    digits
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| {
            format!("`{s}` is not a size: use a number of bytes, optionally with K, M or G")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_run_folders_are_pruned_and_nothing_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        for i in 0..25 {
            std::fs::create_dir(dir.path().join(format!("20261203-1200{i:02}-7"))).expect("mkdir");
        }
        std::fs::create_dir(dir.path().join("mine")).expect("mkdir");
        std::fs::write(dir.path().join("20261203-120000-8"), "a file").expect("write");
        prune_runs(dir.path(), 20);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .expect("read")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
            .collect();
        left.sort();
        assert_eq!(left.len(), 21, "{left:?}");
        assert_eq!(left[0], "20261203-120000-8");
        assert_eq!(left[1], "20261203-120006-7");
        assert_eq!(left.last().map(String::as_str), Some("mine"));
        assert!(is_run_folder_name(
            &default_run_dir_name()
                .file_name()
                .expect("name")
                .to_string_lossy()
        ));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        for bad in ["5 parsecs", "-1", "0", "0s", "soon"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4M"), Ok(4 << 20));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("lots").is_err());
    }
}
