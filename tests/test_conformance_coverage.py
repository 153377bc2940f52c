"""What a pass covers: at the ``ci`` profile, every special value and boundary class a suite declares is drawn.

Inputs are drawn without a backend (:func:`hal.conformance.core.draw_only`: the same examples as a passing run,
each cell with its own seed). A class counts for an operator when some cell declaring it drew it: the rare
classes (an empty input in one example of eight) are certain across an operator's cells, not in each cell."""

from __future__ import annotations

from typing import Dict, Set

import pytest

from hal.conformance.core import Coverage, cell_seed, cells, draw_only, suites

DECLARING = sorted(op for op, s in suites().items() if s.special or s.boundary)


@pytest.mark.parametrize("op", DECLARING)
def test_every_declared_class_is_drawn_at_the_ci_profile(op):
    s = suites()[op]
    declared: Set[str] = set()
    seen: Dict[str, int] = {}
    for features in cells(op):
        want = {f"{kind}:{c}" for kind, classes in s.declared(features).items() for c in classes}
        covered = draw_only(op, features, profile="ci", seed=0)
        assert covered.examples == 30, covered.examples
        declared |= want
        for kind in ("special", "boundary"):
            for c, n in getattr(covered, kind).items():
                if f"{kind}:{c}" in want:
                    seen[f"{kind}:{c}"] = seen.get(f"{kind}:{c}", 0) + n
    assert declared, f"{op} declares no class"
    assert not declared - set(seen), f"{op}: never drawn at the ci profile: {sorted(declared - set(seen))}"


def test_coverage_records_ranges_and_classes():
    c = Coverage()
    c.note(tokens=5, special=("nan",), boundary=("T=1", "T=1"))
    c.note(tokens=600, boundary=("T:tail",))
    assert c.to_json()["ranges"] == {"tokens": [5, 600]}
    assert c.special == {"nan": 1} and c.boundary == {"T=1": 1, "T:tail": 1}
    assert c.missing({"special": ("nan", "inf"), "boundary": ("T=0",)}) == ["boundary:T=0", "special:inf"]


def test_each_cell_draws_its_own_inputs():
    cid = "topk_routing[scoring=softmax,bias=false,group_limited=false,renormalize=true,dtype=bfloat16]"
    assert cell_seed(0, cid) == cell_seed(0, cid) != cell_seed(1, cid)
    assert cell_seed(0, cid) != cell_seed(0, cid.replace("bfloat16", "float16"))
    a, b = (draw_only("hash_routing", f, profile="quick", seed=0) for f in cells("hash_routing")[:2])
    assert a.to_json() != b.to_json()
