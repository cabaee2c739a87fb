"""The launcher names the root cause of a failed attempt, whichever rank's report arrived first."""

from __future__ import annotations

from omni_data.ray_cluster import import_ray
from omni_train.ray_launcher import _classify


def test_a_dead_worker_is_named_over_its_peers_broken_collectives():
    ray = import_ray()
    peer = RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:4242")
    died = ray.exceptions.ActorDiedError()
    outcome, cause, _ = _classify(ray, [(0, peer), (1, died)])
    assert outcome == "failed" and cause.startswith("rank 1: ActorDiedError")
    # an error that a restart cannot fix ends the run, even if a worker also died
    fatal = RuntimeError("TrainingError: 5 non-finite losses in a row")
    assert _classify(ray, [(1, died), (0, fatal)])[:2] == ("fatal", f"rank 0: RuntimeError: {fatal}")
    assert _classify(ray, [(0, peer)])[1] == f"rank 0: RuntimeError: {peer}"
