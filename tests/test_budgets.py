"""Image and text budgets belong to the model: saved with the queries, applied through the processor's own resize
rule, honoured by every path; token-budget batching; processor files left out of folders of pinned Hub backbones."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from PIL import Image

import slq_hf.modeling.budgets as budgets
from slq_hf import SLQConfig, SLQModel
from slq_hf.modeling.budgets import image_rule, image_tokens, processor_with_budgets, resolve_image_budget
from slq_hf.processing import collate, fit_image, image_budget, load_image, plan_batches, to_item
from slq_hf.testing.tiny_backbones import TINY_FAMILIES

from helpers import scene

NUM_QUERIES = 4
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# The tiny Qwen3-VL: patch 16, merge 2 -> one token per 32x32 pixels; its processor allows 1-16 tokens.
BUDGET = {"max_image_tokens": 6, "min_image_tokens": 2, "max_text_tokens": 5}


def _close(a, b, atol: float = 1e-5) -> None:
    torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), atol=atol, rtol=0)


@pytest.fixture(scope="module")
def model(tiny_backbone_path):
    return SLQModel.from_backbone(tiny_backbone_path("qwen3_vl"), num_queries=NUM_QUERIES, **BUDGET).eval()


@pytest.fixture(autouse=True)
def _fresh_warnings():
    budgets._WARNED.clear()  # warnings are once per process; each test starts as a new process would
    yield


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for i, (width, height) in enumerate([(600, 400), (300, 500), (64, 64)]):
        path = folder / f"photo{i}.png"
        scene(width, height, (40 * i, 200, 30)).save(path)
        paths.append(str(path))
    return paths


# ------------------------------------------------------------------------------------------- the one size rule
def test_budget_sets_the_processors_own_grid(model, photos):
    """600x400 under 6 tokens: smart_resize gives 64x96 pixels = a 4x6 patch grid = 6 tokens (worked by hand)."""
    assert dict(model.processor.image_processor.size) == {"shortest_edge": 2 * 1024, "longest_edge": 6 * 1024}
    batch = collate(model.processor, [to_item(photos[0])])
    assert batch["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert image_tokens(model.processor, 600, 400) == 6
    # the processor asked directly for the full-size image (no pre-shrink) lands on the same grid
    direct = model.processor.image_processor(images=[Image.open(photos[0]).convert("RGB")], return_tensors="pt")
    assert direct["image_grid_thw"].tolist() == [[1, 4, 6]]


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_size_slq_computes_is_the_processors_grid_for_every_family(family, tiny_backbone_path):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_backbone_path(family))
    rule = image_rule(processor)
    assert (rule is not None) == (family in QWEN_FAMILIES)
    if rule is None:
        # the image budget does not apply: "auto" leaves it unset, an explicit value is refused naming the processor
        assert resolve_image_budget(processor) == (None, None)
        with pytest.raises(ValueError, match=type(processor.image_processor).__name__):
            resolve_image_budget(processor, max_image_tokens=100)
    else:
        processor = processor_with_budgets(processor, 9, 2, None)
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    budget = image_budget(processor)
    for width, height in [(1001, 333), (333, 1001), (777, 777), (1920, 1080), (61, 45)]:
        image = scene(width, height, (200, 10, 10))
        shrunk = fit_image(image, budget)
        full = collate(processor, [to_item(image)])  # collate pre-shrinks, as every SLQ path does
        raw = processor.apply_chat_template(  # the processor on its own, full-size image
            [[{"role": "user", "content": [{"type": "image", "image": image}]}]], add_generation_prompt=True,
            tokenize=True, return_dict=True, return_tensors="pt")
        tokens = int((full["input_ids"] == image_token).sum())
        assert tokens == int((raw["input_ids"] == image_token).sum()), (family, width, height)
        if rule is not None:
            assert tokens == image_tokens(processor, width, height) <= 9, (width, height)
            assert torch.equal(full["image_grid_thw"], raw["image_grid_thw"])
            unit = rule.unit(processor.image_processor)
            assert shrunk.width % unit == 0 and shrunk.height % unit == 0 or shrunk is image


def _real_qwen3_vl_processor():
    """The image processor of Qwen3-VL-2B-Instruct at its real settings (patch 16, merge 2, 65,536-16,777,216 px)."""
    from types import SimpleNamespace

    from transformers import Qwen2VLImageProcessor

    return SimpleNamespace(image_processor=Qwen2VLImageProcessor(
        patch_size=16, merge_size=2, temporal_patch_size=2,
        size={"shortest_edge": 65_536, "longest_edge": 16_777_216}))


def test_real_qwen3_vl_token_counts_and_default_budget(tmp_path):
    """The backbone's own counts (measured with the real processor: 475 / 2,040 / 11,750 / 16,224) and the default
    budget's cap of 1,800 tokens, also for a 6000x4000 JPEG decoded at reduced scale."""
    processor = _real_qwen3_vl_processor()
    own = {size: image_tokens(processor, *size) for size in [(800, 600), (1920, 1080), (4000, 3000), (6000, 4000)]}
    assert own == {(800, 600): 475, (1920, 1080): 2040, (4000, 3000): 11750, (6000, 4000): 16224}
    assert resolve_image_budget(processor) == (1800, 4)  # "auto": Qwen3-VL-Embedding's 4,096-1,843,200 pixels
    assert resolve_image_budget(processor, max_image_tokens=2) == (2, 2)  # the automatic minimum follows
    assert resolve_image_budget(processor, None, None) == (None, None)  # the processor's own
    with pytest.raises(ValueError, match="min_image_tokens`=8 is larger than `max_image_tokens`=2"):
        resolve_image_budget(processor, max_image_tokens=2, min_image_tokens=8)
    budgeted = processor_with_budgets(processor, 1800, 4, None)
    assert dict(budgeted.image_processor.size) == {"shortest_edge": 4096, "longest_edge": 1_843_200}
    assert dict(processor.image_processor.size)["longest_edge"] == 16_777_216  # the caller's object is untouched
    path = tmp_path / "big.jpg"
    scene(6000, 4000, (10, 100, 200)).save(path, quality=70)
    with pytest.warns(UserWarning, match="above the model's image budget"):
        image = load_image(str(path), budget=image_budget(budgeted))
        to_item(str(path), budget=image_budget(budgeted))
    out = budgeted.image_processor(images=[image], return_tensors="pt")
    grid = out["image_grid_thw"][0]
    tokens = int(grid.prod()) // 4
    assert tokens <= 1800 and tokens == image_tokens(budgeted, 6000, 4000)
    # the reduced-scale JPEG decode does not move the grid: same as the processor on the full image's size
    assert (image.height, image.width) == (int(grid[1]) * 16, int(grid[2]) * 16)


