//! Plans and executes the tests of one suite, emitting [`TestEvent`]s.
//!
//! Every test runs in a fresh instance with its own store, deadline, memory
//! limit and output budget, so one hostile test cannot disturb another. The
//! runner knows nothing of output formats: it only sends events.

use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use wasmtime::{Store, UpdateDeadline};

mod chain;
pub mod filter;
pub mod keep;
mod plan;
mod untrusted;
mod verdict;

pub use chain::{Chain, Store as KeptStore, asked as chain_asked, boot_kept};
pub use filter::FilterExpr;
pub use plan::{IgnoredMode, Partition, PartitionKind, Plan, PlannedTest, plan};
use untrusted::keep_within_budget;
pub use untrusted::{NAME_LIMIT, validate};
pub(crate) use verdict::failure;
use verdict::{classify, kernel_verdict};

use crate::event::{FailureKind, Outcome, Summary, TestEvent, TestFailure, TestId};
use crate::host::{HostState, LevelContext, Suite, TestCase};
use crate::output::{Capture, CapturedOutput, OutputSink};
use crate::suite::LoadedSuite;

/// Which tests to run, and how.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Substrings of test names to select; all tests when empty.
    pub filters: Vec<String>,
    /// Filters must match whole names.
    pub exact: bool,
    /// Substrings of test names to leave out.
    pub skip: Vec<String>,
    /// Only tests this expression selects (`-E`, `--tag`).
    pub expr: Option<FilterExpr>,
    /// Only this shard's part of the selected tests.
    pub partition: Option<Partition>,
    /// What to do with ignored tests.
    pub ignored: IgnoredMode,
    /// Leave ignored tests that do not run out of the plan, hence out of every report.
    pub omit_ignored: bool,
    /// Deadline for tests that do not set their own.
    pub default_timeout: Duration,
    /// Tests run at once.
    pub jobs: usize,
    /// Send output events as output happens.
    pub live_output: bool,
    /// Fail a test that passed while a level's kernel showed signs of trouble.
    pub fail_on_kernel_warnings: bool,
    /// After how long a running test is reported slow (and again at each multiple).
    pub slow_after: Option<Duration>,
    /// Times a failed test runs again; one that passes on a retry is flaky. With a
    /// `--levels` chain, a retry after an infrastructure failure gets a fresh chain.
    pub retries: u32,
    /// `--keep-failed`: after a failed try, a chain stays up until this hold ends.
    pub keep_failed: Option<Arc<dyn keep::Hold>>,
}

impl std::fmt::Debug for dyn keep::Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hold({})", self.until())
    }
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            filters: Vec::new(),
            exact: false,
            skip: Vec::new(),
            expr: None,
            partition: None,
            ignored: IgnoredMode::Skip,
            omit_ignored: false,
            default_timeout: Duration::from_secs(60),
            jobs: 1,
            live_output: false,
            fail_on_kernel_warnings: false,
            slow_after: None,
            retries: 0,
            keep_failed: None,
        }
    }
}

/// The runner could not get as far as running tests.
#[derive(Debug, Error)]
pub enum RunError {
    /// Asking the component for its tests failed.
    #[error("cannot list the tests of {suite}: {message}")]
    List {
        /// Suite name.
        suite: String,
        /// What went wrong.
        message: String,
    },
    /// The suite's list of tests cannot be run as it is: names that are empty,
    /// too long or declared twice would make reports ambiguous.
    #[error(
        "the suite {suite} is malformed: {} (each test needs a unique, non-empty name \
         of at most {NAME_LIMIT} bytes)",
        problems.join("; ")
    )]
    Malformed {
        /// Suite name.
        suite: String,
        /// Each problem, e.g. `test name "x" is declared twice`.
        problems: Vec<String>,
    },
}

/// Runs the tests of one loaded suite at this level.
pub struct Runner {
    suite: Arc<LoadedSuite>,
    ctx: Arc<LevelContext>,
    chain: Option<Arc<Chain>>,
}

