"""Reranking with the frozen backbone (slq_hf/modeling/reranking.py): scores against a hand-written reference, the
shared-prefix cache against full forwards, batch/padding invariance, the backbone left untouched, bad inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from slq_hf.modeling.reranking import YES_NO_DEFAULTS, YesNoPrompt, rerank
from slq_hf.processing import SLQInputError, prepare_inputs
from slq_hf.testing import toy_scenes

from helpers import SwitchRecorder, scene, sharpen_attention

TOY = Path(__file__).resolve().parents[1] / "examples" / "toy" / "backbone"
# Words that are one token each in the tiny byte-level BPE vocabularies (which have no "yes").
TINY_YES_NO = YesNoPrompt(question='Is "{text}" right? say a or the', yes="a", no="the")
FAMILIES = ["toy", "llava"]


def _load(family: str, tiny_backbone_path):
    path = str(TOY) if family == "toy" else tiny_backbone_path(family)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    if family != "toy":
        sharpen_attention(model)  # random tiny weights attend almost uniformly; sharper attention exposes errors
    return model, AutoProcessor.from_pretrained(path)


@pytest.fixture(scope="module")
def scenes():
    return toy_scenes.heldout_scenes()[:5]


# ----------------------------------------------------------------------------------------------- the reference
def _reference_inputs(processor, image, user_text: str | None, answer: list[int], instruction: str | None = None):
    """Prompt through the processor's own chat template, then ``answer`` appended by hand.

    The image first goes through ``prepare_inputs``: the input path ``encode`` and ``rerank`` share (large images
    are shrunk to twice the processor's resolution before it resizes them, which moves pixels slightly).
    """
    image = prepare_inputs([image], processor)[0]
    content = [{"type": "image", "image": image}] + ([{"type": "text", "text": user_text}] if user_text else [])
    if instruction:
        content.insert(0, {"type": "text", "text": instruction})
    batch = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True, return_tensors="pt")
    batch = dict(batch)
    extra = torch.tensor([answer], dtype=batch["input_ids"].dtype)
    start = batch["input_ids"].shape[1]
    batch["input_ids"] = torch.cat([batch["input_ids"], extra], dim=1)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in batch:
            batch[key] = torch.cat([batch[key], torch.zeros_like(extra)], dim=1)
    return batch, start


def _answer(family: str, processor, text: str) -> list[int]:
    """The assistant answer as each template writes it: ChatML ``text<|im_end|>``; LLaVA ``ASSISTANT: text``."""
    tokenizer = processor.tokenizer
    if family == "toy":
        return tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    return tokenizer(" " + text, add_special_tokens=False).input_ids


@torch.no_grad()
def reference_likelihood(family, model, processor, image, text: str, user_text: str | None = None,
                         instruction: str | None = None) -> float:
    batch, start = _reference_inputs(processor, image, user_text, _answer(family, processor, text), instruction)
    logprobs = torch.log_softmax(model(**batch).logits[0].float(), dim=-1)  # (L, V)
    targets = batch["input_ids"][0, start:]
    return logprobs[start - 1 : -1].gather(1, targets[:, None]).mean().item()


def template_answer_token(processor, word: str) -> int:
    """The first token of ``word`` as the chat template writes it as the assistant's answer (rendered and tokenised
    whole): " a" after LLaVA's "ASSISTANT:", "a" after ChatML's "<|im_start|>assistant\n"."""
    user = [{"role": "user", "content": [{"type": "text", "text": "q"}]}]
    answer = [{"role": "assistant", "content": [{"type": "text", "text": word}]}]
    prompt, full = (processor.tokenizer(processor.apply_chat_template(conversation, add_generation_prompt=generation,
                                                                      tokenize=False), add_special_tokens=False)
                    .input_ids for conversation, generation in ((user, True), (user + answer, False)))
    assert full[: len(prompt)] == prompt
    return full[len(prompt)]


@torch.no_grad()
def reference_yes_no(model, processor, image, text: str, prompt: YesNoPrompt) -> float:
    batch, _ = _reference_inputs(processor, image, prompt.question.replace("{text}", text), [])
    logits = model(**batch).logits[0, -1].float()
    yes, no = (template_answer_token(processor, w) for w in (prompt.yes, prompt.no))
    return (logits[yes] - logits[no]).item()


# ------------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("family", FAMILIES)
def test_likelihood_equals_the_reference_both_directions(family, tiny_backbone_path, scenes):
    model, processor = _load(family, tiny_backbone_path)
    captions = [s.caption for s in scenes]
    image_query = rerank(model, processor, scenes[0].image, captions, batch_size=2)
    expected = [reference_likelihood(family, model, processor, scenes[0].image, c) for c in captions]
    torch.testing.assert_close(image_query.scores, torch.tensor(expected), atol=1e-5, rtol=0)
    text_query = rerank(model, processor, captions[1], [s.image for s in scenes], batch_size=2)
    expected = [reference_likelihood(family, model, processor, s.image, captions[1]) for s in scenes]
    torch.testing.assert_close(text_query.scores, torch.tensor(expected), atol=1e-5, rtol=0)


def test_toy_likelihood_finds_the_right_pairs(scenes):
    """The toy backbone captions scenes: its own caption must win in both directions (a test that can fail)."""
    model, processor = _load("toy", None)
    captions = [s.caption for s in scenes]
    for i, s in enumerate(scenes):
        assert rerank(model, processor, s.image, captions).order[0].item() == i
        assert rerank(model, processor, captions[i], [x.image for x in scenes]).order[0].item() == i


@pytest.mark.parametrize("family", ["llava", "qwen3_vl", "smolvlm"])
def test_yes_no_equals_the_reference(family, tiny_backbone_path, scenes):
    """The answer words are read as the template writes an answer: after LLaVA's "ASSISTANT:" / SmolVLM's
    "Assistant:" the model says " a" (one token, "Ġa"), not "a", which the scorer once read."""
    model, processor = _load(family, tiny_backbone_path)
    if family != "qwen3_vl":  # the two spellings are different tokens, so reading the wrong one would show
        assert template_answer_token(processor, "a") != processor.tokenizer("a", add_special_tokens=False).input_ids[0]
    captions = [s.caption for s in scenes]
    result = rerank(model, processor, scenes[2].image, captions, scorer="yes_no", yes_no=TINY_YES_NO, batch_size=2)
    expected = [reference_yes_no(model, processor, scenes[2].image, c, TINY_YES_NO) for c in captions]
    torch.testing.assert_close(result.scores, torch.tensor(expected), atol=1e-5, rtol=0)
    result = rerank(model, processor, captions[0], [s.image for s in scenes], scorer="yes_no", yes_no=TINY_YES_NO)
    expected = [reference_yes_no(model, processor, s.image, captions[0], TINY_YES_NO) for s in scenes]
    torch.testing.assert_close(result.scores, torch.tensor(expected), atol=1e-5, rtol=0)


# The toy vocabulary has no "yes" (see test_yes_no_refuses_words_outside_the_vocabulary): likelihood only there.
@pytest.mark.parametrize("family, scorer", [("toy", "likelihood"), ("llava", "likelihood"), ("llava", "yes_no"),
                                            ("qwen3_vl", "likelihood"), ("qwen3_vl", "yes_no"),
                                            ("gemma3", "likelihood"), ("idefics3", "yes_no")])
def test_shared_prefix_equals_full_forwards(family, scorer, tiny_backbone_path, scenes, monkeypatch):
    import slq_hf.modeling.reranking as reranking

    model, processor = _load(family, tiny_backbone_path)
    texts = [s.caption for s in scenes] + [s.knowledge_caption for s in scenes] + ["a", "red"]
    kwargs = {"yes_no": TINY_YES_NO} if scorer == "yes_no" else {}
    prefix_passes = []
    original = reranking._SharedPrefix.__init__
    monkeypatch.setattr(reranking._SharedPrefix, "__init__",
                        lambda self, *a, **k: (prefix_passes.append(1), original(self, *a, **k))[1])
    # batch_size 3 < 12 candidates: the same cached prefix serves four batches, so a batch that mutated it would show.
    shared = rerank(model, processor, scenes[0].image, texts, scorer, batch_size=3, **kwargs)
    assert prefix_passes == [1]
    full = rerank(model, processor, scenes[0].image, texts, scorer, batch_size=5, share_prefix=False, **kwargs)
    assert prefix_passes == [1]
    torch.testing.assert_close(shared.scores, full.scores, atol=1e-5, rtol=0)
    assert shared.scores.std() > 1e-3  # the scores differ between candidates: the comparison means something


@pytest.mark.parametrize("family", ["toy", "qwen3_vl"])
def test_batch_and_padding_invariance(family, tiny_backbone_path):
    """Images of different sizes (different prompt lengths and M-RoPE deltas) in one padded batch vs one by one."""
    model, processor = _load(family, tiny_backbone_path)
    images = [scene(96, 96, (200, 30, 30)), scene(64, 128, (30, 200, 30)), scene(160, 64, (30, 30, 200)),
              scene(32, 32, (200, 200, 30))]
    query = "a red square in the centre"
    batched = rerank(model, processor, query, images, batch_size=4)
    alone = torch.cat([rerank(model, processor, query, [image]).scores for image in images])
    torch.testing.assert_close(batched.scores, alone, atol=1e-5, rtol=0)
    permuted = rerank(model, processor, query, images[::-1], batch_size=3)
    torch.testing.assert_close(permuted.scores, batched.scores.flip(0), atol=1e-5, rtol=0)
    texts = ["a red square", "a green circle in the top left of the picture", "blue"]
    one = rerank(model, processor, images[1], texts, batch_size=1)
    many = rerank(model, processor, images[1], texts, batch_size=8)
    torch.testing.assert_close(one.scores, many.scores, atol=1e-5, rtol=0)


def test_order_and_top_k(scenes):
    model, processor = _load("toy", None)
    captions = [s.caption for s in scenes]
    result = rerank(model, processor, scenes[3].image, captions, top_k=2)
    assert result.order.shape == (2,) and result.scores.shape == (len(captions),)
    assert result.order.tolist() == torch.argsort(result.scores, descending=True)[:2].tolist()
    assert rerank(model, processor, scenes[3].image, []).scores.shape == (0,)


def test_backbone_unchanged_and_generate_still_works(scenes):
    from slq_hf import SLQModel

    model, processor = _load("toy", None)
    slq = SLQModel.from_backbone(model, num_queries=4, processor=processor)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    messages = [{"role": "user", "content": [{"type": "image", "image": scenes[0].image}]}]
    batch = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt")
    generated = model.generate(**batch, max_new_tokens=10, do_sample=False)
    embedding = slq.encode([scenes[0].caption, scenes[0].image])
    rerank(slq.backbone, processor, scenes[0].image, [s.caption for s in scenes], batch_size=2)
    rerank(slq.backbone, processor, scenes[0].caption, [s.image for s in scenes], scorer="likelihood")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad for p in model.parameters())
    assert torch.equal(model.generate(**batch, max_new_tokens=10, do_sample=False), generated)
    caption = processor.decode(generated[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert caption == scenes[0].caption  # the toy backbone still captions the scene
    torch.testing.assert_close(slq.encode([scenes[0].caption, scenes[0].image]), embedding, atol=1e-6, rtol=0)


BAD_CANDIDATES = [
    ([""], "empty or whitespace only"),
    (["a red square", None], "input 1"),
    (["missing_file.png"], "no such file exists"),
    ([["nested"]], "Nested list"),
    ([{"image": None, "txt": "x"}], "Unknown keys"),
    ([3.5], "Unsupported input type"),
]


@pytest.mark.parametrize("candidates, message", BAD_CANDIDATES)
def test_bad_candidates_get_encodes_errors(candidates, message, scenes):
    from slq_hf import SLQModel

    model, processor = _load("toy", None)
    slq = SLQModel.from_backbone(model, num_queries=2, processor=processor)
    with pytest.raises(SLQInputError, match=message) as from_encode:
        slq.encode(candidates)
    with pytest.raises(SLQInputError) as from_rerank:
        rerank(model, processor, "a red square", candidates)
    assert str(from_rerank.value) == str(from_encode.value)


def test_bad_pairs_and_arguments(scenes, tmp_path):
    model, processor = _load("toy", None)
    image = scenes[0].image
    with pytest.raises(SLQInputError, match="candidate 1 is image"):
        rerank(model, processor, image, ["a red square", image])
    with pytest.raises(SLQInputError, match="candidate 0 is a text"):
        rerank(model, processor, "a red square", ["a blue circle"])
    with pytest.raises(SLQInputError, match="empty or whitespace"):
        rerank(model, processor, "   ", [image])
    with pytest.raises(SLQInputError, match="list of inputs"):
        rerank(model, processor, image, "a red square")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(SLQInputError, match="Cannot read image"):
        rerank(model, processor, "a red square", [image, str(broken)])
    with pytest.raises(ValueError, match="scorer='cosine' is unknown"):
        rerank(model, processor, image, ["a"], scorer="cosine")
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="batch_size"):
            rerank(model, processor, image, ["a"], batch_size=bad)
    with pytest.raises(ValueError, match="top_k"):
        rerank(model, processor, image, ["a"], top_k=0)


def test_yes_no_refuses_words_outside_the_vocabulary(scenes):
    model, processor = _load("toy", None)  # word-level vocabulary: "no" exists, "yes" does not
    with pytest.raises(ValueError, match="'yes' is not in this backbone's vocabulary"):
        rerank(model, processor, scenes[0].image, ["a red square"], scorer="yes_no")
    with pytest.raises(ValueError, match="no '\\{text\\}' field"):
        YesNoPrompt(question="Does it match?")
    with pytest.raises(ValueError, match="two different"):
        YesNoPrompt(yes="no", no="no")


def test_every_supported_family_has_yes_no_defaults():
    from slq_hf.modeling.backbones import BACKBONES

    assert set(YES_NO_DEFAULTS) == set(BACKBONES)


def test_control_tokens_in_a_candidate_are_literal_text(scenes):
    """A caption holding ``<|im_end|>`` is scored as those characters, not as an early end of the answer."""
    model, processor = _load("toy", None)
    tricky = scenes[0].caption + " <|im_end|>"
    score = rerank(model, processor, scenes[0].image, [tricky, scenes[0].caption]).scores
    # As literal text the toy's word-level tokenizer has no such word (unknown tokens), so it must score far lower
    # than the clean caption; as a control token it would be almost the same sequence.
    assert score[0] < score[1] - 1.0


# ------------------------------------------------------------------------------------------- evaluation hookup
@pytest.fixture(scope="module")
def toy_slq():
    from slq_hf import SLQModel

    model, processor = _load("toy", None)
    return SLQModel.from_backbone(model, num_queries=4, processor=processor)


def test_eval_rerank_of_every_candidate_equals_reranking_by_hand(toy_slq, scenes):
    """top_k = all candidates: recall after reranking is recall of the rerank scores alone, computed here by hand."""
    from slq_hf.evaluation import RetrievalDataset, evaluate_retrieval

    images, texts = [s.image for s in scenes], [s.knowledge_caption for s in scenes]
    data = RetrievalDataset.from_pairs(images, texts, name="toy")
    result = evaluate_retrieval(toy_slq, data, show_progress_bar=False, rerank_top_k=len(scenes), rerank_batch_size=3)
    t2i = [rerank(toy_slq.backbone, toy_slq.processor, t, images).order[0].item() == i for i, t in enumerate(texts)]
    i2t = [rerank(toy_slq.backbone, toy_slq.processor, im, texts).order[0].item() == i for i, im in enumerate(images)]
    assert result["rerank"]["metrics"]["t2i"]["R@1"] == pytest.approx(sum(t2i) / len(t2i))
    assert result["rerank"]["metrics"]["i2t"]["R@1"] == pytest.approx(sum(i2t) / len(i2t))
    assert result["rerank"]["num_queries"] == 2 * len(scenes)
    from slq_hf.evaluation import format_results_table

    assert "reranked top-5 (likelihood)" in format_results_table(result)


def test_eval_rerank_takes_captions_as_texts_even_when_they_look_like_files(toy_slq, scenes, tmp_path, monkeypatch):
    """A caption is a text in evaluation, reranked or not: "IMG_0042.JPG" (no such file) and the name of a file that
    exists are scored as texts, the same as the text itself."""
    from slq_hf.evaluation import RetrievalDataset, evaluate_retrieval

    monkeypatch.chdir(tmp_path)
    scenes[0].image.save(tmp_path / "photo.png")
    images = [s.image for s in scenes[:3]]
    texts = ["IMG_0042.JPG", "photo.png", "see photos/"]
    data = RetrievalDataset.from_pairs(images, texts, name="toy")
    result = evaluate_retrieval(toy_slq, data, show_progress_bar=False, rerank_top_k=3)
    t2i = [rerank(toy_slq.backbone, toy_slq.processor, {"text": t}, images).order[0].item() == i
           for i, t in enumerate(texts)]
    assert result["rerank"]["metrics"]["t2i"]["R@1"] == pytest.approx(sum(t2i) / len(t2i))


def test_eval_rerank_top_1_changes_nothing(toy_slq, scenes):
    from slq_hf.evaluation import RetrievalDataset, evaluate_retrieval

    data = RetrievalDataset.from_pairs([s.image for s in scenes], [s.caption for s in scenes], name="toy")
    result = evaluate_retrieval(toy_slq, data, show_progress_bar=False, rerank_top_k=1)
    for direction in ("t2i", "i2t", "t2i_dedup", "i2t_dedup"):
        assert result["rerank"]["metrics"][direction] == result["metrics"][direction]


def test_rerank_similarity_keeps_the_tail_and_reorders_the_top():
    from slq_hf.evaluation.reranking import rerank_similarity

    similarity = torch.tensor([[0.9, 0.8, 0.7, 0.1, 0.0]])
    out = rerank_similarity(similarity, 3, lambda row, top: torch.tensor([-5.0, -1.0, -3.0]), show_progress_bar=False)
    assert torch.argsort(out[0], descending=True).tolist() == [1, 2, 0, 3, 4]
    assert out[0, 3:].tolist() == pytest.approx([0.1, 0.0])


def test_cli_eval_rerank_flags(toy_slq, scenes, tmp_path, capsys):
    import json

    from slq_hf.cli import main

    folder = tmp_path / "slq"
    toy_slq.save_pretrained(folder)
    lines = []
    for i, s in enumerate(scenes):
        s.image.save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "text": s.caption}))
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    argv = ["eval", "--model", str(folder), "--data", str(tmp_path / "data.jsonl"), "--split", "all",
            "--no-progress", "--output", str(tmp_path / "out.json")]
    assert main(argv + ["--rerank-top-k", "3"]) == 0
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["rerank"]["top_k"] == 3 and set(saved["rerank"]["metrics"]) >= {"t2i", "i2t"}
    assert "reranked top-3 (likelihood)" in capsys.readouterr().out
    assert main(argv + ["--rerank-top-k", "0"]) == 2
    assert "--rerank-top-k must be positive" in capsys.readouterr().err


def test_cross_encoder_hosts_the_reranker(toy_slq, scenes, tmp_path):
    from slq_hf.integrations.cross_encoder import load_cross_encoder

    reranker = load_cross_encoder(toy_slq)
    images, captions = [s.image for s in scenes], [s.caption for s in scenes]
    expected = rerank(toy_slq.backbone, toy_slq.processor, captions[2], images).scores
    torch.testing.assert_close(torch.as_tensor(reranker.predict([(captions[2], im) for im in images])), expected,
                               atol=1e-5, rtol=0)
    ranked = reranker.rank(scenes[3].image, captions, batch_size=2)  # an image query: shared prefix per batch
    expected = rerank(toy_slq.backbone, toy_slq.processor, scenes[3].image, captions)
    assert [r["corpus_id"] for r in ranked] == expected.order.tolist()
    torch.testing.assert_close(torch.tensor([r["score"] for r in ranked]), expected.scores[expected.order],
                               atol=1e-5, rtol=0)
    toy_slq.save_pretrained(tmp_path / "slq")
    from_folder = load_cross_encoder(tmp_path / "slq")
    assert from_folder.rank(captions[0], images)[0]["corpus_id"] == 0
    with pytest.raises(SLQInputError, match="candidate 0 is a text"):
        reranker.predict([("a red square", "a blue circle")])


def test_rewrite_scores_the_backbones_own_rewrite(scenes, monkeypatch):
    """The toy backbone rewrites a knowledge caption into the explicit caption; the rewrite is what gets scored."""
    model, processor = _load("toy", None)
    images = [s.image for s in scenes]
    calls = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: (calls.append(1), generate(*a, **k))[1])
    cache: dict = {}
    result = rerank(model, processor, scenes[1].knowledge_caption, images, rewrite="{text}", rewrite_cache=cache)
    assert result.rewritten == [scenes[1].caption] * len(images) and len(calls) == 1  # one query, one rewrite
    plain = rerank(model, processor, scenes[1].caption, images)
    torch.testing.assert_close(result.scores, plain.scores, atol=0, rtol=0)
    assert result.order[0].item() == 1
    again = rerank(model, processor, scenes[1].knowledge_caption, images, rewrite="{text}", rewrite_cache=cache)
    assert len(calls) == 1 and torch.equal(again.scores, result.scores)  # served from the cache
    texts = [s.knowledge_caption for s in scenes]
    by_image = rerank(model, processor, scenes[4].image, texts, rewrite="{text}")
    assert by_image.rewritten == [s.caption for s in scenes] and by_image.order[0].item() == 4
    with pytest.raises(ValueError, match="no '\\{text\\}' field"):
        rerank(model, processor, scenes[1].caption, images, rewrite="describe")


def test_readme_rerank_example_runs(monkeypatch, capsys):
    from helpers import run_readme_example

    run_readme_example("rerank", Path(__file__).resolve().parents[1], monkeypatch)
    out = capsys.readouterr().out
    assert "best image: 3" in out  # the toy backbone finds the scene its caption describes


def test_rerank_leaves_the_backbones_rope_state_alone(scenes):
    """Qwen-VL keeps the rope deltas of its last call on the model, where a concurrent generate reads them: the
    reranker hands its passes explicit positions, so that state is never written."""
    model, processor = _load("toy", None)
    sentinel = torch.full((1, 1), 12345)
    model.model.rope_deltas = sentinel
    rerank(model, processor, scenes[0].image, [s.caption for s in scenes], batch_size=2)
    rerank(model, processor, scenes[0].caption, [s.image for s in scenes], batch_size=2)
    rerank(model, processor, scenes[0].image, [s.caption for s in scenes], share_prefix=False)
    assert model.model.rope_deltas is sentinel


def test_slq_model_rerank_method(toy_slq, scenes):
    captions = [s.caption for s in scenes]
    result = toy_slq.rerank(scenes[2].image, captions, top_k=2, batch_size=2)
    expected = rerank(toy_slq.backbone, toy_slq.processor, scenes[2].image, captions, top_k=2)
    assert torch.equal(result.scores, expected.scores)
    assert result.order.tolist() == expected.order.tolist() and result.order[0].item() == 2
    with pytest.raises(SLQInputError, match="input 0"):
        toy_slq.rerank("a red square", [None])


def test_cache_copy_fallback_equals_the_expanded_views(scenes, monkeypatch):
    """Caches other than plain dynamic layers are deep-copied and repeated per batch: same scores as the views."""
    import slq_hf.modeling.reranking as reranking

    model, processor = _load("toy", None)
    captions = [s.caption for s in scenes]
    views = rerank(model, processor, scenes[1].image, captions, batch_size=2)

    monkeypatch.setattr(reranking, "_expand_cache", reranking._copy_cache)
    copies = rerank(model, processor, scenes[1].image, captions, batch_size=2)
    torch.testing.assert_close(views.scores, copies.scores, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_image_text_candidates_and_an_instruction_match_the_reference(family, tiny_backbone_path, scenes):
    """A candidate {"image", "text"} puts its text after the image in the user turn; ``prompt=`` goes before it."""
    model, processor = _load(family, tiny_backbone_path)
    query = scenes[0].caption
    candidates = [{"image": s.image, "text": "the shape"} for s in scenes[:3]]
    result = rerank(model, processor, query, candidates, prompt="describe")
    expected = [reference_likelihood(family, model, processor, s.image, query, "the shape", "describe")
                for s in scenes[:3]]
    torch.testing.assert_close(result.scores, torch.tensor(expected), atol=1e-5, rtol=0)
    plain = rerank(model, processor, query, [s.image for s in scenes[:3]])
    assert not torch.allclose(plain.scores, result.scores, atol=1e-4)  # the extra text and instruction count


def test_demo_rerank_rows(toy_slq, monkeypatch):
    """examples/demo_rerank.rerank_rows, the function the demo wires in, at a tiny scale."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "examples"))
    from demo_rerank import format_rows, rerank_rows

    rows = rerank_rows(toy_slq, toy_scenes.heldout_scenes()[:8], top_k=3)
    columns = {f"{p} {d}" for p in ("caption", "knowledge") for d in ("t2i", "i2t")}
    assert set(rows["SLQ"]) == columns
    reranked = ["SLQ + rerank top-3 (likelihood)", "SLQ + rerank top-3 (likelihood, backbone rewrites the text first)"]
    for name in reranked:
        assert set(rows[name]) == columns | {"ms per query"} and rows[name]["ms per query"] > 0
    ceiling = rows["SLQ R@3 (the most reranking its top 3 can reach)"]
    assert all(rows[name][c] <= ceiling[c] for name in rows if "rerank" in name for c in columns)
    assert "| SLQ |" in format_rows(rows)


