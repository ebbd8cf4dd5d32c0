"""Hub packaging: `slq-hf export` (hub-ready folder + model card), `slq-hf push` / SLQModel.push_to_hub (upload
intercepted at the huggingface_hub API boundary), `slq-hf convert-reference`, and the config version stamps."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, RepoUrl
from huggingface_hub.errors import EntryNotFoundError
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModel

import slq_hf
from slq_hf import SLQConfig, SLQModel
from slq_hf.cli import main as cli_main
from slq_hf.hub import collect_upload_files, convert_reference, export, load_eval_results, push, render_model_card

from helpers import scene

NUM_QUERIES = 4
REPO_ID = "test-org/slq-tiny"
REMOTE_CARD = "---\nlicense: mit\ntags:\n- mine\n---\n# Written by the repository's owner\n"
ST_FILES = {"modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
            "1_Normalize/config.json"}


TEXTS = ["a red square on grey", "hello world"]
IMAGES = [scene(64, 64, (255, 0, 0)), scene(96, 64, (0, 0, 255))]


@pytest.fixture(scope="module")
def trained(tiny_backbone_path, tmp_path_factory):
    """(model, saved SLQ folder): queries set to non-default values, as after training."""
    model = SLQModel.from_backbone(tiny_backbone_path("qwen3_vl"), num_queries=NUM_QUERIES)
    with torch.no_grad():
        model.queries.copy_(torch.randn(model.queries.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
        model.logit_scale.fill_(3.0)
    folder = tmp_path_factory.mktemp("slq") / "model"
    model.save_pretrained(folder)
    return model, folder


def _export(src: Path, out: Path, **kwargs) -> list[str]:
    # The tiny backbone is pinned as a local path, which export rightly warns about; that warning is tested below.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The backbone is pinned as the local path")
        return export(src, out, **kwargs)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    _, folder = trained
    out = tmp_path_factory.mktemp("hub") / "slq-tiny"
    files = _export(folder, out, repo_id=REPO_ID, backbone_revision="0123456789abcdef")
    return out, files


def _results_json(tmp_path: Path) -> Path:
    """A results file written by slq_hf.evaluation itself (the format `slq-hf eval --output` produces)."""
    from slq_hf.evaluation import RetrievalDataset, evaluate_embeddings, save_results_json

    # 4 images, one caption each. Texts 0-2 match their image exactly; text 3 points mostly at image 0, so text 3
    # retrieves the wrong image (t2i R@1 = 3/4) while every image's nearest text is still its own (i2t R@1 = 1).
    # Different values per direction catch a swap; R@5 = 1 both ways.
    dataset = RetrievalDataset(images=["a.png", "b.png", "c.png", "d.png"], texts=["a", "b", "c", "d"],
                               text_to_image=[0, 1, 2, 3], name="tiny-flickr")
    images = torch.eye(4)
    texts = torch.eye(4)
    texts[3] = torch.tensor([1.0, 0.0, 0.0, 0.2])
    result = evaluate_embeddings(dataset, images, texts)
    result["data"] = {"path": "tiny.jsonl", "format": "jsonl", "split": "test"}
    return save_results_json(result, tmp_path / "results.json")


# ------------------------------------------------------------------------------------------------------- export
def test_export_file_set_is_queries_only(exported, trained, tiny_backbone_path):
    out, files = exported
    names = set(files)
    assert {"config.json", "model.safetensors", "README.md", "configuration_slq.py", "modeling_slq.py",
            "version.py", "tokenizer.json", "tokenizer_config.json"} <= names
    assert ST_FILES <= names
    assert [n for n in names if n.endswith(".safetensors")] == ["model.safetensors"]
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert sorted(handle.keys()) == ["logit_scale", "queries"]
    backbone_bytes = sum(p.stat().st_size for p in Path(tiny_backbone_path("qwen3_vl")).glob("*.safetensors"))
    assert (out / "model.safetensors").stat().st_size < backbone_bytes / 10
    config = json.loads((out / "config.json").read_text())
    assert config["backbone_name_or_path"] == tiny_backbone_path("qwen3_vl")
    assert config["backbone_revision"] == "0123456789abcdef"
    assert config["auto_map"]["AutoModel"] == "modeling_slq.SLQModel"
    assert config["slq_hf_version"] == slq_hf.__version__
    assert config["torch_version"] == str(torch.__version__)
    assert config["transformers_version"]


def test_export_leaves_training_leftovers_behind(trained, tmp_path):
    _, folder = trained
    src = tmp_path / "run"
    shutil.copytree(folder, src)
    (src / "optimizer.pt").write_bytes(b"x" * 100)
    (src / "training_args.bin").write_bytes(b"x" * 100)
    (src / "checkpoint-10").mkdir()
    (src / "checkpoint-10" / "model.safetensors").write_bytes(b"x")
    files = _export(src, tmp_path / "hub")
    assert not {"optimizer.pt", "training_args.bin"} & set(files)
    assert not any(name.startswith("checkpoint-10") for name in files)
    assert not (tmp_path / "hub" / "checkpoint-10").exists()


def test_export_reload_automodel_identical(exported, trained):
    model, _ = trained
    out, _ = exported
    reloaded = AutoModel.from_pretrained(out)  # slq_hf is imported: the registered class
    assert isinstance(reloaded, SLQModel) and reloaded.config.backbone_revision == "0123456789abcdef"
    torch.testing.assert_close(reloaded.encode(TEXTS + IMAGES), model.encode(TEXTS + IMAGES), atol=1e-6, rtol=0)


def test_export_reload_remote_code_and_sentence_transformers_identical(exported, trained, tmp_path):
    """What a Hub user gets without slq_hf installed: AutoModel and SentenceTransformer on the exported code only."""
    pytest.importorskip("sentence_transformers")
    model, _ = trained
    out, _ = exported
    torch.save({"texts": model.encode(TEXTS), "images": model.encode(IMAGES)}, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from PIL import Image
        from sentence_transformers import SentenceTransformer
        from transformers import AutoModel

        def scene(width, height, colour):
            image = Image.new("RGB", (width, height), (128, 128, 128))
            image.paste(colour, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
            return image

        texts, images = {TEXTS!r}, [scene(64, 64, (255, 0, 0)), scene(96, 64, (0, 0, 255))]
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        model = AutoModel.from_pretrained({str(out)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        auto = (model.encode(texts) - expected["texts"]).abs().max().item()
        auto = max(auto, (model.encode(images) - expected["images"]).abs().max().item())
        st = SentenceTransformer({str(out)!r}, trust_remote_code=True, device="cpu")
        st_texts = torch.as_tensor(st.encode(texts))
        st_images = torch.as_tensor(st.encode(images))
        st_diff = max((st_texts - expected["texts"]).abs().max().item(),
                      (st_images - expected["images"]).abs().max().item())
        assert "slq_hf" not in sys.modules, "slq_hf was imported"
        print("DIFF", auto, st_diff)
    """)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    auto_diff, st_diff = map(float, result.stdout.split("DIFF")[1].split())
    assert auto_diff < 1e-6 and st_diff < 1e-5, (auto_diff, st_diff)


