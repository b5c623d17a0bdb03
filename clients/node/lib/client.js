'use strict';
// A small client of strata.orchestrator.v1.OrchestratorService. The .proto files are loaded at
// run time from the repository's protos/ directory (or $STRATA_PROTOS_DIR / options.protosDir);
// google/protobuf/*.proto come with protobufjs. Messages are plain objects with the proto's
// snake_case field names, enums as their names ("ROLE_USER"), int64 as numbers.

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const { StrataError, fromServiceError } = require('./errors');

const DEFAULT_PROTOS_DIR = path.resolve(__dirname, '..', '..', '..', 'protos');
const ORCHESTRATOR_PROTO = 'strata/orchestrator/v1/orchestrator.proto';
const DEFAULT_TIMEOUT_MS = 60_000;

const LOADER_OPTIONS = {
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
};

/** Loads the orchestrator's service definition from `protosDir`. */
function loadOrchestratorService(protosDir = process.env.STRATA_PROTOS_DIR || DEFAULT_PROTOS_DIR) {
  const definition = protoLoader.loadSync(ORCHESTRATOR_PROTO, {
    ...LOADER_OPTIONS,
    includeDirs: [protosDir],
  });
  const loaded = grpc.loadPackageDefinition(definition);
  return loaded.strata.orchestrator.v1.OrchestratorService;
}

/**
 * Creates a client of Strata's public API.
 *
 * @param {string} address host:port of the orchestrator, e.g. "127.0.0.1:50051"
 * @param {string} apiKey  a Strata API key, sent as `authorization: Bearer <key>`
 * @param {object} [options]
 * @param {string} [options.protosDir]   the directory holding strata/... (default: repo protos/)
 * @param {grpc.ChannelCredentials} [options.credentials] default: insecure (plaintext)
 * @param {number} [options.timeoutMs]   deadline of each call (default 60 s)
 */
function createClient(address, apiKey, options = {}) {
  const Service = loadOrchestratorService(options.protosDir);
  const stub = new Service(address, options.credentials || grpc.credentials.createInsecure());
  const timeoutMs = options.timeoutMs || DEFAULT_TIMEOUT_MS;

  function callArgs() {
    const metadata = new grpc.Metadata();
    if (apiKey) metadata.set('authorization', `Bearer ${apiKey}`);
    return [metadata, { deadline: new Date(Date.now() + timeoutMs) }];
  }

  /**
   * Streams an answer. `onDelta(text, delta)` is called for each delta chunk in order.
   * Resolves with { start, final, text }: the start chunk (request_id, model, cache_status),
   * the final chunk (finish_reason, usage, cost, cache_status) and the whole text.
   * Rejects with a StrataError (code, reason from ErrorInfo, metadata, ...).
   */
  function streamGenerate(request, onDelta = () => {}) {
    return new Promise((resolve, reject) => {
      const call = stub.StreamGenerate(request, ...callArgs());
      let start = null;
      let final = null;
      let text = '';
      let failed = false;
      call.on('data', (chunk) => {
        if (chunk.chunk === 'start') {
          start = chunk.start;
        } else if (chunk.chunk === 'delta') {
          text += chunk.delta.text;
          try {
            onDelta(chunk.delta.text, chunk.delta);
          } catch (err) {
            failed = true;
            call.cancel();
            reject(err);
          }
        } else if (chunk.chunk === 'final') {
          final = chunk.final;
        }
      });
      call.on('error', (err) => {
        if (!failed) reject(fromServiceError(err));
        failed = true;
      });
      call.on('end', () => {
        if (failed) return;
        if (start === null || final === null) {
          reject(
            new StrataError({
              code: grpc.status.UNKNOWN,
              reason: 'INCOMPLETE_STREAM',
              message: 'the stream ended without its start or final chunk',
            }),
          );
        } else {
          resolve({ start, final, text });
        }
      });
    });
  }

  /** One unary Generate; resolves with the GenerateResponse, rejects with a StrataError. */
  function generate(request) {
    return new Promise((resolve, reject) => {
      stub.Generate(request, ...callArgs(), (err, response) => {
        if (err) reject(fromServiceError(err));
        else resolve(response);
      });
    });
  }

  return { streamGenerate, generate, close: () => stub.close() };
}

module.exports = { createClient, loadOrchestratorService, StrataError, DEFAULT_PROTOS_DIR };
