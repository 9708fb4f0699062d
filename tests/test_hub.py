"""Hub ids as model options (mlxpost/hub.py): resolved from a Hugging Face cache laid out here.

huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE when it is imported, so the commands
run as subprocesses with those set; the unit tests set its constants directly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml

from mlxpost.assets import DEFAULT_MODEL
from mlxpost.errors import UserError
from mlxpost.hub import locate_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_to_cache(cache: Path, repo_id: str, source: str, skip=(), commit: str = COMMIT) -> Path:
    """Lay `source`'s files out as huggingface_hub does: content-addressed blobs, a snapshot
    of symlinks to them per commit, and refs/main naming the commit. The snapshot's path."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for name in sorted(os.listdir(source)):
        if name in skip:
            continue
        data = Path(source, name).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline huggingface_hub whose cache is tmp_path/cache (in this process)."""
    from huggingface_hub import constants

    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def hub_env(tmp_path: Path, cache: Path) -> dict:
    """The environment of an offline command reading `cache`, nothing of the user's."""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_CACHE=str(cache))
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", HF_HUB_DISABLE_TELEMETRY="1")
    return env


def mlxpost(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlxpost.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=cwd,
    )


# --------------------------------------------------------------------------- locate_model


def test_existing_relative_directory_wins_over_a_hub_id(hub, tmp_path, monkeypatch):
    add_to_cache(hub, "org/name", DEFAULT_MODEL)
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert locate_model("org/name") == "org/name"
    assert locate_model(DEFAULT_MODEL) == DEFAULT_MODEL


def test_what_is_not_a_hub_id_is_returned_unchanged(hub):
    from mlxpost.model_dir import read_config

    for value in ("no-such-model", "a/b/c", "/abs/org", "./org/name", "", None):
        assert locate_model(value) == value
    with pytest.raises(UserError, match="no-such-model: model directory not found"):
        read_config(locate_model("no-such-model"))


def test_a_cached_hub_id_is_its_snapshot_directory(hub):
    snapshot = add_to_cache(hub, "org/name", DEFAULT_MODEL)
    assert locate_model("org/name") == str(snapshot)
    assert locate_model("org/name", "--teacher") == str(snapshot)  # the same, every time


def test_snapshot_without_config_json_is_an_error_naming_it(hub):
    snapshot = add_to_cache(hub, "org/name", DEFAULT_MODEL, skip=("config.json",))
    with pytest.raises(UserError) as err:
        locate_model("org/name", "--reference")
    message = str(err.value)
    assert message.startswith("--reference org/name: ") and str(snapshot) in message
    assert "no config.json" in message and "\n" not in message


def test_snapshot_without_safetensors_is_an_error_naming_it(hub):
    snapshot = add_to_cache(hub, "org/name", DEFAULT_MODEL, skip=("model.safetensors",))
    with pytest.raises(UserError, match=r"no \*\.safetensors") as err:
        locate_model("org/name")
    assert str(snapshot) in str(err.value)


def test_offline_without_a_cached_copy_says_how_to_get_it(hub):
    with pytest.raises(UserError) as err:
        locate_model("org/missing")
    message = str(err.value)
    assert message.startswith("--model org/missing: ")
    assert str(hub) in message and "hf download org/missing" in message and "\n" not in message