# ------------------------------------------------------------------------------------------- every path
def test_budget_survives_save_and_load_and_reaches_every_path(model, photos, tmp_path):
    from slq_hf.evaluation import encode_inputs
    from slq_hf.integrations.sentence_transformers import load_sentence_transformer
    from slq_hf.retrieval import build_index
    from slq_hf.retrieval.search import CorpusIndex
    from slq_hf.training import SLQDataCollator

    text = "a grey picture with a green square in the middle of it"  # over the 5-token text budget
    inputs = photos + [text]
    with pytest.warns(UserWarning, match="text budget"):
        reference = model.encode(inputs)
    folder = tmp_path / "slq"
    model.save_pretrained(folder)
    assert {k: json.loads((folder / "config.json").read_text())[k] for k in BUDGET} == BUDGET
    loaded = SLQModel.from_pretrained(folder)
    assert {k: getattr(loaded.config, k) for k in BUDGET} == BUDGET
    _close(loaded.encode(inputs), reference)
    # per-call budgets change the embedding (the budget is not a no-op) and the model's own comes back
    assert not torch.allclose(loaded.encode(photos[:1], max_image_tokens=16), reference[:1], atol=1e-4)
    _close(loaded.encode(photos[:1]), reference[:1])
    # sentence-transformers: with SLQ's input handling identical; plain, the processor files carry the same size
    st = load_sentence_transformer(folder)
    _close(st.encode(inputs, convert_to_tensor=True).cpu(), reference)
    from sentence_transformers import SentenceTransformer

    plain = SentenceTransformer(str(folder), trust_remote_code=True)
    assert dict(plain[0].processor.image_processor.size) == dict(model.processor.image_processor.size)
    # the training collator sees the budgeted grid and the cut text
    batch = SLQDataCollator(loaded.processor)([{"image": photos[0], "text": text}])
    assert batch["image_grid_thw"].tolist() == [[1, 4, 6]]
    cut = collate(loaded.processor, [to_item(text)])
    assert torch.equal(batch["positive_input_ids"], cut["input_ids"])
    # evaluation and the corpus index go through encode
    # (evaluation reads a str as a text, so its images are given as PIL images)
    _close(encode_inputs(loaded, [Image.open(p) for p in photos] + [text], batch_size=2), reference)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in photos:
        Image.open(path).save(corpus / path.rsplit("/", 1)[1])
    build_index(loaded, corpus, tmp_path / "index", shard_size=8, batch_size=2)
    index = CorpusIndex.load(tmp_path / "index")
    scores, _ = index.search_embeddings(reference[:3].numpy(), k=1)
    _close(torch.as_tensor(scores[:, 0]), torch.ones(3))  # each photo's index vector is its encode embedding


