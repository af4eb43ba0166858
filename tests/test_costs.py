"""The cost model: every cost named, sourced and overridable; bad overrides refused."""

import pytest

from tdpsim.costs import COST_TABLE, CostModel, parse_cost_option


def test_every_cost_has_a_positive_default_and_a_source():
    assert len(COST_TABLE) >= 15
    for c in COST_TABLE.values():
        assert c.default_ns >= 1 and c.source and c.what


def test_anchors_from_workloads_md():
    m = CostModel()
    assert m.spte_zap_4k == 52
    assert 1_200 <= m.fault_4k <= 1_500
    assert m.split_spte == 61 and not hasattr(m, "split_table")


def test_every_cost_is_charged_somewhere():
    """A cost nothing reads is a knob that does nothing: each is read as ``.name`` by some
    module of the model."""
    import pathlib
    import re
    import tdpsim
    root = pathlib.Path(tdpsim.__file__).parent
    text = "\n".join(p.read_text() for p in root.rglob("*.py") if p.name != "costs.py")
    unused = [n for n in COST_TABLE if not re.search(rf"\.{n}\b", text)]
    assert unused == []


def test_override_and_refusals():
    m = CostModel({"spte_zap_4k": 60})
    assert m.spte_zap_4k == 60 and m.overrides == {"spte_zap_4k": 60}
    with pytest.raises(ValueError, match="unknown cost"):
        CostModel({"nope": 1})
    with pytest.raises(ValueError, match=">= 1"):
        CostModel({"spte_zap_4k": 0})
    assert parse_cost_option("fault_4k=1400") == ("fault_4k", 1400)
    for bad in ("fault_4k", "fault_4k=x", "fault_4k=0", "x=1"):
        with pytest.raises(ValueError):
            parse_cost_option(bad)
