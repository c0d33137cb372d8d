"""Checkpoint manifests record sizes and SHA-256 checksums; a checkpoint that does not match (truncated,
edited) is reported on resume, and the run falls back to the previous complete one or starts fresh."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agents.experiment.compose import compose_config
from agents.experiment.run import train
from agents.experiment.store import MANIFEST, STATE_FILE, CheckpointStore



def _writer(payload: bytes):
    def write(folder: Path) -> None:
        (folder / "a.bin").write_bytes(payload)
        (folder / STATE_FILE).write_bytes(payload[::-1])
    return write


def _flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    s = CheckpointStore(tmp_path, keep=2)
    s.save(100, _writer(b"first checkpoint " * 50))
    s.save(200, _writer(b"second checkpoint " * 50))
    return s


def test_manifest_records_size_and_checksum(store: CheckpointStore):
    import hashlib

    d = store.latest()
    entry = json.loads((d / MANIFEST).read_text())["files"]["a.bin"]
    data = (d / "a.bin").read_bytes()
    assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    messages: list[str] = []
    assert store.verified_latest(messages.append) == d and messages == []


@pytest.mark.parametrize("damage,problem", [
    (_flip_one_byte, "a.bin differs from its SHA-256 checksum"),  # same size: only the checksum sees it
    (lambda f: f.write_bytes(f.read_bytes()[:10]), "a.bin has 10 bytes, the manifest says"),
    (lambda f: f.unlink(), "a.bin is missing"),
])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(store: CheckpointStore, damage, problem):
    damage(store.root / "step_000000000200" / "a.bin")
    messages: list[str] = []
    assert store.verified_latest(messages.append) == store.root / "step_000000000100"
    (msg,) = messages
    assert msg.startswith("checkpoint step_000000000200 does not match its manifest") and problem in msg
    assert msg.endswith("falling back to the previous complete checkpoint, step_000000000100")


def test_no_intact_checkpoint_means_a_fresh_start_with_a_message(store: CheckpointStore):
    for d in store.root.glob("step_*"):
        _flip_one_byte(d / STATE_FILE)
    messages: list[str] = []
    assert store.verified_latest(messages.append) is None
    assert len(messages) == 1 and messages[0].endswith("no other complete checkpoint: starting from scratch")
    assert messages[0].count("does not match its manifest") == 2


def test_a_run_resumes_from_the_previous_checkpoint_when_the_latest_was_edited(tmp_path: Path, capsys):
    overrides = ["agent=ppo", "opt=adam", "env=pendulum", "agent.kwargs.n_steps=200", "agent.kwargs.batch_size=100",
                 "agent.kwargs.n_epochs=1", "++agent.policy_kwargs.net_arch=[16]", "total_timesteps=600",
                 "eval.freq=0", "eval.n_episodes=1", "progress_bar=false", "checkpoint.freq=200",
                 "checkpoint.keep=2", "checkpoint.keep_when_done=true"]
    cfg = compose_config(overrides)
    assert train(cfg, tmp_path)["status"] == "finished"
    result = json.loads((tmp_path / "result.json").read_text())
    (tmp_path / "result.json").write_text(json.dumps({**result, "status": "failed"}))  # failed runs resume
    store = CheckpointStore(tmp_path)
    newest, previous = store.steps()[-1], store.steps()[-2]
    _flip_one_byte(newest / STATE_FILE)
    capsys.readouterr()
    r = train(cfg, tmp_path)
    err = capsys.readouterr().err
    assert f"checkpoint {newest.name} does not match its manifest ({STATE_FILE} differs" in err
    assert f"falling back to the previous complete checkpoint, {previous.name}" in err
    assert r["status"] == "finished" and r["resumed_from"] == [int(previous.name.split("_")[1])]