def test_online_downloads_only_weights_configs_and_tokenizer_files(hub, monkeypatch, capsys):
    """The download asks for safetensors, JSON and tokenizer files of the repository's top
    level: never pickled weights or code."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.utils import filter_repo_objects

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append(kwargs)
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        return str(add_to_cache(hub, repo_id, DEFAULT_MODEL))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    path = locate_model("org/name")
    assert path.endswith(os.path.join("models--org--name", "snapshots", COMMIT))
    assert f"--model org/name: downloaded into {path}" in capsys.readouterr().err
    assert [call.get("local_files_only", False) for call in calls] == [True, False]
    repo_files = [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "model-00001-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
        "pytorch_model.bin",
        "model.pt",
        "model.ckpt",
        "training_args.pkl",
        "modeling_custom.py",
        "consolidated.safetensors",
        "original/params.json",
        "onnx/model.onnx",
        "README.md",
    ]
    kept = list(
        filter_repo_objects(
            repo_files,
            allow_patterns=calls[-1]["allow_patterns"],
            ignore_patterns=calls[-1]["ignore_patterns"],
        )
    )
    assert kept == repo_files[:11]


def test_a_failed_download_is_one_line(hub, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def unreachable(repo_id, local_files_only=False, **kwargs):
        raise LocalEntryNotFoundError("Cannot reach the Hub\nsecond line")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(UserError) as err:
        locate_model("org/name")
    message = str(err.value)
    assert "download failed: LocalEntryNotFoundError: Cannot reach the Hub)" in message
    assert str(hub) in message
    assert "\n" not in message


def test_resume_with_the_same_hub_id_is_accepted(hub, tmp_path):
    """config.yaml records the snapshot directory; giving the id again names the same one."""
    from mlxpost.algorithms.sft import SFTConfig
    from mlxpost.config import resolve

    snapshot = add_to_cache(hub, "org/name", DEFAULT_MODEL)
    add_to_cache(hub, "org/other", DEFAULT_MODEL)
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump({"command": "sft", "model": str(snapshot)}))

    def resolved(**given):
        given = {"resume": True, "output": str(out), **given}
        command = click.Command("sft", params=[click.Option([f"--{n}"]) for n in given])
        ctx = click.Context(command)
        for name in given:
            ctx.set_parameter_source(name, click.core.ParameterSource.COMMANDLINE)
        values = {f.name: f.default for f in dataclasses.fields(SFTConfig) if f.init}
        return resolve(SFTConfig, ctx, {**values, **given}, None, "sft")

    assert resolved(model="org/name").model == str(snapshot)
    with pytest.raises(UserError, match="a resumed run keeps its settings.*--model"):
        resolved(model="org/other")


# --------------------------------------------------------------------------- commands


def test_commands_run_offline_from_the_cache(tmp_path):
    """sft trains on a cached hub id and records its snapshot; eval reads the same id."""
    pytest.importorskip("torch")
    cache = tmp_path / "cache"
    snapshot = add_to_cache(cache, "org/name", DEFAULT_MODEL)
    env = hub_env(tmp_path, cache)
    # A folder named like the org beside the run must not shadow the id (no org/name in it).
    (tmp_path / "org").mkdir()
    rows = [{"prompt": f"What is {i} + {i}?", "completion": f" {2 * i}"} for i in range(8)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    train = mlxpost(
        [
            "sft",
            "--model",
            "org/name",
            "--output",
            "run",
            "--backend",
            "torch",
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--max-length",
            "64",
            "--eval-every",
            "0",
            "--save-every",
            "0",
            "--eval-math",
            "0",
            "--eval-text",
            "0",
            "--eval-limit",
            "4",
            "--data",
            "d.jsonl",
            "--eval-data",
            "d.jsonl",
        ],
        env,
        tmp_path,
    )
    assert train.returncode == 0, train.stderr
    assert json.loads(train.stdout)["steps"] == 2
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["model"] == str(snapshot)
    evaluate = mlxpost(
        ["eval", "--task", "perplexity", "--model", "org/name", "--backend", "torch"]
        + ["--limit", "4", "--json"],
        env,
        tmp_path,
    )
    assert evaluate.returncode == 0, evaluate.stderr
    assert json.loads(evaluate.stdout)["n"] == 4
    assert "eval perplexity: org/name" in evaluate.stderr


def test_an_id_not_in_the_cache_fails_offline_in_one_line(tmp_path):
    cache = tmp_path / "cache"
    add_to_cache(cache, "org/name", DEFAULT_MODEL)
    result = mlxpost(
        ["sft", "--model", "org/missing", "--output", "run", "--steps", "2"],
        hub_env(tmp_path, cache),
        tmp_path,
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("error: --model org/missing: ")
    assert str(cache) in lines[0] and "hf download org/missing" in lines[0]
    assert not (tmp_path / "run").exists()
