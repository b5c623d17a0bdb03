"""gRPC face of the control service: proto in, `AdmissionControl`, proto out."""

from __future__ import annotations

from typing import Any

import grpc

from services.common.errors import unary_handler
from services.control.admission import AdmissionControl
from strata.control.v1 import control_pb2, control_pb2_grpc


class ControlServicer(control_pb2_grpc.ControlServiceServicer):
    """Implements strata.control.v1.ControlService."""

    def __init__(self, admission: AdmissionControl) -> None:
        self._admission = admission

    @unary_handler
    async def Admit(
        self, request: control_pb2.AdmitRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> control_pb2.AdmitResponse:
        admission = await self._admission.admit(request)
        return control_pb2.AdmitResponse(
            tenant_id=admission.key.tenant_id,
            key_id=admission.key.key_id,
            plan=[control_pb2.PlanCandidate(model=m) for m in admission.plan],
            reserved_tokens=admission.reserved_tokens,
        )

    @unary_handler
    async def Settle(
        self, request: control_pb2.SettleRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> control_pb2.SettleResponse:
        return control_pb2.SettleResponse(applied=await self._admission.settle(request))
