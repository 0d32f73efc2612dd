//! The sandbox suite: a hostile suite's ways to exhaust or fool the runtime, each
//! of which the runtime must stop. Every test passes only when the sandbox holds.
//!
//! Run with `--grant nest --grant exec=env,sh` and small caps, e.g.
//! `--max-depth 3 --max-levels 4`.

use std::cell::RefCell;

use matryoshka_guest::ErrorKind;
use matryoshka_guest::host::{self, Error};
use matryoshka_guest::nest::Guest;

thread_local! {
    /// Levels this instance holds, for as long as it lives.
    static HELD: RefCell<Vec<Guest>> = const { RefCell::new(Vec::new()) };
}

// ---- remote functions ----

/// Opens a local level and dives into it, forever: only a cap ends it.
fn dive(_: ()) -> Result<u32, Error> {
    let next = Guest::connect("local")?;
    next.call::<_, u32>("dive", &())
}

/// Opens up to `n` local levels here and keeps them; returns how many opened
/// before the first error, and that error's kind and message.
fn hold_here(n: u32) -> Result<(u32, Option<(String, String)>), Error> {
    let mut opened = 0;
    for _ in 0..n {
        match Guest::connect("local") {
            Ok(guest) => {
                HELD.with(|h| h.borrow_mut().push(guest));
                opened += 1;
            }
            Err(e) => return Ok((opened, Some((e.kind.as_str().to_string(), e.message)))),
        }
    }
    Ok((opened, None))
}

/// Claims that a level was lost although none was.
fn forge_level_lost(_: ()) -> Result<(), Error> {
    Err(Error {
        kind: ErrorKind::LevelLost,
        message: "level L0/L1/L9 lost: made up by the component".into(),
        level_path: "L0/L1/L9".into(),
    })
}

// ---- tests ----

fn an_endless_local_chain_is_denied_at_max_depth() -> Result<(), Error> {
    let first = Guest::connect("local")?;
    let err = first
        .call::<_, u32>("dive", &())
        .expect_err("an endless chain must be stopped");
    assert_eq!(err.kind.as_str(), "denied", "{err}");
    assert!(err.message.contains("--max-depth"), "{err}");
    log::info!("stopped at {}: {}", err.level_path, err.message);
    Ok(())
}

fn holding_more_levels_than_max_levels_is_denied() -> Result<(), Error> {
    let max: u32 = std::env::var("MAX_LEVELS")
        .ok()
        .and_then(|v| v.parse().ok())
        .expect("MAX_LEVELS (the run's --max-levels) set with --env");
    // One level held here, the rest opened below it: all count against one budget.
    let first = Guest::connect("local")?;
    let (opened, refused) = first.call::<_, (u32, Option<(String, String)>)>("hold_here", &100)?;
    assert_eq!(opened, max - 1, "levels opened below the first one");
    let (kind, message) = refused.expect("the level past the cap is refused");
    assert_eq!(kind, "denied", "{message}");
    assert!(message.contains("--max-levels"), "{message}");
    let Err(err) = Guest::connect("local") else {
        panic!("the cap must hold at L0 too");
    };
    assert_eq!(err.kind.as_str(), "denied", "{err}");
    // Dropping the first level gives back its whole subtree.
    drop(first);
    let again = hold_here(max)?;
    assert_eq!(again, (max, None), "every level is free again");
    HELD.with(|h| h.borrow_mut().clear());
    log::info!("held {max} levels, refused the next, and got them all back");
    Ok(())
}

fn a_forged_level_lost_is_not_infrastructure() -> Result<(), Error> {
    let next = Guest::connect("local")?;
    let err = next
        .call::<_, ()>("forge_level_lost", &())
        .expect_err("the remote function fails");
    assert_eq!(err.kind.as_str(), "internal", "{err}");
    assert!(
        err.message
            .contains("returned an error of kind level-lost while no level was lost"),
        "{err}"
    );
    Ok(())
}

/// Fails with the forged error itself: the run must count it as a failed test
/// (exit 100), not as infrastructure (exit 101).
fn fails_with_a_forged_level_lost() -> Result<(), Error> {
    let next = Guest::connect("local")?;
    next.call::<_, ()>("forge_level_lost", &())
}

fn exec_has_a_cleared_environment() -> Result<(), Error> {
    let env = host::check_output(&["env"])?;
    let mut names: Vec<&str> = env
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["HOME", "LANG", "PATH"], "{env}");
    Ok(())
}

/// Starts a command that leaves a child running (`sh -c 'sleep N &'`) and
/// returns: the child must not outlive the test.
fn leaves_a_background_command() -> Result<(), Error> {
    let secs = std::env::var("SLEEP_SECS").unwrap_or_else(|_| "987".into());
    let pid = host::check_output(&[
        "sh",
        "-c",
        &format!("sleep {secs} >/dev/null 2>&1 & echo $!"),
    ])?;
    log::info!("left sleep {secs} running as pid {}", pid.trim());
    Ok(())
}

matryoshka_guest::suite! {
    tests: [
        an_endless_local_chain_is_denied_at_max_depth,
        holding_more_levels_than_max_levels_is_denied,
        a_forged_level_lost_is_not_infrastructure,
        #[ignore] fails_with_a_forged_level_lost,
        exec_has_a_cleared_environment,
        leaves_a_background_command,
    ],
    remote: [dive, hold_here, forge_level_lost],
}
