//! Write matryoshka test suites in plain Rust.
//!
//! A suite is a set of ordinary functions registered with [`suite!`]. The crate
//! compiles to a `wasm32-wasip2` component that targets the `matryoshka:test/suite`
//! world, so the same `.wasm` file runs under the `matryoshka` runtime at every
//! level of a nested chain.
//!
//! ```ignore
//! use matryoshka_guest::host;
//!
//! fn hostname_is_set() {
//!     assert!(!host::hostname().is_empty());
//! }
//!
//! fn uname_matches_arch() -> Result<(), host::Error> {
//!     let out = host::check_output(&["uname", "-m"])?;
//!     assert_eq!(out.trim(), host::arch());
//!     Ok(())
//! }
//!
//! matryoshka_guest::suite! {
//!     tests: [
//!         hostname_is_set,
//!         #[tag("exec")] uname_matches_arch,
//!         #[ignore] #[timeout_ms(600_000)] slow_one,
//!     ],
//! }
//! ```
//!
//! Functions listed under `remote:` can be called from another level of the
//! chain with [`nest::Guest::call`]; see [`nest`].
//!
//! The virtualization stack of a level: [`passthrough`] (scsi_debug disks and
//! SCSI devices passed to the levels a test boots), QMP on a booted level's QEMU
//! ([`nest::Guest::qmp`], [`nest::Guest::wait_qmp_event`]) and [`libvirt`]
//! (connections and domains kept alive at their level).
//!
//! Failures are reported with file, line and message: a panic (`assert!`,
//! `assert_eq!`, `unwrap`) or a returned `Err` fails the test. Output of
//! `println!`/`eprintln!` and of the [`log`](https://docs.rs/log) macros is
//! captured per test by the runtime.

pub mod host;
pub mod libvirt;
mod logger;
pub mod nest;
pub mod passthrough;
#[doc(hidden)]
pub mod rt;

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "suite",
        pub_export_macro: true,
        export_macro_name: "__export_suite",
        default_bindings_module: "::matryoshka_guest::bindings",
        additional_derives: [serde::Serialize, serde::Deserialize],
    });
}

pub use bindings::matryoshka::test::log::Level;
pub use bindings::matryoshka::test::types::{ErrorKind, Failure, TestCase};

/// Writes one log line for the running test, outside of the `log` crate.
pub fn log(level: Level, message: &str) {
    bindings::matryoshka::test::log::log(level, message);
}

/// Registers the tests of a suite, and the functions other levels may call,
/// and exports them to the runtime.
///
/// Each test is the name of a function in scope that takes no argument and
/// returns `()` or `Result<(), E>` where `E: Debug`. Attributes before a name
/// set its metadata: `#[ignore]`, `#[timeout_ms(N)]`, `#[tag("a", "b")]`, and
/// `#[name("...")]` to report the test under another name than the function's.
///
/// Each remote function takes one serde argument (a tuple for several, `()` for
/// none) and returns `Result<T, host::Error>` with `T: Serialize`.
#[macro_export]
macro_rules! suite {
    (
        tests: [ $( $( #[$attr:ident $( ( $($arg:tt)* ) )?] )* $name:ident ),* $(,)? ]
        $(, remote: [ $( $remote:ident ),* $(,)? ] )? $(,)?
    ) => {
        #[doc(hidden)]
        struct __MatryoshkaSuite;

        impl __MatryoshkaSuite {
            fn cases() -> ::std::vec::Vec<$crate::rt::Case> {
                ::std::vec![ $( {
                    #[allow(unused_mut)]
                    let mut case = $crate::rt::Case::new(
                        ::std::stringify!($name),
                        || $crate::rt::IntoOutcome::into_outcome($name()),
                    );
                    $( $crate::__case_attr!(case, $attr $( ( $($arg)* ) )?); )*
                    case
                } ),* ]
            }
        }

        impl $crate::bindings::Guest for __MatryoshkaSuite {
            fn tests() -> ::std::vec::Vec<$crate::TestCase> {
                $crate::rt::list(&Self::cases())
            }

            fn run(name: ::std::string::String) -> ::std::result::Result<(), $crate::Failure> {
                $crate::rt::run(&Self::cases(), &name)
            }

            fn call(
                function: ::std::string::String,
                args: ::std::vec::Vec<u8>,
            ) -> ::std::result::Result<::std::vec::Vec<u8>, $crate::rt::WitError> {
                $crate::rt::install_hooks();
                let _ = &args;
                $( $(
                    if function == ::std::stringify!($remote) {
                        return $crate::rt::dispatch($remote, &function, &args);
                    }
                )* )?
                ::std::result::Result::Err($crate::rt::no_remote_function(&function).into())
            }
        }

        $crate::bindings::__export_suite!(__MatryoshkaSuite);
    };
}

/// Applies one test attribute inside [`suite!`].
#[doc(hidden)]
#[macro_export]
macro_rules! __case_attr {
    ($case:ident, ignore) => {
        $case.ignored = true;
    };
    ($case:ident, timeout_ms($ms:expr)) => {
        $case.timeout_ms = ::std::option::Option::Some($ms);
    };
    ($case:ident, tag($($tag:literal),* $(,)?)) => {
        $( $case.tags.push($tag); )*
    };
    ($case:ident, name($name:literal)) => {
        $case.name = $name;
    };
    ($case:ident, $other:ident $($rest:tt)*) => {
        ::std::compile_error!(::std::concat!(
            "unknown test attribute `", ::std::stringify!($other),
            "`: expected #[ignore], #[timeout_ms(N)], #[tag(\"...\")] or #[name(\"...\")]"
        ));
    };
}
