"""`strata documents`: a tenant's knowledge collections (KnowledgeService).

    strata documents ingest COLLECTION PATH...    .txt/.md files, or directories of them
    strata documents list COLLECTION
    strata documents delete COLLECTION ID...
    strata documents search COLLECTION QUERY [--top-k 4] [--min-score 0.3]

`ingest` makes each file a document: its id is the file's stem (`--id-from path`: its path
under the directory given, or as given for a file), its version the SHA-256 of its text
(`--version` sets one for all). Documents go in batches, each one UpsertDocuments call whose
request id is derived from the batch, so running the same ingest again stores nothing twice.
Progress goes to stderr: a bar redrawn in place on a terminal, one line per batch otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import grpc

from strata.orchestrator.v1 import knowledge_pb2, knowledge_pb2_grpc
from strata_cli.client import (
    Metadata,
    add_orchestrator_arguments,
    call_orchestrator,
    message_dict,
    print_json,
    usage_error,
)

SUFFIXES = (".txt", ".md")
MAX_BATCH_DOCUMENTS = 1000
"""The most documents UpsertDocuments takes in one call."""
MAX_BATCH_BYTES = 2 * 1024 * 1024
"""Text per call, well under gRPC's default 4 MiB message limit."""
TIMEOUT_S = 600.0


@dataclass(frozen=True, slots=True)
class LocalDocument:
    """A file to ingest as a document."""

    id: str
    version: str
    text: str
    path: Path


class IngestError(Exception):
    """The paths given cannot be ingested; the message says why."""


def document_files(paths: Sequence[Path]) -> Iterator[tuple[Path, str]]:
    """Each file to ingest with its path for `--id-from path`: a file as given, the .txt and
    .md files under a directory (sorted) relative to it."""
    for path in paths:
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                if file.suffix.lower() in SUFFIXES:
                    yield file, file.relative_to(path).with_suffix("").as_posix()
        elif path.is_file():
            yield path, path.with_suffix("").as_posix()
        else:
            raise IngestError(f"{path}: no such file or directory")


def collect_documents(
    paths: Sequence[Path], id_from: str = "stem", version: str | None = None
) -> list[LocalDocument]:
    """The documents the paths hold; IngestError on a missing path, an unreadable or empty
    file, or two files with the same id."""
    documents: dict[str, LocalDocument] = {}
    for file, relative in document_files(paths):
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise IngestError(f"{file}: {err}") from err
        if not text.strip():
            raise IngestError(f"{file}: the file is empty")
        doc_id = file.stem if id_from == "stem" else relative
        if doc_id in documents:
            raise IngestError(
                f"{file} and {documents[doc_id].path} would both be document {doc_id!r}"
                + (" (try --id-from path)" if id_from == "stem" else "")
            )
        digest = version or hashlib.sha256(text.encode()).hexdigest()[:16]
        documents[doc_id] = LocalDocument(doc_id, digest, text, file)
    if not documents:
        raise IngestError("no .txt or .md files in " + ", ".join(str(p) for p in paths))
    return list(documents.values())