def test_text_budget_keeps_the_chat_template_and_warns_once(model):
    long = " ".join(["word"] * 40)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = model.encode([long])
        model.encode([long + " more"])
    assert sum("text budget" in str(w.message) for w in caught) == 1
    batch = collate(model.processor, [to_item(long)])
    decoded = model.processor.tokenizer.decode(batch["input_ids"][0])
    assert decoded.endswith("<|im_end|>\n<|im_start|>assistant\n")
    tokenizer = model.processor.tokenizer
    kept = tokenizer.decode(tokenizer(long, add_special_tokens=False)["input_ids"][:5])
    _close(first, model.encode([kept]))
    # a higher budget per call keeps more of the text: another embedding
    assert not torch.allclose(model.encode([long], max_text_tokens=30), first, atol=1e-4)


@pytest.mark.parametrize("text", ["😀" * 10, "😀" * 11, "日本語のテキスト" * 3, "a😀b" * 6, "e\u0301" * 12,
                                  "word " * 3])
def test_text_budget_cuts_the_text_at_a_token_boundary(model, text):
    """Texts whose characters take several tokens (emoji in byte-level BPE): the budget holds, and the kept text is
    the start of the original (never a split character decoded as U+FFFD)."""
    from slq_hf.modeling.processing_slq import limit_text

    tokenizer, budget = model.processor.tokenizer, 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = limit_text(model.processor, to_item(text), budget).text
    assert text.startswith(kept) and "\ufffd" not in kept
    assert len(tokenizer(kept, add_special_tokens=False)["input_ids"]) <= budget
    if len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= budget:
        assert kept == text


# ------------------------------------------------------------------------------------------- batching
def test_plan_batches_respects_count_and_padded_tokens():
    lengths = [5, 300, 7, 7, 50, 1000, 6, 49, 51, 8]
    for batch_size, budget in [(4, None), (4, 100), (8, 160), (1, None), (10, 10)]:
        batches = plan_batches(lengths, batch_size, budget)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        for b in batches:
            assert len(b) <= batch_size
            if budget is not None and len(b) > 1:
                assert len(b) * max(lengths[i] for i in b) <= budget
    assert plan_batches(lengths, 10, 100) != plan_batches(lengths, 10, None)  # the token budget splits batches


def test_token_budget_batching_gives_the_same_embeddings_as_count_batching(model, photos):
    texts = ["short", "a somewhat longer text about a square", "red", "one two three four", "x y"]
    inputs = texts + photos + [{"image": photos[1], "text": "with a caption"}]
    count = model.encode(inputs, batch_size=8)
    for budget in (1, 24, 60):
        _close(model.encode(inputs, batch_size=8, max_batch_tokens=budget), count)
    singles = torch.cat([model.encode([x]) for x in inputs])
    _close(count, singles)
    model.max_batch_tokens = 24  # the runtime default reaches paths that call encode for you
    try:
        _close(model.encode(inputs, batch_size=8), count)
    finally:
        model.max_batch_tokens = None


