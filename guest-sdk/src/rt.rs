//! Support code behind [`suite!`](crate::suite): test cases, outcomes and the
//! panic hook that turns a Rust panic into a structured failure.
//!
//! Public only so the macro can reach it; not a stable API.

use std::fmt::Debug;
use std::panic::PanicHookInfo;
use std::sync::Once;

use crate::bindings::matryoshka::test::report;
use crate::host::Error;

/// The WIT error record, as the `call` export returns it.
pub use crate::bindings::matryoshka::test::types::Error as WitError;
use crate::{ErrorKind, Failure, TestCase};

/// One registered test.
pub struct Case {
    /// The function's name, or the one `#[name("...")]` gave.
    pub name: &'static str,
    /// Runs the test body.
    pub body: fn() -> Result<(), String>,
    /// Set by `#[ignore]`.
    pub ignored: bool,
    /// Set by `#[timeout_ms(N)]`.
    pub timeout_ms: Option<u64>,
    /// Set by `#[tag(...)]`.
    pub tags: Vec<&'static str>,
}

impl Case {
    /// A case with default metadata.
    pub fn new(name: &'static str, body: fn() -> Result<(), String>) -> Self {
        Self {
            name,
            body,
            ignored: false,
            timeout_ms: None,
            tags: Vec::new(),
        }
    }
}

/// What a test function may return.
pub trait IntoOutcome {
    /// `Ok` when the test passed, else the failure message.
    fn into_outcome(self) -> Result<(), String>;
}

impl IntoOutcome for () {
    fn into_outcome(self) -> Result<(), String> {
        Ok(())
    }
}

impl<E: Debug> IntoOutcome for Result<(), E> {
    fn into_outcome(self) -> Result<(), String> {
        self.map_err(|e| format!("Error: {e:?}"))
    }
}

/// The `tests` export.
pub fn list(cases: &[Case]) -> Vec<TestCase> {
    cases
        .iter()
        .map(|c| TestCase {
            name: c.name.to_string(),
            ignored: c.ignored,
            timeout_ms: c.timeout_ms,
            tags: c.tags.iter().map(|t| t.to_string()).collect(),
        })
        .collect()
}

/// The `run` export: runs the named case with the panic hook and logger set.
pub fn run(cases: &[Case], name: &str) -> Result<(), Failure> {
    install_hooks();
    let Some(case) = cases.iter().find(|c| c.name == name) else {
        return Err(Failure {
            message: format!("no test named `{name}` in this suite"),
            file: None,
            line: None,
            column: None,
        });
    };
    (case.body)().map_err(|message| Failure {
        message,
        file: None,
        line: None,
        column: None,
    })
}

/// Decodes the arguments, runs a remote function and encodes its result.
pub fn dispatch<A, R>(
    f: fn(A) -> Result<R, Error>,
    function: &str,
    args: &[u8],
) -> Result<Vec<u8>, WitError>
where
    A: serde::de::DeserializeOwned,
    R: serde::Serialize,
{
    let bad = |message: String| WitError {
        kind: ErrorKind::InvalidArgument,
        message,
        level_path: crate::host::level_path(),
    };
    let args: A = postcard::from_bytes(args)
        .map_err(|e| bad(format!("arguments of `{function}` do not decode: {e}")))?;
    let value = f(args).map_err(WitError::from)?;
    postcard::to_allocvec(&value)
        .map_err(|e| bad(format!("result of `{function}` does not encode: {e}")))
}

/// The error the `call` export returns for a function that is not registered.
pub fn no_remote_function(function: &str) -> Error {
    Error {
        kind: ErrorKind::NotFound,
        message: format!("this suite registers no remote function named `{function}`"),
        level_path: crate::host::level_path(),
    }
}

/// Sets the panic hook and the logger once per instance.
pub fn install_hooks() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(report_panic));
        crate::logger::install();
    });
}

fn report_panic(info: &PanicHookInfo<'_>) {
    let payload = info.payload();
    let message = if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "test panicked with a non-string payload".to_string()
    };
    let location = info.location();
    report::panicked(&Failure {
        message,
        file: location.map(|l| l.file().to_string()),
        line: location.map(|l| l.line()),
        column: location.map(|l| l.column()),
    });
}