def test_cache_argument_name_old_and_new():
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` in some forwards; both spellings are handled."""
    import inspect
    from types import SimpleNamespace

    from slq_hf.modeling.prefix_cache import cache_kwarg
    from slq_hf.modeling.reranking import _output_cache

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None):
            return input_ids

    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None):
            return input_ids

    assert cache_kwarg(Old) == "past_key_values" and cache_kwarg(New) == "cache"
    model, _ = _load("toy", None)
    # The installed transformers' spelling (5.20-5.23: past_key_values, 5.24+: cache), read from its signature.
    expected = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    assert cache_kwarg(type(model)) == expected
    assert _output_cache(SimpleNamespace(past_key_values="old")) == "old"
    assert _output_cache(SimpleNamespace(cache="new", past_key_values=None)) == "new"


# ------------------------------------------------------------------------------ threads, lengths, templates, arguments
def test_rerank_never_switches_the_shared_tokenizer_to_split_special_tokens(scenes, monkeypatch):
    """``tokenizer(..., split_special_tokens=True)`` flips a switch on the shared Rust tokenizer; a chat template
    tokenised meanwhile in another thread (encode, generate, another rerank) then gets ``<|im_start|>`` as the
    literal pieces ``<``, ``|``, ... . The reranker must tokenise its literal answers without touching it."""
    model, processor = _load("toy", None)
    tokenizer = processor.tokenizer
    recorder = SwitchRecorder(tokenizer._tokenizer)
    monkeypatch.setattr(tokenizer, "_tokenizer", recorder)
    captions = [s.caption for s in scenes]
    tricky = captions[0] + " <|im_end|>"  # a literal control string still reads as text (see the test above)
    scores = rerank(model, processor, scenes[0].image, [tricky, captions[0]]).scores
    rerank(model, processor, captions[1], [s.image for s in scenes[:2]])
    assert {"encode", "encode_batch"} & recorder.used  # the recorder sat on the reranker's path
    assert True not in recorder.values
    assert scores[0] < scores[1] - 1.0


def test_rerank_in_a_thread_leaves_another_threads_chat_template_intact(scenes):
    """The user-visible side of the test above: prompts tokenised while another thread reranks are unchanged."""
    import threading

    model, processor = _load("toy", None)
    messages = [{"role": "user", "content": [{"type": "text", "text": "a red circle"}]}]

    def prompt_ids() -> list[int]:
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"][0]

    expected = prompt_ids()
    assert expected[0] == processor.tokenizer.convert_tokens_to_ids("<|im_start|>")  # one token, as a template has
    done = threading.Event()

    def reranking() -> None:
        while not done.is_set():
            rerank(model, processor, scenes[0].image, ["a red circle in the top left", "a blue square"])

    worker = threading.Thread(target=reranking)
    worker.start()
    try:
        seen = [prompt_ids() for _ in range(1500)]
    finally:
        done.set()
        worker.join()
    assert all(ids == expected for ids in seen)


@pytest.mark.parametrize("scorer", ["likelihood", "yes_no"])
@pytest.mark.parametrize("share_prefix", [True, False])
def test_a_pair_longer_than_the_backbone_positions_is_refused_on_every_path(scenes, share_prefix, scorer):
    """The toy backbone has 256 positions: a 300-token caption cannot be scored, with or without the shared prefix
    (which builds its rows without the processor and once skipped the check). yes_no puts the text inside its
    question, which was cut to fit (with a warning): its tail went, and texts differing past the cut tied."""
    model, processor = _load("toy", None)
    assert model.config.text_config.max_position_embeddings == 256
    long = " ".join(["a red circle"] * 100)  # 300 word tokens in the toy's word-level vocabulary
    kwargs = {"yes_no": YesNoPrompt("{text} ? a or the", yes="a", no="the")} if scorer == "yes_no" else {}
    with pytest.raises(SLQInputError, match="candidate 1 has .* more than the backbone's 256 positions"):
        rerank(model, processor, scenes[0].image, [scenes[0].caption, long], scorer, share_prefix=share_prefix,
               **kwargs)
    with pytest.raises(SLQInputError, match="candidate 0 has .* more than the backbone's 256 positions"):
        rerank(model, processor, long, [scenes[0].image], scorer, **kwargs)


def test_likelihood_on_a_template_whose_answer_header_differs_in_whitespace(tiny_backbone_path, scenes):
    """LLaVA-OneVision's template writes an assistant turn as ``<|im_start|>assistant \\n{text}<|im_end|>`` but its
    generation prompt as ``<|im_start|>assistant\\n``: the answer follows the generation prompt directly."""
    model, processor = _load("llava_onevision", tiny_backbone_path)
    user = [{"role": "user", "content": [{"type": "text", "text": "q"}]}]
    assert processor.apply_chat_template(user, add_generation_prompt=True, tokenize=False).endswith("assistant\n")
    captions = [s.caption for s in scenes[:3]]
    tokenizer = processor.tokenizer
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    expected = []
    for text in captions:
        answer = tokenizer(text, add_special_tokens=False).input_ids + [end]
        batch, start = _reference_inputs(processor, scenes[1].image, None, answer)
        logprobs = torch.log_softmax(model(**batch).logits[0].float(), dim=-1)
        expected.append(logprobs[start - 1 : -1].gather(1, batch["input_ids"][0, start:, None]).mean().item())
    shared = rerank(model, processor, scenes[1].image, captions, batch_size=2)
    torch.testing.assert_close(shared.scores, torch.tensor(expected), atol=1e-5, rtol=0)
    full = rerank(model, processor, captions[0], [s.image for s in scenes[:3]], batch_size=2)
    assert abs(full.scores[1].item() - expected[0]) < 1e-5


def test_integer_likes_are_accepted_for_top_k_and_batch_size(scenes):
    """``top_k=np.int64(2)`` (numpy arithmetic, e.g. ``np.minimum(k, n)``) means 2, as it does for slicing; floats,
    bools and non-positive values stay refused."""
    import numpy as np

    model, processor = _load("toy", None)
    captions = [s.caption for s in scenes]
    plain = rerank(model, processor, scenes[3].image, captions, top_k=2, batch_size=2)
    for top_k, batch_size in ((np.int64(2), np.int32(2)), (torch.tensor(2), 2)):
        result = rerank(model, processor, scenes[3].image, captions, top_k=top_k, batch_size=batch_size)
        assert result.order.tolist() == plain.order.tolist() and torch.equal(result.scores, plain.scores)
    for bad in (2.0, np.float64(2.0), False, np.int64(0), -3):
        with pytest.raises(ValueError, match="top_k"):
            rerank(model, processor, scenes[3].image, captions, top_k=bad)


@pytest.mark.parametrize("scorer, option", [("likelihood", {"yes_no": YES_NO_DEFAULTS["qwen3_vl"]}),
                                            ("yes_no", {"prompt": "Describe the image."}),
                                            ("yes_no", {"end_of_turn": False})])
def test_an_option_of_the_other_scorer_is_refused(scenes, scorer, option):
    """yes_no= with likelihood (or prompt= / end_of_turn= with yes_no) was accepted and silently ignored."""
    model, processor = _load("toy", None)
    with pytest.raises(ValueError, match=f"{next(iter(option))}= only applies to the other scorer"):
        rerank(model, processor, scenes[0].image, [scenes[0].caption], scorer, **option)



@pytest.mark.parametrize("share_prefix", [True, False])
def test_a_non_finite_score_is_refused_not_ranked_first(tiny_backbone_path, scenes, share_prefix):
    """A broken checkpoint row (or a float16 overflow) makes a pair's score NaN, which torch.sort puts first: the
    broken candidate came back as the best match (order[0], top_k=1)."""
    model, processor = _load("qwen2_vl", tiny_backbone_path)  # untied embeddings: only pairs holding "Q" break
    broken = processor.tokenizer("Q", add_special_tokens=False).input_ids
    assert len(broken) == 1 and not any("Q" in s.caption for s in scenes)
    with torch.no_grad():
        model.get_input_embeddings().weight[broken[0]] = float("nan")
    captions = [s.caption for s in scenes[:3]]
    assert torch.isfinite(rerank(model, processor, scenes[0].image, captions, share_prefix=share_prefix).scores).all()
    with pytest.raises(ValueError, match="pair with candidate 3 nan .* check its weights and dtype"):
        rerank(model, processor, scenes[0].image, captions + ["QQQ"], top_k=1, share_prefix=share_prefix)
