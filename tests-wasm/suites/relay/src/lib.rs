//! The relay suite: the same component at every level of a chain.
//!
//! The chain is named by `MATRYOSHKA_CHAIN` (set with `--env`): a comma-separated
//! list of targets, `local`, `ssh://user@host:port` or `vm` (a VM level booted
//! from the image, with `--grant nest`); the level at depth N
//! reaches the next one through entry N (under `--levels N` the suite starts at
//! LN, and the first N entries go unused). Without it the tests that reach other
//! levels fail: a chain of none would prove nothing.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use matryoshka_guest::host::{self, Error};
use matryoshka_guest::nest::{Guest, Vm};
use serde::{Deserialize, Serialize};

/// What one level says about itself.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Hop {
    level: u32,
    path: String,
    hostname: String,
    arch: String,
}

/// The targets of `MATRYOSHKA_CHAIN`; panics when there are none.
fn chain() -> Vec<String> {
    let chain: Vec<String> = std::env::var("MATRYOSHKA_CHAIN")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    assert!(
        !chain.is_empty(),
        "MATRYOSHKA_CHAIN is not set at {}: run the relay suite with \
         --env MATRYOSHKA_CHAIN=TARGET[,TARGET...] (`local` or `ssh://user@host:port`)",
        host::level_path()
    );
    chain
}

/// Reaches `target` of the chain: boots a VM level for `vm`, else connects.
fn reach(target: &str) -> Result<Guest, Error> {
    if target == "vm" {
        Guest::boot(&Vm::new())
    } else {
        Guest::connect(target)
    }
}

/// The first level of the chain, reached from L0.
fn first() -> Result<Guest, Error> {
    reach(&chain()[0])
}

/// The next level below this one, if the chain goes further.
fn next() -> Result<Option<Guest>, Error> {
    match chain().get(host::level() as usize) {
        Some(target) => reach(target).map(Some),
        None => Ok(None),
    }
}

fn here() -> Hop {
    Hop {
        level: host::level(),
        path: host::level_path(),
        hostname: host::hostname(),
        arch: host::arch(),
    }
}

// ---- remote functions: called at another level ----

fn descend(_: ()) -> Result<Vec<Hop>, Error> {
    let mut hops = vec![here()];
    if let Some(next) = next()? {
        hops.extend(next.call::<_, Vec<Hop>>("descend", &())?);
    }
    Ok(hops)
}

fn sum_of_squares_at_bottom(n: u64) -> Result<(String, u64), Error> {
    match next()? {
        Some(next) => next.call("sum_of_squares_at_bottom", &n),
        None => Ok((host::level_path(), (1..=n).map(|i| i * i).sum())),
    }
}

fn log_at_bottom(message: String) -> Result<String, Error> {
    match next()? {
        Some(next) => next.call("log_at_bottom", &message),
        None => {
            log::info!("{message} (logged at {})", host::level_path());
            println!("{message} (printed at {})", host::level_path());
            Ok(host::level_path())
        }
    }
}

/// Prints `bytes` bytes (a line of `x`) at the bottom of the chain.
fn print_at_bottom(bytes: usize) -> Result<String, Error> {
    match next()? {
        Some(next) => next.call("print_at_bottom", &bytes),
        None => {
            println!("{}", "x".repeat(bytes.saturating_sub(1)));
            Ok(host::level_path())
        }
    }
}

/// Runs `argv` at the bottom of the chain and returns its exit status.
fn exec_at_bottom(argv: Vec<String>) -> Result<Option<i32>, Error> {
    match next()? {
        Some(next) => next.call("exec_at_bottom", &argv),
        None => Ok(host::exec(&argv)?.status),
    }
}

