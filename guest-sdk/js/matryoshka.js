// Write matryoshka test suites in JavaScript.
//
// A suite is an ES module that registers tests with `test(name, fn)` (and
// functions other levels may call with `remote(name, fn)`), then re-exports the
// world's three functions:
//
//     import { test, remote, host, Guest, assert, assertEqual } from './matryoshka.js';
//
//     test('hostname_is_set', () => assert(host.hostname() !== '', 'hostname is empty'));
//     test('slow_one', { ignore: true, timeoutMs: 600000, tags: ['slow'] }, () => {});
//     remote('whoami', () => ({ level: host.level(), path: host.levelPath() }));
//
//     export { tests, run, call } from './matryoshka.js';
//
// A thrown `AssertionError` (from `assert`, `assertEqual`) fails the test as a
// panic with its message and the file:line of the failing call; any other
// thrown error fails it as an error, with where it was thrown. `console.log`
// and `console.error` are captured per test; `log.info(...)` and friends write
// the runtime's structured log. Arguments and results of remote calls travel
// as JSON. `fs.readText` and `fs.writeText` reach the folders granted with
// `--grant fs=...` (WASI's preopens: the only files a suite sees).

import * as wasiHost from 'matryoshka:test/host@0.2.0';
import { log as wasiLog } from 'matryoshka:test/log@0.2.0';
import { Guest as WitGuest } from 'matryoshka:test/nest@0.2.0';
import { panicked } from 'matryoshka:test/report@0.2.0';
import { getDirectories } from 'wasi:filesystem/preopens@0.2.12';

const TESTS = new Map();
const REMOTES = new Map();
const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** A failed assertion. */
export class AssertionError extends Error {
  constructor(message) {
    super(message);
    this.name = 'AssertionError';
  }
}

/** An error from a host function or another level: `kind` as WIT spells it. */
export class MatryoshkaError extends Error {
  constructor(kind, message, levelPath) {
    super(`${kind} at ${levelPath ?? wasiHost.levelPath()}: ${message}`);
    this.name = 'MatryoshkaError';
    this.kind = kind;
    this.detail = message;
    this.levelPath = levelPath ?? wasiHost.levelPath();
  }

  toWit() {
    return { kind: this.kind, message: this.detail, levelPath: this.levelPath };
  }
}

/** Calls a generated binding, throwing `MatryoshkaError` for its error results. */
function witCall(f) {
  try {
    return f();
  } catch (e) {
    const p = e?.payload;
    if (p && typeof p.kind === 'string') {
      throw new MatryoshkaError(p.kind, p.message, p.levelPath);
    }
    throw e;
  }
}

/** Throws an `AssertionError` with `message` unless `cond` holds. */
export function assert(cond, message = 'assertion failed') {
  if (!cond) {
    throw new AssertionError(message);
  }
}

/** Throws an `AssertionError` showing both values unless they are equal (as JSON). */
export function assertEqual(left, right, message = '') {
  const l = JSON.stringify(left);
  const r = JSON.stringify(right);
  if (l !== r) {
    throw new AssertionError(`${message ? `${message}: ` : ''}left: ${l}, right: ${r}`);
  }
}

/**
 * Registers a test: `test(name, fn)` or `test(name, { ignore, timeoutMs, tags }, fn)`.
 */
export function test(name, options, fn) {
  if (typeof options === 'function') {
    [options, fn] = [{}, options];
  }
  if (TESTS.has(name)) {
    throw new Error(`two tests are named \`${name}\``);
  }
  TESTS.set(name, {
    fn,
    ignored: Boolean(options.ignore),
    timeoutMs: options.timeoutMs === undefined ? undefined : BigInt(options.timeoutMs),
    tags: options.tags ?? [],
  });
}

/** Registers a function other levels may call with `Guest.call`. */
export function remote(name, fn) {
  REMOTES.set(name, fn);
}

/** Facts about this level and commands run at it (the `host` interface). */
export const host = {
  hostname: () => wasiHost.hostname(),
  arch: () => wasiHost.arch(),
  level: () => wasiHost.level(),
  levelPath: () => wasiHost.levelPath(),
  componentSha256: () => wasiHost.componentSha256(),
  /** Runs `argv` here (needs `--grant exec=argv[0]`): `{ status, stdout, stderr }` as bytes. */
  exec: (argv, stdin) => witCall(() => wasiHost.exec(argv, stdin)),
  /** Runs `argv` and returns its stdout as text; a non-zero exit throws. */
  checkOutput(argv, stdin) {
    const out = this.exec(argv, stdin);
    if (out.status !== 0) {
      const err = decoder.decode(out.stderr).trim();
      throw new MatryoshkaError('io', `\`${argv.join(' ')}\` exited with status ${out.status}: ${err}`);
    }
    return decoder.decode(out.stdout);
  },
};

/** A refused file operation: `code` is WASI's error code, e.g. `no-entry`, `read-only`. */
export class FsError extends Error {
  constructor(code, path) {
    super(`${path}: ${code}`);
    this.name = 'FsError';
    this.code = code;
  }
}

/** The granted folder holding `path`, and `path` inside it. */
function preopened(path) {
  for (const [dir, guest] of getDirectories()) {
    const prefix = guest.endsWith('/') ? guest : `${guest}/`;
    if (path.startsWith(prefix)) {
      return [dir, path.slice(prefix.length)];
    }
  }
  const error = new FsError('no-entry', path);
  error.message = `${path} is in no folder granted to the suite at ${wasiHost.levelPath()}; grant one with --grant fs=HOST_DIR:GUEST_DIR`;
  throw error;
}