# ------------------------------------------------------------------------------------------- bad values
@pytest.mark.parametrize("field,value", [("max_image_tokens", 0), ("max_image_tokens", -3), ("min_image_tokens", 1.5),
                                         ("max_text_tokens", True), ("max_text_tokens", "512")])
def test_bad_budget_values_name_the_option(field, value):
    with pytest.raises(ValueError, match=rf"`{field}`={value!r} is invalid; expected a positive integer"):
        SLQConfig(**{field: value})


def test_min_above_max_and_bad_call_values(model, tiny_backbone_path):
    with pytest.raises(ValueError, match="min_image_tokens`=10 is larger than `max_image_tokens`=5"):
        SLQConfig(max_image_tokens=5, min_image_tokens=10)
    with pytest.raises(ValueError, match="max_image_tokens"):
        model.encode(["x"], max_image_tokens=0)
    with pytest.raises(ValueError, match="max_batch_tokens=0 is invalid"):
        model.encode(["x"], max_batch_tokens=0)
    with pytest.raises(TypeError, match="max_pixels"):
        model.encode(["x"], max_pixels=100)
    with pytest.raises(ValueError, match="LlavaNextImageProcessor"):
        SLQModel.from_backbone(tiny_backbone_path("llava_next"), num_queries=2, max_image_tokens=100)


# ------------------------------------------------------------------------------------------- small checkpoints
def test_pinned_hub_backbone_folder_leaves_the_processor_out(model, tiny_backbone_path, tmp_path, photos):
    hub_like = SLQModel.from_backbone(tiny_backbone_path("qwen3_vl"), num_queries=NUM_QUERIES, **BUDGET)
    hub_like.load_state_dict(model.trainable_state_dict())
    hub_like.config.backbone_name_or_path, hub_like.config.backbone_revision = "Qwen/Qwen3-VL-2B-Instruct", "a" * 40
    small, bundled, local = tmp_path / "small", tmp_path / "bundled", tmp_path / "local"
    hub_like.save_pretrained(small)
    hub_like.save_pretrained(bundled, bundle_processor=True)
    model.save_pretrained(local)  # a local-path backbone keeps its copy
    assert not (small / "tokenizer.json").exists() and not (small / "processor_config.json").exists()
    assert (bundled / "tokenizer.json").exists() and (local / "tokenizer.json").exists()
    settings = json.loads((small / "sentence_bert_config.json").read_text())
    assert settings["tokenizer_name_or_path"] == "Qwen/Qwen3-VL-2B-Instruct"
    assert settings["processor_kwargs"] == {"revision": "a" * 40,
                                            "size": {"shortest_edge": 2048, "longest_edge": 6144}}
    # loaded with the backbone from elsewhere, the processor comes from the backbone and gets the saved budget
    loaded = SLQModel.from_pretrained(small, backbone_name_or_path=tiny_backbone_path("qwen3_vl"))
    assert dict(loaded.processor.image_processor.size) == {"shortest_edge": 2048, "longest_edge": 6144}
    _close(loaded.encode(photos), model.encode(photos))
    with pytest.raises(ValueError, match="bundle_processor='yes' is invalid"):
        hub_like.save_pretrained(tmp_path / "bad", bundle_processor="yes")
    # Re-saving the small folder with the processor bundled: sentence-transformers must use the copy, not the Hub
    hub_like.save_pretrained(small, bundle_processor=True)
    settings = json.loads((small / "sentence_bert_config.json").read_text())
    assert (small / "tokenizer.json").exists()
    assert "tokenizer_name_or_path" not in settings and "processor_kwargs" not in settings


def test_readme_budgets_example_runs(monkeypatch, capsys):
    from pathlib import Path

    from helpers import run_readme_example

    run_readme_example("budgets", Path(__file__).resolve().parents[1], monkeypatch)
    assert capsys.readouterr().out.splitlines()[0] == "9 4 8192"  # the toy backbone's own range is 9-9 tokens