def test_export_refuses_existing_folder_unless_overwrite(trained, tmp_path):
    _, folder = trained
    out = tmp_path / "hub"
    _export(folder, out)
    with pytest.raises(FileExistsError, match="overwrite"):
        _export(folder, out)
    _export(folder, out, overwrite=True)
    # An earlier export used as a run folder since: --overwrite replaces it whole, nothing of it is carried along
    (out / "checkpoint-1").mkdir()
    (out / "checkpoint-1" / "optimizer.pt").write_bytes(b"state")
    (out / "notes.txt").write_text("old")
    files = _export(folder, out, overwrite=True)
    assert not (out / "checkpoint-1").exists() and not (out / "notes.txt").exists()
    assert not any("checkpoint-1" in str(f) for f in files)
    other = tmp_path / "not-slq"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an SLQ folder"):
        _export(folder, other, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"


def test_export_warns_about_local_backbone_and_repins(trained, tmp_path):
    _, folder = trained
    with pytest.warns(UserWarning, match="local path"):
        export(folder, tmp_path / "a")
    with pytest.warns(UserWarning, match="not pinned to a revision"):
        export(folder, tmp_path / "b", backbone="Qwen/Qwen3-VL-2B-Instruct")
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["backbone_name_or_path"] == "Qwen/Qwen3-VL-2B-Instruct"
    card = ModelCard.load(tmp_path / "b" / "README.md")
    assert card.data.base_model == "Qwen/Qwen3-VL-2B-Instruct"
    assert "https://huggingface.co/Qwen/Qwen3-VL-2B-Instruct" in card.text


# --------------------------------------------------------------------------------------------------- model card
def test_readme_renders_the_real_numbers(trained, tmp_path):
    _, folder = trained
    results = _results_json(tmp_path)
    stored = json.loads(results.read_text())["metrics"]
    assert stored["t2i"]["R@1"] == pytest.approx(0.75) and stored["i2t"]["R@1"] == pytest.approx(1.0)
    out = tmp_path / "hub"
    _export(folder, out, eval_results=results, repo_id=REPO_ID)
    card = ModelCard.load(out / "README.md")
    # model-index: every recall of the file, as a percentage, under its own task and the dataset's split.
    index = {(r.task_type, r.metric_name): r for r in card.data.eval_results}
    assert index[("text-to-image-retrieval", "R@1")].metric_value == 75.0
    assert index[("image-to-text-retrieval", "R@1")].metric_value == 100.0
    assert index[("text-to-image-retrieval", "R@5")].metric_value == 100.0
    assert {r.dataset_name for r in card.data.eval_results} == {"tiny-flickr"}
    assert {r.dataset_split for r in card.data.eval_results} == {"test"}
    assert len(card.data.eval_results) == len(stored) * 3  # 5 direction blocks (with dedup) x R@1/5/10
    assert "| tiny-flickr | test | text → image | 75.0 | 100.0 | 100.0 |" in card.text
    assert "| tiny-flickr | test | image → text | 100.0 | 100.0 | 100.0 |" in card.text
    assert "No evaluation results" not in card.text
    assert f'AutoModel.from_pretrained("{REPO_ID}"' in card.text
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "feature-extraction"
    assert {"slq", "sentence-transformers", "multimodal-embedding"} <= set(card.data.tags)
    assert "2604.13710" in card.text


def test_readme_without_results_says_so(exported):
    out, _ = exported
    card = ModelCard.load(out / "README.md")
    assert "No evaluation results were provided" in card.text
    assert card.data.eval_results is None and "model-index" not in (out / "README.md").read_text()
    assert "were not recorded" in card.text  # no training info either
    # Facts that do come from the checkpoint: N_q x hidden, parameter count, learned temperature exp(-3).
    hidden = json.loads((out / "config.json").read_text())["hidden_size"]
    assert f"| Latent queries | {NUM_QUERIES} × {hidden} |" in card.text
    assert f"| Trainable parameters | {NUM_QUERIES * hidden + 1:,} " in card.text
    assert "projection head" not in card.text and f"| Embedding dimension | {hidden} |" in card.text  # no head here
    assert "0.0498 (learned" in card.text
    assert card.data.license == "other"  # the licence placeholder, pointing at the backbone's terms


def test_readme_training_info_from_trainer_state(trained, tmp_path):
    _, folder = trained
    src = tmp_path / "run"
    shutil.copytree(folder, src)
    (src / "trainer_state.json").write_text(json.dumps({"global_step": 1234, "epoch": 1.0, "train_batch_size": 32}))
    _export(src, tmp_path / "a")
    text = (tmp_path / "a" / "README.md").read_text()
    assert "| steps | 1234 |" in text and "| batch size per device | 32 |" in text
    assert "were not recorded" not in text
    _export(src, tmp_path / "b", training_info={"dataset": "COCO captions (Karpathy train)", "learning_rate": 5e-4})
    text = (tmp_path / "b" / "README.md").read_text()
    assert "| dataset | COCO captions (Karpathy train) |" in text and "| learning rate | 0.0005 |" in text


def test_readme_training_info_from_the_run(trained, tmp_path):
    """What `slq-hf train` knew reaches the card: its training_summary.json, else the newest checkpoint's state."""
    _, folder = trained
    src = tmp_path / "run"
    shutil.copytree(folder, src)
    for step, batch in ((2, 8), (10, 16)):  # checkpoint-10 is the newer one (numeric, not text order)
        (src / f"checkpoint-{step}").mkdir()
        (src / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps(
            {"global_step": step, "epoch": step / 10, "train_batch_size": batch,
             "log_history": [{"learning_rate": 5e-4, "step": 1}, {"learning_rate": 2e-4, "step": 2}]}))
    _export(src, tmp_path / "a")
    text = (tmp_path / "a" / "README.md").read_text()
    assert "| steps | 10 |" in text and "| batch size per device | 16 |" in text and "| epochs | 1.0 |" in text
    assert "| learning rate (peak logged) | 0.0005 |" in text
    summary = {"train_data": "coco_train.jsonl", "steps": 1000, "epochs": 1.0, "batch_size_per_device": 32,
               "learning_rate": 5e-4, "warmup": None}
    (src / "training_summary.json").write_text(json.dumps(summary))
    _export(src, tmp_path / "b")
    text = (tmp_path / "b" / "README.md").read_text()
    for row in ("| train data | coco_train.jsonl |", "| steps | 1000 |", "| batch size per device | 32 |",
                "| learning rate | 0.0005 |"):
        assert row in text
    assert "warmup" not in text and "| steps | 10 |" not in text
    # The shape `slq-hf train` writes: nested objects become rows, this machine's paths stay off the card.
    (src / "training_summary.json").write_text(json.dumps({
        "output_dir": "/home/me/run", "steps": 7, "train_loss": 1.23456789,
        "train_data": {"path": "pairs.jsonl", "examples": 64}, "final_eval": {"eval_loss": 0.5}}))
    _export(src, tmp_path / "nested")
    text = (tmp_path / "nested" / "README.md").read_text()
    for row in ("| train data path | pairs.jsonl |", "| train data examples | 64 |", "| final eval eval loss | 0.5 |",
                "| train loss | 1.234568 |"):
        assert row in text
    assert "/home/me/run" not in text
    (src / "training_summary.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="training_summary.json: the training summary must be a JSON object"):
        _export(src, tmp_path / "c")


def test_several_eval_results_all_reach_the_card(trained, tmp_path):
    _, folder = trained
    explicit = _results_json(tmp_path)
    knowledge = tmp_path / "knowledge.json"
    knowledge.write_text(json.dumps({"dataset": {"name": "toy-karr:knowledge", "split": "test"},
                                     "metrics": {"t2i": {"R@1": 0.25, "R@5": 0.5}}}))
    out = tmp_path / "hub"
    _export(folder, out, eval_results=[explicit, knowledge])
    card = ModelCard.load(out / "README.md")
    assert {r.dataset_name for r in card.data.eval_results} == {"tiny-flickr", "toy-karr:knowledge"}
    assert "| tiny-flickr | test | text → image | 75.0 |" in card.text
    assert "| toy-karr:knowledge | test | text → image | 25.0 | 50.0 |" in card.text
    assert cli_main(["export", str(folder), "--out", str(tmp_path / "cli"), "--eval-results", str(explicit),
                     str(knowledge)]) == 0
    assert "toy-karr:knowledge" in (tmp_path / "cli" / "README.md").read_text()
    with pytest.raises(ValueError, match=r"again.json: tiny-flickr/i2t \(split test\) is also in .*results.json.*"
                                         r"set \"dataset\": \{\"name\"\} in one of the results files"):
        load_eval_results([explicit, shutil.copy(explicit, tmp_path / "again.json")])
    renamed = json.loads((tmp_path / "again.json").read_text())  # the fix the message gives is accepted
    renamed["dataset"]["name"] = "other-flickr"
    (tmp_path / "again.json").write_text(json.dumps(renamed))
    assert len(load_eval_results([explicit, tmp_path / "again.json"])) == 2 * len(load_eval_results([explicit]))


def test_eval_results_validation(tmp_path):
    percent = tmp_path / "percent.json"
    percent.write_text(json.dumps({"dataset": {"name": "x"}, "metrics": {"t2i": {"R@1": 85.8}}}))
    with pytest.raises(ValueError, match=r"fractions in \[0, 1\]"):
        load_eval_results(percent)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        load_eval_results(broken)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"accuracy": 0.9}))
    with pytest.raises(ValueError, match="not an evaluation results file"):
        load_eval_results(other)
    # Several datasets in one file: {"name": result} and {"results": [...]} both work.
    block = {"metrics": {"i2t": {"R@1": 0.5, "R@5": 0.9}}}
    several = tmp_path / "several.json"
    several.write_text(json.dumps({"coco": block, "flickr": block}))
    assert [(b.dataset, b.recalls["R@1"]) for b in load_eval_results(several)] == [("coco", 0.5), ("flickr", 0.5)]


