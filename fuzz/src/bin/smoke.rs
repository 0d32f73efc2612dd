//! The stable-toolchain fuzz run: seeded random inputs through the same targets
//! and input format as the libFuzzer binaries, for CI's short budget.
//!
//! `cargo run --release -p matryoshka-fuzz --bin smoke -- --inputs 20000`
//!
//! A failing input is written to `fuzz/artifacts/<target>/` and replays with
//! `--replay FILE` here or `cargo fuzz run <target> FILE` under libFuzzer.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use matryoshka_fuzz::targets::{self, Reach};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Which {
    Frames,
    Child,
    Parent,
}

impl Which {
    fn name(self) -> &'static str {
        match self {
            Which::Frames => "frames",
            Which::Child => "child",
            Which::Parent => "parent",
        }
    }

    fn run(self, data: &[u8]) -> Reach {
        match self {
            Which::Frames => targets::frames(data),
            Which::Child => targets::child(data),
            Which::Parent => targets::parent(data),
        }
    }
}

/// Seeded fuzzing of the relay protocol's decoder and handshakes.
#[derive(Debug, Parser)]
struct Args {
    /// Targets to run (default: all three).
    #[arg(long = "target", value_enum)]
    targets: Vec<Which>,
    /// Inputs for `frames` and `child`.
    #[arg(long, default_value_t = 20_000)]
    inputs: u64,
    /// Inputs for `parent` (each starts a process).
    #[arg(long, default_value_t = 1_000)]
    parent_inputs: u64,
    /// Seed of the first input (default: from the clock; printed either way).
    #[arg(long)]
    seed: Option<u64>,
    /// Longest a target's inputs may take together, seconds: a target that gets
    /// this slow (a wait per input, say) fails the run instead of eating CI's time.
    #[arg(long, default_value_t = 300)]
    max_seconds: u64,
    /// Largest input, bytes.
    #[arg(long, default_value_t = 2048)]
    max_len: usize,
    /// Where failing inputs are written.
    #[arg(long, default_value = "fuzz/artifacts")]
    artifacts: PathBuf,
    /// Run these input files instead (each under every chosen target).
    #[arg(long, num_args = 1..)]
    replay: Vec<PathBuf>,
    /// Write this many generated streams per target as raw-mode inputs into
    /// `DIR/<target>/` (a seed corpus for `cargo fuzz`), and run nothing.
    #[arg(long, value_name = "DIR")]
    write_corpus: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let which = if args.targets.is_empty() {
        vec![Which::Frames, Which::Child, Which::Parent]
    } else {
        args.targets.clone()
    };
    // Before any thread starts: it sets this process's environment.
    if which.contains(&Which::Parent)
        && let Err(e) = targets::prepare_parent()
    {
        eprintln!("smoke: cannot prepare the parent target: {e}");
        return ExitCode::FAILURE;
    }
    let code = run(&args, &which);
    targets::cleanup_parent();
    code
}

fn run(args: &Args, which: &[Which]) -> ExitCode {
    if let Some(dir) = &args.write_corpus {
        return match write_corpus(dir, which, args.inputs, args.seed.unwrap_or(0)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("smoke: cannot write the corpus into {}: {e}", dir.display());
                ExitCode::FAILURE
            }
        };
    }
    if !args.replay.is_empty() {
        for file in &args.replay {
            let data = match std::fs::read(file) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("smoke: cannot read {}: {e}", file.display());
                    return ExitCode::FAILURE;
                }
            };
            for &w in which {
                let reach = w.run(&data);
                println!("{reach:?}");
                println!("{}: {} passes", w.name(), file.display());
            }
        }
        return ExitCode::SUCCESS;
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    for &w in which {
        let count = if w == Which::Parent {
            args.parent_inputs
        } else {
            args.inputs
        };
        let mut rng = fastrand::Rng::with_seed(seed);
        let started = Instant::now();
        let mut tally = Tally::default();
        for i in 0..count {
            let mut data = vec![0; rng.usize(1..=args.max_len.max(1))];
            rng.fill(&mut data);
            // Random bytes make sense to the generators, rarely to the decoder itself:
            // seven inputs in eight take the structured mode.
            if rng.u8(0..8) != 0 {
                data[0] |= 1;
            }
            match catch_unwind(AssertUnwindSafe(|| w.run(&data))) {
                Ok(reach) => tally.add(reach),
                Err(_) => {
                    report(&args.artifacts, w, seed, i, &data);
                    return ExitCode::FAILURE;
                }
            }
            let spent = started.elapsed().as_secs_f64();
            if spent > args.max_seconds as f64 {
                eprintln!(
                    "smoke {}: {} of {count} inputs took {spent:.0} s, over --max-seconds {} \
                     ({:.1} inputs/s, seed {seed}): the target got slow",
                    w.name(),
                    i + 1,
                    args.max_seconds,
                    (i + 1) as f64 / spent,
                );
                return ExitCode::FAILURE;
            }
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "smoke {}: {count} inputs in {secs:.1} s ({:.0}/s), seed {seed}, no failure; {}",
            w.name(),
            count as f64 / secs.max(1e-9),
            tally.describe(w)
        );
    }
    ExitCode::SUCCESS
}

