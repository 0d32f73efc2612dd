"""Write matryoshka test suites in Python.

A suite is a module of ordinary functions marked with :func:`test`; functions
marked with :func:`remote` can be called from another level of the chain. The
module ends with ``from matryoshka import WitWorld``: that class is what
componentize-py exports as the ``suite`` world.

    from matryoshka import test, remote, host, Guest, WitWorld

    @test
    def hostname_is_set():
        assert host.hostname(), "hostname is empty"

    @test(tags=["exec"])
    def uname_matches_arch():
        assert host.check_output(["uname", "-m"]).strip() == host.arch()

    @remote
    def whoami():
        return {"level": host.level(), "path": host.level_path()}

    @test
    def one_level_down():
        with Guest.connect("local") as l1:
            assert l1.call("whoami")["level"] == host.level() + 1

A failing ``assert`` (or any other exception) fails the test with its message
and the file:line of the line that raised it; ``print`` and the ``logging``
module are captured per test by the runtime. The bindings of every interface
(``libvirt``, ``qmp``, ``passthrough``) are importable as generated, from
``wit_world.imports``.
"""

import json
import linecache
import logging
import os
import traceback

import componentize_py_types
from wit_world.imports import host as _host
from wit_world.imports import log as _log
from wit_world.imports import nest as _nest
from wit_world.imports import report as _report
from wit_world.imports import types as _types

__all__ = [
    "Error",
    "Guest",
    "Vm",
    "WitWorld",
    "host",
    "remote",
    "test",
]

_TESTS = {}
_REMOTES = {}
# The suite's source lines, read while componentize-py imports the module at build
# time: the component carries no source files, and a failure shows its line.
_SOURCES = {}
_SDK_DIR = os.path.dirname(os.path.abspath(__file__))
_STDLIB_DIR = os.path.dirname(os.path.abspath(os.__file__))


