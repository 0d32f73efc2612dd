"""Round trip of a no-op call through a chain of SSH hops with mitogen.

Usage: mitogen_chain.py KEY KNOWN_HOSTS CALLS PORT [PORT ...]
Prints one line per depth: `depth=D calls=N median_us=.. mean_us=..`.
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
        samples = []
        for _ in range(calls):
            start = time.perf_counter()
            context.call(noop)
            samples.append((time.perf_counter() - start) * 1e6)
        print(
            f"depth={depth} calls={calls} median_us={statistics.median(samples):.1f} "
            f"mean_us={statistics.fmean(samples):.1f}",
            flush=True,
        )
        via = context


if __name__ == "__main__":
    mitogen.utils.run_with_router(main)
