"""Determinism: the same inputs give bitwise-identical embeddings on repeated CPU calls, and agree to <= 1e-5 across
batch sizes, input orders and padding sides. Hypothesis draws the batches (compositions of texts, images and
image+text pairs, text lengths, image sizes)."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import slq_hf.processing
from slq_hf import SLQModel

NUM_QUERIES = 4
TOLERANCE = 1e-5
WORDS = ["a", "red", "blue", "square", "circle", "on", "grey", "the", "left", "corner", "cat", "with", "nine", "lives"]
# derandomize: the same examples on every run, so CI failures reproduce; the property still covers many layouts.
HYPOTHESIS = settings(max_examples=20, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def model(tiny_backbone_path) -> SLQModel:
    slq = SLQModel.from_backbone(tiny_backbone_path("qwen3_vl"), num_queries=NUM_QUERIES)
    with torch.no_grad():
        torch.nn.init.normal_(slq.queries, std=0.5)  # distinct queries: a wrong row/order shows up
    return slq


@contextmanager
def padding_side(model: SLQModel, side: str):
    tokenizer = model.processor.tokenizer
    previous, tokenizer.padding_side = tokenizer.padding_side, side
    try:
        yield
    finally:
        tokenizer.padding_side = previous


# ---------------------------------------------------------------------------------------------------- strategies
def _image(width: int, height: int, colour: tuple[int, int, int], mode: str) -> Image.Image:
    image = Image.new("RGB", (width, height), (128, 128, 128))
    image.paste(colour, (width // 4, height // 4, max(width // 4 + 1, 3 * width // 4),
                         max(height // 4 + 1, 3 * height // 4)))
    return image.convert(mode) if mode != "RGB" else image


def sizes(largest: int):
    # Qwen-VL refuses aspect ratios above 200 (a documented SLQInputError, see test_inputs.py): stay below it here.
    return st.tuples(st.integers(1, largest), st.integers(1, largest)).filter(lambda s: max(s) / min(s) <= 200)


texts = st.lists(st.sampled_from(WORDS), min_size=1, max_size=40).map(" ".join)
colours = st.tuples(*[st.integers(0, 255)] * 3)
images = st.builds(lambda size, colour, mode: _image(*size, colour, mode), sizes(160), colours,
                   st.sampled_from(["RGB", "RGBA", "L"]))
items = st.one_of(texts, images, st.builds(lambda image, text: {"image": image, "text": text}, images, texts))
batches = st.lists(items, min_size=1, max_size=6)


def _alone(model: SLQModel, inputs: list) -> torch.Tensor:
    return torch.cat([model.encode([value]) for value in inputs])


# --------------------------------------------------------------------------------------------------------- tests
def test_repeated_calls_are_bitwise_identical(model):
    inputs = ["a red square", _image(64, 48, (255, 0, 0), "RGB"), {"image": _image(96, 64, (0, 0, 255), "RGB"),
                                                                     "text": "what shape?"}, "hello " * 30]
    first = model.encode(inputs, batch_size=2)
    for _ in range(2):
        assert torch.equal(model.encode(inputs, batch_size=2), first)
    # also with two threads (the machine's default), and with a freshly loaded copy of the same model
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two_threads = model.encode(inputs, batch_size=2)
        assert torch.equal(model.encode(inputs, batch_size=2), two_threads)
    finally:
        torch.set_num_threads(threads)
    assert (two_threads - first).abs().max() <= TOLERANCE


def test_saved_and_reloaded_model_is_bitwise_identical(model, tmp_path):
    from transformers import AutoModel

    inputs = ["a blue circle", _image(50, 70, (0, 200, 0), "RGB")]
    model.save_pretrained(tmp_path / "slq")
    reloaded = AutoModel.from_pretrained(tmp_path / "slq")
    assert torch.equal(reloaded.encode(inputs), model.encode(inputs))


@HYPOTHESIS
@given(batch=batches, batch_size=st.integers(1, 6), order=st.randoms(use_true_random=False),
       side=st.sampled_from(["left", "right"]))
def test_batch_size_order_and_padding_side_do_not_change_embeddings(model, batch, batch_size, order, side):
    reference = _alone(model, batch)
    permutation = list(range(len(batch)))
    order.shuffle(permutation)
    with padding_side(model, side):
        shuffled = model.encode([batch[i] for i in permutation], batch_size=batch_size)
    assert shuffled.shape == reference.shape
    assert (shuffled - reference[permutation]).abs().max() <= TOLERANCE


@HYPOTHESIS
@given(batch=batches)
def test_left_and_right_padded_forward_agree(model, batch):
    """At the forward level (one padded batch straight from the processor), the padding side does not matter: the
    model re-lays every row to left padding itself."""
    items = slq_hf.processing.to_items(batch)
    with torch.no_grad():
        outputs = {}
        for side in ("left", "right"):
            with padding_side(model, side):
                processed = slq_hf.processing.collate(model.processor, items)
            if len(batch) > 1 and processed["attention_mask"].min() == 0:
                pad_column = 0 if side == "left" else -1
                assert processed["attention_mask"][:, pad_column].min() == 0  # the processor did pad on that side
            outputs[side] = model(**processed).pooler_output
    assert (outputs["left"] - outputs["right"]).abs().max() <= TOLERANCE


@HYPOTHESIS
@given(text=texts, size=sizes(400))
def test_one_item_among_many_matches_it_alone(model, text, size):
    """An item's embedding does not depend on which other items share its batch (padding, image sizes)."""
    target = {"image": _image(*size, (10, 200, 30), "RGB"), "text": text}
    others = ["x", "a much longer text " * 12, _image(160, 32, (200, 0, 0), "RGB"), _image(8, 8, (0, 0, 0), "L")]
    alone = model.encode([target])
    together = model.encode([*others, target], batch_size=len(others) + 1)
    assert (together[-1:] - alone).abs().max() <= TOLERANCE
