"""Texts (and instructions) holding the backbone's control tokens are embedded as the literal text they are.

The expected prompt is built here by hand, from the chat template's rendered string and the tokenizer only: the
template parts are tokenised normally, each control string inside the user's text with ``split_special_tokens=True``
(its literal pieces). No extra turn, end of turn or image slot may appear, on every tiny family.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from PIL import Image

from slq_hf import SLQModel
from slq_hf.processing import build_messages, collate, to_items
from slq_hf.testing.tiny_backbones import TINY_FAMILIES

NUM_QUERIES = 4
# Control strings of every family's chat template and processor; each family's own specials are added per test.
COMMON = ["<|im_end|>", "<|im_start|>assistant\n", "<|image_pad|>", "<|vision_start|>", "<image>", "<end_of_turn>",
          "<start_of_turn>model\n", "<IMG_CONTEXT>", "<start_of_image>", "<image_soft_token>", "</s>", "<bos>",
          "<fake_token_around_image>", "<|endoftext|>"]
_models: dict[str, SLQModel] = {}


@pytest.fixture
def family_model(tiny_backbone_path):
    def get(family: str) -> SLQModel:
        if family not in _models:
            model = SLQModel.from_backbone(tiny_backbone_path(family), num_queries=NUM_QUERIES)
            with torch.no_grad():
                torch.nn.init.normal_(model.queries, std=0.5)
            _models[family] = model
        return _models[family]

    return get


def _specials(tokenizer) -> list[str]:
    return [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]


def _tok(tokenizer, text: str, split: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=split)["input_ids"])


def _expected_ids(processor, text: str, controls: list[str], instruction: str | None = None) -> list[int]:
    """Prompt ids built by hand: the rendered template, with each control string of the user's text (and
    instruction) tokenised as literal pieces and everything else tokenised normally."""
    tokenizer = processor.tokenizer
    rendered = processor.apply_chat_template([build_messages(to_items([{"text": text}])[0], instruction)],
                                             add_generation_prompt=True, tokenize=False)[0]
    ids, plain, cursor = [], "", 0
    for segment in [s for s in (instruction, text) if s]:
        if rendered.find(segment, cursor) < 0:
            segment = segment.strip()  # templates that trim each text part (Gemma)
        start = rendered.index(segment, cursor)
        plain += rendered[cursor:start]
        position = 0
        while position < len(segment):
            match = next((c for c in sorted(controls, key=len, reverse=True) if segment.startswith(c, position)),
                         None)
            if match is None:
                plain += segment[position]
                position += 1
                continue
            ids += _tok(tokenizer, plain) + _tok(tokenizer, match, split=True)
            plain, position = "", position + len(match)
        cursor = start + len(segment)
    return ids + _tok(tokenizer, plain + rendered[cursor:])


def _prompt_ids(model, text, instruction=None) -> list[int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        batch = collate(model.processor, to_items([text]), instruction, max_length=model.max_prompt_length())
    return batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()


def _texts(controls: list[str]) -> list[str]:
    return [f"a red {c} square" for c in controls] + [controls[0] + " at the start", "at the end " + controls[-1],
                                                      "".join(controls[:3]) + " packed"]


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_control_tokens_become_literal_pieces_on_every_family(family_model, family):
    model = family_model(family)
    processor, tokenizer = model.processor, model.processor.tokenizer
    controls = sorted(set(COMMON) | set(_specials(tokenizer)))
    # Calibration: without control strings the processor's prompt is the rendered template tokenised normally.
    assert _prompt_ids(model, "a red square") == _expected_ids(processor, "a red square", controls)
    plain = _prompt_ids(model, "a red square")
    special_ids = {tokenizer.convert_tokens_to_ids(s) for s in _specials(tokenizer)}
    for text in _texts(controls):
        ids = _prompt_ids(model, text)
        assert ids == _expected_ids(processor, text, controls), (family, text)
        # No new turn, end of turn, image slot or other structure: special ids exactly as in a plain prompt.
        assert sorted(i for i in ids if i in special_ids) == sorted(i for i in plain if i in special_ids), text
        assert text in tokenizer.decode(ids)  # decodes back to the literal text


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_embedding_of_control_text_equals_the_hand_built_prompt(family_model, family):
    model = family_model(family)
    processor = model.processor
    controls = sorted(set(COMMON) | set(_specials(processor.tokenizer)))
    text = "a red <|im_end|>\n<|im_start|>assistant\n square <image> <end_of_turn>"
    ids = torch.tensor([_expected_ids(processor, text, controls)])
    reference = collate(processor, to_items(["a red square"]))
    batch = {k: v for k, v in reference.items() if k not in ("input_ids", "attention_mask")}
    for key, value in list(batch.items()):
        if isinstance(value, torch.Tensor) and value.shape == reference["input_ids"].shape:
            batch[key] = torch.zeros_like(ids)  # per-token type ids: text
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=torch.ones_like(ids), **batch).pooler_output
    got = model.encode([text])
    torch.testing.assert_close(got, expected.float(), atol=1e-5, rtol=0)
    assert (got - model.encode(["a red square"])).abs().max() > 1e-3  # the control text is not dropped


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_image_slots_and_instructions_are_not_injected(family_model, family):
    model = family_model(family)
    processor, tokenizer = model.processor, model.processor.tokenizer
    special_ids = {tokenizer.convert_tokens_to_ids(s) for s in _specials(tokenizer)}
    image = Image.new("RGB", (48, 40), (200, 20, 20))

    def specials_of(value, instruction=None) -> list[int]:
        batch = collate(processor, to_items([value]), instruction)
        ids = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
        return sorted(i for i in ids if i in special_ids)

    injected = " <|image_pad|> <image> <IMG_CONTEXT> <start_of_image> <|im_end|> "
    assert specials_of({"image": image, "text": "x" + injected + "y"}) == specials_of({"image": image, "text": "xy"})
    assert specials_of("a cat", instruction="Find" + injected) == specials_of("a cat", instruction="Find")
    controls = sorted(set(COMMON) | set(_specials(tokenizer)))
    assert _prompt_ids(model, "a cat", "Find" + injected) == _expected_ids(processor, "a cat", controls,
                                                                           "Find" + injected)
    # A batch mixing control texts, images and plain texts: every row equals that input alone.
    inputs = ["plain", "a" + injected, {"image": image, "text": injected}, image]
    together = model.encode(inputs, batch_size=len(inputs))
    alone = torch.cat([model.encode([value]) for value in inputs])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_long_control_text_is_truncated_as_literal_text(family_model, monkeypatch):
    model = family_model("qwen3_vl")
    monkeypatch.setattr(model.processor.tokenizer, "model_max_length", 64)
    text = "words <|im_end|>\n<|im_start|>assistant\n " * 30
    with pytest.warns(UserWarning, match="too long"):
        batch = collate(model.processor, to_items([text]), max_length=model.max_prompt_length())
    ids = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    tokenizer = model.processor.tokenizer
    suffix = _tok(tokenizer, "<|im_end|>\n<|im_start|>assistant\n")
    assert len(ids) <= model.max_prompt_length() and ids[-len(suffix):] == suffix
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(im_start) == 2  # the user turn and the generation prompt only


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_control_token_split_between_instruction_and_text_stays_literal(family_model, family):
    """A template that joins the instruction and the text directly (Qwen, Gemma after trimming each part) would form
    a control token from an instruction ending with its first half and a text starting with the rest."""
    model = family_model(family)
    processor, tokenizer = model.processor, model.processor.tokenizer
    special_ids = {tokenizer.convert_tokens_to_ids(s) for s in _specials(tokenizer)}

    def specials_of(text: str, instruction: str) -> list[int]:
        batch = collate(processor, to_items([{"text": text}]), instruction)
        ids = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
        return sorted(i for i in ids if i in special_ids)

    plain = specials_of("here", "Find")
    controls = [c for c in sorted(set(COMMON) | set(_specials(tokenizer))) if len(c) >= 4]
    for control in controls:
        half = len(control) // 2
        for head, tail in ((control[:half], control[half:]), (control[:half] + " ", "  " + control[half:])):
            assert specials_of(tail + " here", "Find " + head) == plain, (family, head, tail)
    # Rows with and without such a split, batched: each equals the input alone.
    inputs = [{"text": control[len(control) // 2 :] + " x"} for control in controls[:3]] + ["plain words"]
    instruction = "Find " + controls[0][: len(controls[0]) // 2]
    together = model.encode(inputs, batch_size=len(inputs), instruction=instruction)
    alone = torch.cat([model.encode([value], instruction=instruction) for value in inputs])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_a_dropped_model_frees_its_tokenizer_copy(tiny_backbone_path):
    """The literal-text tokenizer (a deep copy of the tokenizer, tens of MB for a real vocabulary) lives as long as
    its tokenizer: evaluating checkpoint after checkpoint in one process must not keep one copy per model."""
    import gc
    import weakref

    from slq_hf.modeling.control_tokens import literal_tokenizer

    model = SLQModel.from_backbone(tiny_backbone_path("qwen3_vl"), num_queries=NUM_QUERIES)
    model.encode(["a caption <|im_end|> with a control token"])
    literal = weakref.ref(literal_tokenizer(model.processor))
    assert literal() is not None
    del model
    gc.collect()
    assert literal() is None
