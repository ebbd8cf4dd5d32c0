"""The committed toy backbone (examples/toy/backbone), the scene generator and the demo's pieces at a tiny scale."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch

from slq_hf.testing import toy_scenes

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = ROOT / "examples" / "toy" / "backbone"


def _load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------------ scenes
def test_scenes_are_deterministic_and_the_split_is_fixed():
    first, second = toy_scenes.heldout_scenes(), toy_scenes.heldout_scenes()
    assert len(first) == 150
    assert [s.combination for s in first] == toy_scenes.combinations()
    assert all(a.image.tobytes() == b.image.tobytes() for a, b in zip(first, second))
    # One scene per combination: every caption (and every knowledge caption) names exactly one image.
    assert len({s.caption for s in first}) == len({s.knowledge_caption for s in first}) == 150
    a, b = toy_scenes.random_scene(random.Random(5)), toy_scenes.random_scene(random.Random(5))
    assert a.caption == b.caption and a.image.tobytes() == b.image.tobytes()
    # The training stream draws different pixels than the held-out split for the same combination.
    train = toy_scenes.scene_for(first[0].combination, random.Random(toy_scenes.TRAIN_SEED))
    assert train.image.tobytes() != first[0].image.tobytes()
    assert first[0].image.size == (toy_scenes.SIZE, toy_scenes.SIZE)


def test_knowledge_captions_use_only_facts():
    scene = toy_scenes.Scene("red", "triangle", "top left", image=None)
    assert scene.caption == "a red triangle in the top left"
    assert scene.knowledge_caption == "the shape with three corners and the colour of blood in the top left"
    # The knowledge caption names neither the colour nor the shape; the facts link them.
    assert "red" not in scene.knowledge_caption.split() and "triangle" not in scene.knowledge_caption.split()
    assert "a triangle is the shape with three corners" in toy_scenes.fact_lines()
    assert "red is the colour of blood" in toy_scenes.fact_lines()


# ---------------------------------------------------------------------------------------------------- backbone
def test_committed_backbone_files_are_small():
    files = [p for p in BACKBONE.iterdir() if p.is_file()]
    assert any(p.name.endswith(".safetensors") for p in files)
    too_big = {p.name: p.stat().st_size for p in files if p.stat().st_size >= 1_000_000}
    assert not too_big, f"repository rule: committed files < 1 MB; {too_big}"
    config = json.loads((BACKBONE / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl"


@pytest.fixture(scope="module")
def toy():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(BACKBONE, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(BACKBONE)


def test_backbone_captions_fresh_scenes(toy):
    model, processor = toy
    rng = random.Random(20_260_413)  # a stream used nowhere else: scenes the backbone never saw
    scenes = [toy_scenes.random_scene(rng) for _ in range(12)]
    messages = [[{"role": "user", "content": [{"type": "image", "image": s.image}]}] for s in scenes]
    batch = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt", processor_kwargs={"padding": True})
    with torch.inference_mode():
        tokens = model.generate(**batch, max_new_tokens=12, do_sample=False)
    captions = [c.strip() for c in processor.batch_decode(tokens[:, batch["input_ids"].shape[1]:],
                                                          skip_special_tokens=True)]
    exact = sum(c == s.caption for c, s in zip(captions, scenes))
    assert exact >= 10, list(zip(captions, [s.caption for s in scenes]))


# -------------------------------------------------------------------------------------------------------- demo
# peft reads a transformers property that is deprecated in transformers 5 (their notice, not ours).
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_demo_runs_at_a_tiny_scale(tmp_path, capsys):
    demo = _load_module(ROOT / "examples" / "demo.py", "slq_demo")
    config = demo.DemoConfig(steps=2, batch_size=8, eval_scenes=12, warmup=1, log_every=1, eval_steps=1, drawings=1,
                             out=str(tmp_path))
    summary = demo.run(config)
    rows = set(summary["rows"])
    assert {"zero-shot last token", "SLQ, random queries", "SLQ trained (frozen backbone)",
            "LoRA r=8 q,k,v,o, last token"} <= rows
    # the extra steps: SLQ's top 10 reranked by the backbone (with and without a rewrite), then corpus search
    assert any(name.startswith("SLQ + rerank top-10 (likelihood)") for name in rows), rows
    assert any("rewrites the text first" in name for name in rows), rows
    assert (tmp_path / "search" / "search_grid.png").stat().st_size > 0
    assert all(summary["reload_checks"].values()), summary["reload_checks"]
    assert (tmp_path / "modality_gap_slq.png").stat().st_size > 0
    saved = tmp_path / "slq-toy" / "model.safetensors"
    assert saved.stat().st_size < 20_000  # queries + temperature only, never the backbone
    stdout = capsys.readouterr().out
    assert "| SLQ trained (frozen backbone) |" in stdout
    # SLQ was trained by the product (`slq-hf train`), not by a loop of the demo's own
    assert "Plan: 150 training pairs" in stdout and "$ slq-hf train --backbone" in stdout
    assert json.loads((tmp_path / "slq-toy" / "training_summary.json").read_text())["steps"] == 2
