//! `matryoshka test`: load the suite, plan, boot a chain if asked, run, report.
//!
//! Reports are opened first and always closed: a run that ends early (a suite
//! that does not load, a chain that does not boot, SIGINT or SIGTERM) ends every
//! report with a `RunAborted` event that says why, so a JUnit file is whole and
//! a TAP stream ends with `Bail out!`.

use std::fs::File;
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::{
    EXIT_COULD_NOT_RUN, EXIT_INTERRUPTED, EXIT_NO_TESTS, EXIT_TERMINATED, EXIT_TESTS_FAILED,
    EXIT_USAGE, NoTests, TestArgs, default_run_dir, default_run_dir_name, ssh_settings,
};
use crate::config::{Grants, InstanceLimits, NestLimits, VmSettings};
use crate::engine::CacheDir;
use crate::event::TestEvent;
use crate::host::LevelContext;
use crate::level::LevelInfo;
use crate::level::vm::{RunDir, VmContext};
use crate::output::{OutputSink, Stream};
use crate::reporter::folder::FolderReporter;
use crate::reporter::human::HumanReporter;
use crate::reporter::json::JsonReporter;
use crate::reporter::junit::JunitReporter;
use crate::reporter::tap::TapReporter;
use crate::reporter::timeline::TimelineReporter;
use crate::reporter::tmt::TmtReporter;
use crate::reporter::{Format, Reporter};
use crate::runner::{self, Chain, FilterExpr, IgnoredMode, RunOptions, Runner};
use crate::suite;

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