def test_template_errors_on_undefined_variables(trained, tmp_path):
    _, folder = trained
    template = tmp_path / "card.md"
    template.write_text("---\n{{ card_data }}\n---\n# {{ model_name }} {{ no_such_variable }}\n")
    with pytest.raises(Exception, match="no_such_variable"):
        render_model_card(SLQConfig.from_pretrained(folder), model_name="x", template=template)


# ------------------------------------------------------------------------------------------------------------ push
@pytest.fixture
def hub_calls(monkeypatch):
    """Intercept huggingface_hub at its API boundary: record create_repo / create_commit / file_exists calls."""
    calls: dict[str, list] = {"create_repo": [], "create_commit": [], "file_exists": []}
    remote_files: set[str] = set()

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"].append({"repo_id": repo_id, **kwargs})
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        operations = list(operations)
        # Read the files now: push_to_hub uploads from a temporary folder that is gone afterwards.
        contents = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        calls["create_commit"].append({"repo_id": repo_id, "operations": operations, "contents": contents,
                                       **kwargs})
        return f"https://huggingface.co/{repo_id}/commit/0000"

    def file_exists(self, repo_id, filename, **kwargs):
        calls["file_exists"].append(filename)
        return filename in remote_files

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(HfApi, "file_exists", file_exists)

    def load_card(repo_id, **kwargs):  # transformers' push_to_hub reads the repository's card first
        calls["file_exists"].append("README.md")
        if "README.md" not in remote_files:
            raise EntryNotFoundError(f"{repo_id} has no README.md")
        return ModelCard(REMOTE_CARD)

    monkeypatch.setattr(ModelCard, "load", load_card)
    calls["remote_files"] = remote_files
    return calls