class Error(Exception):
    """An error from a host function or another level.

    ``kind`` is the error kind as WIT spells it (``denied``, ``timeout``, ``io``,
    ``not-found``, ``invalid-argument``, ``level-lost``, ``unsupported``,
    ``internal``); ``level_path`` is where it happened.
    """

    def __init__(self, kind, message, level_path=None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.level_path = level_path if level_path is not None else _host.level_path()

    def __str__(self):
        return f"{self.kind} at {self.level_path}: {self.message}"

    @classmethod
    def _from_wit(cls, err):
        return cls(err.kind.name.lower().replace("_", "-"), err.message, err.level_path)

    def _to_wit(self):
        kind = _types.ErrorKind[self.kind.upper().replace("-", "_")]
        return _types.Error(kind=kind, message=self.message, level_path=self.level_path)


def _wit_call(f, *args):
    """Calls a generated binding, raising :class:`Error` for its error results."""
    try:
        return f(*args)
    except componentize_py_types.Err as e:
        raise Error._from_wit(e.value) from None


def _keep_source(f):
    filename = f.__code__.co_filename
    if filename not in _SOURCES:
        _SOURCES[filename] = linecache.getlines(filename)


def test(fn=None, *, ignore=False, timeout_ms=None, tags=(), name=None):
    """Registers a test: ``@test`` or ``@test(ignore=True, timeout_ms=N, tags=[...], name=...)``."""

    def register(f):
        _keep_source(f)
        case = name or f.__name__
        if case in _TESTS:
            raise ValueError(f"two tests are named `{case}`")
        _TESTS[case] = (f, _types.TestCase(case, bool(ignore), timeout_ms, list(tags)))
        return f

    return register(fn) if fn is not None else register


def remote(fn=None, *, name=None):
    """Registers a function other levels may call with :meth:`Guest.call`.

    Its arguments and its result travel as JSON (lists, dicts, str, int, float,
    bool, None). Raising :class:`Error` returns that error to the caller.
    """

    def register(f):
        _keep_source(f)
        _REMOTES[name or f.__name__] = f
        return f

    return register(fn) if fn is not None else register


class _Host:
    """Facts about this level and commands run at it (the ``host`` interface)."""

    class Output:
        """What a finished command produced."""

        def __init__(self, out):
            self.status = out.status
            self.stdout = out.stdout
            self.stderr = out.stderr

        @property
        def ok(self):
            """Whether the command exited with status 0."""
            return self.status == 0

    def hostname(self):
        """The host name of this level."""
        return _host.hostname()

    def arch(self):
        """The machine architecture, as ``uname -m`` prints it."""
        return _host.arch()

    def level(self):
        """The nesting depth: 0 where the run started."""
        return _host.level()

    def level_path(self):
        """The level path, e.g. ``L0/L1``."""
        return _host.level_path()

    def component_sha256(self):
        """Hex sha256 of this component, as this level's runtime computed it."""
        return _host.component_sha256()

    def exec(self, argv, stdin=None):
        """Runs ``argv`` here (needs ``--grant exec=argv[0]``) and returns its output."""
        return self.Output(_wit_call(_host.exec, list(argv), stdin))

    def check_output(self, argv, stdin=None):
        """Runs ``argv`` and returns its stdout as text; a non-zero exit raises :class:`Error`."""
        out = self.exec(argv, stdin)
        if not out.ok:
            err = out.stderr.decode("utf-8", "replace").strip()
            raise Error("io", f"`{' '.join(argv)}` exited with status {out.status}: {err}")
        return out.stdout.decode("utf-8", "replace")


host = _Host()


class Vm:
    """A virtual machine to boot as the next level; unset fields take the runtime's defaults."""

    def __init__(self, memory_mib=None, cpus=None, arch=None, image=None, accel=None,
                 boot_timeout_ms=None, libvirt=False):
        backend = _nest.Backend.LIBVIRT if libvirt else None
        self._spec = _nest.VmSpec(memory_mib, cpus, arch, image, accel, boot_timeout_ms,
                                  backend, [])


class Guest:
    """Another level of the chain, running this same component (needs ``--grant nest``).

    The remote side keeps one instance per handle: what a remote function keeps
    in a global is there for the next call through the same handle. Use it as a
    context manager (or call :meth:`close`) to let the level go.
    """

    def __init__(self, handle):
        self._handle = handle

    @classmethod
    def connect(cls, target):
        """Reaches ``local`` (a child runtime here) or ``ssh://user@host[:port]``."""
        return cls(_wit_call(_nest.Guest.connect, target))

    @classmethod
    def boot(cls, vm=None):
        """Boots a VM as the next level and waits until its runtime serves."""
        return cls(_wit_call(_nest.Guest.boot, (vm or Vm())._spec))

    def call(self, function, *args, timeout_ms=None):
        """Calls the remote function ``function`` of this component at that level."""
        data = json.dumps(list(args)).encode()
        return json.loads(_wit_call(self._handle.call, function, data, timeout_ms))

    def level(self):
        """The depth of that level."""
        return self._handle.level()

    def level_path(self):
        """The level path of that level, e.g. ``L0/L1``."""
        return self._handle.level_path()

    def arch(self):
        """The architecture of that level."""
        return self._handle.arch()

    def hostname(self):
        """The host name of that level."""
        return self._handle.hostname()

    def ssh_command(self):
        """A shell command that opens a shell there, when it was reached over SSH."""
        return self._handle.ssh_command()

    def accel(self):
        """``kvm`` or ``tcg`` for a booted level; None for others."""
        return self._handle.accel()

    def close(self):
        """Lets the level go (a booted VM is shut down)."""
        self._handle.__exit__(None, None, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _LogHandler(logging.Handler):
    _LEVELS = [
        (logging.ERROR, _log.Level.ERROR),
        (logging.WARNING, _log.Level.WARN),
        (logging.INFO, _log.Level.INFO),
        (logging.DEBUG, _log.Level.DEBUG),
    ]

    def emit(self, record):
        level = next((lv for n, lv in self._LEVELS if record.levelno >= n), _log.Level.TRACE)
        _log.log(level, self.format(record))


def _install_logging():
    root = logging.getLogger()
    if not any(isinstance(h, _LogHandler) for h in root.handlers):
        root.addHandler(_LogHandler())
        root.setLevel(logging.DEBUG)


def _where(exc):
    """File and line of the innermost frame of the suite's own code (not this SDK's,
    not the standard library's)."""
    frames = traceback.extract_tb(exc.__traceback__)
    own = [f for f in frames
           if not os.path.abspath(f.filename).startswith((_SDK_DIR, _STDLIB_DIR))]
    last = (own or frames or [None])[-1]
    if last is None:
        return None, None, None
    lines = _SOURCES.get(last.filename, [])
    text = lines[last.lineno - 1].strip() if 0 < (last.lineno or 0) <= len(lines) else None
    return os.path.basename(last.filename), last.lineno, text


def _failure(exc):
    file, line, text = _where(exc)
    message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if text:
        message += f"\n  {text}"
    return _types.Failure(message, file, line, None)


class WitWorld:
    """The ``suite`` world's exports, as componentize-py looks them up."""

    def tests(self):
        return [case for _, case in _TESTS.values()]

    def run(self, name):
        _install_logging()
        if name not in _TESTS:
            raise componentize_py_types.Err(
                _types.Failure(f"no test named `{name}` in this suite", None, None, None))
        try:
            _TESTS[name][0]()
        except Exception as exc:  # noqa: BLE001 - every exception fails the test
            failure = _failure(exc)
            if isinstance(exc, AssertionError):
                # An assertion is reported as the guest's panic, with where it failed.
                _report.panicked(failure)
            raise componentize_py_types.Err(failure) from None

    def call(self, function, args):
        _install_logging()
        f = _REMOTES.get(function)
        if f is None:
            raise componentize_py_types.Err(Error(
                "not-found",
                f"this suite registers no remote function named `{function}`")._to_wit())
        try:
            decoded = json.loads(args)
        except ValueError as e:
            raise componentize_py_types.Err(Error(
                "invalid-argument", f"arguments of `{function}` do not decode: {e}")._to_wit())
        try:
            value = f(*decoded)
        except Error as e:
            raise componentize_py_types.Err(e._to_wit()) from None
        except Exception as exc:  # noqa: BLE001 - reported to the caller, with where
            failure = _failure(exc)
            where = f" at {failure.file}:{failure.line}" if failure.file else ""
            raise componentize_py_types.Err(Error(
                "internal", f"`{function}` raised {failure.message}{where}")._to_wit()) from None
        return json.dumps(value).encode()
