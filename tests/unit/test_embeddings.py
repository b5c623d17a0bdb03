"""The local embedder on the real packaged model: vector shape, meaning, batching, checks."""

import asyncio
import hashlib
import math
import shutil
from collections.abc import Iterator

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
