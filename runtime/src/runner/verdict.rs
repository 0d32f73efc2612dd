//! How the end of a test becomes its outcome: what the call returned, the
//! limits it hit, what the guest reported, and (with `--fail-on-kernel-warnings`)
//! what the kernels of its levels printed.

use std::time::Duration;

use crate::event::{FailureKind, Outcome, TestFailure};
use crate::host::{Failure, HostState, MemoryLimitExceeded};
use crate::output::{CapturedOutput, OutputLimitExceeded};

pub(super) type CallResult =
    Result<wasmtime::Result<Result<(), Failure>>, tokio::time::error::Elapsed>;

/// Turns what the call returned into an outcome, with the most specific cause first.
pub(super) fn classify(result: CallResult, state: &mut HostState, timeout: Duration) -> Outcome {
    if let Some(exceeded) = state.capture().exceeded() {
        return Outcome::Failed(failure(
            FailureKind::OutputLimit,
            exceeded.to_string(),
            None,
        ));
    }
    if !matches!(result, Ok(Ok(Ok(()))))
        && let Some(cause) = state.infrastructure_error()
    {
        return Outcome::Failed(failure(
            FailureKind::Infrastructure,
            cause.to_string(),
            None,
        ));
    }
    let trap = match result {
        Err(_) => {
            return Outcome::Failed(failure(
                FailureKind::Timeout,
                format!(
                    "timed out after {:.1} s (raise it with --timeout or #[timeout_ms] on the test)",
                    timeout.as_secs_f64()
                ),
                None,
            ));
        }
        Ok(Ok(Ok(()))) => return Outcome::Passed,
        Ok(Ok(Err(f))) => {
            // SDKs of languages with exceptions report a failed assertion through
            // `report.panicked` and then return the failure: it is a panic all the same.
            let (kind, f) = match state.take_panic() {
                Some(panic) => (FailureKind::Panic, panic),
                None => (FailureKind::Error, f),
            };
            return Outcome::Failed(from_guest(kind, f, state.has_fs_grants()));
        }
        Ok(Err(trap)) => trap,
    };
    if let Some(e) = trap.downcast_ref::<MemoryLimitExceeded>() {
        return Outcome::Failed(failure(FailureKind::MemoryLimit, e.to_string(), None));
    }
    if let Some(e) = trap.downcast_ref::<OutputLimitExceeded>() {
        return Outcome::Failed(failure(FailureKind::OutputLimit, e.to_string(), None));
    }
    if let Some(f) = state.take_panic() {
        return Outcome::Failed(from_guest(FailureKind::Panic, f, state.has_fs_grants()));
    }
    Outcome::Failed(failure(
        FailureKind::Trap,
        format!("the test trapped: {trap:#}"),
        None,
    ))
}

fn from_guest(kind: FailureKind, f: Failure, has_fs_grants: bool) -> TestFailure {
    let location = f.file.map(|file| match (f.line, f.column) {
        (Some(l), Some(c)) => format!("{file}:{l}:{c}"),
        (Some(l), None) => format!("{file}:{l}"),
        _ => file,
    });
    failure(kind, with_hint(f.message, has_fs_grants), location)
}

/// Adds what to do next to guest messages whose cause is a missing grant.
///
/// WASI reports a path outside every preopen as `ENOENT` (errno 44) or
/// `ENOTCAPABLE` (errno 76) inside the guest, before the host sees the call.
fn with_hint(message: String, has_fs_grants: bool) -> String {
    let no_preopen = message.contains("os error 76")
        || message.contains("Capabilities insufficient")
        || (!has_fs_grants && message.contains("os error 44"));
    if no_preopen {
        return format!(
            "{message}\nhint: the component has no preopened directory for that path; \
             grant one with --grant fs=PATH"
        );
    }
    message
}

pub(crate) fn failure(kind: FailureKind, message: String, location: Option<String>) -> TestFailure {
    TestFailure {
        kind,
        message,
        location,
    }
}

/// A passed test's outcome under `--fail-on-kernel-warnings`: failed when its
/// output holds a kernel line a level's console watcher reported
/// (`level/vm/kernel.rs`). A suite that logs such a line itself fails only itself.
pub(super) fn kernel_verdict(output: &CapturedOutput) -> Outcome {
    let seen: Vec<String> = output
        .logs
        .iter()
        .filter(|l| l.level == crate::output::LogLevel::Warn && l.message.starts_with("kernel: "))
        .map(|l| format!("{}: {}", l.level_path, l.message))
        .collect();
    match seen.first() {
        None => Outcome::Passed,
        Some(first) => Outcome::Failed(failure(
            FailureKind::KernelWarning,
            format!(
                "the test passed, but a kernel showed signs of trouble while it ran ({} line{}; \
                 --fail-on-kernel-warnings): {first}",
                seen.len(),
                if seen.len() == 1 { "" } else { "s" }
            ),
            None,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::{LogLevel, LogLine};

    fn log(level: LogLevel, message: &str) -> LogLine {
        LogLine {
            level_path: "L0/L1".into(),
            level,
            message: message.into(),
            at_secs: 0.0,
        }
    }

    #[test]
    fn only_a_kernel_warning_fails_a_passed_test() {
        let mut output = CapturedOutput::default();
        output
            .logs
            .push(log(LogLevel::Info, "kernel: an info line is not one"));
        output
            .logs
            .push(log(LogLevel::Warn, "a warning of the test's own"));
        assert_eq!(kernel_verdict(&output), Outcome::Passed);
        output
            .logs
            .push(log(LogLevel::Warn, "kernel: [ 5.6] Call Trace:"));
        let Outcome::Failed(f) = kernel_verdict(&output) else {
            panic!("passed with a kernel warning");
        };
        assert_eq!(f.kind, FailureKind::KernelWarning);
        assert!(
            f.message.ends_with(
                "(1 line; --fail-on-kernel-warnings): L0/L1: kernel: [ 5.6] Call Trace:"
            ),
            "{}",
            f.message
        );
    }
}
