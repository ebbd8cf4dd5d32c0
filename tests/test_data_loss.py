"""Data is never lost: every SLQ save (save_pretrained, query-set files, Trainer.save_model) refuses another model's
folder before writing anything, is atomic at the folder level, and keeps what it does not own.

All through the public API on a real tiny backbone; disk full is RLIMIT_FSIZE in a subprocess, kills are SIGKILL at
random moments, and concurrency is a writer thread against a reader process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_checkpoint import tree_digest

from slq_hf import SLQConfig, SLQModel
from slq_hf.modeling.checkpoint import CheckpointError

SRC = str(Path(__file__).resolve().parents[1])
TOY = Path(SRC) / "examples" / "toy" / "backbone"


def _run(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run PRELUDE + script in a fresh interpreter; sys.argv[2:] are ``args``."""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    code = PRELUDE + textwrap.dedent(script)
    return subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), *args], capture_output=True,
                          text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL)


def _without(digest: dict[str, str], *tops: str) -> dict[str, str]:
    return {k: v for k, v in digest.items() if k.split("/")[0] not in tops}


def _beside(folder: Path) -> list[str]:
    """Hidden entries next to ``folder`` (staging or old folders a save left behind)."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def build_models(backbone: str) -> tuple[SLQModel, SLQModel]:
    """Two different SLQ models on one backbone: A has 4 queries and a "doc" set, B 4 other queries and no extra set.
    Subprocesses import this to build the same two models."""
    a = SLQModel.from_backbone(backbone, num_queries=4)
    a.add_query_set("doc", 3)
    b = SLQModel.from_backbone(backbone, num_queries=4)
    with torch.no_grad():
        b.queries.mul_(-1)
    return a, b


# Prepended to subprocess scripts: argv[1] is always this tests folder.
PRELUDE = """
import json, os, random, resource, signal, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
from safetensors.torch import save_file
from slq_hf import SLQModel
from test_checkpoint import tree_digest
from test_data_loss import build_models
"""


@pytest.fixture(scope="module")
def backbone(tiny_backbone_path) -> str:
    return tiny_backbone_path("qwen3_vl")


@pytest.fixture(scope="module")
def models(backbone):
    return build_models(backbone)


# ------------------------------------------------------------------------------- never another model's folder
def _foreign(kind: str, tmp_path: Path, tiny_backbone_path, models) -> Path:
    out = tmp_path / kind
    if kind == "qwen3_vl backbone":
        shutil.copytree(tiny_backbone_path("qwen3_vl"), out)
    elif kind == "llava backbone":
        shutil.copytree(tiny_backbone_path("llava"), out)
    elif kind == "sharded toy backbone":
        shutil.copytree(TOY, out)
    elif kind == "backbone re-saved":
        models[0].backbone.save_pretrained(out)
    elif kind == "bare pickle weights":
        out.mkdir()
        torch.save({"weight": torch.zeros(2)}, out / "pytorch_model.bin")
    elif kind == "sentence-transformers model":
        out.mkdir()
        (out / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
        (out / "modules.json").write_text("[]")
        (out / "README.md").write_text("someone's card")
    elif kind == "older sentence-transformers model":  # its config and weights live in 0_Transformer/
        (out / "0_Transformer").mkdir(parents=True)
        (out / "0_Transformer" / "config.json").write_text(json.dumps({"model_type": "bert"}))
        save_file({"embeddings.weight": torch.zeros(4, 2)}, str(out / "0_Transformer" / "model.safetensors"))
        (out / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "0_Transformer",
                                                       "type": "sentence_transformers.models.Transformer"}]))
    return out


FOREIGN = ["qwen3_vl backbone", "llava backbone", "sharded toy backbone", "backbone re-saved", "bare pickle weights",
           "sentence-transformers model", "older sentence-transformers model"]


@pytest.mark.parametrize("kind", FOREIGN)
def test_save_pretrained_never_overwrites_another_model(tmp_path, tiny_backbone_path, models, kind):
    folder = _foreign(kind, tmp_path, tiny_backbone_path, models)
    before = tree_digest(folder)
    with pytest.raises(CheckpointError, match="refusing to save an SLQ model here.*Nothing was written") as info:
        models[0].save_pretrained(folder)
    assert str(folder) in str(info.value)
    assert tree_digest(folder) == before and _beside(folder) == []


def test_save_pretrained_into_its_own_backbone_folder(tmp_path, tiny_backbone_path):
    """The case of `slq-hf train --output-dir` equal to `--backbone`: the backbone's weights, config and tokenizer
    files survive byte for byte."""
    backbone = tmp_path / "backbone"
    shutil.copytree(tiny_backbone_path("qwen3_vl"), backbone)
    model = SLQModel.from_backbone(str(backbone), num_queries=4)
    before = tree_digest(backbone)
    with pytest.raises(CheckpointError, match="refusing"):
        model.save_pretrained(backbone)
    assert tree_digest(backbone) == before
    SLQModel.from_backbone(str(backbone), num_queries=4)  # still a loadable backbone


# -------------------------------------------------------------------------------------------- re-saving
def test_resave_over_an_slq_folder_replaces_it_and_keeps_foreign_entries(tmp_path, models):
    a, b = models
    target = tmp_path / "slq"
    a.save_pretrained(target)
    assert (target / "query_sets" / "doc.safetensors").is_file()
    (target / "checkpoint-3").mkdir()
    (target / "checkpoint-3" / "optimizer.pt").write_bytes(b"optimizer state")
    (target / "runs").mkdir()
    (target / "runs" / "events").write_text("tensorboard")
    (target / "README.md").write_text("my model card")
    (target / "notes.txt").write_text("user file")
    (target / "locked").mkdir()
    (target / "locked" / "data").write_text("kept")
    (target / "locked").chmod(0o555)  # a read-only folder is carried over too
    for age, entry in enumerate(("checkpoint-3", "runs", "locked")):  # carried folders keep their times
        os.utime(target / entry, ns=(10**18 + age, 10**18 + age))
    times = {e: (target / e).stat().st_mtime_ns for e in ("checkpoint-3", "runs", "locked")}
    b.save_pretrained(target)
    assert {e: (target / e).stat().st_mtime_ns for e in times} == times  # (the Trainer rotates checkpoints by mtime)
    assert (target / "locked" / "data").read_text() == "kept"
    (target / "locked").chmod(0o755)
    assert not (target / "query_sets").exists()  # B has no extra set: A's "doc" set must not come back
    assert (target / "checkpoint-3" / "optimizer.pt").read_bytes() == b"optimizer state"
    assert (target / "runs" / "events").read_text() == "tensorboard"
    assert (target / "README.md").read_text() == "my model card" and (target / "notes.txt").read_text() == "user file"
    loaded = SLQModel.from_pretrained(target, backbone=b.backbone)
    assert torch.equal(loaded.queries, b.queries) and loaded.query_sets == ["default"]
    assert _beside(target) == []
    # and back: the set reappears because A has it
    a.save_pretrained(target)
    loaded = SLQModel.from_pretrained(target, backbone=a.backbone)
    assert torch.equal(loaded.queries, a.queries) and torch.equal(loaded.get_query_set("doc"), a.get_query_set("doc"))


def test_a_query_set_file_saved_into_an_slq_folder_does_not_block_its_resave(tmp_path, models):
    a, _ = models
    a.save_pretrained(tmp_path / "slq")
    a.save_query_set("doc", tmp_path / "slq" / "doc.safetensors")  # a user file, and SLQ's own format
    a.save_pretrained(tmp_path / "slq")
    assert (tmp_path / "slq" / "doc.safetensors").is_file()


def test_resave_of_the_same_model_is_byte_identical(tmp_path, models):
    target = tmp_path / "slq"
    models[0].save_pretrained(target)
    first = tree_digest(target)
    models[0].save_pretrained(target)
    assert tree_digest(target) == first


def test_save_pretrained_push_to_hub_uploads_the_save_or_fails_loudly(tmp_path, models, monkeypatch):
    """save_pretrained(push_to_hub=True) is transformers' "save, then upload": it was accepted and silently ignored,
    so a user believed the Hub had the new queries. Offline (this suite), it now saves and then raises."""
    from huggingface_hub import HfApi, ModelCard
    from huggingface_hub.errors import EntryNotFoundError, OfflineModeIsEnabled
    from huggingface_hub.hf_api import RepoUrl

    target = tmp_path / "slq-push"
    with pytest.raises(OfflineModeIsEnabled):
        models[0].save_pretrained(target, push_to_hub=True)
    assert sorted(SLQModel.from_pretrained(target, backbone=models[0].backbone).query_sets) == ["default", "doc"]
    # With the Hub reachable (its API recorded at the boundary), the upload is the save, with the caller's options.
    calls = []

    def no_card(repo_id, **kwargs):
        raise EntryNotFoundError(f"{repo_id} has no README.md")

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: RepoUrl(f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(HfApi, "create_commit", lambda self, repo_id, operations, **kw: calls.append((
        repo_id, kw["commit_message"], {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations})))
    monkeypatch.setattr(ModelCard, "load", no_card)
    models[0].save_pretrained(target, push_to_hub=True, repo_id="me/slq", commit_message="new queries")
    ((repo_id, message, uploaded),) = calls
    assert (repo_id, message) == ("me/slq", "new queries")
    assert uploaded["model.safetensors"] == (target / "model.safetensors").read_bytes()
    assert uploaded["query_sets/doc.safetensors"] == (target / "query_sets" / "doc.safetensors").read_bytes()


def _max_seq_length(folder: Path) -> int | None:
    return json.loads((folder / "sentence_bert_config.json").read_text()).get("max_seq_length")


def test_resave_writes_the_models_own_prompt_limit(tmp_path, backbone):
    # X leaves more room for the prompt than Y (fewer queries); saving X, Y, X must end as a fresh save of X.
    x = SLQModel.from_backbone(backbone, num_queries=4)
    y = SLQModel.from_backbone(backbone, num_queries=6)
    assert x.max_prompt_length() - y.max_prompt_length() == 2
    x.save_pretrained(tmp_path / "fresh")
    target = tmp_path / "slq"
    for model in (x, y, x):
        model.save_pretrained(target)
        assert _max_seq_length(target) == model.max_prompt_length()
    assert (target / "sentence_bert_config.json").read_bytes() == (tmp_path / "fresh" / "sentence_bert_config.json"
                                                                    ).read_bytes()
    # A hand-edited smaller limit lasts until the next save_pretrained (documented in sentence_bert_config); the
    # file's other settings stay.
    edited = {**json.loads((target / "sentence_bert_config.json").read_text()), "max_seq_length": 7,
              "processing_kwargs": {"chat_template": {"add_generation_prompt": True}, "text": {"padding": True}}}
    (target / "sentence_bert_config.json").write_text(json.dumps(edited))
    x.save_pretrained(target)
    rewritten = json.loads((target / "sentence_bert_config.json").read_text())
    assert rewritten["max_seq_length"] == x.max_prompt_length()
    assert rewritten["processing_kwargs"] == edited["processing_kwargs"]


def test_st_files_without_a_known_limit_keep_the_files_value(tmp_path):
    from slq_hf.modeling.sentence_transformers_files import sentence_bert_config

    assert sentence_bert_config({"max_seq_length": 7}, None)["max_seq_length"] == 7
    assert sentence_bert_config({"max_seq_length": 7}, 30)["max_seq_length"] == 30
    assert sentence_bert_config({"max_seq_length": 70}, 30)["max_seq_length"] == 30
    assert "max_seq_length" not in sentence_bert_config(None, None)


# -------------------------------------------------------------------------------------- failed saves
_DISK_FULL = """
target, backbone, mode = Path(sys.argv[2]), sys.argv[3], sys.argv[4]
big = SLQModel.from_backbone(backbone, num_queries=1500)  # 1500 x 64 float32 = 384 KB of queries
big.add_query_set("doc", 1500)
# "ignore": writes fail with EFBIG; "killed": SIGXFSZ kills the process (Python starts with it ignored).
signal.signal(signal.SIGXFSZ, signal.SIG_IGN if mode == "ignore" else signal.SIG_DFL)
resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))
errors = {}
for name, save in [
    ("save_pretrained", lambda: big.save_pretrained(target)),
    ("save_query_set", lambda: big.save_query_set("doc", target / "query_sets" / "doc.safetensors")),
    ("trainer.save_model", lambda: __import__("slq_hf.training", fromlist=["x"]).SLQTrainer(
        model=big, args=__import__("transformers").TrainingArguments(
            output_dir=str(target), use_cpu=True, report_to=[], per_device_train_batch_size=2)).save_model(target)),
]:
    try:
        save()
        errors[name] = None
    except OSError as err:
        errors[name] = str(err)
