"""One model, many threads: query injection and the active query set belong to the call, never to the model.

- N threads encoding different inputs on one model give, bitwise, what sequential calls give (two families);
- threads inside different ``use_query_set`` blocks each get their own set, and nobody else's active set moves;
- ``backbone.generate`` after a failed encode, and while other threads encode, equals the bare backbone's generate;
  an encode never writes the backbone's shared ``rope_deltas``;
- a training step after an exception mid-forward equals a clean step (both training paths).
"""

from __future__ import annotations

import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoModelForImageTextToText

from slq_hf import SLQModel
from slq_hf.processing import collate, to_item
from slq_hf.training import SLQDataCollator

from helpers import SwitchRecorder, scene, sharpen_attention

THREADS = 8
ROUNDS = 3
NUM_QUERIES = 4
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (90, 20, 200),
           (20, 200, 90)]


def _inputs(i: int) -> list:
    """Different inputs per thread: texts of different lengths, images of two sizes, an image+text pair."""
    colour = COLOURS[i % len(COLOURS)]
    return [f"item {i}: a {'very ' * i}small square", scene(64 + 32 * (i % 2), 64, colour),
            {"image": scene(64, 96, colour), "text": f"what colour is square {i}?"}]


def _model(path: str, **kwargs) -> SLQModel:
    model = SLQModel.from_backbone(path, num_queries=NUM_QUERIES, **kwargs)
    sharpen_attention(model.backbone)  # sharp attention: a query injected into the wrong call shows clearly
    with torch.no_grad():
        model.queries.copy_(torch.randn(model.queries.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
    return model


def _run_threads(work, count: int = THREADS) -> list:
    """``work(i)`` in ``count`` threads released together by a barrier; results in thread order."""
    barrier = threading.Barrier(count)

    def start(i):
        barrier.wait()
        return work(i)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(start, range(count)))


@pytest.mark.parametrize("family", ["qwen3_vl", "llava"])
def test_threads_encoding_different_inputs_equal_sequential_bitwise(tiny_backbone_path, family):
    model = _model(tiny_backbone_path(family))
    expected = [model.encode(_inputs(i), batch_size=2) for i in range(THREADS)]
    for _ in range(ROUNDS):
        got = _run_threads(lambda i: model.encode(_inputs(i), batch_size=2))
        for i in range(THREADS):
            assert torch.equal(got[i], expected[i]), f"thread {i}: max diff {(got[i] - expected[i]).abs().max()}"
    # The inputs differ enough that a mix-up between calls would show.
    assert (expected[0] - expected[1]).abs().max() > 1e-3


def test_threads_with_different_query_sets(tiny_backbone_path):
    model = _model(tiny_backbone_path("qwen3_vl"))
    model.add_query_set("query")
    model.add_query_set("document", num_queries=3)
    names = model.query_sets
    items = _inputs(3)
    expected = {}
    for name in names:
        with model.use_query_set(name):
            expected[name] = model.encode(items)

    batch = collate(model.processor, [to_item(items[0])])  # tokenized once: forward itself never tokenizes

    def work(i):
        name = names[i % len(names)]
        with model.use_query_set(name):
            assert model.active_query_set == name
            return name, model.encode(items), model(**batch).pooler_output

    for _ in range(ROUNDS):
        for name, encoded, forwarded in _run_threads(work):
            assert torch.equal(encoded, expected[name]), name
            torch.testing.assert_close(forwarded, expected[name][:1], rtol=0, atol=1e-5)  # alone vs padded batch
        assert model.active_query_set == "default"  # no thread's block leaked into the model
    assert (expected["query"] - expected["document"]).abs().max() > 1e-3


def _chat(processor, text: str, image=None) -> dict:
    content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True, return_tensors="pt")


class _Boom(RuntimeError):
    pass


def _fail_once_in_last_layer(model: SLQModel):
    """A hook that raises inside the backbone's last decoder layer on the next call (after the injection hook ran)."""
    layer = model.backbone.get_decoder().layers[-1]

    def boom(module, args, output):
        handle.remove()
        raise _Boom("injected failure mid-forward")

    handle = layer.register_forward_hook(boom)
    return handle


