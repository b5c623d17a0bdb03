'use strict';
// Decodes Strata's rich errors: the `grpc-status-details-bin` trailer is a google.rpc.Status
// whose details hold an ErrorInfo (domain "strata", a stable reason, metadata) and, where
// they apply, RetryInfo and BadRequest (see services/common/errors.py).

const grpc = require('@grpc/grpc-js');
const protobuf = require('protobufjs');

const STATUS_DETAILS_KEY = 'grpc-status-details-bin';

// The few google.rpc messages we decode, as a protobufjs JSON descriptor (the .proto files of
// google/rpc are not bundled with protobufjs, and Strata's protos do not import them).
const root = protobuf.Root.fromJSON({
  nested: {
    google: {
      nested: {
        protobuf: {
          nested: {
            Any: {
              fields: { type_url: { type: 'string', id: 1 }, value: { type: 'bytes', id: 2 } },
            },
            Duration: {
              fields: { seconds: { type: 'int64', id: 1 }, nanos: { type: 'int32', id: 2 } },
            },
          },
        },
        rpc: {
          nested: {
            Status: {
              fields: {
                code: { type: 'int32', id: 1 },
                message: { type: 'string', id: 2 },
                details: { rule: 'repeated', type: 'google.protobuf.Any', id: 3 },
              },
            },
            ErrorInfo: {
              fields: {
                reason: { type: 'string', id: 1 },
                domain: { type: 'string', id: 2 },
                metadata: { keyType: 'string', type: 'string', id: 3 },
              },
            },
            RetryInfo: {
              fields: { retry_delay: { type: 'google.protobuf.Duration', id: 1 } },
            },
            BadRequest: {
              nested: {
                FieldViolation: {
                  fields: {
                    field: { type: 'string', id: 1 },
                    description: { type: 'string', id: 2 },
                  },
                },
              },
              fields: {
                field_violations: {
                  rule: 'repeated',
                  type: 'google.rpc.BadRequest.FieldViolation',
                  id: 1,
                },
              },
            },
          },
        },
      },
    },
  },
});

const Status = root.lookupType('google.rpc.Status');
const ErrorInfo = root.lookupType('google.rpc.ErrorInfo');
const RetryInfo = root.lookupType('google.rpc.RetryInfo');
const BadRequest = root.lookupType('google.rpc.BadRequest');
const TYPE_PREFIX = 'type.googleapis.com/';

const CODE_NAMES = Object.fromEntries(
  Object.entries(grpc.status).map(([name, value]) => [value, name]),
);

/** A failed call: the gRPC code and what Strata's ErrorInfo says about it. */
class StrataError extends Error {
  constructor(fields) {
    super(fields.message);
    this.name = 'StrataError';
    /** Numeric gRPC status code. */
    this.code = fields.code;
    /** Its name, e.g. "UNAUTHENTICATED". */
    this.codeName = CODE_NAMES[fields.code] || String(fields.code);
    /** ErrorInfo.reason, e.g. "API_KEY_INVALID"; "" when the server sent none. */
    this.reason = fields.reason || '';
    /** ErrorInfo.domain ("strata"). */
    this.domain = fields.domain || '';
    /** ErrorInfo.metadata: the values behind the error (model, limit, ...). */
    this.metadata = fields.metadata || {};
    /** RetryInfo.retry_delay in milliseconds, or null. */
    this.retryDelayMs = fields.retryDelayMs ?? null;
    /** BadRequest field paths, e.g. ["params.max_output_tokens"]. */
    this.fieldViolations = fields.fieldViolations || [];
  }
}

function durationMs(d) {
  return Number(d.seconds || 0) * 1000 + Math.round((d.nanos || 0) / 1e6);
}

/** Turns a grpc-js ServiceError into a StrataError, decoding the status details trailer. */
function fromServiceError(err) {
  const fields = { code: err.code, message: err.details || err.message };
  const raw = err.metadata ? err.metadata.get(STATUS_DETAILS_KEY) : [];
  if (raw.length > 0) {
    const status = Status.decode(Buffer.from(raw[0]));
    for (const detail of status.details) {
      const type = detail.type_url.startsWith(TYPE_PREFIX)
        ? detail.type_url.slice(TYPE_PREFIX.length)
        : detail.type_url;
      if (type === 'google.rpc.ErrorInfo') {
        const info = ErrorInfo.toObject(ErrorInfo.decode(detail.value), { defaults: true });
        Object.assign(fields, { reason: info.reason, domain: info.domain, metadata: info.metadata });
      } else if (type === 'google.rpc.RetryInfo') {
        const retry = RetryInfo.decode(detail.value);
        if (retry.retry_delay) fields.retryDelayMs = durationMs(retry.retry_delay);
      } else if (type === 'google.rpc.BadRequest') {
        fields.fieldViolations = BadRequest.decode(detail.value).field_violations.map((v) => v.field);
      }
    }
  }
  return new StrataError(fields);
}

module.exports = { StrataError, fromServiceError, STATUS_DETAILS_KEY };
