//! A level loaded bare (the way a chain is booted to be saved) serves no
//! component until an `Attach` brings it, with the rights the component runs
//! with: over a real child runtime (`matryoshka serve --stdio`), no VM.

#[allow(dead_code, reason = "shared by several test crates, each using a part")]
mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use matryoshka::config::{Grants, NestLimits, VmSettings};
use matryoshka::engine::{CacheDir, ComponentSource};
use matryoshka::event::{FailureKind, Outcome};
use matryoshka::host::LevelContext;
use matryoshka::level::vm::{RunDir, VmContext};
use matryoshka::level::{LevelInfo, Target};
use matryoshka::output::Capture;
use matryoshka::runner::Chain;

fn context(grants: Grants, component: Option<Arc<ComponentSource>>) -> LevelContext {
    LevelContext {
        level: LevelInfo::top(),
        grants,
        limits: Default::default(),
        nest: NestLimits::default(),
        env: Vec::new(),
        ssh: None,
        component,
        vms: Arc::new(VmContext::new(
            VmSettings::default(),
            None,
            RunDir::Temporary(OnceLock::new()),
            None,
        )),
        parent_budget: None,
    }
}

async fn run(chain: &Chain, name: &str) -> Outcome {
    let capture = Capture::new("L0", 1 << 20, None);
    chain
        .run_test(name, Duration::from_secs(60), &capture)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_level_runs_nothing_until_the_component_is_attached_with_its_rights() {
    // SAFETY: set before any thread of this test reads the environment; the
    // only test of this file.
    unsafe {
        std::env::set_var(
            "MATRYOSHKA_LOCAL_SERVE",
            format!("{} serve --stdio", env!("CARGO_BIN_EXE_matryoshka")),
        );
        std::env::set_var("MATRYOSHKA_CACHE_DIR", common::cache_dir());
    }
    let cache = CacheDir::At(common::cache_dir());
    let path = std::path::Path::new(matryoshka_test_programs::BASICS);
    let loaded = matryoshka::suite::load(path, &cache).expect("the basics suite loads");
    let grants = Grants {
        exec: BTreeSet::from(["uname".to_string()]),
        ..Grants::default()
    };
    let ctx = context(grants, Some(loaded.component.clone()));

    let chain = Chain::boot(&ctx, Some(Target::Local), 1, None, true)
        .await
        .expect("a bare local level starts");
    // Nothing to run yet: the level says why.
    match run(&chain, "hostname_is_set").await {
        Outcome::Failed(f) => {
            assert_eq!(f.kind, FailureKind::Infrastructure, "{f:?}");
            assert!(
                f.message.contains("no component is loaded at L0/L1"),
                "{}",
                f.message
            );
        }
        other => panic!("a bare level ran a test: {other:?}"),
    }

    // Bytes that are not what their hash says are refused, and the level
    // takes a good attach after that.
    let forged = context(
        Grants::default(),
        Some(Arc::new(ComponentSource {
            sha256: "0".repeat(64),
            bytes: loaded.component.bytes.clone(),
            precompiled: None,
            cache: cache.clone(),
        })),
    );
    let refused = chain.attach(&forged).await.expect_err("a forged component");
    assert!(refused.message.contains("hash to"), "{}", refused.message);

    chain.attach(&ctx).await.expect("the component is attached");
    // The exec grant came with the attach (the bare level had none).
    assert_eq!(
        run(&chain, "exec_uname_matches_arch").await,
        Outcome::Passed
    );
    assert_eq!(run(&chain, "hostname_is_set").await, Outcome::Passed);

    let again = chain.attach(&ctx).await.expect_err("a second attach");
    assert!(
        again.message.contains("already has a component"),
        "{}",
        again.message
    );
}
