"""A training step never waits on the device between its first forward launch and the optimizer step.

The step of the trainer (forward_backward over micro-batches, the global grad-norm clip, the optimizer step
that skips itself on the device when the loss or norm is not finite) runs under omni_dist.sync_guard's
HostSyncGuard, which fails on every op that makes the host wait: reading a device value (.item(), .tolist(),
bool()), an op whose output size depends on device data (nonzero, boolean indexing, ...), a blocking copy.
On CPU every tensor counts as a device tensor except what the batch deliberately keeps on the host
(PackedBatch.host_tensors: labels, media positions and grids) and what is computed from those alone.

The model is the quickstart's architecture (Qwen2-VL vision tower for images and video, Whisper for audio,
the Janus VQ image decoder, a Qwen2 foundation) under FSDP, with a micro-batch lacking some modalities (so
the dummy encoder/decoder passes run too). The MoE foundation with EP has its own test
(tests/omni_dist/test_ep_host_sync.py).
"""

from __future__ import annotations

import pytest
import torch

from omni_dist.sync_guard import HostSyncError, HostSyncGuard
from tests.harness import run_ranks


def _step_under_guard() -> dict:
    from omni_dist import ParallelDims, ParallelMesh
    from omni_dist.grad_norm import clip_grad_norm_
    from omni_dist.optim import SkippingAdamW
    from omni_dist.parallelize import ParallelizeConfig
    from omni_dist.weights import materialize_
    from omni_models.config import build_omni_model
    from omni_models.omni_weights import init_omni_weights_
    from omni_models.parallel import parallelize_omni, run_settings
    from omni_train.trainer import forward_backward
    from tests.guarded_step import guarded_steps
    from tests.omni_models.omni_fixtures import chat_processor, draw_sample, micro_batch, omni_config, sample

    mesh = ParallelMesh.build(ParallelDims(world_size=1), device_type="cpu")
    cfg = omni_config(decoder=True)
    with torch.device("meta"):
        model = build_omni_model(cfg, run_settings(mesh, ParallelizeConfig(), None, loss_chunk=0))
    parallelize_omni(model, mesh, cfg)
    materialize_(model, "cpu")
    init_omni_weights_(model, 0)
    proc = chat_processor(model)
    batches = [
        micro_batch(proc, [sample(0, ("image", "audio")), draw_sample(1)]),
        micro_batch(proc, [sample(2, ("video",))]),  # no audio, no generation target: dummies run
    ]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = SkippingAdamW(params, lr=1e-3)
    losses = guarded_steps(model, mesh, batches, steps=2, opt=opt)["steps"]

    # The guard fails where a step would wait: it can fail.
    caught = {}
    device_tensor = torch.ones(3)
    checks = {
        "item": lambda: device_tensor.sum().item(),
        "nonzero": lambda: torch.nonzero(device_tensor > 0),
        "bool_index": lambda: device_tensor[device_tensor > 0],
        "bool": lambda: bool(device_tensor.sum() > 0),
    }
    for name, fn in checks.items():
        try:
            with HostSyncGuard("cpu"):
                fn()
            caught[name] = None
        except HostSyncError as e:
            caught[name] = str(e)
    host = torch.tensor([1, 2, 3])
    with HostSyncGuard("cpu", host=[host]):  # host data is read freely
        host_read = (host * 2).tolist()

    # A non-finite step is skipped on the device: weights, moments and step counts stay as they were.
    before = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
    steps_before = [s["step"].clone() for s in opt.state.values()]
    result = forward_backward(model, batches, mesh, None, torch.device("cpu"))
    params[0].grad.full_tensor()  # the gradients exist ...
    params[0].grad.to_local().fill_(float("nan"))  # ... and one is poisoned
    norm = clip_grad_norm_(params, 1.0)
    opt.step(skip=~(torch.isfinite(result.loss) & torch.isfinite(norm)))
    unchanged = all(torch.equal(before[k], v.full_tensor()) for k, v in model.state_dict().items())
    steps_kept = all(torch.equal(a, s["step"]) for a, s in zip(steps_before, opt.state.values(), strict=True))
    return {
        "losses": losses,
        "caught": caught,
        "host_read": host_read,
        "skipped_unchanged": unchanged,
        "steps_kept": steps_kept,
        "nan_norm": float(norm),
    }


@pytest.fixture(scope="module")
def guarded() -> dict:
    (out,) = run_ranks(_step_under_guard, 1)
    return out


def test_training_step_has_no_host_sync(guarded):
    (loss1, norm1, finite1), (loss2, _, finite2) = guarded["losses"]
    assert finite1 == 1.0 and finite2 == 1.0
    assert loss1 > 0 and norm1 > 0
    assert loss2 < loss1  # the optimizer step ran: the second step's loss on the same batches is lower


def test_guard_catches_what_makes_the_host_wait(guarded):
    assert all(guarded["caught"].values()), guarded["caught"]
    assert "nonzero" in guarded["caught"]["nonzero"] and "local_scalar_dense" in guarded["caught"]["item"]
    assert guarded["host_read"] == [2, 4, 6]


def test_non_finite_step_skips_itself_on_the_device(guarded):
    assert guarded["nan_norm"] != guarded["nan_norm"]  # NaN
    assert guarded["skipped_unchanged"] and guarded["steps_kept"]
