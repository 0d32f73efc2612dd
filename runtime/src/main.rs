//! The `matryoshka` binary: see [`matryoshka::cli`].

fn main() -> std::process::ExitCode {
    matryoshka::cli::main()
}