impl Runner {
    /// A runner for `suite` in the context `ctx` (level, grants, limits, chain settings).
    pub fn new(suite: LoadedSuite, ctx: LevelContext) -> Self {
        Self {
            suite: Arc::new(suite),
            ctx: Arc::new(ctx),
            chain: None,
        }
    }

    /// Runs every test at the deepest level of `chain` instead of here.
    pub fn with_chain(mut self, chain: Chain) -> Self {
        self.chain = Some(Arc::new(chain));
        self
    }

    /// The context tests of this runner start from.
    pub fn context(&self) -> &LevelContext {
        &self.ctx
    }

    /// The suite this runner runs.
    pub fn suite(&self) -> &LoadedSuite {
        &self.suite
    }

    /// Asks the component for its tests, in a fresh instance, and checks their
    /// names with [`validate`].
    pub async fn list(&self) -> Result<Vec<TestCase>, RunError> {
        let err = |message: String| RunError::List {
            suite: self.suite.name.clone(),
            message,
        };
        let capture = Capture::new(&self.ctx.level.path, self.ctx.limits.output_bytes, None);
        let state = HostState::new(self.ctx.clone(), capture).map_err(|e| err(format!("{e:#}")))?;
        let mut store = new_store(&self.suite.engine, state);
        let result = {
            let pre = &self.suite.pre;
            let store = &mut store;
            let call = async move {
                let suite: Suite = pre.instantiate_async(&mut *store).await?;
                suite.call_tests(&mut *store).await
            };
            tokio::time::timeout(Duration::from_secs(30), call).await
        };
        match result {
            Ok(Ok(cases)) => validate(&self.suite.name, &cases).map(|()| cases),
            Ok(Err(trap)) => Err(err(format!("the `tests` export trapped: {trap:#}"))),
            Err(_) => Err(err("the `tests` export did not return within 30 s".into())),
        }
    }