def batches(
    documents: Iterable[LocalDocument],
    max_documents: int = 50,
    max_bytes: int = MAX_BATCH_BYTES,
) -> Iterator[list[LocalDocument]]:
    """Consecutive batches of at most `max_documents` and (but for a single large document)
    `max_bytes` of text."""
    batch: list[LocalDocument] = []
    size = 0
    for document in documents:
        length = len(document.text.encode())
        if batch and (len(batch) >= max_documents or size + length > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(document)
        size += length
    if batch:
        yield batch


def batch_request_id(collection: str, batch: Sequence[LocalDocument]) -> str:
    """The same batch of the same versions gets the same request id."""
    digest = hashlib.sha256(collection.encode())
    for document in batch:
        digest.update(f"\0{document.id}\0{document.version}".encode())
    return "ingest-" + digest.hexdigest()[:32]


def progress_line(done: int, total: int, chunks: int, width: int = 30) -> str:
    """`[#######-------]  12/40 documents, 96 chunks`."""
    filled = width * done // total if total else width
    return (
        f"[{'#' * filled}{'-' * (width - filled)}] {done:>{len(str(total))}}/{total} documents,"
        f" {chunks} chunks"
    )


class Progress:
    """Ingest progress on a stream: redrawn in place on a terminal, a line per batch else."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total = total
        self.stream = stream
        self.interactive = stream.isatty()
        self._drawn = False

    def update(self, done: int, chunks: int) -> None:
        if self.interactive:
            self.stream.write("\r" + progress_line(done, self.total, chunks))
            self.stream.flush()
            self._drawn = True

    def batch_done(self, number: int, batches: int, done: int, chunks: int) -> None:
        if not self.interactive:
            print(
                f"batch {number}/{batches}: {done}/{self.total} documents, {chunks} chunks",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        """Ends the line the bar is on (before a message or the result)."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds `strata documents` and its subcommands."""
    documents = commands.add_parser("documents", help="ingest, list, delete, search documents")
    verbs = documents.add_subparsers(dest="verb", required=True)

    ingest = verbs.add_parser("ingest", help="store .txt/.md files as documents")
    ingest.add_argument("collection")
    ingest.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    ingest.add_argument(
        "--id-from",
        choices=("stem", "path"),
        default="stem",
        help="document id: the file's stem (default) or its path without the suffix",
    )
    ingest.add_argument("--version", help="version of every document (default: content hash)")
    ingest.add_argument("--batch-size", type=int, default=50, help="documents per call")
    ingest.set_defaults(run=run_ingest)

    listing = verbs.add_parser("list", help="a collection's documents")
    listing.add_argument("collection")
    listing.set_defaults(run=run_list)

    delete = verbs.add_parser("delete", help="delete documents")
    delete.add_argument("collection")
    delete.add_argument("ids", nargs="+", metavar="ID")
    delete.add_argument("--request-id", default="", help="idempotency id")
    delete.set_defaults(run=run_delete)

    search = verbs.add_parser("search", help="the chunks closest to a query")
    search.add_argument("collection")
    search.add_argument("query", nargs="+")
    search.add_argument("--top-k", type=int, default=4)
    search.add_argument("--min-score", type=float, default=0.0)
    search.set_defaults(run=run_search)

    for verb in (ingest, listing, delete, search):
        add_orchestrator_arguments(verb)


def _stub(channel: grpc.Channel) -> knowledge_pb2_grpc.KnowledgeServiceStub:
    return knowledge_pb2_grpc.KnowledgeServiceStub(channel)


def run_ingest(args: argparse.Namespace) -> int:
    """`strata documents ingest`."""
    if not 1 <= args.batch_size <= MAX_BATCH_DOCUMENTS:
        return usage_error(f"--batch-size must be 1 to {MAX_BATCH_DOCUMENTS}")
    try:
        documents = collect_documents(args.paths, args.id_from, args.version)
    except IngestError as err:
        return usage_error(str(err))
    groups = list(batches(documents, args.batch_size))
    progress = Progress(len(documents), sys.stderr)

    def ingest(channel: grpc.Channel, metadata: Metadata) -> int:
        stub = _stub(channel)
        stored, chunks = 0, 0
        try:
            progress.update(0, 0)
            for number, batch in enumerate(groups, 1):
                request = knowledge_pb2.UpsertDocumentsRequest(
                    request_id=batch_request_id(args.collection, batch),
                    collection=args.collection,
                    documents=[
                        knowledge_pb2.Document(id=d.id, version=d.version, text=d.text)
                        for d in batch
                    ],
                )
                batch_done, batch_chunks = 0, 0
                for step in stub.UpsertDocuments(request, metadata=metadata, timeout=TIMEOUT_S):
                    batch_done, batch_chunks = step.done, step.chunks
                    progress.update(stored + batch_done, chunks + batch_chunks)
                stored += batch_done
                chunks += batch_chunks
                progress.batch_done(number, len(groups), stored, chunks)
        finally:
            progress.close()
        if args.json:
            print_json(
                {
                    "collection": args.collection,
                    "documents": [
                        {"id": d.id, "version": d.version, "path": str(d.path)} for d in documents
                    ],
                    "stored": stored,
                    "chunks": chunks,
                }
            )
        else:
            print(f"stored {stored} documents ({chunks} chunks) in {args.collection}")
        return 0

    return call_orchestrator(args, ingest)


def list_documents(
    stub: knowledge_pb2_grpc.KnowledgeServiceStub, collection: str, metadata: Metadata
) -> list[knowledge_pb2.DocumentInfo]:
    """Every document of the collection, all pages."""
    found: list[knowledge_pb2.DocumentInfo] = []
    token = ""
    while True:
        page = stub.ListDocuments(
            knowledge_pb2.ListDocumentsRequest(
                collection=collection, page_size=1000, page_token=token
            ),
            metadata=metadata,
            timeout=30,
        )
        found.extend(page.documents)
        token = page.next_page_token
        if not token:
            return found


def format_documents(documents: Sequence[knowledge_pb2.DocumentInfo]) -> str:
    """One line a document: id, version, chunks, update time."""
    if not documents:
        return "(no documents)"
    width = max(len(d.id) for d in documents) + 2
    lines = []
    for d in documents:
        updated = d.update_time.ToJsonString() if d.HasField("update_time") else "-"
        lines.append(f"{d.id:<{width}}{d.version:<18}{d.chunks:>5} chunks  {updated}")
    return "\n".join(lines)


def run_list(args: argparse.Namespace) -> int:
    """`strata documents list`."""

    def body(channel: grpc.Channel, metadata: Metadata) -> int:
        documents = list_documents(_stub(channel), args.collection, metadata)
        if args.json:
            data = message_dict(knowledge_pb2.ListDocumentsResponse(documents=documents))
            data.setdefault("documents", [])
            print_json(data)
        else:
            print(format_documents(documents))
        return 0

    return call_orchestrator(args, body)


def run_delete(args: argparse.Namespace) -> int:
    """`strata documents delete`."""

    def body(channel: grpc.Channel, metadata: Metadata) -> int:
        request_id = args.request_id or uuid.uuid4().hex
        reply = _stub(channel).DeleteDocuments(
            knowledge_pb2.DeleteDocumentsRequest(
                request_id=request_id, collection=args.collection, document_ids=args.ids
            ),
            metadata=metadata,
            timeout=30,
        )
        if args.json:
            print_json({"deleted": reply.deleted})
        else:
            print(f"deleted {reply.deleted} of {len(args.ids)} documents")
        return 0

    return call_orchestrator(args, body)


def format_hits(hits: Sequence[knowledge_pb2.SearchHit], width: int = 200) -> str:
    """Each hit: its score and where it is, then the start of its text."""
    if not hits:
        return "(no matches)"
    lines = []
    for hit in hits:
        text = " ".join(hit.text.split())
        if len(text) > width:
            text = text[: width - 1] + "…"
        lines.append(f"{hit.score:.3f}  {hit.document_id}@{hit.version} chunk {hit.chunk}")
        lines.append(f"       {text}")
    return "\n".join(lines)


def run_search(args: argparse.Namespace) -> int:
    """`strata documents search`."""

    def body(channel: grpc.Channel, metadata: Metadata) -> int:
        reply = _stub(channel).Search(
            knowledge_pb2.SearchRequest(
                collection=args.collection,
                query=" ".join(args.query),
                top_k=args.top_k,
                min_score=args.min_score,
            ),
            metadata=metadata,
            timeout=30,
        )
        if args.json:
            data = message_dict(reply)
            data.setdefault("hits", [])
            print_json(data)
        else:
            print(format_hits(reply.hits))
        return 0

    return call_orchestrator(args, body)