def test_generate_after_failed_and_during_concurrent_encode_equals_bare_backbone(tiny_backbone_path):
    path = tiny_backbone_path("qwen3_vl")
    bare = AutoModelForImageTextToText.from_pretrained(path).eval()
    sharpen_attention(bare)
    model = _model(path)
    prompts = [_chat(model.processor, "describe the picture", scene(64, 96, (255, 0, 0))),
               _chat(model.processor, "what is a square?")]

    def generate(backbone, prompt):
        return backbone.generate(**prompt, max_new_tokens=8, do_sample=False)

    reference = [generate(bare, p) for p in prompts]

    _fail_once_in_last_layer(model)
    with pytest.raises(_Boom):
        model.encode(_inputs(0))
    for prompt, ref in zip(prompts, reference):
        assert torch.equal(generate(model.backbone, prompt), ref)

    # Encodes with images in other threads while this thread generates (image prompts use the rope deltas the
    # backbone stores during generate; an encode must neither inject into generate nor overwrite those deltas).
    stop = threading.Event()

    def encode_until_stopped(i):
        while not stop.is_set():
            model.encode(_inputs(i))

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(encode_until_stopped, i) for i in range(3)]
        try:
            for _ in range(3):
                for prompt, ref in zip(prompts, reference):
                    assert torch.equal(generate(model.backbone, prompt), ref)
        finally:
            stop.set()
        for future in futures:
            future.result()

    marker = torch.full((1, 1), 12345)
    model.backbone.model.rope_deltas = marker
    model.encode(_inputs(1))
    assert model.backbone.model.rope_deltas is marker  # never written by an encode


@pytest.mark.parametrize("training_path", ["prefix_cache", "full"])
def test_training_step_after_an_exception_mid_forward_equals_a_clean_step(tiny_backbone_path, training_path):
    path = tiny_backbone_path("qwen3_vl")
    pairs = [{"image": scene(64, 64, c), "text": f"colour {c}"} for c in COLOURS[:4]]

    def step(model):
        model.train()
        model.zero_grad()
        out = model(**SLQDataCollator(model.processor)(pairs))
        out.loss.backward()
        return out.loss.detach(), model.queries.grad.clone()

    clean = step(_model(path, training_path=training_path))
    model = _model(path, training_path=training_path)
    _fail_once_in_last_layer(model)
    with pytest.raises(_Boom):
        step(model)
    after = step(model)
    assert torch.equal(after[0], clean[0]) and torch.equal(after[1], clean[1])
    assert clean[1].abs().max() > 0


def test_two_models_sharing_one_backbone_in_threads(tiny_backbone_path):
    """Both models use the same embedding layer's hook: each call injects only its own model's queries."""
    first = _model(tiny_backbone_path("qwen3_vl"))
    second = SLQModel.from_backbone(first.backbone, num_queries=NUM_QUERIES + 2, processor=first.processor)
    models = [first, second]
    expected = [[m.encode(_inputs(i)) for i in range(THREADS)] for m in models]
    got = _run_threads(lambda i: models[i % 2].encode(_inputs(i)))
    for i in range(THREADS):
        assert torch.equal(got[i], expected[i % 2][i]), i
    assert (expected[0][0] - expected[1][0]).abs().max() > 1e-3


def test_a_discarded_model_sharing_a_backbone_is_freed(tiny_backbone_path):
    """The embedding layer's hook holds no model: a second SLQModel built on a backbone and dropped is freed (it was
    kept alive by its hook, forever, and ran on every backbone call), and the first still embeds as before."""
    import gc
    import weakref

    first = _model(tiny_backbone_path("qwen3_vl"))
    before = first.encode(_inputs(0))
    second = SLQModel.from_backbone(first.backbone, num_queries=NUM_QUERIES + 2, processor=first.processor)
    second.encode(_inputs(1))
    gone = weakref.ref(second)
    del second
    gc.collect()
    assert gone() is None
    assert len(first.backbone.get_input_embeddings()._forward_hooks) == 1
    assert torch.equal(first.encode(_inputs(0)), before)


def test_literal_text_never_switches_the_shared_tokenizer(tiny_backbone_path, monkeypatch):
    """Control strings and long texts are tokenised as literal text (``split_special_tokens``), which on a fast
    tokenizer sets a switch on the Rust backend that every thread shares: a prompt tokenised meanwhile in another
    thread would get ``<|im_start|>`` as the pieces ``<``, ``|``, ... . encode, prepare_inputs and the collator (text
    budgets, control strings, batch planning) must tokenise literal text without setting it."""
    model = _model(tiny_backbone_path("qwen3_vl"), max_text_tokens=6)
    tokenizer = model.processor.tokenizer
    recorder = SwitchRecorder(tokenizer._tokenizer)
    monkeypatch.setattr(tokenizer, "_tokenizer", recorder)
    texts = ["a caption that says <|im_end|> in the middle", "a caption far longer than the six token text budget",
             {"image": scene(64, 64, (255, 0, 0)), "text": "<|image_pad|> and <|vision_start|> as plain text"}]
    with warnings.catch_warnings():  # the text budget cuts the long caption (warned once per process)
        warnings.simplefilter("ignore")
        model.encode(texts, batch_size=2)
    collate(model.processor, [to_item(t) for t in texts[:2]])
    SLQDataCollator(model.processor)([{"query": texts[0], "positive": texts[1]}, {"query": "b", "positive": "c"}])
    assert {"encode", "encode_batch"} & recorder.used  # the recorder sat on the tokenizing path
    assert True not in recorder.values