print(json.dumps(errors))
"""


@pytest.mark.parametrize("mode", ["ignore", "killed"])
def test_disk_full_leaves_the_previous_folder_identical(tmp_path, backbone, models, mode):
    target = tmp_path / "slq"
    models[0].save_pretrained(target)
    (target / "checkpoint-1").mkdir()
    before = tree_digest(target)
    result = _run(_DISK_FULL, str(target), backbone, mode)
    if mode == "ignore":
        assert result.returncode == 0, result.stderr[-3000:]
        errors = json.loads(result.stdout.strip().splitlines()[-1])
        assert all(error and "File too large" in error for error in errors.values()), errors
        assert _beside(target) == []  # a failed save cleans up after itself
    else:
        assert result.returncode == -signal.SIGXFSZ, result.stderr[-3000:]
    assert tree_digest(target) == before
    loaded = SLQModel.from_pretrained(target, backbone=models[0].backbone)
    assert torch.equal(loaded.queries, models[0].queries)


_KILL_LOOP = """
target, backbone = Path(sys.argv[2]), sys.argv[3]
a, b = build_models(backbone)
a.save_pretrained(target.parent / "ref_a")
b.save_pretrained(target.parent / "ref_b")
refs = {"a": tree_digest(target.parent / "ref_a"), "b": tree_digest(target.parent / "ref_b")}
a.save_pretrained(target)
(target / "checkpoint-1").mkdir()
(target / "checkpoint-1" / "optimizer.pt").write_bytes(b"state")
random.seed(0)
seen = []
for attempt in range(12):
    pid = os.fork()
    if pid == 0:  # the child re-saves B and A in turn until it is killed
        while True:
            b.save_pretrained(target)
            a.save_pretrained(target)
    time.sleep(random.uniform(0.05, 0.8))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    digest = tree_digest(target)
    carried = digest.pop("checkpoint-1", None) == "dir" and digest.pop("checkpoint-1/optimizer.pt", None)
    seen.append(next((name for name, ref in refs.items() if ref == digest), "MIX") if carried else "LOST")
