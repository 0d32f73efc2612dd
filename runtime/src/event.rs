//! The one stream of events a run produces; every reporter reads only this.

use serde::{Deserialize, Serialize};

use crate::output::{CapturedOutput, Stream};

/// Why a test failed, as a category.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// The guest panicked or asserted (it reported where).
    Panic,
    /// The test returned an error.
    Error,
    /// The guest trapped without saying why.
    Trap,
    /// The test ran past its deadline.
    Timeout,
    /// A memory grew past the limit.
    MemoryLimit,
    /// The test wrote more output than allowed.
    OutputLimit,
    /// The runtime could not run the test (instantiation failed, a level was lost).
    Infrastructure,
    /// The test passed, but a level's kernel showed signs of trouble while it ran
    /// (`--fail-on-kernel-warnings`).
    KernelWarning,
}

impl FailureKind {
    /// The kebab-case name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Panic => "panic",
            FailureKind::Error => "error",
            FailureKind::Trap => "trap",
            FailureKind::Timeout => "timeout",
            FailureKind::MemoryLimit => "memory-limit",
            FailureKind::OutputLimit => "output-limit",
            FailureKind::Infrastructure => "infrastructure",
            FailureKind::KernelWarning => "kernel-warning",
        }
    }
}

/// A failed test, explained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestFailure {
    /// The category.
    pub kind: FailureKind,
    /// The message, e.g. an assertion with both values.
    pub message: String,
    /// `file:line:column` of the failing assertion, when known.
    pub location: Option<String>,
}

/// How a test ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum Outcome {
    /// It passed.
    Passed,
    /// It failed.
    Failed(TestFailure),
    /// It was not run because it is marked ignored.
    Ignored,
}

/// One test as the plan names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TestId {
    /// The suite, i.e. the component's file stem.
    pub suite: String,
    /// The test's name inside the suite.
    pub name: String,
    /// Where it runs, e.g. `L0`.
    pub level_path: String,
}

impl TestId {
    /// `suite::name`.
    pub fn full_name(&self) -> String {
        format!("{}::{}", self.suite, self.name)
    }
}

/// Counts at the end of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Tests that passed.
    pub passed: usize,
    /// Tests that failed.
    pub failed: usize,
    /// Of the failed tests, those whose cause was the infrastructure (a level
    /// that did not boot or was lost), not the test.
    pub infrastructure: usize,
    /// Tests not run because they are ignored.
    pub ignored: usize,
    /// Tests not in the plan because of filters.
    pub filtered_out: usize,
    /// Of the passed tests, those that failed first and passed on a retry.
    pub flaky: usize,
}

/// A level kept up by `--keep-failed`, and how a person reaches it.
#[derive(Debug, Clone, Serialize)]
pub struct KeptLevel {
    /// Its level path.
    pub path: String,
    /// A command that opens a shell there from the machine the run started on.
    pub shell: String,
    /// A command that opens its QEMU's human monitor, when it has one.
    pub monitor: Option<String>,
    /// Something a person should know first.
    pub note: Option<String>,
}

/// Something that happened during a run.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum TestEvent {
    /// `--levels`/`--target`: the chain's levels are being booted (or reached).
    ChainBooting {
        /// How many.
        levels: u32,
    },
    /// The chain is up: its deepest level serves.
    ChainUp {
        /// The deepest level's path, where every test runs.
        deepest: String,
    },
    /// The plan is known.
    RunStarted {
        /// Suite name.
        suite: String,
        /// Path of the component.
        component: String,
        /// Hex sha256 of the component.
        sha256: String,
        /// Level path of the runtime that leads the run.
        level_path: String,
        /// Host name of the machine that leads the run.
        hostname: String,
        /// Tests in the plan, ignored ones included.
        planned: usize,
        /// Tests left out by filters.
        filtered_out: usize,
        /// Tests run at once.
        jobs: usize,
        /// Times a failed test is run again (`--retries`).
        retries: u32,
    },
    /// A test began.
    TestStarted {
        /// Which test.
        test: TestId,
    },
    /// A test has run longer than the slow threshold (`--slow-timeout`); sent
    /// again at each multiple of it while the test runs.
    TestSlow {
        /// Which test.
        test: TestId,
        /// How long it has run, in seconds.
        elapsed_secs: f64,
    },
    /// A test wrote output (sent as it happens).
    Output {
        /// Which test.
        test: TestId,
        /// The level that wrote it, e.g. `L0/L1/L2`.
        origin: String,
        /// Which stream.
        stream: Stream,
        /// The text.
        text: String,
    },
    /// A test failed and runs again (`--retries`); `TestFinished` follows the last try.
    TestRetried {
        /// Which test.
        test: TestId,
        /// The try that failed, from 1.
        attempt: u32,
        /// How it failed.
        failure: TestFailure,
        /// Wall time of that try, in seconds.
        duration_secs: f64,
        /// Everything that try wrote (left out of JSON lines, which had it live).
        #[serde(skip_serializing_if = "CapturedOutput::is_empty")]
        output: CapturedOutput,
    },
    /// A test ended.
    TestFinished {
        /// Which test.
        test: TestId,
        /// Its place in the plan, from 0: tests end in any order, reports that
        /// number them (TAP) or list them (JUnit) use this one.
        index: usize,
        /// How it ended.
        outcome: Outcome,
        /// Wall time of the last try, in seconds.
        duration_secs: f64,
        /// Everything the last try wrote (left out of JSON lines, which had it live).
        #[serde(skip_serializing_if = "CapturedOutput::is_empty")]
        output: CapturedOutput,
        /// Tries, from 1: a test that passed on a try after the first is flaky.
        attempts: u32,
        /// How the first try failed, when there was more than one (every try is
        /// in its `TestRetried` event; JSON lines carry those).
        #[serde(skip)]
        first_failure: Option<TestFailure>,
    },
    /// Every test ended.
    RunFinished {
        /// Counts.
        summary: Summary,
        /// Wall time of the whole run, in seconds.
        duration_secs: f64,
    },
    /// `--keep-failed`: the chain's levels stay up after `test` failed, for a
    /// person to look into, until the hold ends.
    LevelsKept {
        /// The test that failed.
        test: TestId,
        /// Each level of the chain, L1 first, with the commands that reach it.
        levels: Vec<KeptLevel>,
        /// The OpenSSH client configuration the commands use.
        ssh_config: String,
        /// How the hold ends, e.g. `press Enter, or wait 60 s`.
        until: String,
    },
    /// The run ended before its tests did, or before it could start: the suite
    /// could not be loaded, the chain did not boot, or a signal stopped it.
    /// Reports end with what they have and say why. Ends the stream instead of
    /// `RunFinished`.
    RunAborted {
        /// The suite, i.e. the component's file stem.
        suite: String,
        /// Why, e.g. `interrupted by SIGTERM`.
        reason: String,
        /// Tests that had finished.
        finished: usize,
        /// Wall time until then, in seconds.
        duration_secs: f64,
    },
}
