"""The basics suite in Python: the same tests, with the same outcomes, as the
Rust, C and JavaScript ones (runtime/tests/test_languages.rs compares them)."""

import logging
import os
import time

from matryoshka import WitWorld, host, test  # noqa: F401 - WitWorld is the export

KNOWN_ARCHES = ["x86_64", "aarch64", "s390x", "ppc64le", "riscv64"]


@test
def hostname_is_set():
    name = host.hostname()
    logging.info("hostname is %s", name)
    assert name, "hostname is empty"


@test
def arch_is_known():
    arch = host.arch()
    assert arch in KNOWN_ARCHES, f"unexpected arch {arch}"


@test
def level_path_matches_level():
    path = host.level_path()
    assert len(path.split("/")) == host.level() + 1, f"level path {path}"
    assert path.startswith("L0"), f"level path {path}"


@test(tags=["exec"])
def exec_uname_matches_arch():
    assert host.check_output(["uname", "-m"]).strip() == host.arch()


@test(tags=["exec"])
def exec_hostname_matches_host():
    assert host.check_output(["hostname"]).strip() == host.hostname()


@test(tags=["exec"])
def exec_feeds_stdin():
    data = bytes(i % 256 for i in range(200_000))
    out = host.exec(["cat"], data)
    assert out.ok, f"status {out.status}: {out.stderr!r}"
    assert out.stdout == data, "`cat` gave back other bytes than it was fed"


@test(tags=["fs"])
def fs_read_via_preopen():
    with open("/data/hello.txt") as f:
        assert f.read() == "hello from the host\n"


@test(tags=["fs"])
def fs_preopen_is_read_only():
    with open("/data/hello.txt"):
        pass
    try:
        open("/data/written-by-guest.txt", "w")
    except PermissionError:
        return
    raise AssertionError("a read-only preopen accepted a write")


@test
def prints_and_logs():
    print(f"to stdout from {host.level_path()}")
    logging.warning("a warning line")


@test
def clocks_and_random_work():
    assert time.time() > 1_600_000_000, f"wall clock at {time.time()}"
    start = time.monotonic()
    time.sleep(0.02)
    slept = time.monotonic() - start
    assert 0.02 <= slept < 5, f"a 20 ms sleep took {slept} s"
    first, second = os.urandom(32), os.urandom(32)
    assert first != second, "two draws of wasi:random gave the same bytes"
    assert first != bytes(32), "wasi:random gave only zeros"


@test(tags=["expected-failure"])
def deliberately_fails():
    two = 1 + 1
    assert two == 3, f"arithmetic at {host.level_path()}"


@test(ignore=True)
def ignored_by_default():
    raise AssertionError("ignored tests run only with --ignored or --include-ignored")
