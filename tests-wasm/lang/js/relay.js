// The relay suite in JavaScript: this same component called at the levels below.
//
// Each level reaches the next one with `Guest.connect('local')` (a child runtime
// on the same machine; at a VM level, inside that VM). Arguments and results of
// the calls are JSON values, encoded by the SDK on both ends.

import { test, remote, host, Guest, MatryoshkaError, assert, assertEqual } from './matryoshka.js';

function whoami(caller) {
  return {
    caller,
    level: host.level(),
    path: host.levelPath(),
    arch: host.arch(),
    sha256: host.componentSha256(),
  };
}

function descend(depth) {
  const paths = [host.levelPath()];
  if (depth > 0) {
    const below = Guest.connect('local');
    try {
      paths.push(...below.call('descend', depth - 1));
    } finally {
      below.close();
    }
  }
  return paths;
}

remote('whoami', whoami);
remote('descend', descend);

test('calls_itself_one_level_down', () => {
  const here = host.levelPath();
  const below = Guest.connect('local');
  try {
    const caller = { path: here, numbers: [1, 2.5, null] };
    const hop = below.call('whoami', caller);
    assertEqual(hop.caller, caller, 'arguments that came back');
    assertEqual(hop.level, host.level() + 1);
    assertEqual(hop.path, `${here}/L${host.level() + 1}`);
    assertEqual(hop.arch, host.arch());
    assertEqual(below.arch(), host.arch());
    assertEqual(hop.sha256, host.componentSha256(), 'sha256 of the component below');
  } finally {
    below.close();
  }
});

test('descends_two_levels', () => {
  const here = host.levelPath();
  const level = host.level();
  assertEqual(descend(2), [here, `${here}/L${level + 1}`, `${here}/L${level + 1}/L${level + 2}`]);
});

test('an_unknown_remote_function_is_not_found', () => {
  const below = Guest.connect('local');
  try {
    below.call('no_such_function');
  } catch (e) {
    assert(e instanceof MatryoshkaError, `not a MatryoshkaError: ${e}`);
    assertEqual(e.kind, 'not-found');
    return;
  } finally {
    below.close();
  }
  throw new Error('calling an unknown function succeeded');
});

export { tests, run, call } from './matryoshka.js';
