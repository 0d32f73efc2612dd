// Builds one JavaScript suite into a component of the `suite-js` world:
//   node componentize.mjs SOURCE.js WIT_DIR OUT.wasm
// Run from the folder that holds SOURCE.js and matryoshka.js (componentize-js
// resolves the module's relative imports from there). No AOT (weval): it would
// download a binary from outside the npm registry.
import { componentize } from '@bytecodealliance/componentize-js';
import { writeFile } from 'node:fs/promises';

const [source, wit, out] = process.argv.slice(2);
const { component } = await componentize({
  sourcePath: source,
  witPath: wit,
  worldName: 'suite-js',
  disableFeatures: ['http', 'fetch-event'],
});
await writeFile(out, component);