def _uploaded(calls) -> dict[str, bytes]:
    (commit,) = calls["create_commit"]
    return commit["contents"]


def test_push_uploads_exactly_the_export(exported, hub_calls):
    out, files = exported
    push(out, REPO_ID, private=True)
    assert hub_calls["create_repo"] == [{"repo_id": REPO_ID, "private": True, "exist_ok": True, "repo_type": "model"}]
    uploaded = _uploaded(hub_calls)
    assert sorted(uploaded) == files
    assert all(uploaded[name] == (out / name).read_bytes() for name in files)
    assert [name for name in uploaded if name.endswith((".safetensors", ".bin", ".pt", ".gguf"))] == [
        "model.safetensors"]


def test_push_cli_private_flag_and_dry_run(exported, hub_calls, capsys):
    out, files = exported
    assert cli_main(["push", str(out), "--repo-id", REPO_ID, "--dry-run"]) == 0
    assert not hub_calls["create_repo"] and not hub_calls["create_commit"]
    listing = capsys.readouterr().out
    assert all(f"  {name}\n" in listing for name in files)
    assert cli_main(["push", str(out), "--repo-id", REPO_ID, "--private"]) == 0
    assert hub_calls["create_repo"][0]["private"] is True
    assert sorted(_uploaded(hub_calls)) == files


