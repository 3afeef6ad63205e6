"""evotune export: checkpoint names as users type them, manifest checks, file modes."""

from __future__ import annotations

import logging
import os

import pytest
from runner import run_cli
from tiny import save_tiny_llama

from evotune.errors import ConfigError
from evotune.train import checkpoint as ckpt


def _checkpoint(work_dir, step, real_model=False):
    temporary = ckpt.temporary_folder(work_dir, step)
    ckpt.prepare_folder(temporary)
    if real_model:
        save_tiny_llama(temporary / "hf", seed=step)
    else:
        (temporary / "hf").mkdir()
        (temporary / "hf" / "config.json").write_text('{"model_type": "llama"}')
    (temporary / "optimizer.pt").write_bytes(b"o" * 100)
    final = work_dir / ckpt.checkpoint_name(step)
    ckpt.publish(temporary, final)
    return final


@pytest.fixture
def work(tmp_path):
    for step in (40, 82):
        _checkpoint(tmp_path, step)
    return tmp_path


@pytest.mark.parametrize(
    "spec, step",
    [
        ("checkpoint-0000082", None),
        ("checkpoint-82", None),
        ("82", None),
        ("", 82),
        ("", None),  # the work dir alone: its newest checkpoint
    ],
)
def test_resolve_checkpoint_spellings(work, spec, step):
    assert (
        ckpt.resolve_checkpoint(work / spec if spec else work, step) == work / "checkpoint-0000082"
    )


def test_resolve_lists_what_exists(work):
    with pytest.raises(ConfigError) as error:
        ckpt.resolve_checkpoint(work / "checkpoint-83")
    message = str(error.value)
    assert "no checkpoint of step 83" in message
    assert "checkpoint-0000040, checkpoint-0000082" in message
    ckpt.temporary_folder(work, 90).mkdir()
    with pytest.raises(ConfigError, match=r"the save of step 90 never finished"):
        ckpt.resolve_checkpoint(work, 90)


def test_resolve_a_folder_without_complete(work):
    (work / "checkpoint-0000050").mkdir()  # a save cut short before the rename existed
    with pytest.raises(ConfigError, match="checkpoint-0000050 has no COMPLETE"):
        ckpt.resolve_checkpoint(work / "checkpoint-0000050")


def test_a_work_dir_named_by_digits_is_a_work_dir(tmp_path):
    work = tmp_path / "2024"
    _checkpoint(work, 3)
    assert ckpt.resolve_checkpoint(work) == work / "checkpoint-0000003"


def test_resolve_in_a_folder_without_checkpoints(tmp_path):
    with pytest.raises(ConfigError, match="holds no complete checkpoint"):
        ckpt.resolve_checkpoint(tmp_path / "checkpoint-5")
    with pytest.raises(ConfigError, match=r"folder .*missing does not exist"):
        ckpt.resolve_checkpoint(tmp_path / "missing" / "checkpoint-5")
    with pytest.raises(ConfigError, match="no complete checkpoint-\\* inside"):
        ckpt.resolve_checkpoint(tmp_path)
    with pytest.raises(ConfigError, match="no such checkpoint folder"):
        ckpt.resolve_checkpoint(tmp_path / "nowhere" / "at-all")


def test_export_copies_the_folder_with_umask_modes(tmp_path):
    source = _checkpoint(tmp_path / "work", 8, real_model=True)
    weights = source / "hf" / "model.safetensors"
    weights.chmod(0o600)  # as checkpoints saved before publish() fixed modes had it
    previous = os.umask(0o022)
    try:
        output = ckpt.export_hf(tmp_path / "work" / "checkpoint-8", tmp_path / "out")
    finally:
        os.umask(previous)
    assert (output / "model.safetensors").read_bytes() == weights.read_bytes()
    assert sorted(p.name for p in output.iterdir()) == sorted(
        p.name for p in (source / "hf").iterdir()
    )
    for path in [output, *output.iterdir()]:
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_export_refuses_a_broken_checkpoint(tmp_path, damage):
    source = _checkpoint(tmp_path, 8, real_model=True)
    weights = source / "hf" / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        weights.unlink()
    with pytest.raises(ConfigError) as error:
        ckpt.export_hf(source, tmp_path / "out")
    assert f"{weights}:" in str(error.value) and "not exported" in str(error.value)
    assert not (tmp_path / "out").exists()
    # a damaged optimizer does not matter to an export of the weights
    _checkpoint(tmp_path / "w2", 8, real_model=True)
    (tmp_path / "w2" / "checkpoint-0000008" / "optimizer.pt").write_bytes(b"")
    assert ckpt.export_hf(tmp_path / "w2" / "checkpoint-0000008", tmp_path / "out2").is_dir()


def test_export_of_a_work_dir_skips_a_broken_newest(tmp_path, caplog):
    _checkpoint(tmp_path, 4, real_model=True)
    newest = _checkpoint(tmp_path, 8, real_model=True)
    (newest / "hf" / "model.safetensors").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="evotune"):
        chosen = ckpt.resolve_checkpoint(tmp_path)
    assert chosen == tmp_path / "checkpoint-0000004"
    assert "checkpoint-0000008 is broken" in caplog.text


def test_export_without_manifest_warns(tmp_path, caplog):
    source = _checkpoint(tmp_path, 8, real_model=True)
    (source / ckpt.MANIFEST_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="evotune"):
        ckpt.export_hf(source, tmp_path / "out")
    assert "has no MANIFEST.json" in caplog.text
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.integration
def test_cli_export_by_unpadded_name_and_step(tmp_path):
    work = tmp_path / "work"
    for step in (40, 82):
        _checkpoint(work, step, real_model=True)
    result = run_cli("export", str(work / "checkpoint-82"), "-o", str(tmp_path / "a"))
    assert result.returncode == 0, result.stderr
    assert f"exported {work / 'checkpoint-0000082'} -> {tmp_path / 'a'}" in result.stdout
    result = run_cli("export", str(work), "--step", "40", "-o", str(tmp_path / "b"))
    assert result.returncode == 0, result.stderr
    missing = run_cli("export", str(work / "checkpoint-83"), "-o", str(tmp_path / "c"))
    assert missing.returncode == 2
    [line] = missing.stderr.strip().splitlines()
    assert "no checkpoint of step 83" in line and "checkpoint-0000082" in line
    weights = work / "checkpoint-0000082" / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    broken = run_cli("export", str(work / "checkpoint-82"), "-o", str(tmp_path / "d"))
    assert broken.returncode == 2
    assert str(weights) in broken.stderr and "truncated" in broken.stderr