print(json.dumps(seen))
"""


def test_sigkill_at_random_moments_leaves_one_complete_save(tmp_path, backbone):
    target = tmp_path / "slq"
    result = _run(_KILL_LOOP, str(target), backbone)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(seen) <= {"a", "b"}, seen
    loaded = SLQModel.from_pretrained(target, backbone_name_or_path=backbone)
    assert loaded.config.num_queries == 4


# --------------------------------------------------------------------------------------- concurrent reads
_READER = """
from safetensors.torch import load_file
target, backbone, seconds = sys.argv[2], sys.argv[3], float(sys.argv[4])
refs = {n: load_file(f"{sys.argv[5]}/ref_{n}/model.safetensors")["queries"] for n in "ab"}
model = SLQModel.from_pretrained(target, backbone_name_or_path=backbone)
shared = model.backbone
deadline, reads, bad = time.time() + seconds, 0, []
while time.time() < deadline:
    try:
        loaded = SLQModel.from_pretrained(target, backbone=shared, processor=model.processor)
        sets = loaded.query_sets
        name = next((n for n, q in refs.items() if q.shape == loaded.queries.shape and torch.equal(q, loaded.queries)),
                    None)
        if name is None or sets != (["default", "doc"] if name == "a" else ["default"]):
            bad.append(f"mix: {name} {sets}")
    except Exception as err:
        bad.append(f"{type(err).__name__}: {err}"[:300])
    reads += 1
