"""The local embedder on the real packaged model: vector shape, meaning, batching, checks."""

import asyncio
import contextlib
import hashlib
import math
import shutil
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import pytest

from services.common.embeddings import (
    DIMENSIONS,
    MODEL_SHA256,
    TOKENIZER_SHA256,
    Embedder,
    LocalEmbedder,
    packaged_model_path,
    packaged_tokenizer_path,
)
from services.common.settings import ConfigError

MAX_TOKENS = 256
TEXTS = [
    "How do I reset my password?",
    "",
    "Best pizza toppings",
    "The cache answers repeated questions without calling the model again, which saves "
    "both time and money when many users ask the same thing in slightly different words.",
    "ok",
]


@pytest.fixture(scope="module")
def embedder() -> Iterator[LocalEmbedder]:
    """One embedder for the module: loading the model is the slow part."""
    local = LocalEmbedder(threads=2, max_tokens=MAX_TOKENS, batch_size=2)
    yield local
    asyncio.run(local.aclose())


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def assert_close(got: list[list[float]], want: list[list[float]], tolerance: float = 1e-5) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= tolerance


def test_is_an_embedder(embedder: LocalEmbedder) -> None:
    local: Embedder = embedder
    assert local.dimensions == DIMENSIONS == 384


async def test_vectors_have_384_dimensions_and_unit_length(embedder: LocalEmbedder) -> None:
    vectors = await embedder.embed(TEXTS)
    assert len(vectors) == len(TEXTS)
    for vector in vectors:
        assert len(vector) == DIMENSIONS
        assert all(isinstance(x, float) for x in vector)
        assert math.sqrt(sum(x * x for x in vector)) == pytest.approx(1.0, abs=1e-5)


async def test_deterministic(embedder: LocalEmbedder) -> None:
    first = await embedder.embed(TEXTS)
    assert await embedder.embed(TEXTS) == first
    assert embedder.embed_sync(TEXTS) == first


async def test_batch_equals_one_by_one(embedder: LocalEmbedder) -> None:
    together = await embedder.embed(TEXTS)
    alone = [(await embedder.embed([text]))[0] for text in TEXTS]
    assert_close(together, alone)


async def test_input_order_is_kept_across_lengths_and_batches(embedder: LocalEmbedder) -> None:
    alone = {text: (await embedder.embed([text]))[0] for text in TEXTS}
    shuffled = [TEXTS[i] for i in (3, 0, 4, 2, 1, 3)]  # three batches of 2, a text twice
    assert_close(await embedder.embed(shuffled), [alone[text] for text in shuffled])


async def test_concurrent_calls_agree_with_sync(embedder: LocalEmbedder) -> None:
    results = await asyncio.gather(*(embedder.embed([text]) for text in TEXTS))
    assert_close([vector for [vector] in results], embedder.embed_sync(TEXTS))


async def test_paraphrases_are_closer_than_unrelated_texts(embedder: LocalEmbedder) -> None:
    reset, change, pizza = await embedder.embed(
        ["How do I reset my password?", "How can I change my password?", "Best pizza toppings"]
    )
    assert cosine(reset, change) > 0.75
    assert cosine(reset, pizza) < 0.3
    assert cosine(reset, change) > cosine(reset, pizza) + 0.4


async def test_long_text_is_cut_at_max_tokens(embedder: LocalEmbedder) -> None:
    # "hello" is one word piece; [CLS] and [SEP] take the other two places.
    kept = MAX_TOKENS - 2
    very_long, exactly, shorter = await embedder.embed(
        ["hello " * 5000, "hello " * kept, "hello " * (kept - 1)]
    )
    assert_close([very_long], [exactly])
    assert max(abs(x - y) for x, y in zip(very_long, shorter, strict=True)) > 1e-5


async def test_empty_list(embedder: LocalEmbedder) -> None:
    assert await embedder.embed([]) == []
    assert embedder.embed_sync([]) == []


async def test_one_str_is_refused(embedder: LocalEmbedder) -> None:
    with pytest.raises(TypeError, match="not one str"):
        await embedder.embed("hello")


@pytest.mark.parametrize("which", ["model", "tokenizer"])
def test_tampered_file_is_refused(tmp_path, which: str) -> None:
    source = packaged_model_path() if which == "model" else packaged_tokenizer_path()
    copy = tmp_path / source.name
    shutil.copyfile(source, copy)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x01
    copy.write_bytes(bytes(data))

    with pytest.raises(ConfigError) as raised:
        LocalEmbedder(**{f"{which}_path": copy})
    pinned = MODEL_SHA256 if which == "model" else TOKENIZER_SHA256
    message = str(raised.value)
    assert str(copy) in message
    assert hashlib.sha256(data).hexdigest() in message
    assert pinned in message


def test_missing_file_is_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        LocalEmbedder(model_path=tmp_path / "absent.onnx")


