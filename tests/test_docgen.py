"""The generated documentation (docs/operators.md, the mapping tables of docs/backends/*.md) equals what the
code generates: regenerate with ``python -m hal.docgen``."""

from __future__ import annotations

from pathlib import Path

import pytest

from hal import docgen
from hal.backends.ascend.backend import AscendBackend
from hal.backends.mlu.backend import MluBackend
from hal.contract import all_ops

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path, text", sorted(docgen.generated(ROOT).items()), ids=lambda v: getattr(v, "name", ""))
def test_committed_docs_equal_the_generated_text(path, text):
    assert path.read_text(encoding="utf-8") == text, f"{path} is stale: run python -m hal.docgen"


def test_check_mode_reports_a_stale_file(tmp_path, capsys):
    (tmp_path / "docs" / "backends").mkdir(parents=True)
    for page in ("ascend.md", "mlu.md"):
        (tmp_path / "docs" / "backends" / page).write_text(f"intro\n{docgen.BEGIN}\nold\n{docgen.END}\nrest\n")
    assert docgen.main(["--check", "--root", str(tmp_path)]) == 1
    assert "stale" in capsys.readouterr().out
    assert docgen.main(["--root", str(tmp_path)]) == 0
    page = (tmp_path / "docs" / "backends" / "mlu.md").read_text()
    assert page.startswith(f"intro\n{docgen.BEGIN}\n| contract |") and page.endswith(f"{docgen.END}\nrest\n")
    assert docgen.main(["--check", "--root", str(tmp_path)]) == 0


def test_operators_page_has_one_row_per_contract_and_links_files_that_exist():
    rows = [ln for ln in docgen.operators_page().splitlines() if ln.startswith("| `")]
    assert [r.split(" | ")[0][3:-1] for r in rows] == list(all_ops())
    for row in rows:
        for target in row.split("](")[1:]:
            assert (ROOT / "docs" / target.split(")")[0]).resolve().exists(), row


@pytest.mark.parametrize("backend", [AscendBackend, MluBackend])
def test_vendor_table_has_one_row_per_record_and_every_reason(backend):
    table = docgen.vendor_table(backend)
    for record in backend.mappings.values():
        row = next(ln for ln in table.splitlines() if ln.startswith(f"| `{record.op}` |"))
        assert all(f.reason.replace("|", "\\|") in row for f in record.fallbacks)
