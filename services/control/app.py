"""Wires the control service: settings → key ring, Redis → admission → servicer."""

from __future__ import annotations

import grpc

from services.common.bootstrap import Service
from services.common.redis_state import connect
from services.control.admission import AdmissionControl
from services.control.keys import KeyRing
from services.control.servicer import ControlServicer
from services.control.settings import ControlSettings
from strata.control.v1 import control_pb2, control_pb2_grpc

SERVICE_NAME = control_pb2.DESCRIPTOR.services_by_name["ControlService"].full_name


async def build(settings: ControlSettings) -> Service:
    """The control service, ready for `bootstrap.start`."""
    keys = KeyRing.from_file(settings.tenants_file)
    client = connect(settings.redis_url, settings.redis_timeout_s)
    admission = AdmissionControl(
        keys, client, settings.reservation_ttl_s, settings.settlement_ttl_s
    )
    servicer = ControlServicer(admission)

    def register(server: grpc.aio.Server) -> None:
        control_pb2_grpc.add_ControlServiceServicer_to_server(servicer, server)

    return Service(
        name="control",
        register=register,
        service_names=[SERVICE_NAME],
        probes={"redis": admission.ping},
        close=client.aclose,
    )
