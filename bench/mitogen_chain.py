"""Round trip of a no-op call through a chain of SSH hops with mitogen.

Usage: mitogen_chain.py KEY KNOWN_HOSTS CALLS PORT [PORT ...]
Prints one line per depth: `depth=D first_contact_ms=.. calls=N median_us=.. mean_us=..`,
where first contact is `router.ssh` to that level (through the ones above) and the
first call there (which sends this module), as a test needs before its first call.
The peer measurement for docs/benchmarks.md; run by runtime/tests/bench_relay.rs.
"""

import statistics
import sys
import time

import mitogen.master
import mitogen.utils


def noop():
    return None


def main(router):
    key, known_hosts, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ports = [int(p) for p in sys.argv[4:]]
    via = None
    for depth, port in enumerate(ports, start=1):
        start = time.perf_counter()
        context = router.ssh(
            hostname="127.0.0.1",
            port=port,
            username="root",
            identity_file=key,
            check_host_keys="enforce",
            ssh_args=["-o", "UserKnownHostsFile=" + known_hosts, "-o", "IdentitiesOnly=yes"],
            python_path=sys.executable,
            via=via,
        )
        context.call(noop)  # connect and warm up
        first_ms = (time.perf_counter() - start) * 1e3
        samples = []
        for _ in range(calls):
            start = time.perf_counter()
            context.call(noop)
            samples.append((time.perf_counter() - start) * 1e6)
        print(
            f"depth={depth} first_contact_ms={first_ms:.1f} calls={calls} median_us={statistics.median(samples):.1f} "
            f"mean_us={statistics.fmean(samples):.1f}",
            flush=True,
        )
        via = context


if __name__ == "__main__":
    mitogen.utils.run_with_router(main)
