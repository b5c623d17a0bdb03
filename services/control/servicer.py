"""gRPC face of the control service: proto in, the domain, proto out."""

from __future__ import annotations

from typing import Any

import grpc

from services.common import semconv, telemetry
from services.common.admin import bearer
from services.common.errors import StrataError, unary_handler
from services.control.admin import Admin
from services.control.admission import AdmissionControl
from strata.control.v1 import admin_pb2, admin_pb2_grpc, control_pb2, control_pb2_grpc


class ControlServicer(control_pb2_grpc.ControlServiceServicer):
    """Implements strata.control.v1.ControlService."""

    def __init__(self, admission: AdmissionControl) -> None:
        self._admission = admission

    @unary_handler
    async def Admit(
        self, request: control_pb2.AdmitRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> control_pb2.AdmitResponse:
        try:
            admission = await self._admission.admit_call(request)
        except StrataError as err:
            telemetry.instruments("control").admission_denials.add(1, {semconv.REASON: err.reason})
            raise
        return control_pb2.AdmitResponse(
            tenant_id=admission.key.tenant_id,
            key_id=admission.key.key_id,
            team_id=admission.key.team_id,
            plan=[control_pb2.PlanCandidate(model=m, probe=p) for m, p in admission.plan],
            reserved_tokens=admission.reserved_tokens,
            reserved_usd_micros=admission.reserved_cost,
            guardrail_findings=admission.findings,
            redacted_messages=admission.redacted or [],
            guardrail_profile=admission.profile,
            admission=admission.number,
        )

    @unary_handler
    async def Settle(
        self, request: control_pb2.SettleRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> control_pb2.SettleResponse:
        return control_pb2.SettleResponse(applied=await self._admission.settle(request))

    @unary_handler
    async def SettleBatch(
        self, request: control_pb2.SettleBatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> control_pb2.SettleBatchResponse:
        return control_pb2.SettleBatchResponse(
            applied=await self._admission.settle_batch(request.entries)
        )

    @unary_handler
    async def CheckOutput(
        self, request: control_pb2.CheckOutputRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> control_pb2.CheckOutputResponse:
        verdict, findings = await self._admission.check_output(request)
        return control_pb2.CheckOutputResponse(
            blocked=verdict.blocked,
            findings=findings,
            # A blocked text is not shown, redacted or not.
            redacted_text=verdict.redacted[0] if verdict.redacted and not verdict.blocked else "",
        )

    @unary_handler
    async def Authenticate(
        self,
        request: control_pb2.AuthenticateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> control_pb2.AuthenticateResponse:
        key = await self._admission.authenticate(request.api_key, request.api_key_sha256)
        return control_pb2.AuthenticateResponse(
            tenant_id=key.tenant_id, key_id=key.key_id, team_id=key.team_id, tier=key.tier
        )


class ControlAdminServicer(admin_pb2_grpc.ControlAdminServiceServicer):
    """Implements strata.control.v1.ControlAdminService (admin token required)."""

    def __init__(self, admin: Admin) -> None:
        self._admin = admin

    @unary_handler
    async def CreateApiKey(
        self, request: admin_pb2.CreateApiKeyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.CreateApiKeyResponse:
        self._admin.authorize(bearer(context))
        return await self._admin.idempotent(
            request.request_id,
            admin_pb2.CreateApiKeyResponse,
            lambda: self._admin.create_key(request),
        )

    @unary_handler
    async def ListApiKeys(
        self, request: admin_pb2.ListApiKeysRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.ListApiKeysResponse:
        self._admin.authorize(bearer(context))
        return await self._admin.list_keys(request)

    @unary_handler
    async def RevokeApiKey(
        self, request: admin_pb2.RevokeApiKeyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.RevokeApiKeyResponse:
        self._admin.authorize(bearer(context))
        return await self._admin.idempotent(
            request.request_id,
            admin_pb2.RevokeApiKeyResponse,
            lambda: self._admin.revoke_key(request),
        )

    @unary_handler
    async def SetBudget(
        self, request: admin_pb2.SetBudgetRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.SetBudgetResponse:
        self._admin.authorize(bearer(context))
        return await self._admin.idempotent(
            request.request_id, admin_pb2.SetBudgetResponse, lambda: self._admin.set_budget(request)
        )

    @unary_handler
    async def SetLimits(
        self, request: admin_pb2.SetLimitsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.SetLimitsResponse:
        self._admin.authorize(bearer(context))
        return await self._admin.idempotent(
            request.request_id, admin_pb2.SetLimitsResponse, lambda: self._admin.set_limits(request)
        )

    @unary_handler
    async def GetUsage(
        self, request: admin_pb2.GetUsageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.GetUsageResponse:
        self._admin.authorize(bearer(context))
        return await self._admin.usage(request)

    @unary_handler
    async def ListBreakers(
        self, request: admin_pb2.ListBreakersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.ListBreakersResponse:
        self._admin.authorize(bearer(context))
        return await self._admin.breakers(request)
