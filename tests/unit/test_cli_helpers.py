"""The command line's pure helpers: files to documents, batches, progress, offline views."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from strata.orchestrator.v1 import jobs_pb2
from strata_cli.documents import (
    IngestError,
    LocalDocument,
    Progress,
    batch_request_id,
    batches,
    collect_documents,
    progress_line,
)
from strata_cli.jobs import format_job, generate_request
from strata_cli.templates import format_templates, load_templates

ROOT = Path(__file__).resolve().parents[2]


def _tree(tmp_path: Path) -> Path:
    (tmp_path / "a" / "guides").mkdir(parents=True)
    (tmp_path / "a" / "intro.md").write_text("Intro.")
    (tmp_path / "a" / "guides" / "setup.txt").write_text("Setup.")
    (tmp_path / "a" / "guides" / "image.png").write_bytes(b"\x89PNG")
    return tmp_path / "a"


def test_directories_give_their_txt_and_md_files_with_the_stem_or_path_as_id(
    tmp_path: Path,
) -> None:
    root = _tree(tmp_path)
    by_stem = collect_documents([root])
    assert [(d.id, d.path.name) for d in by_stem] == [("setup", "setup.txt"), ("intro", "intro.md")]
    assert [d.id for d in collect_documents([root], id_from="path")] == ["guides/setup", "intro"]


def test_the_version_is_the_content_hash_unless_given(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    first = {d.id: d.version for d in collect_documents([root])}
    (root / "intro.md").write_text("Intro, changed.")
    second = {d.id: d.version for d in collect_documents([root])}
    assert first["setup"] == second["setup"] and first["intro"] != second["intro"]
    assert {d.version for d in collect_documents([root], version="v7")} == {"v7"}


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"x/doc.md": "a", "y/doc.txt": "b"}, "would both be document 'doc' (try --id-from path)"),
        ({"empty.md": "  \n"}, "the file is empty"),
        ({"data.csv": "a,b"}, "no .txt or .md files"),
    ],
)
def test_paths_that_cannot_be_ingested_say_why(
    tmp_path: Path, files: dict[str, str], message: str
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    with pytest.raises(IngestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        collect_documents([tmp_path])


def test_a_missing_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="no such file or directory"):
        collect_documents([tmp_path / "missing.md"])


def _doc(doc_id: str, size: int) -> LocalDocument:
    return LocalDocument(doc_id, "v1", "x" * size, Path(doc_id))


def test_batches_hold_at_most_n_documents_and_m_bytes_but_never_split_one() -> None:
    docs = [_doc(str(i), 10) for i in range(5)]
    assert [len(b) for b in batches(docs, max_documents=2)] == [2, 2, 1]
    assert [len(b) for b in batches(docs, max_documents=10, max_bytes=25)] == [2, 2, 1]
    assert [len(b) for b in batches([_doc("big", 100)], max_bytes=10)] == [1]


def test_the_same_batch_gets_the_same_request_id() -> None:
    batch = [_doc("a", 1), _doc("b", 1)]
    assert batch_request_id("faq", batch) == batch_request_id("faq", list(batch))
    assert batch_request_id("faq", batch) != batch_request_id("other", batch)
    assert batch_request_id("faq", batch) != batch_request_id("faq", batch[:1])


def test_progress_line_and_the_two_ways_it_is_shown() -> None:
    assert progress_line(1, 4, 9, width=8) == "[##------] 1/4 documents, 9 chunks"
    assert progress_line(0, 0, 0, width=4) == "[####] 0/0 documents, 0 chunks"

    piped = io.StringIO()
    progress = Progress(4, piped)
    progress.update(1, 2)
    progress.batch_done(1, 2, 2, 5)
    progress.close()
    assert piped.getvalue() == "batch 1/2: 2/4 documents, 5 chunks\n"

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    progress = Progress(4, terminal)
    progress.update(1, 2)
    progress.batch_done(1, 2, 2, 5)
    progress.update(4, 9)
    progress.close()
    assert terminal.getvalue() == (
        "\r" + progress_line(1, 4, 2) + "\r" + progress_line(4, 4, 9) + "\n"
    )


def test_a_job_names_a_model_or_a_route() -> None:
    by_model = generate_request("hi", model=None, system="be brief", temperature=0)
    assert by_model.model == "mock-small" and not by_model.route
    assert [m.content for m in by_model.messages] == ["be brief", "hi"]
    assert by_model.params.HasField("temperature")
    by_route = generate_request("hi", route="support")
    assert (by_route.route, by_route.model) == ("support", "")


def test_a_failed_job_shows_its_error() -> None:
    job = jobs_pb2.Job(
        job_id="j1",
        state=jobs_pb2.JOB_STATE_FAILED,
        error=jobs_pb2.JobError(code="UNAVAILABLE", reason="PROVIDER_UNAVAILABLE", message="down"),
    )
    text = format_job(job)
    assert "state     FAILED" in text
    assert "error     UNAVAILABLE PROVIDER_UNAVAILABLE: down" in text


def test_the_shipped_templates_list_with_versions_in_order_and_their_variables() -> None:
    templates = load_templates(ROOT / "config" / "templates")
    versions = templates["support_answer"]
    assert [v.version for v in versions] == ["1", "2"]
    required = {v.name for v in versions[1].variables if v.required}
    assert required == {"question", "product"}
    text = format_templates(templates)
    assert '  @2     question*, product*, tone="friendly"' in text
