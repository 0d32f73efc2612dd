"""The relay suite in Python: this same component called at the levels below.

Each level reaches the next one with ``Guest.connect("local")`` (a child runtime
on the same machine; at a VM level, inside that VM). Arguments and results of
the calls are JSON values, encoded by the SDK on both ends."""

from matryoshka import Error, Guest, WitWorld, host, remote, test  # noqa: F401


@remote
def whoami(caller):
    return {
        "caller": caller,
        "level": host.level(),
        "path": host.level_path(),
        "arch": host.arch(),
        "sha256": host.component_sha256(),
    }


@remote
def descend(depth):
    paths = [host.level_path()]
    if depth > 0:
        with Guest.connect("local") as below:
            paths += below.call("descend", depth - 1)
    return paths


@test
def calls_itself_one_level_down():
    here = host.level_path()
    with Guest.connect("local") as below:
        hop = below.call("whoami", {"path": here, "numbers": [1, 2.5, None]})
        assert hop["caller"] == {"path": here, "numbers": [1, 2.5, None]}, hop
        assert hop["level"] == host.level() + 1, hop
        assert hop["path"] == f"{here}/L{host.level() + 1}", hop
        assert hop["arch"] == below.arch() == host.arch(), hop
        assert hop["sha256"] == host.component_sha256(), "another component answered"


@test
def descends_two_levels():
    paths = descend(2)
    here = host.level_path()
    level = host.level()
    assert paths == [here, f"{here}/L{level + 1}", f"{here}/L{level + 1}/L{level + 2}"], paths


@test
def an_unknown_remote_function_is_not_found():
    with Guest.connect("local") as below:
        try:
            below.call("no_such_function")
        except Error as e:
            assert e.kind == "not-found", e
            return
    raise AssertionError("calling an unknown function succeeded")
