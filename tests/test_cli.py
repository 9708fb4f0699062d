"""The command line: help, and bad input ending with exit status 2 and one clear line."""

from __future__ import annotations

import json
import subprocess
import sys


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "mlxpost.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_help_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "parity" in result.stdout


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ")
    for fragment in fragments:
        assert fragment in message, message


def test_missing_model_directory(tmp_path):
    assert_user_error(
        run_cli("parity", "--model", str(tmp_path / "nope")), str(tmp_path / "nope"), "not found"
    )


def test_directory_without_config(tmp_path):
    assert_user_error(run_cli("parity", "--model", str(tmp_path)), "config.json", "not found")


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert_user_error(run_cli("parity", "--model", str(tmp_path)), "bert", "not supported", "gpt2")


def test_config_that_is_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    assert_user_error(run_cli("parity", "--model", str(tmp_path)), "config.json", "not valid JSON")


def test_checkpoint_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert_user_error(run_cli("parity", "--model", str(tmp_path)), "safetensors")


def test_adapter_directory_without_files(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (model / "model.safetensors").write_bytes(b"")
    result = run_cli("parity", "--model", str(model), "--adapter", str(tmp_path / "adapter"))
    assert_user_error(result, "adapter_config.json", "not found")