    /// Runs `plan`, sending events to `events`, and returns the counts.
    pub async fn run(
        &self,
        plan: Plan,
        opts: &RunOptions,
        events: mpsc::UnboundedSender<TestEvent>,
    ) -> Summary {
        let started = Instant::now();
        let jobs = opts.jobs.max(1);
        let _ = events.send(TestEvent::RunStarted {
            suite: self.suite.name.clone(),
            component: self.suite.path.display().to_string(),
            sha256: self.suite.sha256.clone(),
            level_path: self.ctx.level.path.clone(),
            hostname: self.ctx.level.hostname.clone(),
            planned: plan.tests.len(),
            filtered_out: plan.filtered_out,
            jobs,
            retries: opts.retries,
        });
        let mut summary = Summary {
            filtered_out: plan.filtered_out,
            ..Summary::default()
        };
        let permits = Arc::new(Semaphore::new(jobs));
        let mut tasks = JoinSet::new();
        for (index, planned) in plan.tests.into_iter().enumerate() {
            let id = TestId {
                suite: self.suite.name.clone(),
                name: planned.case.name.clone(),
                level_path: self
                    .chain
                    .as_ref()
                    .map_or_else(|| self.ctx.level.path.clone(), |c| c.deepest()),
            };
            let timeout = planned
                .case
                .timeout_ms
                .map(Duration::from_millis)
                .unwrap_or(opts.default_timeout);
            let job = TestJob {
                suite: self.suite.clone(),
                ctx: self.ctx.clone(),
                timeout,
                live_output: opts.live_output,
                chain: self.chain.clone(),
                keep: opts.keep_failed.clone(),
            };
            // Taking the permit before spawning starts tests in suite order; ignored
            // tests go through the same queue so that reports keep that order too.
            // The semaphore is never closed, so acquiring cannot fail.
            let permit = permits.clone().acquire_owned().await.ok();
            let events = events.clone();
            let run = planned.run;
            let retries = opts.retries;
            let slow_after = opts.slow_after;
            let strict_kernel = opts.fail_on_kernel_warnings;
            tasks.spawn(async move {
                let _permit = permit;
                if !run {
                    let outcome = Outcome::Ignored;
                    let _ = events.send(TestEvent::TestFinished {
                        test: id,
                        index,
                        outcome: outcome.clone(),
                        duration_secs: 0.0,
                        output: CapturedOutput::default(),
                        attempts: 1,
                        first_failure: None,
                    });
                    return (outcome, 1);
                }
                let _ = events.send(TestEvent::TestStarted { test: id.clone() });
                let began = Instant::now();
                let _slow = slow_after.map(|every| slow_reports(&id, began, every, &events));
                let mut attempt = 1;
                let mut first_failure = None;
                loop {
                    // A chain restored from its snapshot for each try, before its clock starts.
                    if let Some(chain) = &job.chain {
                        chain.fresh(&job.ctx).await;
                    }
                    let began = Instant::now();
                    let (outcome, output) = job.run(&id, &events).await;
                    let outcome = match outcome {
                        Outcome::Passed if strict_kernel => kernel_verdict(&output),
                        outcome => outcome,
                    };
                    let duration_secs = began.elapsed().as_secs_f64();
                    match outcome {
                        Outcome::Failed(failure) if attempt <= retries => {
                            // Reported before a chain is booted again, which takes long.
                            let _ = events.send(TestEvent::TestRetried {
                                test: id.clone(),
                                attempt,
                                failure: failure.clone(),
                                duration_secs,
                                output,
                            });
                            job.keep(&id, &failure, &events).await;
                            job.before_retry(&failure).await;
                            first_failure.get_or_insert(failure);
                            attempt += 1;
                        }
                        outcome => {
                            let _ = events.send(TestEvent::TestFinished {
                                test: id.clone(),
                                index,
                                outcome: outcome.clone(),
                                duration_secs,
                                output,
                                attempts: attempt,
                                first_failure,
                            });
                            if let Outcome::Failed(failure) = &outcome {
                                job.keep(&id, failure, &events).await;
                            }
                            return (outcome, attempt);
                        }
                    }
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok((Outcome::Passed, attempts)) => {
                    summary.passed += 1;
                    if attempts > 1 {
                        summary.flaky += 1;
                    }
                }
                Ok((Outcome::Ignored, _)) => summary.ignored += 1,
                Ok((Outcome::Failed(f), _)) => {
                    summary.failed += 1;
                    if f.kind == FailureKind::Infrastructure {
                        summary.infrastructure += 1;
                    }
                }
                Err(e) => {
                    tracing::error!("a test task died: {e}");
                    summary.failed += 1;
                }
            }
        }
        // The levels' kernel logs, and the files kept of levels below L1, before
        // the chain goes down (and before report.json lists them).
        if let Some(chain) = &self.chain {
            chain.save_files(&self.ctx).await;
        }
        let _ = events.send(TestEvent::RunFinished {
            summary,
            duration_secs: started.elapsed().as_secs_f64(),
        });
        summary
    }
}

/// Sends `TestSlow` for `test` at each multiple of `every` after `began`, until
/// the returned guard is dropped.
fn slow_reports(
    test: &TestId,
    began: Instant,
    every: Duration,
    events: &mpsc::UnboundedSender<TestEvent>,
) -> tokio_util::task::AbortOnDropHandle<()> {
    let test = test.clone();
    let events = events.clone();
    let every = every.max(Duration::from_millis(100));
    tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
        let mut ticks =
            tokio::time::interval_at(tokio::time::Instant::from_std(began) + every, every);
        loop {
            ticks.tick().await;
            let _ = events.send(TestEvent::TestSlow {
                test: test.clone(),
                elapsed_secs: began.elapsed().as_secs_f64(),
            });
        }
    }))
}

/// Everything one test needs, owned, so it can run on any worker.
struct TestJob {
    suite: Arc<LoadedSuite>,
    ctx: Arc<LevelContext>,
    timeout: Duration,
    live_output: bool,
    chain: Option<Arc<Chain>>,
    keep: Option<Arc<dyn keep::Hold>>,
}