def test_a_max_pixels_attribute_set_by_hand_moves_the_pre_shrink_with_the_processor():
    """transformers 5 Qwen-VL processors still pass a ``max_pixels`` attribute set over ``size`` to every call; the
    pre-shrink used to read it without the grid rule and picked another grid than the processor (1,271 vs 1,230
    tokens). Now both use the same range and rule."""
    processor = _real_qwen3_vl_processor()
    processor.image_processor.max_pixels = 1_000_000
    budget = image_budget(processor)
    assert (budget.max_pixels, budget.unit) == (1_000_000, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation of the attribute
        for width, height in [(4000, 3000), (1921, 1079), (3001, 1999)]:
            image = scene(width, height, (1, 2, 3))
            shrunk = fit_image(image, budget)
            assert shrunk.size != image.size
            own = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"]
            pre = processor.image_processor(images=[shrunk], return_tensors="pt")["image_grid_thw"]
            assert torch.equal(pre, own), (width, height)
            assert int(own.prod()) // 4 == image_tokens(processor, width, height)
    # a budget applied over it replaces the hand-set value
    budgeted = processor_with_budgets(processor, 100, 4, None)
    assert budgeted.image_processor.max_pixels is None and image_budget(budgeted).max_pixels == 100 * 1024


def test_token_budget_counts_the_chat_template_too(model):
    """The padded prompt of every batch of several inputs stays within max_batch_tokens: the chat template's tokens
    (about 11 around a text here) count, not only the text's. Measured on the real collated batches."""
    from slq_hf.processing import encode_batches, to_items

    items = to_items(["word " * 3] * 10 + ["a red circle", "x"])
    instruction = "Represent this caption for retrieving the photo it describes"
    for budget, instruct in ((40, None), (64, None), (150, instruction), (256, instruction)):  # ~60 a prompt
        batches = encode_batches(model.processor, items, 32, budget, instruct)
        assert sorted(i for b in batches for i in b) == list(range(len(items)))
        for b in batches:
            padded = collate(model.processor, [items[i] for i in b], instruct)["input_ids"].numel()
            assert len(b) == 1 or padded <= budget, (budget, instruct, b, padded)
    # encode plans with its instruction too: it gives the same rows as the planner, for every batch
    planned = encode_batches(model.processor, items, 32, 256, instruction)
    sizes = []
    original = model.forward
    model.forward = lambda *args, **kwargs: sizes.append(kwargs["input_ids"].shape[0]) or original(*args, **kwargs)
    try:
        model.encode([i.text for i in items], batch_size=32, max_batch_tokens=256, instruction=instruction)
    finally:
        del model.forward
    assert sorted(sizes) == sorted(len(b) for b in planned)


def test_encode_max_text_tokens_none_means_no_limit_like_from_pretrained(model, tmp_path):
    long = " ".join(["word"] * 40)
    model.save_pretrained(tmp_path / "m")
    unlimited = SLQModel.from_pretrained(tmp_path / "m", max_text_tokens=None).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _close(model.encode([long], max_text_tokens=None), unlimited.encode([long]))
        assert not torch.allclose(model.encode([long], max_text_tokens=None), model.encode([long]), atol=1e-4)
    with pytest.raises(ValueError, match="max_image_tokens`=None cannot be applied per call"):
        model.encode(["x"], max_image_tokens=None)


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_fixed_count_images_are_planned_at_their_real_cost(tiny_backbone_path, family):
    """LLaVA and Gemma 3 give every image the same number of tokens, so a 1080p photo costs what an 8x8 icon costs.
    max_batch_tokens must count that fixed cost: not one token per 28x28 pixels (a photo a batch), and not one
    token short for images under 28 pixels (a batch over the budget)."""
    from transformers import AutoProcessor

    from slq_hf.processing import encode_batches, to_items

    processor = AutoProcessor.from_pretrained(tiny_backbone_path(family))
    items = to_items([Image.new("RGB", (1920, 1080), "red")] * 8 + [Image.new("RGB", (8, 8), "blue")] * 8)
    image_prompt = collate(processor, items[:1])["input_ids"].shape[1]
    assert collate(processor, [items[8]])["input_ids"].shape[1] == image_prompt  # the same at any size
    budget = 4 * image_prompt - 1  # room for 3 image prompts, not 4
    batches = encode_batches(processor, items, 8, budget)
    for batch in batches:
        assert collate(processor, [items[i] for i in batch])["input_ids"].numel() <= budget, batch
    assert sorted(len(b) for b in batches) == [1, 3, 3, 3, 3, 3]