print(json.dumps({"reads": reads, "bad": bad[:5], "n_bad": len(bad)}))
"""


def _race_reader_against_resaves(tmp_path, backbone, a, b, reader: str) -> None:
    """Re-save A and B alternately into one folder from a thread while ``reader`` (a script run in another process)
    loads it for 20 s; every load must see one whole save."""
    target = tmp_path / "slq"
    a.save_pretrained(target)
    stop, saves = threading.Event(), [0]

    def writer():
        while not stop.is_set():
            (b if saves[0] % 2 == 0 else a).save_pretrained(target)
            saves[0] += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        result = _run(reader, str(target), backbone, "20", str(tmp_path))
    finally:
        stop.set()
        thread.join()
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["reads"] >= 10 and saves[0] >= 10, (summary, saves)
    assert summary["n_bad"] == 0, summary


def test_a_reader_during_resaves_sees_the_old_or_the_new_folder(tmp_path, backbone, models):
    a, b = models
    a.save_pretrained(tmp_path / "ref_a")
    b.save_pretrained(tmp_path / "ref_b")
    _race_reader_against_resaves(tmp_path, backbone, a, b, _READER)


_AUTO_READER = """
from transformers import AutoModel
target, backbone, seconds = sys.argv[2], sys.argv[3], float(sys.argv[4])
model = SLQModel.from_pretrained(target, backbone_name_or_path=backbone)
shared, refs = model.backbone, {}  # (AutoModel deep-copies its keyword arguments: no backbone= there)
for name in "ab":
    ref = SLQModel.from_pretrained(f"{sys.argv[5]}/ref_{name}", backbone=shared, processor=model.processor)
    refs[name] = (ref.queries.detach().clone(), ref.config.pooling)
