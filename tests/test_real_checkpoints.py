"""Real checkpoints from the Hub (GPU recommended). Marked `slow`: deselected by default, run with

    HF_HUB_OFFLINE=0 .venv/bin/pytest -m slow tests/test_real_checkpoints.py

They need the Hub (tests/conftest.py defaults to offline, hence HF_HUB_OFFLINE=0) or a warm HF cache, and skip
with the reason when the model cannot be loaded. These were NOT run on the CPU-only development machine.
Without the Hub and without a cached copy they skip at once: one short probe of the Hub replaces each load's
network retries (about a minute per test otherwise).
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
from huggingface_hub import constants, get_session, try_to_load_from_cache
from PIL import Image

import slq_hf.processing
from slq_hf import SLQModel

pytestmark = pytest.mark.slow

BACKBONES = ["Qwen/Qwen3-VL-2B-Instruct", "OpenGVLab/InternVL3-1B-hf", "HuggingFaceTB/SmolVLM-256M-Instruct"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@functools.cache
def _hub_unreachable() -> str | None:
    """Why the Hub cannot be used here, or None when it answers. One HEAD request with a short timeout and no
    retries, through huggingface_hub's own HTTP session (so proxies and HF_ENDPOINT apply)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").upper() in {"1", "ON", "YES", "TRUE"}:
        return "HF_HUB_OFFLINE is set (tests/conftest.py's default; run with HF_HUB_OFFLINE=0 to download)"
    try:
        get_session().head(constants.ENDPOINT, timeout=5)
    except Exception as err:  # any transport error (DNS, refused, timeout, proxy) means: no Hub from here
        return f"{constants.ENDPOINT} is unreachable ({type(err).__name__}: {err})"
    return None


def _load(name: str, **kwargs) -> SLQModel:
    cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    reason = _hub_unreachable()
    if reason and not cached:
        pytest.skip(f"{name} is not in the local Hugging Face cache and {reason}")
    try:
        return SLQModel.from_backbone(name, num_queries=40, dtype=torch.float32, device_map=DEVICE, **kwargs)
    except OSError as err:  # no network and no cache: say so instead of failing
        pytest.skip(f"cannot load {name} from the Hub here: {err}")


def _image() -> Image.Image:
    image = Image.new("RGB", (448, 336), (90, 140, 200))
    image.paste((230, 40, 40), (120, 90, 300, 250))
    return image


def _inputs() -> list:
    image = _image()
    return ["a red rectangle on a blue background", image, {"image": image, "text": "what colour is the shape?"}]


@pytest.mark.parametrize("name", BACKBONES)
def test_batch_equals_single_items(name):
    model = _load(name)
    inputs = _inputs()
    batched = model.encode(inputs, batch_size=len(inputs))
    singles = torch.cat([model.encode([x]) for x in inputs])
    torch.testing.assert_close(batched, singles, atol=1e-4, rtol=0)
    assert batched.shape == (3, model.config.hidden_size)


@pytest.mark.parametrize("name", BACKBONES)
def test_prefix_cache_equals_full_forward(name):
    model = _load(name)
    items = slq_hf.processing.to_items(_inputs())
    batch = slq_hf.processing.collate(model.processor, items)
    batch = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    results = {}
    for path in ("prefix_cache", "full"):
        model.config.training_path = path
        model.zero_grad()
        out = model(**batch)
        out.pooler_output.pow(2).sum().backward()  # any scalar that depends on every query
        results[path] = (out.pooler_output.detach(), model.queries.grad.clone())
    torch.testing.assert_close(results["prefix_cache"][0], results["full"][0], atol=1e-4, rtol=0)
    grad_full = results["full"][1]
    relative = (results["prefix_cache"][1] - grad_full).norm() / grad_full.norm()
    assert relative < 1e-3


def test_qwen3_vl_matches_reference_procedure():
    from test_core import _reference_qwen3_vl

    model = _load(BACKBONES[0])
    for value in _inputs():
        batch = slq_hf.processing.collate(model.processor, [slq_hf.processing.to_item(value)])
        batch = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with torch.no_grad():
            got = model(**batch).pooler_output
            expected = _reference_qwen3_vl(model, batch)
        torch.testing.assert_close(got, expected.to(got.device), atol=1e-4, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="4-bit on a 2B model is a GPU job")
def test_qwen3_vl_4bit_encode_and_grad():
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    try:
        model = SLQModel.from_backbone(BACKBONES[0], num_queries=40, quantization_config=quant, device_map="cuda")
    except OSError as err:
        pytest.skip(f"cannot load {BACKBONES[0]}: {err}")
    assert model.queries.dtype == torch.float32
    emb = model.encode(_inputs())
    assert torch.isfinite(emb).all()
    batch = slq_hf.processing.collate(model.processor, [slq_hf.processing.to_item("a cat")])
    batch = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    model(**batch).pooler_output.sum().backward()
    assert model.queries.grad is not None and model.queries.grad.abs().sum() > 0


def test_qwen3_vl_generate_unchanged_by_slq():
    from transformers import AutoModelForImageTextToText

    model = _load(BACKBONES[0])
    plain = AutoModelForImageTextToText.from_pretrained(BACKBONES[0], dtype=torch.float32, device_map=DEVICE)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Name three colours."}]}]
    prompt = model.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True, return_tensors="pt").to(model.device)
    model.encode(_inputs())  # the hook has been active: it must be inert again
    ours = model.backbone.generate(**prompt, max_new_tokens=12, do_sample=False)
    theirs = plain.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(ours, theirs)
