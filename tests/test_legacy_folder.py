"""Folders written before the LatentQueries refactor load with the current code and embed identically (to 1e-6:
the same code in another process already differs by ~6e-8 in fp32).

The folders in tests/fixtures/legacy_slq* and the embeddings next to them were written by the old code
(tests/fixtures/legacy_make_fixture.py says how); nothing here recomputes the expected values.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slq_hf import SLQModel

FIXTURES = Path(__file__).parent / "fixtures"
BACKBONE = Path(__file__).parents[1] / "examples" / "toy" / "backbone"


def _inputs(folder: Path) -> list:
    def resolve(item):
        if isinstance(item, dict):
            return {k: resolve(v) for k, v in item.items()}
        return str(FIXTURES / item) if item.endswith(".png") else item

    return [resolve(i) for i in json.loads((folder / "inputs.json").read_text())]


@pytest.mark.parametrize("name", ["legacy_slq", "legacy_slq_head"])
def test_legacy_folder_embeds_identically(name):
    folder = FIXTURES / name
    expected = load_file(str(folder / "embeddings.safetensors"))
    model = SLQModel.from_pretrained(folder, backbone_name_or_path=str(BACKBONE), dtype=torch.float32)
    inputs = _inputs(folder)
    torch.testing.assert_close(model.encode(inputs, batch_size=2), expected["active"], rtol=0, atol=1e-6)
    sets = [k[len("set_"):] for k in expected if k.startswith("set_")]
    if sets:
        assert sorted(model.query_sets) == sorted(sets)
        got = model.encode(inputs, batch_size=2, query_sets=sets)
        for set_name in sets:
            torch.testing.assert_close(got[set_name], expected[f"set_{set_name}"], rtol=0, atol=1e-6)


def test_legacy_folder_keeps_active_set_and_sizes():
    model = SLQModel.from_pretrained(FIXTURES / "legacy_slq", backbone_name_or_path=str(BACKBONE),
                                     dtype=torch.float32)
    assert model.active_query_set == "query"
    assert {n: model.get_query_set(n).shape[0] for n in model.query_sets} == {"default": 4, "query": 3,
                                                                               "document": 5}