# backup-name / data-name / pickle-renamed: the guard reads what a file holds, not only its name, so a backbone shard
# kept as a backup or renamed goes up under no name.
@pytest.mark.parametrize("intruder", ["backbone-copy", "sharded", "pickle", "full-model", "backup-name", "data-name",
                                      "pickle-renamed"])
def test_push_refuses_backbone_weights(exported, tmp_path, hub_calls, tiny_backbone_path, intruder):
    out, _ = exported
    folder = tmp_path / "hub"
    shutil.copytree(out, folder)
    backbone_weights = next(Path(tiny_backbone_path("qwen3_vl")).glob("*.safetensors"))
    if intruder == "backbone-copy":
        shutil.copy(backbone_weights, folder / "backbone.safetensors")
    elif intruder == "sharded":
        (folder / "model.safetensors.index.json").write_text("{}")
    elif intruder == "pickle":
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x04N.")
    elif intruder == "backup-name":
        shutil.copy(backbone_weights, folder / "model.safetensors.bak")
    elif intruder == "data-name":
        shutil.copy(backbone_weights, folder / "extra_data.json")
    elif intruder == "pickle-renamed":
        torch.save({"w": torch.zeros(3)}, folder / "weights.dat")  # torch.save's zip format
    else:  # the backbone's weights under the SLQ file name
        shutil.copy(backbone_weights, folder / "model.safetensors")
    with pytest.raises(ValueError, match="refusing to upload"):
        push(folder, REPO_ID)
    assert cli_main(["push", str(folder), "--repo-id", REPO_ID]) == 2
    assert not hub_calls["create_repo"] and not hub_calls["create_commit"]  # refused before any network call