/// How many inputs got how far.
#[derive(Default)]
struct Tally {
    messages: usize,
    asked: u64,
    hash_mismatch: u64,
    load_failed: u64,
    ready: u64,
    answers: usize,
    opened: u64,
    answered: u64,
}

impl Tally {
    fn add(&mut self, r: Reach) {
        self.messages += r.messages;
        self.asked += u64::from(r.asked);
        self.hash_mismatch += u64::from(r.hash_mismatch);
        self.load_failed += u64::from(r.load_failed);
        self.ready += u64::from(r.ready);
        self.answers += r.answers;
        self.opened += u64::from(r.opened);
        self.answered += u64::from(r.answered);
    }

    fn describe(&self, w: Which) -> String {
        match w {
            Which::Frames => format!("{} messages decoded", self.messages),
            Which::Child => format!(
                "NeedComponent sent {}, Fatal for a wrong hash {}, for a component that did not load {}; \
                 Ready to a bare Load {}, answers after it {}",
                self.asked, self.hash_mismatch, self.load_failed, self.ready, self.answers
            ),
            Which::Parent => format!(
                "handshakes completed {}, calls answered {}",
                self.opened, self.answered
            ),
        }
    }
}

fn report(artifacts: &Path, w: Which, seed: u64, index: u64, data: &[u8]) {
    let dir = artifacts.join(w.name());
    let file = dir.join(format!("smoke-{seed}-{index}"));
    let saved = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&file, data));
    eprintln!(
        "smoke {}: input {index} of seed {seed} failed (the panic is above)",
        w.name()
    );
    match saved {
        Ok(()) => eprintln!(
            "replay: cargo run --release -p matryoshka-fuzz --bin smoke -- --target {} --replay {}",
            w.name(),
            file.display()
        ),
        Err(e) => eprintln!("cannot save it to {}: {e}", file.display()),
    }
    let hex: String = data.iter().map(|b| format!("{b:02x}")).collect();
    eprintln!("input ({} bytes): {hex}", data.len());
}

/// Raw-mode inputs of generated streams: valid frames, some mutated, for
/// libFuzzer's own mutations to start from.
fn write_corpus(dir: &Path, which: &[Which], count: u64, seed: u64) -> std::io::Result<()> {
    use matryoshka_fuzz::{Input, generate};
    let mut rng = fastrand::Rng::with_seed(seed);
    for &w in which {
        let script = match w {
            Which::Frames => generate::stream,
            Which::Child => generate::parent_script,
            Which::Parent => generate::child_script,
        };
        let out = dir.join(w.name());
        std::fs::create_dir_all(&out)?;
        for i in 0..count {
            let mut data = vec![0; rng.usize(1..=512)];
            rng.fill(&mut data);
            data[0] = 1;
            let stream = Input::new(&data, script).stream;
            std::fs::write(out.join(format!("seed-{i}")), Input::raw(&stream))?;
        }
    }
    Ok(())
}
