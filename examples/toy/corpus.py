"""The toy training corpus as a user's dataset looks: JSONL files of image paths and captions, written once.

A FIXED corpus (``drawings`` drawings of each of the 150 combinations, explicit captions only, PNG files) trained for
several epochs, a validation file for ``slq-hf train --eval-data`` (one other drawing per combination, explicit
captions) and the held-out test split (``heldout_scenes()``) once with explicit and once with knowledge captions.
Knowledge captions are never used in training or model selection. Everything is a pure function of the seeds.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from slq_hf.testing.toy_scenes import TRAIN_SEED, combinations, heldout_scenes, scene_for

DRAWINGS_PER_COMBINATION = 64
VALIDATION_SEED = 2_000_003  # a stream neither the corpus (TRAIN_SEED) nor the test split (HELDOUT_SEED) uses


def write_corpus(folder: str | os.PathLike, drawings: int = DRAWINGS_PER_COMBINATION) -> dict[str, Path]:
    """Write train/validation/test JSONL files and their PNGs into ``folder`` once (reused when present).

    Returns:
        {"train", "validation", "test_caption", "test_knowledge"} -> JSONL path.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"train": folder / "train.jsonl", "validation": folder / "validation.jsonl",
             "test_caption": folder / "test_caption.jsonl", "test_knowledge": folder / "test_knowledge.jsonl"}
    stamp = folder / "corpus.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("drawings") == drawings and all(
            path.is_file() for path in files.values()):
        return files
    (folder / "images").mkdir(exist_ok=True)
    rng = random.Random(TRAIN_SEED)
    lines = []
    for round_ in range(drawings):
        for index, combination in enumerate(combinations()):
            scene = scene_for(combination, rng)
            name = f"images/train_{round_:02d}_{index:03d}.png"
            scene.image.save(folder / name)
            lines.append({"image": name, "text": scene.caption})
    _write_jsonl(files["train"], lines)
    rng = random.Random(VALIDATION_SEED)
    lines = []
    for index, combination in enumerate(combinations()):
        scene = scene_for(combination, rng)
        name = f"images/validation_{index:03d}.png"
        scene.image.save(folder / name)
        lines.append({"image": name, "text": scene.caption})
    _write_jsonl(files["validation"], lines)
    captions, knowledge = [], []
    for index, scene in enumerate(heldout_scenes()):
        name = f"images/test_{index:03d}.png"
        scene.image.save(folder / name)
        captions.append({"image": name, "text": scene.caption})
        knowledge.append({"image": name, "text": scene.knowledge_caption})
    _write_jsonl(files["test_caption"], captions)
    _write_jsonl(files["test_knowledge"], knowledge)
    stamp.write_text(json.dumps({"drawings": drawings}) + "\n")
    return files


def _write_jsonl(path: Path, lines: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    os.replace(tmp, path)