def test_model_push_to_hub_uploads_queries_only(trained, hub_calls):
    model, folder = trained
    model.push_to_hub(REPO_ID, private=False, commit_message="queries")
    uploaded = _uploaded(hub_calls)
    saved = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    # The same set save_pretrained writes, plus a short model card because the repository had none.
    assert set(uploaded) == saved | {"README.md"}
    assert [name for name in uploaded if name.endswith(".safetensors")] == ["model.safetensors"]
    assert hub_calls["create_commit"][0]["commit_message"] == "queries"
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        assert sorted(handle.keys()) == ["logit_scale", "queries"]
    assert uploaded["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    card = ModelCard(uploaded["README.md"].decode())  # transformers' starter card; slq-hf export makes the full one
    assert card.data.library_name == "transformers"


def test_model_push_to_hub_keeps_existing_card(trained, hub_calls):
    model, _ = trained
    hub_calls["remote_files"].add("README.md")
    model.push_to_hub(REPO_ID)
    assert _uploaded(hub_calls)["README.md"].decode() == str(ModelCard(REMOTE_CARD))  # the repository's own card
    assert "model.safetensors" in _uploaded(hub_calls)


def test_export_and_push_input_errors(exported, tiny_backbone_path, tmp_path, hub_calls):
    with pytest.raises(ValueError, match="model_type 'qwen3_vl', not 'slq'"):
        export(tiny_backbone_path("qwen3_vl"), tmp_path / "out")
    out, _ = exported
    with pytest.raises(ValueError, match="repo_id 'a/b/c' is invalid"):
        push(out, "a/b/c")
    with pytest.warns(UserWarning, match="do not load 'other-org/name'"):
        push(out, "other-org/name")  # the card's snippets name REPO_ID


def test_collect_upload_files_skips_hidden(exported, tmp_path):
    out, files = exported
    folder = tmp_path / "hub"
    shutil.copytree(out, folder)
    (folder / ".cache").mkdir()
    (folder / ".cache" / "weights.safetensors").write_bytes(b"x")
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    assert collect_upload_files(folder) == files


# --------------------------------------------------------------------------------------------- convert-reference
def test_convert_reference_round_trip(tiny_backbone_path, tmp_path, capsys):
    backbone = tiny_backbone_path("qwen3_vl")
    hidden = SLQModel.from_backbone(backbone, num_queries=1).config.hidden_size
    queries = torch.randn(5, hidden, generator=torch.Generator().manual_seed(3))
    torch.save(queries, tmp_path / "meta_queries.pt")
    out = tmp_path / "slq"
    assert cli_main(["convert-reference", str(tmp_path / "meta_queries.pt"), "--backbone", backbone,
                     "--out", str(out), "--dtype", "float32"]) == 0
    loaded = AutoModel.from_pretrained(out)
    assert loaded.config.num_queries == 5 and loaded.config.backbone_name_or_path == backbone
    torch.testing.assert_close(loaded.queries.detach(), queries, atol=0, rtol=0)
    assert loaded.encode(TEXTS).shape == (2, hidden)
    # [hidden]: one vector in --num-queries slots.
    torch.save(queries[0], tmp_path / "one.pt")
    model = SLQModel.from_pretrained(convert_reference(tmp_path / "one.pt", backbone, tmp_path / "one", num_queries=3))
    torch.testing.assert_close(model.queries.detach(), queries[0].expand(3, -1), atol=0, rtol=0)


def test_convert_reference_rejects_wrong_width(tiny_backbone_path, tmp_path, capsys):
    backbone = tiny_backbone_path("qwen3_vl")
    hidden = SLQModel.from_backbone(backbone, num_queries=1).config.hidden_size
    torch.save(torch.zeros(4, hidden + 8), tmp_path / "wide.pt")
    with pytest.raises(ValueError) as err:
        convert_reference(tmp_path / "wide.pt", backbone, tmp_path / "out")
    assert "wide.pt" in str(err.value) and str(hidden + 8) in str(err.value) and str(hidden) in str(err.value)
    assert cli_main(["convert-reference", str(tmp_path / "wide.pt"), "--backbone", backbone,
                     "--out", str(tmp_path / "out")]) == 2
    assert "hidden size" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    torch.save(torch.zeros(4, hidden), tmp_path / "four.pt")
    with pytest.raises(ValueError, match="num_queries=6"):
        convert_reference(tmp_path / "four.pt", backbone, tmp_path / "out", num_queries=6)


class _Payload:
    """Pickles to a call of Path.touch(marker): what a malicious checkpoint could run on torch.load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_convert_reference_refuses_pickled_code(tiny_backbone_path, tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"meta_queries": torch.zeros(4, 8), "extra": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refused to load"):
        convert_reference(tmp_path / "evil.pt", tiny_backbone_path("qwen3_vl"), tmp_path / "out")
    assert not marker.exists()
    # The payload is live: an unsafe load would have run it. This is what weights_only=True prevents.
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


# ------------------------------------------------------------------------------------------------ version stamps
def _saved_config(tmp_path: Path, **changes) -> Path:
    SLQConfig(num_queries=2, hidden_size=8).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(changes)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_config_records_versions(tmp_path):
    import transformers

    config = json.loads((_saved_config(tmp_path) / "config.json").read_text())
    assert config["slq_hf_version"] == slq_hf.__version__
    assert config["transformers_version"] == transformers.__version__
    assert config["torch_version"] == str(torch.__version__)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loading a config of this very version warns about nothing
        SLQConfig.from_pretrained(tmp_path)


def test_config_from_newer_slq_hf_warns(tmp_path):
    _saved_config(tmp_path, slq_hf_version="99.0.0")
    with pytest.warns(UserWarning, match=r"written by slq_hf 99\.0\.0.*upgrade slq_hf"):
        config = SLQConfig.from_pretrained(tmp_path)
    assert config.slq_hf_version == "99.0.0"
    _saved_config(tmp_path, slq_hf_version="0.0.1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an older writer is fine
        SLQConfig.from_pretrained(tmp_path)


def test_unknown_config_keys_are_dropped_with_upgrade_hint(tmp_path):
    _saved_config(tmp_path, slq_hf_version="99.0.0", query_sets=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = SLQConfig.from_pretrained(tmp_path)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert any("ignoring unknown config key(s) ['query_sets'] (written by slq_hf 99.0.0)" in m and
               "Upgrade slq_hf" in m for m in messages), messages
    assert any("written by slq_hf 99.0.0" in m and "upgrade slq_hf" in m for m in messages), messages
    assert not hasattr(config, "query_sets")
    config.save_pretrained(tmp_path / "again")
    assert "query_sets" not in json.loads((tmp_path / "again" / "config.json").read_text())


def test_version_has_one_source():
    from slq_hf.modeling.version import SLQ_HF_VERSION

    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    assert slq_hf.__version__ == SLQ_HF_VERSION == pyproject["project"]["version"]


# ---------------------------------------------------------------------------------------------------------- CLI help
@pytest.mark.parametrize("command, expected", [
    ("export", ["--eval-results", "README.md", "no number is ever made up"]),
    ("push", ["--repo-id", "--private", "backbone weights"]),
    ("convert-reference", ["--backbone", "weights_only=True", "[N_q, hidden]"]),
])
def test_cli_help_explains_itself(command, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main([command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert all(" ".join(e.split()) in text for e in expected), text


def test_export_cli(trained, tmp_path, capsys):
    _, folder = trained
    results = _results_json(tmp_path)
    out = tmp_path / "hub"
    assert cli_main(["export", str(folder), "--out", str(out), "--eval-results", str(results),
                     "--repo-id", REPO_ID, "--license", "apache-2.0"]) == 0
    captured = capsys.readouterr()
    assert "model.safetensors" in captured.out and "local path" in captured.err
    assert ModelCard.load(out / "README.md").data.license == "apache-2.0"
    assert cli_main(["export", str(folder), "--out", str(out)]) == 2  # exists, no --overwrite
    assert "overwrite" in capsys.readouterr().err
    assert cli_main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2


# ----------------------------------------------------------------------------------------------- provenance and safety
def test_export_refuses_an_out_folder_that_holds_the_source(trained, tmp_path):
    """`export run/checkpoint-5 --out run --overwrite` used to swap `run` out and delete it, checkpoint included."""
    _, folder = trained
    run = tmp_path / "run"
    shutil.copytree(folder, run)
    shutil.copytree(folder, run / "checkpoint-5")
    before = (run / "checkpoint-5" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="would delete the source"):
        _export(run / "checkpoint-5", run, overwrite=True)
    assert (run / "checkpoint-5" / "model.safetensors").read_bytes() == before


def _card_rows(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith("| ok ")]


def test_eval_results_given_twice_or_repeated_in_one_file_are_refused(tmp_path):
    """A comparison file {"baseline": ..., "slq": ...} on one dataset would put two R@1 values for one thing on the
    card, one of them another model's."""
    result = {"dataset": {"name": "ok"}, "metrics": {"t2i": {"R@1": 0.5}}}
    baseline = {"dataset": {"name": "ok"}, "metrics": {"t2i": {"R@1": 0.1}}}
    both = tmp_path / "both.json"
    both.write_text(json.dumps({"baseline": baseline, "slq": result}))
    with pytest.raises(ValueError, match="ok/t2i .* also earlier in the same file"):
        load_eval_results(both)
    once = tmp_path / "once.json"
    once.write_text(json.dumps(result))
    with pytest.raises(ValueError, match="ok/t2i .* also earlier in the same file"):
        load_eval_results([once, once])


def test_cli_eval_results_reach_the_card_with_the_data_split_only(trained, tmp_path):
    """`slq-hf eval` on a file without splits must not make the card claim a "test" split; a file with splits
    keeps its split."""
    _, folder = trained
    for name, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
        scene(64, 64, colour).save(tmp_path / f"{name}.png")
    plain = tmp_path / "ok.jsonl"
    plain.write_text('{"image": "a.png", "text": "red"}\n{"image": "b.png", "text": "blue"}\n')
    tagged = tmp_path / "tagged.jsonl"
    tagged.write_text('{"image": "a.png", "text": "red", "split": "test"}\n'
                      '{"image": "b.png", "text": "blue", "split": "test"}\n')
    for data in (plain, tagged):
        assert cli_main(["eval", "--model", str(folder), "--data", str(data), "--output",
                         str(tmp_path / f"{data.stem}.json"), "--no-progress"]) == 0
    plain_result = json.loads((tmp_path / "ok.json").read_text())
    assert plain_result["data"]["split"] is None and plain_result["data"]["format"] == "jsonl"
    assert json.loads((tmp_path / "tagged.json").read_text())["data"]["split"] == "test"
    _export(folder, tmp_path / "hub", eval_results=[tmp_path / "ok.json", tmp_path / "tagged.json"])
    card = ModelCard.load(tmp_path / "hub" / "README.md")
    splits = {r.dataset_name: r.dataset_split for r in card.data.eval_results}
    assert splits == {"ok": None, "tagged:test": "test"}
    assert all(row.startswith("| ok | – |") for row in _card_rows(tmp_path / "hub" / "README.md"))


def test_export_refuses_results_of_other_queries(trained, tmp_path):
    """`slq-hf eval` records which queries it ran; exporting another model with that file would put numbers on its
    card that it never produced."""
    model, folder = trained
    scene(64, 64, (255, 0, 0)).save(tmp_path / "a.png")
    scene(64, 64, (0, 0, 255)).save(tmp_path / "b.png")
    data = tmp_path / "ok.jsonl"
    data.write_text('{"image": "a.png", "text": "red"}\n{"image": "b.png", "text": "blue"}\n')
    results = tmp_path / "ok.json"
    assert cli_main(["eval", "--model", str(folder), "--data", str(data), "--output", str(results),
                     "--no-progress"]) == 0
    _export(folder, tmp_path / "hub", eval_results=[results])  # its own results: accepted
    # Another model: the same folder, other queries.
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    state = {name: tensor.detach().clone() for name, tensor in model.trainable_state_dict().items()}
    state["queries"] += 0.25
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(other / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match="computed with other queries"):
        _export(other, tmp_path / "hub-other", eval_results=[results])
    assert not (tmp_path / "hub-other").exists()


def test_card_training_rows_keep_small_values(trained, tmp_path):
    """A learning rate or weight decay below 1e-6 (rounded to 6 decimals: 0.0) must not reach the card as 0.0."""
    _, folder = trained
    _export(folder, tmp_path / "hub", training_info={"lr": 5e-7, "weight_decay": 1e-8, "train_loss": 1.23456789,
                                                     "epochs": 1.0})
    rows = set((tmp_path / "hub" / "README.md").read_text().splitlines())
    assert {"| lr | 5e-07 |", "| weight decay | 1e-08 |", "| train loss | 1.234568 |", "| epochs | 1.0 |"} <= rows
