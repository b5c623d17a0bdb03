"""How the CLI words an error from a Strata service."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


def describe_error(err: grpc.RpcError) -> str:
    """`CODE REASON: message` for an error from a Strata service."""
    code = err.code().name if isinstance(err, grpc.Call) else "UNKNOWN"
    reason, extra = "", ""
    status = rpc_status.from_call(err) if isinstance(err, grpc.Call) else None
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
                if info.metadata:
                    extra = (
                        " (" + ", ".join(f"{k}={v}" for k, v in sorted(info.metadata.items())) + ")"
                    )
    message = err.details() if isinstance(err, grpc.Call) else str(err)
    return f"{code} {reason}: {message}{extra}".replace("  ", " ")
