//! The relay suite: the same component at every level of a chain.
//!
//! The chain is named by `MATRYOSHKA_CHAIN` (set with `--env`): a comma-separated
//! list of targets, `local` or `ssh://user@host:port`; the level at depth N
//! reaches the next one through entry N.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use matryoshka_guest::host::{self, Error};
use matryoshka_guest::nest::Guest;
use serde::{Deserialize, Serialize};

/// What one level says about itself.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Hop {
    level: u32,
    path: String,
    hostname: String,
    arch: String,
}

fn chain() -> Vec<String> {
    std::env::var("MATRYOSHKA_CHAIN")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// The next level below this one, if the chain goes further.
fn next() -> Result<Option<Guest>, Error> {
    match chain().get(host::level() as usize) {
        Some(target) => Guest::connect(target).map(Some),
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
            std::thread::sleep(Duration::from_millis(ms));
            Ok(host::level_path())
        }
    }
}

// ---- tests: run at level 0 ----

fn depth() -> usize {
    chain().len()
}

fn reaches_every_level() -> Result<(), Error> {
    let hops = descend(())?;
    assert_eq!(hops.len(), depth() + 1, "{hops:?}");
    for (i, hop) in hops.iter().enumerate() {
        assert_eq!(hop.level as usize, i);
        let expected: Vec<String> = (0..=i).map(|l| format!("L{l}")).collect();
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
    let Some(first) = next()? else {
        return Ok(());
    };
    assert_eq!(first.call::<_, u32>("count", &())?, 1);
    assert_eq!(first.call::<_, u32>("count", &())?, 2);
    let second = next()?.expect("same chain");
    assert_eq!(
        second.call::<_, u32>("count", &())?,
        1,
        "a new handle gets a new instance"
    );
    assert_eq!(first.call::<_, u32>("count", &())?, 3);
    Ok(())
}

fn unknown_remote_function_is_not_found() -> Result<(), Error> {
    let Some(first) = next()? else {
        return Ok(());
    };
    let err = first
        .call::<_, u32>("no_such_function", &())
        .expect_err("must fail");
    assert_eq!(err.kind.as_str(), "not-found", "{err}");
    Ok(())
}

fn hold_at_the_bottom() -> Result<(), Error> {
    let ms = std::env::var("HOLD_MS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30_000);
    hold_at_bottom(ms).map(|_| ())
}

matryoshka_guest::suite! {
    tests: [
        reaches_every_level,
        computes_at_the_deepest_level,
        streams_a_log_line_from_the_deepest_level,
        remote_instance_keeps_state,
        unknown_remote_function_is_not_found,
        #[ignore] hold_at_the_bottom,
    ],
    remote: [descend, sum_of_squares_at_bottom, log_at_bottom, count, hold_at_bottom],
}
