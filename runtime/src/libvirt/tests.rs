//! These tests use libvirt's in-process test driver, `test:///default`: no
//! daemon, but `libvirt.so.0` must be installed (`libvirt0` on Debian).
//! Every `test:///default` connection in a process shares one driver
//! state, so each test defines domains under names of its own and leaves
//! the driver's `test` domain alone.

use super::*;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

const TEST_URI: &str = "test:///default";
/// Set in the child processes started by `run_child`.
const CHILD_ENV: &str = "MATRYOSHKA_LIBVIRT_TEST_CHILD";

fn open() -> Connection {
    Connection::open(TEST_URI).expect("open test:///default (is libvirt0 installed?)")
}

/// A domain name no other test (or test process) uses.
fn unique_name(tag: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("mtr-{tag}-{}-{n}", std::process::id())
}

fn domain_xml(name: &str) -> String {
    format!(
        "<domain type='test'><name>{name}</name>\
         <memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type>hvm</type></os></domain>"
    )
}

fn expect_libvirt_error(result: Result<impl fmt::Debug, Error>) -> Error {
    let error = result.expect_err("the call should fail");
    assert!(
        matches!(error, Error::Libvirt { .. }),
        "not a libvirt error: {error:?}"
    );
    error
}

/// Runs this binary's test `name` (an ignored one) alone in a child
/// process with `env` set, and returns its output; the child sees
/// [`CHILD_ENV`] set.
fn run_child(name: &str, env: &[(&str, &str)]) -> std::process::Output {
    // Test names are module paths without the crate name.
    let module = module_path!().split_once("::").map_or("", |(_, rest)| rest);
    let exe = std::env::current_exe().expect("current test binary");
    let output = Command::new(exe)
        .args([
            &format!("{module}::{name}"),
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .envs(env.iter().copied())
        .output()
        .expect("run the test binary");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "child test {name} failed: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    output
}

fn in_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

#[test]
fn open_reports_the_test_driver() {
    let conn = open();
    assert_eq!(conn.uri().expect("uri"), TEST_URI);
    let hypervisor = conn.hypervisor().expect("hypervisor");
    eprintln!("hypervisor: {hypervisor:?}");
    assert_eq!(hypervisor.driver, "TEST");
    assert!(hypervisor.lib_version >= 1_000_000, "{hypervisor:?}");
    assert_eq!(
        hypervisor.lib_version,
        library_version().expect("library_version")
    );
    let caps = conn.capabilities().expect("capabilities");
    assert!(caps.contains("<capabilities>"), "{caps}");
}

#[test]
fn list_domains_finds_the_default_domain() {
    let conn = open();
    let domains = conn.list_domains().expect("list_domains");
    let names: Vec<String> = domains.iter().map(|d| d.name().expect("name")).collect();
    assert!(names.iter().any(|n| n == "test"), "{names:?}");
    let test = conn.lookup_domain("test").expect("lookup test");
    assert_eq!(test.state().expect("state").0, DomainState::Running);
    assert!(test.is_persistent().expect("is_persistent"));
    assert_eq!(test.uuid().expect("uuid").len(), 36);
}

#[test]
fn unknown_domain_is_no_domain() {
    let conn = open();
    let error = expect_libvirt_error(conn.lookup_domain("mtr-no-such-domain"));
    eprintln!("lookup of an unknown name: {error}");
    let Error::Libvirt { call, code, .. } = &error else {
        unreachable!()
    };
    assert_eq!(*call, "virDomainLookupByName");
    assert_eq!(*code, 42);
    assert_eq!(error.code_name(), Some("no-domain"));
    assert_eq!(
        error.to_string(),
        "virDomainLookupByName failed: Domain not found \
         (libvirt error 42 no-domain, domain 12)",
        "VIR_FROM_TEST is 12"
    );
}

#[test]
fn malformed_xml_is_an_xml_detail() {
    let conn = open();
    // libvirt reports XML that does not parse as VIR_ERR_XML_DETAIL (35),
    // from VIR_FROM_DOMAIN (20), the message showing where parsing stopped.
    let error = expect_libvirt_error(conn.define_domain("<domain type='test'><name>broken"));
    eprintln!("malformed XML: {error}");
    assert_eq!(error.code_name(), Some("xml-detail"), "{error:?}");
    let Error::Libvirt { domain, .. } = error else {
        unreachable!()
    };
    assert_eq!(domain, 20);
    // Well-formed XML that is not a domain is VIR_ERR_XML_ERROR (27) ...
    let error = expect_libvirt_error(conn.define_domain("<notadomain/>"));
    eprintln!("wrong root element: {error}");
    assert_eq!(error.code_name(), Some("xml-error"), "{error:?}");
    // ... and a domain without a name VIR_ERR_NO_NAME (21).
    let error = expect_libvirt_error(conn.define_domain("<domain type='test'/>"));
    eprintln!("domain without a name: {error}");
    assert_eq!(error.code_name(), Some("no-name"), "{error:?}");
}

#[test]
fn defined_domain_lifecycle() {
    let conn = open();
    let name = unique_name("life");
    let dom = conn.define_domain(&domain_xml(&name)).expect("define");
    assert_eq!(dom.name().expect("name"), name);
    assert!(dom.is_persistent().expect("is_persistent"));
    assert_eq!(dom.state().expect("state").0, DomainState::Shutoff);

    dom.start().expect("start");
    let (state, reason) = dom.state().expect("state");
    assert_eq!(state, DomainState::Running);
    assert_eq!(state.name(), "running");
    eprintln!("running, reason {reason}");

    let xml = dom.xml_desc(false).expect("xml_desc");
    assert!(xml.contains(&format!("<name>{name}</name>")), "{xml}");
    let inactive = dom.xml_desc(true).expect("xml_desc inactive");
    assert!(
        inactive.contains(&format!("<name>{name}</name>")),
        "{inactive}"
    );

    let again = conn.lookup_domain(&name).expect("lookup");
    assert_eq!(again.uuid().expect("uuid"), dom.uuid().expect("uuid"));

    let err = expect_libvirt_error(dom.start());
    eprintln!("starting a running domain: {err}");
    // The test driver says internal-error; the QEMU driver operation-invalid.
    assert!(
        matches!(
            err.code_name(),
            Some("internal-error" | "operation-invalid")
        ),
        "{err:?}"
    );

    dom.destroy().expect("destroy");
    let (state, reason) = dom.state().expect("state");
    assert_eq!(state, DomainState::Shutoff);
    assert_eq!(state.name(), "shut-off");
    assert_eq!(reason, 2, "VIR_DOMAIN_SHUTOFF_DESTROYED");

    dom.start().expect("start again");
    dom.shutdown().expect("shutdown");
    assert_eq!(dom.state().expect("state").0, DomainState::Shutoff);

    dom.undefine().expect("undefine");
    let error = expect_libvirt_error(conn.lookup_domain(&name));
    assert_eq!(error.code_name(), Some("no-domain"));
}

#[test]
fn transient_domain_goes_away_when_destroyed() {
    let conn = open();
    let name = unique_name("transient");
    let dom = conn
        .create_transient(&domain_xml(&name))
        .expect("create_transient");
    assert!(!dom.is_persistent().expect("is_persistent"));
    assert_eq!(dom.state().expect("state").0, DomainState::Running);
    let listed = conn.list_domains().expect("list_domains");
    assert!(
        listed
            .iter()
            .any(|d| d.name().ok().as_deref() == Some(name.as_str()))
    );
    dom.destroy().expect("destroy");
    let error = expect_libvirt_error(conn.lookup_domain(&name));
    assert_eq!(error.code_name(), Some("no-domain"));
}

#[test]
fn device_hotplug_is_not_supported_by_the_test_driver() {
    let conn = open();
    let name = unique_name("disk");
    let dom = conn
        .create_transient(&domain_xml(&name))
        .expect("create_transient");
    let disk = "<disk type='file' device='disk'><source file='/nonexistent/disk.img'/>\
                <target dev='vdb' bus='virtio'/></disk>";
    for flags in [
        DeviceFlags {
            live: true,
            config: false,
        },
        DeviceFlags::default(),
    ] {
        let error = expect_libvirt_error(dom.attach_device(disk, flags));
        eprintln!("attach_device {flags:?}: {error}");
        assert_eq!(error.code_name(), Some("no-support"), "{error:?}");
        let error = expect_libvirt_error(dom.detach_device(disk, flags));
        eprintln!("detach_device {flags:?}: {error}");
        assert_eq!(error.code_name(), Some("no-support"), "{error:?}");
    }
    dom.destroy().expect("destroy");
}

#[test]
fn qemu_monitor_command_is_not_supported_by_the_test_driver() {
    let conn = open();
    let dom = conn.lookup_domain("test").expect("lookup test");
    for hmp in [true, false] {
        let command = if hmp {
            "info status"
        } else {
            r#"{"execute":"query-status"}"#
        };
        let error = expect_libvirt_error(dom.qemu_monitor_command(command, hmp));
        eprintln!("qemu_monitor_command hmp={hmp}: {error}");
        assert_eq!(error.code_name(), Some("no-support"), "{error:?}");
        let Error::Libvirt { call, .. } = error else {
            unreachable!()
        };
        assert_eq!(call, "virDomainQemuMonitorCommand");
    }
}

#[test]
fn bad_uri_fails_to_open() {
    let error = expect_libvirt_error(Connection::open("mtr-bogus:///nowhere"));
    eprintln!("bogus URI: {error}");
    assert!(error.code_name().is_some(), "{error:?}");
}

#[test]
fn nul_bytes_are_invalid_arguments() {
    let conn = open();
    let error = conn.lookup_domain("te\0st").expect_err("NUL in a name");
    assert!(matches!(error, Error::InvalidArgument(_)), "{error:?}");
    assert_eq!(error.code_name(), None);
    assert!(matches!(
        Connection::open("test:\0"),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn domain_outlives_its_connection() {
    let conn = open();
    let dom = conn.lookup_domain("test").expect("lookup test");
    drop(conn);
    assert_eq!(dom.name().expect("name"), "test");
    assert_eq!(dom.state().expect("state").0, DomainState::Running);
}

#[test]
fn errors_stay_with_their_thread() {
    let conn = Arc::new(open());
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let conn = Arc::clone(&conn);
            std::thread::spawn(move || {
                // Half the threads fail one way, half another, all at
                // once: each must read its own error.
                for _ in 0..100 {
                    if i % 2 == 0 {
                        let error = conn.lookup_domain("mtr-missing").expect_err("missing");
                        assert_eq!(error.code_name(), Some("no-domain"), "{error:?}");
                    } else {
                        let error = conn.define_domain("<domain>").expect_err("malformed");
                        assert_eq!(error.code_name(), Some("xml-detail"), "{error:?}");
                    }
                    let found = conn.lookup_domain("test").expect("lookup test");
                    assert_eq!(found.name().expect("name"), "test");
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("thread panicked");
    }
}

#[test]
fn error_names_come_from_virterror() {
    let error = |code| Error::Libvirt {
        call: "x",
        code,
        domain: 0,
        message: String::new(),
    };
    assert_eq!(error(5).code_name(), Some("no-connect"));
    assert_eq!(error(8).code_name(), Some("invalid-arg"));
    assert_eq!(error(9).code_name(), Some("operation-failed"));
    assert_eq!(error(27).code_name(), Some("xml-error"));
    assert_eq!(error(35).code_name(), Some("xml-detail"));
    assert_eq!(error(42).code_name(), Some("no-domain"));
    assert_eq!(error(55).code_name(), Some("operation-invalid"));
    assert_eq!(error(84).code_name(), Some("operation-unsupported"));
    assert_eq!(error(0).code_name(), None);
    assert_eq!(
        error(41).code_name(),
        None,
        "41 is a warning, VIR_WAR_NO_NETWORK"
    );
    assert_eq!(error(10_000).code_name(), None);
    assert_eq!(Error::Unavailable(String::new()).code_name(), None);
}

#[test]
fn state_names() {
    assert_eq!(DomainState::from_raw(5), DomainState::Shutoff);
    assert_eq!(DomainState::from_raw(7).name(), "pm-suspended");
    assert_eq!(DomainState::from_raw(99), DomainState::Other(99));
    assert_eq!(DomainState::Other(99).to_string(), "unknown (99)");
    assert_eq!(DeviceFlags::default().bits(), 0);
    assert_eq!(
        DeviceFlags {
            live: true,
            config: true
        }
        .bits(),
        3
    );
}

#[test]
fn missing_library_is_unavailable() {
    let output = run_child(
        "child_missing_library",
        &[(LIBRARY_ENV, "libvirt-matryoshka-missing.so.0")],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("child checked the missing library"),
        "{stdout}"
    );
}

#[test]
#[ignore = "run by missing_library_is_unavailable in a child process"]
fn child_missing_library() {
    if !in_child() {
        return;
    }
    let first = Connection::open(TEST_URI).expect_err("the library is missing");
    let Error::Unavailable(message) = &first else {
        panic!("not Unavailable: {first:?}")
    };
    println!("missing library: {message}");
    assert!(
        message.contains("libvirt-matryoshka-missing.so.0"),
        "{message}"
    );
    assert!(
        message.contains("cannot open shared object file"),
        "{message}"
    );
    assert!(
        message.contains("libvirt0") && message.contains("libvirt-libs"),
        "{message}"
    );
    // Remembered: the same error, from every entry point.
    assert_eq!(
        Connection::open(TEST_URI).expect_err("still missing"),
        first
    );
    assert_eq!(library_version().expect_err("still missing"), first);
    println!("child checked the missing library");
}

#[test]
fn missing_qemu_library_is_unavailable() {
    let output = run_child(
        "child_missing_qemu_library",
        &[(QEMU_LIBRARY_ENV, "libvirt-qemu-matryoshka-missing.so.0")],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("child checked the missing qemu library"),
        "{stdout}"
    );
}

#[test]
#[ignore = "run by missing_qemu_library_is_unavailable in a child process"]
fn child_missing_qemu_library() {
    if !in_child() {
        return;
    }
    let conn = open();
    let dom = conn.lookup_domain("test").expect("lookup test");
    let first = dom
        .qemu_monitor_command("info status", true)
        .expect_err("missing");
    let Error::Unavailable(message) = &first else {
        panic!("not Unavailable: {first:?}")
    };
    println!("missing qemu library: {message}");
    assert!(
        message.contains("libvirt-qemu-matryoshka-missing.so.0"),
        "{message}"
    );
    assert!(message.contains("libvirt0"), "{message}");
    assert_eq!(
        dom.qemu_monitor_command("info status", true)
            .expect_err("again"),
        first
    );
    // libvirt itself still works.
    assert_eq!(dom.name().expect("name"), "test");
    println!("child checked the missing qemu library");
}

#[test]
fn libvirt_prints_nothing_to_stderr() {
    let output = run_child("child_fails_quietly", &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("libvirt:"), "libvirt printed: {stderr}");
    assert!(!stderr.contains("mtr-quiet"), "libvirt printed: {stderr}");
}

#[test]
#[ignore = "run by libvirt_prints_nothing_to_stderr in a child process"]
fn child_fails_quietly() {
    if !in_child() {
        return;
    }
    let conn = open();
    conn.lookup_domain("mtr-quiet-missing")
        .expect_err("missing domain");
    conn.define_domain("<domain>mtr-quiet")
        .expect_err("malformed XML");
    Connection::open("mtr-quiet:///nowhere").expect_err("bogus URI");
}
