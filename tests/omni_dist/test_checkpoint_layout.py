"""The checkpoint folder layout answers its questions with plain pathlib: no process group needed."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from omni_dist import distributed
from omni_dist.checkpoint import CheckpointError, CheckpointLayout, CheckpointManager


class Weights:
    """A tiny stateful part."""

    def __init__(self, value: float) -> None:
        self.w = torch.full((3,), value)

    def state_dict(self) -> dict:
        return {"w": self.w}

    def load_state_dict(self, state: dict) -> None:
        self.w = state["w"].clone()


def _complete(path):
    path.mkdir(parents=True)
    (path / ".metadata").write_bytes(b"index")
    (path / "__0_0.distcp").write_bytes(b"shard")
    return path


def _by_hand(root):
    """step 10 and 30 complete, step 20 without .metadata, step 40 a crashed partial save."""
    layout = CheckpointLayout(root)
    for step in (10, 30):
        _complete(layout.step_dir(step))
    layout.step_dir(20).mkdir()
    (layout.step_dir(20) / "__0_0.distcp").write_bytes(b"half")
    _complete(layout.tmp_dir(40))  # even a finished-looking save is invisible until published
    (root / "notes.txt").write_text("not a checkpoint")
    (root / "step-abc").mkdir()
    return layout


def test_names_round_trip():
    layout = CheckpointLayout("/runs/a/checkpoints")
    assert layout.step_dir(120).name == "step-00000120"
    assert layout.tmp_dir(120).name == "step-00000120.tmp"
    assert layout.step_dir(120).parent == layout.root
    assert CheckpointLayout.step_of(layout.step_dir(120)) == 120
    assert layout.step_of("step-123456789") == 123456789
    for bad in ("step-00000120.tmp", "latest", "ckpt", "/runs/a/checkpoints"):
        with pytest.raises(ValueError, match="not a checkpoint step directory"):
            layout.step_of(bad)
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(ValueError, match="int >= 0"):
            layout.step_dir(bad)


def test_a_directory_built_by_hand(tmp_path):
    root = tmp_path / "ckpt"
    layout = _by_hand(root)
    assert not dist.is_initialized()
    assert layout.complete_steps() == [10, 30]
    assert layout.latest() == layout.step_dir(30) and layout.latest_step() == 30
    assert layout.checkpoint() == layout.step_dir(30)
    assert layout.checkpoint(10) == layout.step_dir(10)
    assert layout.is_complete(layout.step_dir(10))
    assert not layout.is_complete(layout.step_dir(20))  # no .metadata
    assert not layout.is_complete(layout.tmp_dir(40))  # never published
    assert layout.partial_dirs() == [layout.tmp_dir(40)]

    # the pointer wins when it names a complete checkpoint (a run resumed from an older step)
    (root / "latest").write_text("step-00000010\n")
    assert layout.latest_step() == 10
    # a stale pointer (pruned, incomplete, unpublished or garbage) falls back to the newest complete
    for stale in ("step-00000020", "step-00000040.tmp", "step-00000099", "../elsewhere", ""):
        (root / "latest").write_text(stale)
        assert layout.latest_step() == 30, stale


def test_missing_or_incomplete_steps_name_the_root_and_the_steps_there(tmp_path):
    root = tmp_path / "ckpt"
    layout = _by_hand(root)
    with pytest.raises(
        CheckpointError, match=r"no checkpoint of step 50 under .*ckpt; complete steps: \[10, 30\]"
    ):
        layout.checkpoint(50)
    with pytest.raises(CheckpointError, match=r"step-00000020 is incomplete \(it has no \.metadata\)"):
        layout.checkpoint(20)
    with pytest.raises(CheckpointError, match=r"step 40 has only an unfinished save .*\[10, 30\]"):
        layout.checkpoint(40)

    empty = CheckpointLayout(tmp_path / "nothing-yet")
    assert empty.complete_steps() == [] and empty.partial_dirs() == []
    assert empty.latest() is None and empty.latest_step() is None
    with pytest.raises(CheckpointError, match=r"no complete checkpoint under .*nothing-yet"):
        empty.checkpoint()
    with pytest.raises(CheckpointError, match="there are no complete checkpoints"):
        empty.checkpoint(3)


def test_publish_renames_and_moves_the_pointer(tmp_path):
    layout = CheckpointLayout(tmp_path)
    tmp = layout.tmp_dir(5)
    tmp.mkdir()
    with pytest.raises(CheckpointError, match=r"no \.metadata"):
        layout.publish(tmp, layout.step_dir(5))
    (tmp / ".metadata").write_bytes(b"index")
    with pytest.raises(ValueError, match="not a checkpoint step directory"):
        layout.publish(tmp, tmp_path / "final")
    layout.publish(tmp, layout.step_dir(5))
    assert not tmp.exists() and layout.latest_step() == 5 and layout.partial_dirs() == []
    assert (tmp_path / "latest").read_text() == "step-00000005"
    assert not (tmp_path / "latest.tmp").exists()


def test_a_directory_written_by_the_manager(tmp_path):
    root = tmp_path / "ckpt"
    with distributed():  # one process, like `omni-train convert` / inference
        manager = CheckpointManager(root, keep=2)
        assert manager.layout.root == root
        for step in (1, 2, 3):
            manager.save(step, {"weights": Weights(float(step))})
        assert manager.complete_steps() == [2, 3] and manager.latest() == manager.layout.step_dir(3)
    assert not dist.is_initialized()

    layout = CheckpointLayout(root)
    assert layout.complete_steps() == [2, 3]  # keep=2 pruned step 1
    assert layout.latest() == root / "step-00000003" and layout.latest_step() == 3
    assert layout.checkpoint(2) == root / "step-00000002"
    assert layout.partial_dirs() == []
    with pytest.raises(CheckpointError, match=r"step 1 under .*complete steps: \[2, 3\]"):
        layout.checkpoint(1)

    # a crashed save of step 4 and a pointer to a checkpoint deleted by hand
    crashed = layout.tmp_dir(4)
    crashed.mkdir()
    (crashed / "__0_0.distcp").write_bytes(b"half")
    (root / "latest").write_text("step-00000001")
    assert layout.latest_step() == 3 and layout.partial_dirs() == [crashed]

    with distributed():  # the manager sees the same: it loads the newest complete, then cleans up
        manager = CheckpointManager(root, keep=2)
        part = Weights(0.0)
        assert manager.load({"weights": part}) == 3 and torch.equal(part.w, torch.full((3,), 3.0))
        assert manager.load({"weights": part}, layout.checkpoint(2)) == 2
        manager.save(5, {"weights": part})
    assert layout.partial_dirs() == [] and layout.complete_steps() == [3, 5] and layout.latest_step() == 5