function fsCall(path, f) {
  try {
    return f();
  } catch (e) {
    if (typeof e?.payload === 'string') {
      throw new FsError(e.payload, path);
    }
    throw e;
  }
}

/** Files in the folders granted to the suite. */
export const fs = {
  /** The whole file at `path`, as UTF-8 text. */
  readText(path) {
    const [dir, rel] = preopened(path);
    return fsCall(path, () => {
      const file = dir.openAt({ symlinkFollow: false }, rel, {}, { read: true });
      const chunks = [];
      let offset = 0n;
      for (;;) {
        const [bytes, end] = file.read(65536n, offset);
        chunks.push(bytes);
        offset += BigInt(bytes.length);
        if (end || bytes.length === 0) {
          break;
        }
      }
      return chunks.map((c) => decoder.decode(c, { stream: true })).join('') + decoder.decode();
    });
  },
  /** Creates or replaces the file at `path` with `text`. */
  writeText(path, text) {
    const [dir, rel] = preopened(path);
    fsCall(path, () => {
      const file = dir.openAt({ symlinkFollow: false }, rel, { create: true, truncate: true }, { write: true });
      const bytes = encoder.encode(text);
      let done = 0;
      while (done < bytes.length) {
        done += Number(file.write(bytes.subarray(done), BigInt(done)));
      }
    });
  },
};

/** The runtime's structured log for the running test. */
export const log = Object.fromEntries(
  ['trace', 'debug', 'info', 'warn', 'error'].map((level) => [
    level,
    (...parts) => wasiLog(level, parts.join(' ')),
  ]),
);

/**
 * Another level of the chain, running this same component (needs `--grant nest`).
 * The remote side keeps one instance per handle; `close()` lets the level go.
 */
export class Guest {
  constructor(handle) {
    this.handle = handle;
  }

  /** Reaches `local` (a child runtime here) or `ssh://user@host[:port]`. */
  static connect(target) {
    return new Guest(witCall(() => WitGuest.connect(target)));
  }

  /** Boots a VM as the next level: `{ memoryMib, cpus, arch, image, accel, bootTimeoutMs }`. */
  static boot(vm = {}) {
    const spec = { ...vm, scsi: [] };
    if (spec.bootTimeoutMs !== undefined) {
      spec.bootTimeoutMs = BigInt(spec.bootTimeoutMs);
    }
    return new Guest(witCall(() => WitGuest.boot(spec)));
  }

  /** Calls the remote function `name` at that level with JSON arguments. */
  call(name, ...args) {
    const bytes = encoder.encode(JSON.stringify(args));
    const out = witCall(() => this.handle.call(name, bytes, undefined));
    return JSON.parse(decoder.decode(out));
  }

  level() {
    return this.handle.level();
  }

  levelPath() {
    return this.handle.levelPath();
  }

  arch() {
    return this.handle.arch();
  }

  hostname() {
    return this.handle.hostname();
  }

  sshCommand() {
    return this.handle.sshCommand();
  }

  accel() {
    return this.handle.accel();
  }

  /** Lets the level go (a booted VM is shut down). */
  close() {
    this.handle[Symbol.dispose]?.();
  }
}

/** `file:line:column` of the first stack frame outside this SDK, from a SpiderMonkey stack. */
function where(error) {
  const frames = String(error?.stack ?? '').split('\n');
  for (const frame of frames) {
    const m = frame.match(/@(.*):(\d+):(\d+)$/);
    if (m && !m[1].endsWith('matryoshka.js')) {
      return { file: m[1].replace(/^.*\//, ''), line: Number(m[2]), column: Number(m[3]) };
    }
  }
  return { file: undefined, line: undefined, column: undefined };
}

function failure(error) {
  const name = error?.name ?? 'Error';
  const message = error instanceof Error ? `${name}: ${error.message}` : `thrown: ${String(error)}`;
  return { message, ...where(error) };
}

/** The `tests` export. */
export function tests() {
  return [...TESTS].map(([name, t]) => ({
    name,
    ignored: t.ignored,
    timeoutMs: t.timeoutMs,
    tags: t.tags,
  }));
}

/** The `run` export. */
export function run(name) {
  const t = TESTS.get(name);
  if (!t) {
    throw { payload: { message: `no test named \`${name}\` in this suite` } };
  }
  try {
    t.fn();
  } catch (error) {
    const f = failure(error);
    if (error instanceof AssertionError) {
      panicked(f);
    }
    throw { payload: f };
  }
}

/** The `call` export. */
export function call(name, args) {
  const f = REMOTES.get(name);
  if (!f) {
    throw { payload: new MatryoshkaError('not-found', `this suite registers no remote function named \`${name}\``).toWit() };
  }
  let decoded;
  try {
    decoded = JSON.parse(decoder.decode(args));
  } catch (e) {
    throw { payload: new MatryoshkaError('invalid-argument', `arguments of \`${name}\` do not decode: ${e}`).toWit() };
  }
  try {
    return encoder.encode(JSON.stringify(f(...decoded) ?? null));
  } catch (error) {
    if (error instanceof MatryoshkaError) {
      throw { payload: error.toWit() };
    }
    const fl = failure(error);
    const at = fl.file ? ` at ${fl.file}:${fl.line}` : '';
    throw { payload: new MatryoshkaError('internal', `\`${name}\` raised ${fl.message}${at}`).toWit() };
  }
}
