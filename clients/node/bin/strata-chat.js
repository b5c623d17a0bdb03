#!/usr/bin/env node
'use strict';
// strata-chat ADDRESS MODEL PROMPT [--system TEXT] [--seed N] [--temperature T]
//                                  [--max-output-tokens N] [--timeout-ms N]
//
// Streams the answer's text to stdout as it arrives, then writes one line of JSON to stderr:
//   {"request_id":..,"model":..,"finish_reason":..,"usage":{..},"cost_usd_micros":..,"cache_status":..}
// The API key comes from $STRATA_API_KEY. On a gRPC error it writes
//   error: <CODE> <REASON>: <message> [{metadata}]
// to stderr and exits 1; on a usage error it exits 2.

const { createClient, StrataError } = require('../lib/client');

const USAGE =
  'usage: strata-chat ADDRESS MODEL PROMPT [--system TEXT] [--seed N] [--temperature T] ' +
  '[--max-output-tokens N] [--timeout-ms N]   (API key: $STRATA_API_KEY)';

const FLAGS = {
  '--system': 'system',
  '--seed': 'seed',
  '--temperature': 'temperature',
  '--max-output-tokens': 'maxOutputTokens',
  '--timeout-ms': 'timeoutMs',
};

function parseArgs(argv) {
  const positional = [];
  const flags = {};
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '-h' || arg === '--help') return null;
    if (arg in FLAGS) {
      if (i + 1 >= argv.length) throw new Error(`${arg} needs a value`);
      flags[FLAGS[arg]] = argv[++i];
    } else if (arg.startsWith('--')) {
      throw new Error(`unknown option ${arg}`);
    } else {
      positional.push(arg);
    }
  }
  if (positional.length !== 3) throw new Error('expected ADDRESS MODEL PROMPT');
  const number = (name) => {
    if (flags[name] === undefined) return undefined;
    const value = Number(flags[name]);
    if (!Number.isFinite(value)) throw new Error(`not a number: ${flags[name]}`);
    return value;
  };
  const [address, model, prompt] = positional;
  return {
    address,
    model,
    prompt,
    system: flags.system,
    seed: number('seed'),
    temperature: number('temperature'),
    maxOutputTokens: number('maxOutputTokens'),
    timeoutMs: number('timeoutMs'),
  };
}

function buildRequest(args) {
  const messages = [];
  if (args.system !== undefined) messages.push({ role: 'ROLE_SYSTEM', content: args.system });
  messages.push({ role: 'ROLE_USER', content: args.prompt });
  const params = {};
  if (args.seed !== undefined) params.seed = args.seed;
  if (args.temperature !== undefined) params.temperature = args.temperature;
  if (args.maxOutputTokens !== undefined) params.max_output_tokens = args.maxOutputTokens;
  return { model: args.model, messages, params };
}

async function main() {
  let args;
  try {
    args = parseArgs(process.argv.slice(2));
  } catch (err) {
    process.stderr.write(`strata-chat: ${err.message}\n${USAGE}\n`);
    return 2;
  }
  if (args === null) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  const client = createClient(args.address, process.env.STRATA_API_KEY || '', {
    timeoutMs: args.timeoutMs,
  });
  try {
    const { start, final } = await client.streamGenerate(buildRequest(args), (text) => {
      process.stdout.write(text);
    });
    process.stdout.write('\n');
    const summary = {
      request_id: start.request_id,
      model: start.model,
      finish_reason: final.finish_reason,
      usage: final.usage,
      cost_usd_micros: final.cost ? final.cost.total_usd_micros : 0,
      cache_status: final.cache_status,
    };
    process.stderr.write(`${JSON.stringify(summary)}\n`);
    return 0;
  } catch (err) {
    if (!(err instanceof StrataError)) throw err;
    let line = `error: ${err.codeName} ${err.reason || '-'}: ${err.message}`;
    if (Object.keys(err.metadata).length > 0) line += ` ${JSON.stringify(err.metadata)}`;
    process.stderr.write(`${line}\n`);
    return 1;
  } finally {
    client.close();
  }
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (err) => {
    process.stderr.write(`strata-chat: ${err.stack || err}\n`);
    process.exitCode = 1;
  },
);