/// Runs the test `name` here in a fresh instance, its output going to `sink` as it
/// is written; for the deepest level of a `--levels` chain.
pub async fn run_here(
    suite: Arc<LoadedSuite>,
    ctx: Arc<LevelContext>,
    name: &str,
    timeout: Duration,
    sink: OutputSink,
) -> Outcome {
    let capture = Capture::new(&ctx.level.path, ctx.limits.output_bytes, Some(sink));
    let job = TestJob {
        suite,
        ctx,
        timeout,
        live_output: true,
        chain: None,
        keep: None,
    };
    job.run_in(name, capture).await
}

impl TestJob {
    /// `--keep-failed`: holds the chain after `failure` of `id`.
    async fn keep(
        &self,
        id: &TestId,
        failure: &TestFailure,
        events: &mpsc::UnboundedSender<TestEvent>,
    ) {
        if let (Some(chain), Some(hold)) = (&self.chain, &self.keep) {
            let infrastructure = failure.kind == FailureKind::Infrastructure;
            keep::hold(chain, &self.ctx, hold, id, infrastructure, events).await;
        }
    }

    /// Readies a retry after `failure`: a chain that lost a level is booted again.
    async fn before_retry(&self, failure: &TestFailure) {
        if failure.kind != FailureKind::Infrastructure {
            return;
        }
        if let Some(chain) = &self.chain
            && let Err(e) = chain.renew(&self.ctx).await
        {
            tracing::warn!(
                "booting {} again for a retry failed: {}",
                chain.deepest(),
                e.message
            );
        }
    }

    async fn run(
        &self,
        id: &TestId,
        events: &mpsc::UnboundedSender<TestEvent>,
    ) -> (Outcome, CapturedOutput) {
        let sink: Option<OutputSink> = self.live_output.then(|| {
            let events = events.clone();
            let id = id.clone();
            Arc::new(move |origin: &str, stream, text: &str| {
                let _ = events.send(TestEvent::Output {
                    test: id.clone(),
                    origin: origin.to_string(),
                    stream,
                    text: text.to_string(),
                });
            }) as OutputSink
        });
        let capture = Capture::new(&self.ctx.level.path, self.ctx.limits.output_bytes, sink);
        if let Some(chain) = &self.chain {
            let outcome = chain.run_test(&id.name, self.timeout, &capture).await;
            return (keep_within_budget(outcome, &capture), capture.take());
        }
        let outcome = self.run_in(&id.name, capture.clone()).await;
        (outcome, capture.take())
    }

    /// Runs `name` in a fresh instance whose output goes to `capture`.
    async fn run_in(&self, name: &str, capture: Arc<Capture>) -> Outcome {
        let state = match HostState::new(self.ctx.clone(), capture.clone()) {
            Ok(state) => state,
            Err(e) => {
                let failure = failure(FailureKind::Infrastructure, format!("{e:#}"), None);
                return Outcome::Failed(failure);
            }
        };
        let mut store = new_store(&self.suite.engine, state);
        let result = {
            let pre = &self.suite.pre;
            let store = &mut store;
            let call = async move {
                let suite: Suite = pre.instantiate_async(&mut *store).await?;
                suite.call_run(&mut *store, name).await
            };
            tokio::time::timeout(self.timeout, call).await
        };
        let outcome = classify(result, store.data_mut(), self.timeout);
        keep_within_budget(outcome, &capture)
    }
}

/// A store with the memory limiter and the epoch yield that deadlines rely on.
pub(crate) fn new_store(engine: &wasmtime::Engine, state: HostState) -> Store<HostState> {
    let mut store = Store::new(engine, state);
    store.limiter(|s| &mut s.limiter);
    // Yield to the executor on every epoch tick so the test's deadline (a tokio
    // timeout around the call) can fire even inside a tight guest loop.
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(|_| Ok(UpdateDeadline::Yield(1)));
    store
}
