//! The `matryoshka` command line.
//!
//! Exit codes: 0 when every selected test passed (or with `--exit-zero` once the
//! run completed), [`EXIT_TESTS_FAILED`] when a test failed,
//! [`EXIT_COULD_NOT_RUN`] when the suite could not be run at all (unreadable or
//! malformed component, wrong world, a failing `tests` export), 2 for an
//! invalid command line, grant or config file, and 130 when interrupted.

use std::fs::File;
use std::io::{self, BufWriter, IsTerminal};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tokio::sync::mpsc;

use crate::config::{AccelPolicy, Grants, InstanceLimits, NestLimits, SshSettings, VmSettings};
use crate::engine::CacheDir;
use crate::host::LevelContext;
use crate::level::LevelInfo;
use crate::level::vm::{RunDir, VmContext};
use crate::output::{OutputSink, Stream};
use crate::reporter::human::HumanReporter;
use crate::reporter::json::JsonReporter;
use crate::reporter::junit::JunitReporter;
use crate::reporter::tap::TapReporter;
use crate::reporter::{Format, Reporter};
use crate::runner::{self, Chain, IgnoredMode, RunOptions, Runner};
use crate::serve::{ServeOptions, serve_stdio};
use crate::suite;

/// Some selected test failed.
pub const EXIT_TESTS_FAILED: u8 = 100;
/// The suite could not be run: the fault is in the component or the infrastructure.
pub const EXIT_COULD_NOT_RUN: u8 = 101;
/// The command line, a grant or the config file is invalid.
pub const EXIT_USAGE: u8 = 2;
/// The run was interrupted (SIGINT).
pub const EXIT_INTERRUPTED: u8 = 130;

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
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Speak the protocol on stdin and stdout.
    #[arg(long, required = true)]
    stdio: bool,
    /// Folder for cached components and precompiled artifacts.
    #[arg(long, value_name = "PATH")]
    cache_dir: Option<PathBuf>,
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
    /// Deadline of each test that sets none itself, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    timeout: f64,
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
        Command::Test(args) => runtime.block_on(test(*args)),
        Command::Serve(args) => {
            let opts = ServeOptions {
                cache: args
                    .cache_dir
                    .map(CacheDir::At)
                    .unwrap_or_else(CacheDir::default_location),
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

/// `target/matryoshka/<UTC date and time>-<pid>`.
fn default_run_dir() -> PathBuf {
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
        .with_ansi(io::stderr().is_terminal())
        .try_init();
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

fn grants_for(args: &TestArgs) -> Result<Grants, String> {
    let mut grants = Grants::default();
    let beside = args
        .component
        .parent()
        .unwrap_or(Path::new("."))
        .join("matryoshka.toml");
    let config = match &args.config {
        Some(path) => Some(path.clone()),
        None if !args.no_config && beside.exists() => Some(beside),
        None => None,
    };
    if let Some(path) = config {
        grants.merge_config(&path).map_err(|e| e.to_string())?;
    }
    for g in &args.grant {
        grants.add(g).map_err(|e| e.to_string())?;
    }
    Ok(grants)
}

async fn test(args: TestArgs) -> u8 {
    let (grants, ssh) = match grants_for(&args).and_then(|g| Ok((g, ssh_settings(&args)?))) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    let cache = match (&args.cache_dir, args.no_cache) {
        (_, true) => CacheDir::Disabled,
        (Some(dir), false) => CacheDir::At(dir.clone()),
        (None, false) => CacheDir::default_location(),
    };
    let component = args.component.clone();
    let memo_dir = cache.dir().map(PathBuf::from);
    let loaded = match tokio::task::spawn_blocking(move || suite::load(&component, &cache)).await {
        Ok(Ok(suite)) => suite,
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            return EXIT_COULD_NOT_RUN;
        }
        Err(e) => {
            eprintln!("error: loading the component panicked: {e}");
            return EXIT_COULD_NOT_RUN;
        }
    };
    tracing::info!(source = ?loaded.source, sha256 = %loaded.sha256, "component loaded");
    let limits = InstanceLimits {
        memory_bytes: args.memory_limit.saturating_mul(1 << 20),
        output_bytes: args.max_output,
        ..InstanceLimits::default()
    };
    let ctx = LevelContext {
        level: LevelInfo::top(),
        grants,
        limits,
        nest: NestLimits {
            max_depth: args.max_depth,
            max_levels: args.max_levels,
        },
        env: args.env.clone(),
        ssh,
        component: loaded.component.clone(),
        vms: VmContext::new(
            VmSettings {
                accel: args.accel,
                jump: Vec::new(),
                chain_arch: args.level_arch.clone(),
            },
            args.image_dir.clone(),
            RunDir::Kept(args.run_dir.clone().unwrap_or_else(default_run_dir)),
            memo_dir,
        ),
        parent_budget: None,
    };
    let runner = Runner::new(loaded, ctx);
    let cases = match runner.list().await {
        Ok(cases) => cases,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_COULD_NOT_RUN;
        }
    };
    let Ok(timeout) = Duration::try_from_secs_f64(args.timeout.max(0.001)) else {
        eprintln!(
            "error: --timeout {} is not a number of seconds",
            args.timeout
        );
        return EXIT_USAGE;
    };
    let opts = RunOptions {
        filters: args.filters.clone(),
        exact: args.exact,
        skip: args.skip.clone(),
        ignored: if args.ignored {
            IgnoredMode::Only
        } else if args.include_ignored {
            IgnoredMode::Include
        } else {
            IgnoredMode::Skip
        },
        default_timeout: timeout,
        jobs: args
            .jobs
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        live_output: args.nocapture || args.format == Format::Json,
        retries: args.retries,
    };
    let plan = runner::plan(&cases, &opts);
    if args.list {
        return list(&runner, &plan, args.format);
    }
    if args.levels > args.max_depth {
        eprintln!(
            "error: --levels {} is deeper than --max-depth {}; raise it with --max-depth {}",
            args.levels, args.max_depth, args.levels
        );
        return EXIT_USAGE;
    }
    let (runner, opts) = if args.levels > 0 {
        eprintln!(
            "booting {} VM level{} for the run (L1 .. L{}); every test runs at the deepest",
            args.levels,
            if args.levels == 1 { "" } else { "s" },
            args.levels
        );
        let sink: OutputSink = Arc::new(|origin: &str, stream, text: &str| {
            if let Stream::Log(level) = stream {
                eprintln!("  {} {origin} | {text}", level.as_str());
            }
        });
        let booted = tokio::select! {
            booted = Chain::boot(runner.context(), args.levels, Some(sink)) => booted,
            _ = tokio::signal::ctrl_c() => {
                eprintln!("interrupted: stopping the levels booted so far");
                return EXIT_INTERRUPTED;
            }
        };
        match booted {
            Ok(chain) => {
                eprintln!("{} is up", chain.deepest());
                // One chain, one test at a time: its output is the running test's.
                (runner.with_chain(chain), RunOptions { jobs: 1, ..opts })
            }
            Err(e) => {
                eprintln!("error: {}", e.message);
                return EXIT_COULD_NOT_RUN;
            }
        }
    } else {
        (runner, opts)
    };
    let mut reporters = match reporters(&args) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let run = runner.run(plan, &opts, tx);
    let report = async {
        let mut failed = None;
        while let Some(event) = rx.recv().await {
            for r in &mut reporters {
                if let Err(e) = r.event(&event) {
                    failed.get_or_insert(e);
                }
            }
        }
        failed
    };
    let both = async { tokio::join!(run, report) };
    let (summary, report_error) = tokio::select! {
        done = both => done,
        _ = tokio::signal::ctrl_c() => {
            // Dropping the run drops every instance, its guests and their levels.
            eprintln!("interrupted: stopping the tests and every level they reached");
            return EXIT_INTERRUPTED;
        }
    };
    if let Some(e) = report_error {
        eprintln!("error: writing the report failed: {e}");
        return EXIT_COULD_NOT_RUN;
    }
    if summary.failed > 0 && !args.exit_zero {
        // Every failure came from the infrastructure: nothing was learnt about the tests.
        if summary.failed == summary.infrastructure {
            EXIT_COULD_NOT_RUN
        } else {
            EXIT_TESTS_FAILED
        }
    } else {
        0
    }
}

fn list(runner: &Runner, plan: &runner::Plan, format: Format) -> u8 {
    use std::io::Write as _;
    let suite = &runner.suite().name;
    let mut out = BufWriter::new(io::stdout().lock());
    let mut write = || -> io::Result<()> {
        for t in &plan.tests {
            let c = &t.case;
            if format == Format::Json {
                let line = serde_json::json!({
                    "suite": suite,
                    "name": c.name,
                    "ignored": c.ignored,
                    "timeout_ms": c.timeout_ms,
                    "tags": c.tags,
                });
                writeln!(out, "{}", crate::reporter::json::to_line(&line)?)?;
            } else {
                let ignored = if c.ignored { " (ignored)" } else { "" };
                let name = crate::reporter::text::line(&c.name);
                writeln!(
                    out,
                    "{}::{name}: test{ignored}",
                    crate::reporter::text::line(suite)
                )?;
            }
        }
        out.flush()
    };
    match write() {
        Ok(()) => 0,
        // A reader that stopped early (`| head`) wanted no more.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => 0,
        Err(e) => {
            eprintln!("error: cannot write the list: {e}");
            EXIT_COULD_NOT_RUN
        }
    }
}

fn reporters(args: &TestArgs) -> io::Result<Vec<Box<dyn Reporter>>> {
    let stdout = || BufWriter::new(io::stdout());
    let mut out: Vec<Box<dyn Reporter>> = vec![match args.format {
        Format::Human => Box::new(HumanReporter::new(stdout(), args.nocapture)),
        Format::Json => Box::new(JsonReporter::new(stdout())),
        Format::Junit => Box::new(JunitReporter::new(stdout())),
        Format::Tap => Box::new(TapReporter::new(stdout(), args.nocapture)),
    }];
    if let Some(path) = &args.junit {
        let file = File::create(path).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot create {}: {e}", path.display()))
        })?;
        out.push(Box::new(JunitReporter::new(BufWriter::new(file))));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4M"), Ok(4 << 20));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("lots").is_err());
    }
}
