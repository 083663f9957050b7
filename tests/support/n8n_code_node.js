// Runs one of deploy/n8n/code/*.js as n8n's Code node ("Run Once for All Items") runs it: the
// file is the body of an async function whose `this.helpers`, `$input`, `$(name)`, `$env` and
// `require` are n8n's, and which returns the node's output items.
// stdin: {"file", "items", "nodes": {name: [items]}, "env", "allow": [modules]}; stdout: the items.
const fs = require('fs');

const AsyncFunction = Object.getPrototypeOf(async () => {}).constructor;

function inputOf(items) {
  return { all: () => items, first: () => items[0], last: () => items[items.length - 1] };
}

async function main() {
  const call = JSON.parse(fs.readFileSync(0, 'utf8'));
  const items = call.items;
  const nodes = call.nodes || {};
  const allowed = new Set(call.allow || []);
  const helpers = {
    // The Webhook node's raw body: base64 in binary property `property` of item `index`.
    async getBinaryDataBuffer(index, property) {
      return Buffer.from(items[index].binary[property].data, 'base64');
    },
  };
  const $ = (name) => {
    if (!(name in nodes)) throw new Error(`no output of node "${name}" was given`);
    return inputOf(nodes[name]);
  };
  // NODE_FUNCTION_ALLOW_BUILTIN: only the modules named there can be required.
  const guardedRequire = (module) => {
    if (!allowed.has(module)) throw new Error(`Cannot find module '${module}' (not allowed)`);
    return require(module);
  };
  const body = fs.readFileSync(call.file, 'utf8');
  const node = new AsyncFunction('$input', '$', '$env', 'require', body);
  try {
    const output = await node.call({ helpers }, inputOf(items), $, call.env || {}, guardedRequire);
    process.stdout.write(JSON.stringify({ items: output }));
  } catch (error) {
    process.stdout.write(JSON.stringify({ error: String(error.message || error) }));
  }
}

main();