deadline, reads, bad = time.time() + seconds, 0, []
while time.time() < deadline:
    try:  # AutoConfig reads config.json before SLQModel.from_pretrained reads the weights
        loaded = AutoModel.from_pretrained(target, backbone_name_or_path=backbone, normalize=False)
        name = next((n for n, (q, _) in refs.items() if torch.equal(q, loaded.queries)), None)
        if name is None or loaded.config.pooling != refs[name][1] or loaded.config.normalize is not False:
            bad.append(f"mix: queries of {name}, pooling {loaded.config.pooling}, normalize {loaded.config.normalize}")
    except Exception as err:
        bad.append(f"{type(err).__name__}: {err}"[:300])
    reads += 1
print(json.dumps({"reads": reads, "bad": bad[:5], "n_bad": len(bad)}))
"""


def test_automodel_during_resaves_pairs_config_and_weights_of_one_save(tmp_path, backbone):
    # A and B differ in a config field (pooling) and in the queries: a load pairing A's config.json with B's
    # model.safetensors is visible. normalize=False is a load-time override that every load must keep.
    a = SLQModel.from_backbone(backbone, num_queries=4, pooling="mean")
    b = SLQModel.from_backbone(backbone, num_queries=4, pooling="last")
    with torch.no_grad():
        b.queries.mul_(-1)
    a.save_pretrained(tmp_path / "ref_a")
    b.save_pretrained(tmp_path / "ref_b")
    _race_reader_against_resaves(tmp_path, backbone, a, b, _AUTO_READER)


def test_a_config_read_before_a_resave_is_replaced_by_the_saved_one_with_its_load_keywords(tmp_path, backbone):
    # The race of the test above, made deterministic: AutoConfig reads A's config.json (with a load keyword and an
    # edit), then B is saved over A, then the model is loaded with that config.
    from transformers import AutoConfig, AutoModel

    a = SLQModel.from_backbone(backbone, num_queries=4, pooling="mean")
    b = SLQModel.from_backbone(backbone, num_queries=6, pooling="last", temperature=0.05)
    target = tmp_path / "slq"
    a.save_pretrained(target)
    config = AutoConfig.from_pretrained(target, normalize=False)
    config.training_path = "full"
    b.save_pretrained(target)
    loaded = AutoModel.from_pretrained(target, config=config, backbone=b.backbone)
    assert torch.equal(loaded.queries, b.queries) and loaded.config.num_queries == 6
    assert (loaded.config.pooling, loaded.config.temperature) == ("last", 0.05)  # B's saved fields
    assert (loaded.config.normalize, loaded.config.training_path) == (False, "full")  # the keyword and the edit
    # Unchanged folder: the passed config object is used as it is.
    config = AutoConfig.from_pretrained(target, pooling="mean")
    assert SLQModel.from_pretrained(target, config=config, backbone=b.backbone).config is config
    # A config built in code is used as given (here: one that cannot hold B's 6 queries).
    built = SLQConfig(**{**b.config.field_values(), "num_queries": 4})
    with pytest.raises(CheckpointError, match="queries"):
        SLQModel.from_pretrained(target, config=built, backbone=b.backbone)


# --------------------------------------------------------------------------------- Trainer.save_model
def _trainer(model, output_dir: Path):
    from transformers import TrainingArguments

    from slq_hf.training import SLQTrainer

    args = TrainingArguments(output_dir=str(output_dir), use_cpu=True, report_to=[], per_device_train_batch_size=2)
    return SLQTrainer(model=model, args=args)


def test_trainer_save_model_goes_through_the_same_rules(tmp_path, tiny_backbone_path, models):
    a, b = models
    run = tmp_path / "run"
    trainer = _trainer(a, run)
    trainer.save_model(str(run))
    (run / "checkpoint-5").mkdir()
    (run / "checkpoint-5" / "trainer_state.json").write_text("{}")
    _trainer(b, run).save_model(str(run))
    loaded = SLQModel.from_pretrained(run, backbone=b.backbone)
    assert torch.equal(loaded.queries, b.queries)
    assert (run / "checkpoint-5" / "trainer_state.json").read_text() == "{}"
    assert (run / "training_args.bin").is_file() and _beside(run) == []
    backbone = tmp_path / "backbone"
    shutil.copytree(tiny_backbone_path("qwen3_vl"), backbone)
    before = tree_digest(backbone)
    with pytest.raises(CheckpointError, match="refusing"):
        _trainer(a, backbone).save_model(str(backbone))
    assert tree_digest(backbone) == before
