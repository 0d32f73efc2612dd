// The basics suite in JavaScript: the same tests, with the same outcomes, as the
// Rust, C and Python ones (runtime/tests/test_languages.rs compares them).

import { test, host, fs, log, assert, assertEqual, FsError } from './matryoshka.js';

const KNOWN_ARCHES = ['x86_64', 'aarch64', 's390x', 'ppc64le', 'riscv64'];

test('hostname_is_set', () => {
  const name = host.hostname();
  log.info(`hostname is ${name}`);
  assert(name !== '', 'hostname is empty');
});

test('arch_is_known', () => {
  const arch = host.arch();
  assert(KNOWN_ARCHES.includes(arch), `unexpected arch ${arch}`);
});

test('level_path_matches_level', () => {
  const path = host.levelPath();
  assertEqual(path.split('/').length, host.level() + 1, `level path ${path}`);
  assert(path.startsWith('L0'), `level path ${path}`);
});

test('exec_uname_matches_arch', { tags: ['exec'] }, () => {
  assertEqual(host.checkOutput(['uname', '-m']).trim(), host.arch());
});

test('exec_hostname_matches_host', { tags: ['exec'] }, () => {
  assertEqual(host.checkOutput(['hostname']).trim(), host.hostname());
});

test('exec_feeds_stdin', { tags: ['exec'] }, () => {
  const data = new Uint8Array(200000).map((_, i) => i % 256);
  const out = host.exec(['cat'], data);
  assertEqual(out.status, 0, 'status of `cat`');
  assertEqual(out.stdout.length, data.length, 'bytes that came back');
  assert(out.stdout.every((b, i) => b === data[i]), '`cat` gave back other bytes than it was fed');
});

test('fs_read_via_preopen', { tags: ['fs'] }, () => {
  assertEqual(fs.readText('/data/hello.txt'), 'hello from the host\n');
});

test('fs_preopen_is_read_only', { tags: ['fs'] }, () => {
  fs.readText('/data/hello.txt');
  try {
    fs.writeText('/data/written-by-guest.txt', 'x');
  } catch (e) {
    assert(e instanceof FsError, `write refused for another reason: ${e}`);
    assert(['read-only', 'not-permitted', 'access'].includes(e.code), `write refused with ${e.code}`);
    return;
  }
  throw new Error('a read-only preopen accepted a write');
});

test('prints_and_logs', () => {
  console.log(`to stdout from ${host.levelPath()}`);
  log.warn('a warning line');
});

test('clocks_and_random_work', () => {
  assert(Date.now() > 1600000000000, `wall clock at ${Date.now()}`);
  const start = performance.now();
  while (performance.now() - start < 20) {
    // A busy wait: a synchronous test has no sleep to call.
  }
  const slept = performance.now() - start;
  assert(slept >= 20 && slept < 5000, `a 20 ms wait took ${slept} ms`);
  const draw = () => crypto.getRandomValues(new Uint8Array(32));
  const [first, second] = [draw(), draw()];
  assert(first.some((b, i) => b !== second[i]), 'two draws of wasi:random gave the same bytes');
  assert(first.some((b) => b !== 0), 'wasi:random gave only zeros');
});

test('deliberately_fails', { tags: ['expected-failure'] }, () => {
  const two = 1 + 1;
  assertEqual(two, 3, `arithmetic at ${host.levelPath()}`);
});

test('ignored_by_default', { ignore: true }, () => {
  throw new Error('ignored tests run only with --ignored or --include-ignored');
});

export { tests, run, call } from './matryoshka.js';