pub(super) async fn test(args: TestArgs) -> u8 {
    let mut stop = Stop::listen();
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
    let expr = match selection_expr(&args.exprs, &args.tags) {
        Ok(expr) => expr,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    // --target makes L1 an existing machine; --levels counts it.
    let levels = if args.target.is_some() {
        args.levels.max(1)
    } else {
        args.levels
    };
    if levels > args.max_depth {
        eprintln!(
            "error: --levels {levels} is deeper than --max-depth {}; raise it with --max-depth {levels}",
            args.max_depth
        );
        return EXIT_USAGE;
    }
    if matches!(args.target, Some(crate::level::Target::Ssh(_))) && args.ssh_key.is_none() {
        eprintln!(
            "error: --target ssh://... needs --ssh-key FILE and --ssh-known-hosts FILE \
             (the key that logs in and the host keys to trust)"
        );
        return EXIT_USAGE;
    }
    if args.snapshot && (args.levels == 0 || args.target.is_some()) {
        eprintln!(
            "error: --snapshot saves the VM chain of --levels N (booted by this runtime, \
             without --target) and restores it for each test"
        );
        return EXIT_USAGE;
    }
    // A chain of VM levels is saved and restored unless --no-snapshot.
    let snapshot = args.levels > 0 && args.target.is_none() && !args.no_snapshot;
    let keep_failed: Option<Arc<dyn runner::keep::Hold>> =
        match (args.keep_failed || args.keep_failed_for.is_some(), levels) {
            (false, _) => None,
            (true, 0) => {
                eprintln!(
                    "error: --keep-failed keeps the chain of --levels N or --target up; a test's \
                 own guests go down with it (their `ssh-command` reaches them while it runs)"
                );
                return EXIT_USAGE;
            }
            (true, _) => Some(Arc::new(super::keep::TerminalHold::new(
                args.keep_failed_for,
            ))),
        };
    // Report files exist from the start, so that a run ending early still leaves
    // a whole report saying why.
    // `--list` writes no run folder, so it removes none either.
    let run_dir = match (&args.run_dir, args.list) {
        (Some(dir), _) => dir.clone(),
        (None, true) => default_run_dir_name(),
        (None, false) => default_run_dir(),
    };
    let mut report = match Reports::new(&args, &run_dir) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    let component = args.component.clone();
    let memo_dir = cache.dir().map(PathBuf::from);
    let loading = tokio::task::spawn_blocking(move || suite::load(&component, &cache));
    let loaded = tokio::select! {
        loaded = loading => loaded,
        signal = stop.next() => {
            return report.abort(&format!("interrupted by {signal} while loading the suite"), signal.exit_code());
        }
    };
    let loaded = match loaded {
        Ok(Ok(suite)) => suite,
        Ok(Err(e)) => return report.abort(&format!("{e}"), EXIT_COULD_NOT_RUN),
        Err(e) => {
            let reason = format!("loading the component panicked: {e}");
            return report.abort(&reason, EXIT_COULD_NOT_RUN);
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
        component: Some(loaded.component.clone()),
        vms: Arc::new(VmContext::new(
            VmSettings {
                accel: args.accel,
                jump: Vec::new(),
                chain_arch: args.level_arch.clone(),
                keep_failed: keep_failed.is_some(),
            },
            args.image_dir.clone(),
            RunDir::Kept(run_dir),
            memo_dir,
        )),
        parent_budget: None,
    };
    let runner = Runner::new(loaded, ctx);
    let listed = tokio::select! {
        listed = runner.list() => listed,
        signal = stop.next() => {
            return report.abort(&format!("interrupted by {signal} while listing the tests"), signal.exit_code());
        }
    };
    let cases = match listed {
        Ok(cases) => cases,
        Err(e) => return report.abort(&e.to_string(), EXIT_COULD_NOT_RUN),
    };
    let opts = RunOptions {
        filters: args.filters.clone(),
        exact: args.exact,
        skip: args.skip.clone(),
        expr,
        partition: args.partition,
        omit_ignored: args.omit_ignored,
        ignored: if args.ignored {
            IgnoredMode::Only
        } else if args.include_ignored {
            IgnoredMode::Include
        } else {
            IgnoredMode::Skip
        },
        default_timeout: args.timeout,
        jobs: args
            .jobs
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        live_output: args.nocapture,
        slow_after: (!args.slow_timeout.is_zero()).then_some(args.slow_timeout),
        fail_on_kernel_warnings: args.fail_on_kernel_warnings,
        retries: args.retries,
        keep_failed: keep_failed.clone(),
    };
    let plan = runner::plan(&runner.suite().name, &cases, &opts);
    if args.list {
        return list(&runner, &plan, args.format);
    }
    if !plan.tests.iter().any(|t| t.run) {
        let reason = format!(
            "no tests to run: the filters selected {} of the suite's {} tests, and 0 of them \
             run (--no-tests=warn or pass allows this)",
            plan.tests.len(),
            cases.len(),
        );
        match args.no_tests {
            NoTests::Fail => {
                eprintln!("error: {reason}");
                return report.abort(&reason, EXIT_NO_TESTS);
            }
            NoTests::Warn => eprintln!("warning: {reason}"),
            NoTests::Pass => {}
        }
    }
    let (runner, opts) = if levels > 0 {
        let vms = levels - u32::from(args.target.is_some());
        match &args.target {
            Some(crate::level::Target::Ssh(host)) => eprintln!(
                "reaching {host} over SSH as L1{}; every test runs at the deepest",
                booting_below(vms)
            ),
            Some(_) => eprintln!(
                "starting a local runtime as L1{}; every test runs at the deepest",
                booting_below(vms)
            ),
            None => eprintln!(
                "{} {levels} VM level{} for the run (L1 .. L{levels}); every test runs at the deepest",
                if snapshot { "starting" } else { "booting" },
                if levels == 1 { "" } else { "s" },
            ),
        }
        let sink: OutputSink = Arc::new(|origin: &str, stream, text: &str| {
            if let Stream::Log(level) = stream {
                eprintln!("  {} {origin} | {text}", level.as_str());
            }
        });
        report.send(&TestEvent::ChainBooting { levels });
        let to_run = plan.tests.iter().filter(|t| t.run).count();
        // A chain that does not boot is booted again, up to --retries times.
        let mut tries = 0;
        let chain = loop {
            tries += 1;
            let booted = tokio::select! {
                booted = boot_chain(runner.context(), args.target.clone(), levels, sink.clone(), snapshot, runner.context().vms.memo_dir.as_deref(), to_run > 1) => booted,
                signal = stop.next() => {
                    eprintln!("interrupted: stopping the levels booted so far");
                    return report.abort(&format!("interrupted by {signal} while booting"), signal.exit_code());
                }
            };
            match booted {
                Ok(chain) => break chain,
                Err(e) if tries <= args.retries => {
                    eprintln!(
                        "the chain did not boot (try {tries} of {}): {}; booting it again",
                        args.retries + 1,
                        e.message
                    );
                }
                Err(e) => {
                    let reason = format!("the chain did not boot: {}", e.message);
                    return report.abort(&reason, EXIT_COULD_NOT_RUN);
                }
            }
        };
        eprintln!("{} is up", chain.deepest());
        report.send(&TestEvent::ChainUp {
            deepest: chain.deepest(),
        });
        // One chain, one test at a time: its output is the running test's.
        (runner.with_chain(chain), RunOptions { jobs: 1, ..opts })
    } else {
        (runner, opts)
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let run = runner.run(plan, &opts, tx);
    let reporting = async {
        while let Some(event) = rx.recv().await {
            report.send(&event);
        }
    };
    let both = async { tokio::join!(run, reporting) };
    let summary = tokio::select! {
        (summary, ()) = both => summary,
        signal = stop.next() => {
            // Dropping the run dropped every instance, its guests and their levels.
            eprintln!("interrupted: stopping the tests and every level they reached");
            while let Ok(event) = rx.try_recv() {
                report.send(&event);
            }
            return report.abort(&format!("interrupted by {signal}"), signal.exit_code());
        }
    };
    if let Some(e) = report.error.take() {
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

/// Boots the run's chain; with `snapshot`, saved (a warning when that fails:
/// the tests then share it). With a cache folder too, the chain's snapshot is
/// kept there across runs (`runner::boot_kept`): restored when it matches,
/// else booted bare and saved; without one, the chain is saved for this run
/// with the component in it (a bare one would need the component attached
/// down the chain for each test, ~3 s a test at L2 here against a 0.5 s
/// restore, which only a snapshot kept across runs makes up for). `copies`:
/// more than one test runs on the chain, so a kept chain is saved once more,
/// holding the component, for the tests after the first.
async fn boot_chain(
    ctx: &LevelContext,
    target: Option<crate::level::Target>,
    levels: u32,
    sink: OutputSink,
    snapshot: bool,
    cache: Option<&Path>,
    copies: bool,
) -> Result<Chain, crate::wire::RemoteError> {
    let say = |line: String| eprintln!("{line}");
    if let (true, None, Some(cache)) = (snapshot, &target, cache) {
        match kept_store(ctx, levels, cache) {
            Ok(store) => {
                return runner::boot_kept(ctx, levels, Some(sink), &store, copies, &say).await;
            }
            Err(e) => say(format!(
                "warning: the chain's snapshot is not kept across runs ({e}); it is saved for \
                 this run only"
            )),
        }
    }
    let mut chain = Chain::boot(ctx, target, levels, Some(sink), false).await?;
    if snapshot {
        match chain.save(ctx).await {
            Ok(said) => say(said),
            Err(why) => say(format!("warning: {why}")),
        }
    }
    Ok(chain)
}

/// The cache slot of the run's chain; the run's levels accept the key kept
/// in it (unless `--ssh-key` named one).
fn kept_store(ctx: &LevelContext, levels: u32, cache: &Path) -> Result<runner::KeptStore, String> {
    let store = runner::KeptStore::open(cache, &runner::chain_asked(ctx, levels))?;
    let own_key = ctx
        .ssh
        .as_ref()
        .is_some_and(|s| s.private_key.is_some() || s.public_key.is_some());
    if !own_key {
        ctx.vms.use_key_file(&store.key_file())?;
    }
    Ok(store)
}

/// `, then N VM levels below it`, or nothing.
fn booting_below(vms: u32) -> String {
    match vms {
        0 => String::new(),
        1 => ", then a VM level below it".into(),
        n => format!(", then {n} VM levels below it"),
    }
}

/// One expression from `-E` (or'ed) and `--tag` (any of them), both when both are given.
fn selection_expr(exprs: &[String], tags: &[String]) -> Result<Option<FilterExpr>, String> {
    let any = |parts: Vec<FilterExpr>| {
        parts
            .into_iter()
            .reduce(|a, b| FilterExpr::Or(Box::new(a), Box::new(b)))
    };
    let mut parsed = Vec::new();
    for e in exprs {
        parsed.push(FilterExpr::parse(e).map_err(|err| format!("-E `{e}`: {err}"))?);
    }
    let tags = tags
        .iter()
        .map(|t| FilterExpr::Tag(runner::filter::Pattern::Equals(t.clone())))
        .collect();
    Ok(match (any(parsed), any(tags)) {
        (Some(e), Some(t)) => Some(FilterExpr::And(Box::new(e), Box::new(t))),
        (e, t) => e.or(t),
    })
}

/// The run's reporters, fed every event, and closed with `RunAborted` when the
/// run ends early.
struct Reports {
    reporters: Vec<Box<dyn Reporter>>,
    suite: String,
    started: Instant,
    finished: usize,
    /// The first error writing a report.
    error: Option<io::Error>,
}

impl Reports {
    /// The reporter of `--format` on stdout, and the `--junit` file; none for `--list`.
    fn new(args: &TestArgs, run_dir: &Path) -> io::Result<Self> {
        let suite = args
            .component
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut reporters: Vec<Box<dyn Reporter>> = Vec::new();
        if !args.list {
            let stdout = || BufWriter::new(io::stdout());
            reporters.push(match args.format {
                Format::Human => {
                    Box::new(HumanReporter::new(stdout(), args.nocapture).naming_folder(run_dir))
                }
                Format::Json => Box::new(JsonReporter::new(stdout(), args.nocapture)),
                Format::Junit => Box::new(JunitReporter::new(stdout())),
                Format::Tap => Box::new(TapReporter::new(stdout(), args.nocapture)),
            });
            if let Some(path) = &args.junit {
                let file = File::create(path).map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot create {}: {e}", path.display()))
                })?;
                reporters.push(Box::new(JunitReporter::new(BufWriter::new(file))));
            }
            if let Some(path) = &args.tmt_results {
                reporters.push(Box::new(TmtReporter::new(path.clone())));
            }
            reporters.push(Box::new(FolderReporter::new(run_dir.to_path_buf())));
            reporters.push(Box::new(TimelineReporter::new(run_dir.to_path_buf())));
        }
        Ok(Self {
            reporters,
            suite,
            started: Instant::now(),
            finished: 0,
            error: None,
        })
    }

    /// Hands `event` to every reporter.
    fn send(&mut self, event: &TestEvent) {
        if matches!(event, TestEvent::TestFinished { .. }) {
            self.finished += 1;
        }
        for r in &mut self.reporters {
            if let Err(e) = r.event(event) {
                self.error.get_or_insert(e);
            }
        }
    }

    /// Ends every report with `reason` and returns `code`; a reason that is an
    /// error (not a signal) also goes to stderr.
    fn abort(&mut self, reason: &str, code: u8) -> u8 {
        if code == EXIT_COULD_NOT_RUN {
            eprintln!("error: {reason}");
        }
        let event = TestEvent::RunAborted {
            suite: self.suite.clone(),
            reason: reason.to_string(),
            finished: self.finished,
            duration_secs: self.started.elapsed().as_secs_f64(),
        };
        self.send(&event);
        code
    }
}

/// A signal that stops the run.
#[derive(Debug, Clone, Copy)]
enum StopSignal {
    Int,
    Term,
}

impl StopSignal {
    fn exit_code(self) -> u8 {
        match self {
            StopSignal::Int => EXIT_INTERRUPTED,
            StopSignal::Term => EXIT_TERMINATED,
        }
    }
}

impl std::fmt::Display for StopSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopSignal::Int => "SIGINT",
            StopSignal::Term => "SIGTERM",
        })
    }
}

/// SIGINT and SIGTERM, listened for from the start of the run: a signal while
/// the suite loads ends the reports as well as one while tests run.
struct Stop {
    int: Option<tokio::signal::unix::Signal>,
    term: Option<tokio::signal::unix::Signal>,
}

impl Stop {
    fn listen() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        Self {
            int: signal(SignalKind::interrupt()).ok(),
            term: signal(SignalKind::terminate()).ok(),
        }
    }

    /// The next SIGINT or SIGTERM.
    async fn next(&mut self) -> StopSignal {
        async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            () = recv(&mut self.int) => StopSignal::Int,
            () = recv(&mut self.term) => StopSignal::Term,
        }
    }
}