@pytest.mark.parametrize(
    "arguments", [{"threads": 0}, {"batch_size": 0}, {"max_tokens": 1}, {"max_tokens": 513}]
)
def test_out_of_range_parameters_are_refused(arguments: dict) -> None:
    with pytest.raises(ConfigError, match=next(iter(arguments))):
        LocalEmbedder(**arguments)


async def test_closed_embedder_refuses() -> None:
    local = LocalEmbedder()
    await local.aclose()
    await local.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await local.embed(["hello"])
    with pytest.raises(RuntimeError, match="closed"):
        local.embed_sync(["hello"])


# --- Batches shared by concurrent calls ------------------------------------------------


class Gated:
    """Wraps an embedder's inference: records each batch's texts, holds the first batch
    until released, and fails any batch holding `poison`."""

    def __init__(self, local: LocalEmbedder, poison: str | None = None) -> None:
        self.batches: list[list[str]] = []
        self.release = threading.Event()
        self._inner = local._embed_batch
        self._poison = poison
        local._embed_batch = self  # type: ignore[method-assign]

    def __call__(self, texts: Sequence[str]) -> Any:
        self.batches.append(list(texts))
        if len(self.batches) == 1:
            assert self.release.wait(10)
        if self._poison in texts:
            raise ValueError("inference failed")
        return self._inner(texts)


@pytest.fixture
async def solo() -> AsyncIterator[LocalEmbedder]:
    """One worker thread, batches of up to 32."""
    local = LocalEmbedder(threads=1, max_tokens=MAX_TOKENS, batch_size=32)
    yield local
    await local.aclose()


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.005)


async def test_calls_waiting_together_share_one_inference(
    solo: LocalEmbedder, embedder: LocalEmbedder
) -> None:
    gated = Gated(solo)
    texts = [f"question number {n}" for n in range(16)]
    calls = [asyncio.create_task(solo.embed([text])) for text in texts]
    await until(lambda: len(gated.batches) == 1)  # the first runs alone, the rest wait
    gated.release.set()
    results = await asyncio.gather(*calls)
    assert gated.batches == [texts[:1], texts[1:]]
    assert_close([vector for [vector] in results], embedder.embed_sync(texts))


async def test_texts_of_a_call_that_gave_up_are_never_embedded(
    solo: LocalEmbedder, embedder: LocalEmbedder
) -> None:
    gated = Gated(solo)
    first = asyncio.create_task(solo.embed(["first"]))
    await until(lambda: len(gated.batches) == 1)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(solo.embed(["abandoned", "also abandoned"]), 0.05)
    kept = asyncio.create_task(solo.embed(["kept"]))
    await asyncio.sleep(0)
    gated.release.set()
    assert_close(await kept, embedder.embed_sync(["kept"]))
    await first
    assert gated.batches == [["first"], ["kept"]]


async def test_a_failed_inference_fails_its_callers_only(
    solo: LocalEmbedder, embedder: LocalEmbedder
) -> None:
    gated = Gated(solo, poison="bad")
    first = asyncio.create_task(solo.embed(["first"]))
    await until(lambda: len(gated.batches) == 1)
    shared = [asyncio.create_task(solo.embed([text])) for text in ("good", "bad")]
    await asyncio.sleep(0)
    gated.release.set()
    await first
    for call in shared:
        with pytest.raises(ValueError, match="inference failed"):
            await call
    assert gated.batches[1] == ["good", "bad"]
    # Nothing is left held: the next calls run.
    assert_close(await solo.embed(["after"]), embedder.embed_sync(["after"]))


def test_an_event_loop_closed_mid_batch_leaves_the_embedder_usable(
    embedder: LocalEmbedder,
) -> None:
    local = LocalEmbedder(threads=1, max_tokens=MAX_TOKENS)
    gated = Gated(local)

    async def leave_while_embedding() -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(local.embed(["left behind"]), 0.01)

    asyncio.run(leave_while_embedding())
    finished = local._pool.submit(lambda: None)  # queued behind the held batch
    gated.release.set()  # the batch ends after its loop has closed
    finished.result(timeout=10)
    assert_close(asyncio.run(local.embed(["next"])), embedder.embed_sync(["next"]))
    assert gated.batches == [["left behind"], ["next"]]
    asyncio.run(local.aclose())


async def test_a_lone_question_is_not_held_behind_a_long_call(
    solo: LocalEmbedder, embedder: LocalEmbedder
) -> None:
    gated = Gated(solo)
    chunks = [f"chunk {n} of a long document" for n in range(100)]
    document = asyncio.create_task(solo.embed(chunks))
    await until(lambda: len(gated.batches) == 1)  # the first 32 chunks
    question = asyncio.create_task(solo.embed(["where is my parcel"]))
    await asyncio.sleep(0)
    gated.release.set()
    assert_close(await question, embedder.embed_sync(["where is my parcel"]))
    assert_close(await document, embedder.embed_sync(chunks))
    assert "where is my parcel" in gated.batches[1]
    assert [len(batch) for batch in gated.batches] == [32, 32, 32, 5]