/// Sleeps `ms` milliseconds here.
fn sleep_ms(ms: u64) -> Result<(), Error> {
    std::thread::sleep(Duration::from_millis(ms));
    Ok(())
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn count(_: ()) -> Result<u32, Error> {
    Ok(COUNTER.fetch_add(1, Ordering::SeqCst) + 1)
}

/// Sleeps at the bottom of the chain, after saying so.
fn hold_at_bottom(ms: u64) -> Result<String, Error> {
    match next()? {
        Some(next) => next.call("hold_at_bottom", &ms),
        None => {
            let pid = host::check_output(&["sh", "-c", "echo $PPID"])?;
            log::info!(
                "holding at {} in runtime pid {}",
                host::level_path(),
                pid.trim()
            );
            if std::env::var_os("HOLD_WITH_EXEC").is_some() {
                // Hold in a command started by the runtime, which must not outlive its level.
                host::exec(&["sh", "-c", &format!("sleep {}", ms.div_ceil(1000))])?;
            } else {
                std::thread::sleep(Duration::from_millis(ms));
            }
            Ok(host::level_path())
        }
    }
}

thread_local! {
    /// The next level, kept for the life of this instance (the remote proxy at work).
    static KEPT: std::cell::RefCell<Option<Guest>> = const { std::cell::RefCell::new(None) };
}

/// Calls `function` on the next level through a handle kept across calls.
fn via_kept<A: Serialize, R: serde::de::DeserializeOwned>(
    function: &str,
    args: &A,
) -> Result<Option<R>, Error> {
    KEPT.with(|kept| {
        let mut kept = kept.borrow_mut();
        if kept.is_none() {
            *kept = next()?;
        }
        match kept.as_ref() {
            Some(guest) => guest.call(function, args).map(Some),
            None => Ok(None),
        }
    })
}

/// Does nothing at the bottom of the chain; intermediate levels keep their handle.
fn noop_at_bottom(_: ()) -> Result<u32, Error> {
    Ok(via_kept::<_, u32>("noop_at_bottom", &())?.unwrap_or_else(host::level))
}

/// Times reaching the next level from every level: (level path reached, ms).
fn connect_times(_: ()) -> Result<Vec<(String, f64)>, Error> {
    let Some(target) = chain().get(host::level() as usize).cloned() else {
        return Ok(Vec::new());
    };
    let started = std::time::Instant::now();
    let next = reach(&target)?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let mut times = vec![(next.level_path(), ms)];
    times.extend(next.call::<_, Vec<(String, f64)>>("connect_times", &())?);
    Ok(times)
}

// ---- tests: run at level 0, or at LN under `--levels N` ----

/// The depth of the deepest level.
fn depth() -> usize {
    chain().len()
}

fn reaches_every_level() -> Result<(), Error> {
    let start = host::level() as usize;
    let hops = descend(())?;
    assert_eq!(hops.len(), depth() + 1 - start, "{hops:?}");
    for (i, hop) in hops.iter().enumerate() {
        assert_eq!(hop.level as usize, start + i);
        let expected: Vec<String> = (0..=start + i).map(|l| format!("L{l}")).collect();
        assert_eq!(hop.path, expected.join("/"));
        assert!(!hop.hostname.is_empty());
        assert_eq!(hop.arch, host::arch());
        log::info!("reached {} on {} ({})", hop.path, hop.hostname, hop.arch);
    }
    Ok(())
}

fn computes_at_the_deepest_level() -> Result<(), Error> {
    let (path, sum) = sum_of_squares_at_bottom(1000)?;
    assert_eq!(sum, 333_833_500);
    assert_eq!(path.split('/').count(), depth() + 1, "{path}");
    Ok(())
}

fn streams_a_log_line_from_the_deepest_level() -> Result<(), Error> {
    let path = log_at_bottom("hello from the bottom".to_string())?;
    assert_eq!(path.split('/').count(), depth() + 1, "{path}");
    Ok(())
}

fn remote_instance_keeps_state() -> Result<(), Error> {
    let first = first()?;
    assert_eq!(first.call::<_, u32>("count", &())?, 1);
    assert_eq!(first.call::<_, u32>("count", &())?, 2);
    let second = self::first()?;
    assert_eq!(
        second.call::<_, u32>("count", &())?,
        1,
        "a new handle gets a new instance"
    );
    assert_eq!(first.call::<_, u32>("count", &())?, 3);
    Ok(())
}

fn unknown_remote_function_is_not_found() -> Result<(), Error> {
    let first = first()?;
    let err = first
        .call::<_, u32>("no_such_function", &())
        .expect_err("must fail");
    assert_eq!(err.kind.as_str(), "not-found", "{err}");
    assert_eq!(err.level_path, first.level_path(), "{err}");
    Ok(())
}

fn a_call_timeout_restarts_the_remote_instance() -> Result<(), Error> {
    let first = first()?;
    assert_eq!(first.call::<_, u32>("count", &())?, 1);
    assert_eq!(first.call::<_, u32>("count", &())?, 2);
    let started = Instant::now();
    let err = first
        .call_with_timeout::<_, ()>("sleep_ms", &20_000u64, Duration::from_millis(300))
        .expect_err("a 20 s sleep returned within a 300 ms timeout");
    let took = started.elapsed();
    assert_eq!(err.kind.as_str(), "timeout", "{err}");
    assert_eq!(err.level_path, first.level_path(), "{err}");
    assert!(
        took < Duration::from_secs(5),
        "the timeout came after {took:?}"
    );
    // The same handle answers again, from a new instance: the count starts over.
    assert_eq!(
        first.call::<_, u32>("count", &())?,
        1,
        "the instance that timed out kept its state"
    );
    Ok(())
}

fn the_deepest_level_denies_what_l0_did_not_grant() -> Result<(), Error> {
    // The grant of L0 (`sh`) holds at the bottom...
    let status = exec_at_bottom(vec!["sh".into(), "-c".into(), "exit 7".into()])?;
    assert_eq!(status, Some(7));
    // ...and nothing more does.
    let err = exec_at_bottom(vec!["cat".into(), "/dev/null".into()])
        .expect_err("`cat` ran below L0 without a grant");
    assert_eq!(err.kind.as_str(), "denied", "{err}");
    assert_eq!(err.level_path.split('/').count(), depth() + 1, "{err}");
    assert!(
        err.message.contains(&format!(
            "exec of `cat` is not granted at {}",
            err.level_path
        )),
        "{err}"
    );
    Ok(())
}

/// Prints `PRINT_BYTES` (default 1000) at the bottom of the chain in each of
/// `PRINT_CALLS` (default 4) calls; the output counts against the budget of the
/// test at L0, whatever each call spent at its own level.
fn output_below_counts_at_l0() -> Result<(), Error> {
    let var = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let (bytes, calls) = (var("PRINT_BYTES", 1000), var("PRINT_CALLS", 4));
    for _ in 0..calls {
        print_at_bottom(bytes)?;
    }
    Ok(())
}

fn hold_at_the_bottom() -> Result<(), Error> {
    let ms = std::env::var("HOLD_MS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30_000);
    hold_at_bottom(ms).map(|_| ())
}

/// Kills the runtime it runs in with SIGKILL (run it at a VM level with
/// `--levels N`): the level must end and its parent report it lost. Fails if the
/// runtime lives on.
fn kill_own_runtime() -> Result<(), Error> {
    log::info!("killing the runtime of {}", host::level_path());
    host::exec(&["sh", "-c", "kill -KILL $PPID"])?;
    std::thread::sleep(Duration::from_secs(30));
    panic!("the runtime of {} outlived SIGKILL", host::level_path());
}

/// Benchmark: round trips of a no-op call to the bottom of the chain.
fn bench_round_trips() -> Result<(), Error> {
    let calls: usize = std::env::var("BENCH_CALLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let bottom = noop_at_bottom(())?; // connects every level once
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = std::time::Instant::now();
        noop_at_bottom(())?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let mean = samples.iter().sum::<f64>() / calls as f64;
    log::info!(
        "BENCH round-trip depth={bottom} calls={calls} median_us={:.1} mean_us={mean:.1} p90_us={:.1}",
        samples[calls / 2],
        samples[calls * 9 / 10]
    );
    Ok(())
}

/// Benchmark: time to reach each level (copy and start when not cached).
fn bench_first_contact() -> Result<(), Error> {
    for (path, ms) in connect_times(())? {
        log::info!("BENCH first-contact level={path} ms={ms:.1}");
    }
    Ok(())
}

matryoshka_guest::suite! {
    tests: [
        reaches_every_level,
        computes_at_the_deepest_level,
        streams_a_log_line_from_the_deepest_level,
        remote_instance_keeps_state,
        unknown_remote_function_is_not_found,
        a_call_timeout_restarts_the_remote_instance,
        the_deepest_level_denies_what_l0_did_not_grant,
        #[ignore] output_below_counts_at_l0,
        #[ignore] hold_at_the_bottom,
        #[ignore] kill_own_runtime,
        #[ignore] #[tag("bench")] bench_round_trips,
        #[ignore] #[tag("bench")] bench_first_contact,
    ],
    remote: [
        descend,
        sum_of_squares_at_bottom,
        log_at_bottom,
        count,
        print_at_bottom,
        exec_at_bottom,
        sleep_ms,
        hold_at_bottom,
        noop_at_bottom,
        connect_times,
    ],
}
