"""``hal conformance``: reports, capability awareness, waivers, crash and hang isolation, resuming,
EMULATED labelling, exit status, and the pytest entry point."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hal.conformance import runner
from helpers import ACME_BACKEND, ACME_PLUGIN, plugin_source

GG_CELLS = 24  # meaningful grouped_gemm cells (see conformance/suites/grouped_gemm.py)


def opts(tmp_path, backend="cpu", **kw):
    kw.setdefault("ops", ["grouped_gemm"])
    kw.setdefault("profile", "quick")
    kw.setdefault("seed", 1)
    return runner.Options(backend=backend, report_dir=tmp_path / "report", **kw)


def run_quietly(o):
    import io
    out = io.StringIO()
    data = runner.run(o, out=out)
    return data, out.getvalue()


@pytest.fixture
def on_path(site, monkeypatch):
    """Fake distributions visible to worker processes too."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site.root), os.environ.get("PYTHONPATH", "")]))
    return site


def test_cpu_run_writes_both_reports(tmp_path):
    data, text = run_quietly(opts(tmp_path, isolate=False))
    assert data["conforms"] and data["summary"]["pass"] == GG_CELLS
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["meta"]["backend"] == "cpu" and saved["meta"]["seed"] == 1 and saved["meta"]["profile"] == "quick"
    assert "torch" in saved["meta"]["versions"]
    cell = saved["cells"][0]
    assert cell["examples"] == 4 and cell["stats"]["y"]["checked"] > 0
    assert {"max_abs", "max_rel", "tolerance_used", "max_ulps"} <= set(cell["stats"]["y"])
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## grouped_gemm" in md and "| layout | x_dtype | w_dtype | out_dtype | result |" in md
    assert "seed 1" in text and "CONFORMS" in text


def test_unsupported_cells_are_reported_not_failed(on_path, tmp_path):
    on_path.install("acme-hal", {"acme": "acme_plugin"}, {"acme_plugin": ACME_PLUGIN, "acme_backend": ACME_BACKEND})
    data, _ = run_quietly(opts(tmp_path, backend="acme", isolate=False))
    statuses = {c["id"]: c["status"] for c in data["cells"]}
    f32 = "grouped_gemm[layout=contiguous,x_dtype=float32,w_dtype=float32,out_dtype=float32]"
    assert statuses[f32] == "pass"
    unsupported = [c for c in data["cells"] if c["status"] == "unsupported"]
    assert len(unsupported) == GG_CELLS - 2  # acme serves fp32 x fp32 in both layouts
    assert "x_dtype=bfloat16 is not supported" in next(c["message"] for c in unsupported
                                                       if c["features"]["x_dtype"] == "bfloat16")
    assert data["conforms"]


CRASHY = """
    import os, time, hal
    from hal.backends.cpu.backend import CpuBackend
    from hal.ops.grouped_gemm import grouped_gemm as GG
    class Crashy(CpuBackend):
        def __init__(self):
            super().__init__()
            self.add_implementation("grouped_gemm", self.gg)
        def gg(self, x, w, group_sizes, *, layout="contiguous", x_scale=None, w_scale=None, out_dtype=None):
            if layout == "masked" and str(x.dtype) == "torch.float16" and str(w.dtype) == "torch.float16":
                os._exit(3)                      # a vendor kernel taking the process down
            if layout == "masked" and str(x.dtype) == "torch.float32" and str(w.dtype) == "torch.float32":
                time.sleep(600)                  # a kernel that never returns
            return GG.reference_impl(x, w, group_sizes, layout=layout, x_scale=x_scale, w_scale=w_scale,
                                     out_dtype=out_dtype)
"""


def test_crashes_and_hangs_are_recorded_and_the_run_goes_on(on_path, tmp_path):
    on_path.install("crashy-hal", {"crashy": "crashy_plugin"}, {
        "crashy_plugin": plugin_source("crashy", "crashy_backend:Crashy"), "crashy_backend": CRASHY})
    data, text = run_quietly(opts(tmp_path, backend="crashy", timeout=10, ops=[
        "grouped_gemm[layout=masked,x_dtype=float16,w_dtype=float16", "grouped_gemm[layout=masked,x_dtype=float32"]))
    statuses = {c["id"]: c for c in data["cells"]}
    crashed = statuses["grouped_gemm[layout=masked,x_dtype=float16,w_dtype=float16,out_dtype=float16]"]
    hung = statuses["grouped_gemm[layout=masked,x_dtype=float32,w_dtype=float32,out_dtype=float32]"]
    assert crashed["status"] == "crashed" and "exit code 3" in crashed["message"]
    assert hung["status"] == "timeout"
    assert data["summary"]["pass"] == 2, text  # the other two masked float32 cells, after the hang
    assert not data["conforms"]


