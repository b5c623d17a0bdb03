"""Wires the control service: settings → Redis, keys, catalog, guardrails → servicers."""

from __future__ import annotations

import asyncio
import logging

import grpc

from services.common.bootstrap import Service, answered_once
from services.common.catalog import load_catalog
from services.common.errors import StrataError
from services.common.guardrails import Guardrails
from services.common.redis_state import connect
from services.common.tasks import cancel_and_wait
from services.control.admin import Admin
from services.control.admission import AdmissionControl
from services.control.keys import KeyStore, TenantsFile, seed
from services.control.servicer import ControlAdminServicer, ControlServicer
from services.control.settings import ControlSettings
from strata.control.v1 import admin_pb2, admin_pb2_grpc, control_pb2, control_pb2_grpc

SERVICE_NAME = control_pb2.DESCRIPTOR.services_by_name["ControlService"].full_name
log = logging.getLogger(__name__)
ADMIN_SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["ControlAdminService"].full_name


async def build(settings: ControlSettings) -> Service:
    """The control service, ready for `bootstrap.start`."""
    catalog = load_catalog(settings.models_file)
    guardrails = Guardrails.from_file(settings.guardrails_file)
    tenants = TenantsFile.load(settings.tenants_file) if settings.tenants_file else None
    client = connect(settings.redis_url, settings.redis_timeout_s)
    keys = KeyStore(client, guardrails.profile(None).name)
    keys.start()

    async def seed_tenants() -> None:
        # Retried until Redis answers; health stays NOT_SERVING until it is done.
        while tenants is not None:
            try:
                await seed(client, keys, tenants)
                return
            except StrataError as err:
                log.warning("cannot write the tenants file into Redis yet (%s)", err.reason)
                await asyncio.sleep(1.0)

    seeding = asyncio.create_task(seed_tenants())

    async def seeded() -> None:
        if not seeding.done():
            raise RuntimeError("tenants not written yet")

    admission = AdmissionControl(
        keys,
        client,
        catalog,
        guardrails,
        settings.reservation_ttl_s,
        settings.settlement_ttl_s,
        settings.outage_grace_s,
    )
    sweeper = asyncio.create_task(admission.run_sweeper(settings.sweep_interval_s))
    token = settings.admin_token.get_secret_value() if settings.admin_token else None
    servicer = ControlServicer(admission)
    admin = ControlAdminServicer(Admin(client, keys, catalog, token))

    def register(server: grpc.aio.Server) -> None:
        control_pb2_grpc.add_ControlServiceServicer_to_server(servicer, server)
        admin_pb2_grpc.add_ControlAdminServiceServicer_to_server(admin, server)

    async def close() -> None:
        for task in (seeding, sweeper):
            await cancel_and_wait(task)
        await admission.drain()
        await keys.stop()
        await client.aclose()

    return Service(
        name="control",
        register=register,
        service_names=[SERVICE_NAME, ADMIN_SERVICE_NAME],
        # A later Redis outage keeps control in rotation: admission degrades (per-process
        # limits, budgets refused) instead of failing.
        probes={"redis": answered_once(admission.ping), "tenants": seeded},
        close=close,
    )
