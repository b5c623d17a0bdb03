"""The names of every span, attribute and metric Strata emits, in one place.

The OpenTelemetry GenAI conventions are still marked as moving (the semconv package ships
them as incubating), so Strata spells the names it relies on here instead of importing them:
a rename upstream is one edit here, and dashboards built on these names keep working until
we choose to move.
"""

from __future__ import annotations

# --- GenAI (https://opentelemetry.io/docs/specs/semconv/gen-ai/) ---------------------------
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_REQUEST_TOP_P = "gen_ai.request.top_p"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_SEED = "gen_ai.request.seed"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_TOKEN_TYPE = "gen_ai.token.type"
GEN_AI_INPUT_MESSAGES = "gen_ai.input.messages"
GEN_AI_OUTPUT_MESSAGES = "gen_ai.output.messages"
ERROR_TYPE = "error.type"
OPERATION_CHAT = "chat"

# --- gRPC (https://opentelemetry.io/docs/specs/semconv/rpc/grpc/) --------------------------
RPC_SYSTEM = "rpc.system"
RPC_SERVICE = "rpc.service"
RPC_METHOD = "rpc.method"
RPC_GRPC_STATUS_CODE = "rpc.grpc.status_code"

# --- Strata's own ----------------------------------------------------------------------------
REQUEST_ID = "strata.request_id"
TENANT_ID = "strata.tenant_id"
ROUTE = "strata.route"
TEMPLATE = "strata.template"
PROMPT_HASH = "strata.prompt_hash"
ADMISSION_DECISION = "strata.admission.decision"
ADMISSION_REASON = "strata.admission.reason"
RESERVED_USD_MICROS = "strata.admission.reserved_usd_micros"
PLAN = "strata.admission.plan"
CACHE_RESULT = "strata.cache.result"
CACHE_SIMILARITY = "strata.cache.similarity"
CACHE_REJECTED_BY = "strata.cache.rejected_by"
RETRIEVAL_COLLECTION = "strata.retrieval.collection"
RETRIEVAL_DOCUMENTS = "strata.retrieval.document_ids"
RETRIEVAL_SCORES = "strata.retrieval.scores"
ATTEMPT = "strata.attempt"
FALLBACK = "strata.fallback"
RETRIES = "strata.retries"
TIME_TO_FIRST_TOKEN_S = "strata.time_to_first_token_s"
GUARDRAIL_PHASE = "strata.guardrail.phase"
GUARDRAIL_BLOCKED = "strata.guardrail.blocked"
GUARDRAIL_RULES = "strata.guardrail.rules"
COST_USD_MICROS = "strata.cost.usd_micros"
OUTCOME = "strata.outcome"
PIPELINE = "strata.pipeline"
PIPELINE_STEP = "strata.pipeline.step"
JOB_ID = "strata.job_id"
CONTENT_TRUNCATED = "strata.content.truncated"
MODEL = "strata.model"
REASON = "strata.reason"
KIND = "strata.kind"
STATE = "strata.state"

# --- span names ------------------------------------------------------------------------------
SPAN_ADMISSION = "admission"
SPAN_CACHE_LOOKUP = "cache lookup"
SPAN_CACHE_STORE = "cache store"
SPAN_RETRIEVAL = "retrieval"
SPAN_GUARDRAILS = "guardrails"
SPAN_SETTLEMENT = "settlement"
SPAN_PIPELINE_STEP = "pipeline step"
SPAN_JOB = "job"
EVENT_PROMPT = "gen_ai.client.inference.operation.details"

# --- metrics -----------------------------------------------------------------------------------
METRIC_TOKEN_USAGE = "gen_ai.client.token.usage"
METRIC_OPERATION_DURATION = "gen_ai.client.operation.duration"
METRIC_TIME_TO_FIRST_TOKEN = "gen_ai.client.time_to_first_token"
METRIC_COST = "strata.cost"
METRIC_CACHE_RESULTS = "strata.cache.results"
METRIC_ADMISSION_DENIALS = "strata.admission.denials"
METRIC_BREAKER_STATE = "strata.breaker.state"
METRIC_RETRIES = "strata.retries"
METRIC_FALLBACKS = "strata.fallbacks"
METRIC_JOB_QUEUE_DEPTH = "strata.jobs.queue.depth"
METRIC_JOB_QUEUE_AGE = "strata.jobs.queue.oldest_age"
METRIC_SETTLEMENTS_KEPT = "strata.settlements.kept"
METRIC_REQUESTS = "strata.requests"