def test_resume_runs_only_the_missing_cells(tmp_path):
    run_quietly(opts(tmp_path, isolate=False))
    results = tmp_path / "report" / "results.jsonl"
    lines = results.read_text().splitlines()
    results.write_text("\n".join(lines[:-3]) + "\n")
    data, text = run_quietly(opts(tmp_path, isolate=False, resume=True, seed=None))
    assert f"resuming: {GG_CELLS - 3} cells already done" in text
    assert text.count("PASS") == 3
    assert data["summary"]["pass"] == GG_CELLS and data["meta"]["seed"] == 1


def test_waivers_from_a_file_and_stale_waivers(tmp_path):
    waivers = tmp_path / "waivers.toml"
    waivers.write_text('[waivers]\n"grouped_gemm[layout=masked" = "masked layout lands in release 2 (JIRA-12)"\n'
                       '"no_such_op[" = "stale"\n')
    data, _ = run_quietly(opts(tmp_path, isolate=False, waivers=waivers))
    waived = [c for c in data["cells"] if c["status"].startswith("waived")]
    assert len(waived) == 12 and all("JIRA-12" in c["message"] for c in waived)
    assert data["stale_waivers"] == ["no_such_op["]
    assert "Waivers that matched no cell" in (tmp_path / "report" / "report.md").read_text()


def test_emulated_backends_are_labelled_everywhere(on_path, tmp_path):
    on_path.install("emu-hal", {"emu": "emu_plugin"}, {
        "emu_plugin": plugin_source("emu", "hal.backends.cpu.backend:CpuBackend", emulated=True)})
    data, text = run_quietly(opts(tmp_path, backend="emu", isolate=False, ops=["grouped_gemm"]))
    assert data["meta"]["emulated"] is True
    assert "[EMULATED" in text and "CONFORMS (EMULATED)" in text
    assert "**EMULATED**" in (tmp_path / "report" / "report.md").read_text()


WRONG = """
    import hal
    from hal.backends.cpu.backend import CpuBackend
    class Wrong(CpuBackend):
        def __init__(self):
            super().__init__()
            self.add_implementation("grouped_gemm", self.gg)
        def gg(self, x, w, group_sizes, *, layout="contiguous", x_scale=None, w_scale=None, out_dtype=None):
            return (x.float() @ w[0].float().T).to(x.dtype) if layout == "contiguous" else x[..., :1] * 0
"""


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "hal.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_cli_exit_status(on_path, tmp_path):
    on_path.install("wrong-hal", {"wrong": "wrong_plugin"}, {
        "wrong_plugin": plugin_source("wrong", "wrong_backend:Wrong"), "wrong_backend": WRONG})
    bad = _cli("conformance", "--backend", "wrong", "--ops", "grouped_gemm[layout=contiguous,x_dtype=float32",
               "--profile", "quick", "--seed", "1",
               "--in-process", "--report", str(tmp_path / "r1"), cwd=tmp_path)
    assert bad.returncode == 1 and "DOES NOT CONFORM" in bad.stdout
    missing = _cli("conformance", "--backend", "nonesuch", cwd=tmp_path)
    assert missing.returncode == 2 and "no backend named 'nonesuch'" in missing.stderr


def test_pytest_entry_point(on_path, tmp_path):
    on_path.install("acme-hal", {"acme": "acme_plugin"}, {"acme_plugin": ACME_PLUGIN, "acme_backend": ACME_BACKEND})
    proc = subprocess.run([sys.executable, "-m", "pytest", "--pyargs", "hal.conformance", "--hal-backend", "acme",
                           "--hal-ops", "grouped_gemm", "--hal-profile", "quick", "-q", "-rs", "-p",
                           "no:cacheprovider"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "2 passed, 22 skipped" in proc.stdout
    assert "declared unsupported by 'acme'" in proc.stdout


def test_workers_import_the_same_hal_from_a_source_checkout(tmp_path, monkeypatch):
    """Run from a folder holding a ``hal/`` package (a source checkout): the workers must not pick it up."""
    (tmp_path / "hal").mkdir()
    (tmp_path / "hal" / "__init__.py").write_text("raise ImportError('the checkout shadowed the installed hal')\n")
    monkeypatch.chdir(tmp_path)
    data, _ = run_quietly(opts(tmp_path, ops=["moe_permute"]))
    assert data["conforms"] and data["summary"]["pass"] == 3
