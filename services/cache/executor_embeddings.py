"""Embeddings from a provider, through the executor's Embed RPC (the non-default embedder)."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from services.common.calls import open_channel
from services.common.errors import from_rpc_error
from services.common.security import Trust
from strata.executor.v1 import executor_pb2, executor_pb2_grpc

EMBED_TIMEOUT_S = 10.0


class ExecutorEmbedder:
    """An Embedder backed by an embedding model configured at the executor."""

    def __init__(
        self, address: str, model: str, dimensions: int, trust: Trust | None = None
    ) -> None:
        self._channel = open_channel(address, trust=trust)
        self._stub = executor_pb2_grpc.ExecutorServiceStub(self._channel)
        self._model = model
        self.dimensions = dimensions

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Unit vectors of the texts, in order (the provider's, as it returns them)."""
        if not texts:
            return []
        try:
            reply = await self._stub.Embed(
                executor_pb2.EmbedRequest(request_id="cache", model=self._model, inputs=texts),
                timeout=EMBED_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as err:
            raise RuntimeError(
                f"executor embeddings failed: {from_rpc_error(err, 'executor')}"
            ) from err
        return [list(e.values) for e in reply.embeddings]

    async def aclose(self) -> None:
        """Closes the channel."""
        await self._channel.close()
