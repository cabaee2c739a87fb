"""The launcher names the root cause of a failed attempt, whichever rank's report arrived first, and
tells errors a restart cannot fix by their type (as Ray delivers them), never by their message."""

from __future__ import annotations

from omni_data.ray_cluster import import_ray
from omni_train.config import ConfigError
from omni_train.errors import TrainingError
from omni_train.ray_launcher import _classify


def _as_ray_get_raises(ray, error: BaseException, rank: int = 0) -> BaseException:
    """What `ray.get` raises for `error` raised inside TrainWorker.run: a RayTaskError carrying the
    original as `.cause`, subclassed from the original's type by `as_instanceof_cause()`."""
    traceback = (
        "Traceback (most recent call last):\n"
        '  File "/src/omni_train/ray_launcher.py", line 80, in run\n'
        "    return train(TrainConfig.model_validate(config), self._on_progress)\n"
        f"{type(error).__module__}.{type(error).__name__}: {error}"
    )
    task_error = ray.exceptions.RayTaskError(
        "TrainWorker.run",
        traceback,
        error,
        proctitle=f"ray::rank{rank}.run",
        pid=4242,
        ip="127.0.0.1",
        actor_repr=f"rank{rank}",
    )
    return task_error.as_instanceof_cause()


def test_a_dead_worker_is_named_over_its_peers_broken_collectives():
    ray = import_ray()
    peer = RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:4242")
    died = ray.exceptions.ActorDiedError()
    outcome, cause, _ = _classify(ray, [(0, peer), (1, died)])
    assert outcome == "failed" and cause.startswith("rank 1: ActorDiedError")
    # an error that a restart cannot fix ends the run, even if a worker also died
    fatal = _as_ray_get_raises(ray, TrainingError("5 non-finite losses in a row"))
    assert type(fatal).__name__ == "RayTaskError(TrainingError)"
    assert _classify(ray, [(1, died), (0, fatal)])[:2] == (
        "fatal",
        "rank 0: TrainingError: 5 non-finite losses in a row",
    )
    assert _classify(ray, [(0, peer)])[1] == f"rank 0: RuntimeError: {peer}"


def test_fatal_is_decided_by_type_not_by_message_text():
    ray = import_ray()
    mentions = _as_ray_get_raises(ray, RuntimeError("TrainingError: not really, just a message"))
    outcome, cause, _ = _classify(ray, [(0, mentions)])
    assert outcome == "failed"
    assert cause == "rank 0: RuntimeError: TrainingError: not really, just a message"
    plain = RuntimeError("DataErrorRateExceeded ConfigError")
    assert _classify(ray, [(2, plain)])[:2] == ("failed", f"rank 2: RuntimeError: {plain}")


def test_a_fatal_type_nested_as_a_cause_is_fatal_and_named():
    ray = import_ray()
    # Ray wrapping Ray (a nested task), and a RayTaskError that could not be subclassed (plain wrapper)
    inner = _as_ray_get_raises(ray, ConfigError("train.steps must be > 0"))
    nested = ray.exceptions.RayTaskError("outer", "Traceback...", inner, proctitle="p", pid=1, ip="127.0.0.1")
    peer = _as_ray_get_raises(ray, RuntimeError("[gloo] Connection reset by peer"), rank=0)
    assert _classify(ray, [(0, peer), (3, nested)])[:2] == (
        "fatal",
        "rank 3: ConfigError: train.steps must be > 0",
    )
    # `raise ... from` inside the worker: the fatal cause wins and is the one named
    try:
        try:
            raise TrainingError("data ended early at step 7")
        except TrainingError as e:
            raise RuntimeError("trainer shut down") from e
    except RuntimeError as e:
        chained = e
    assert _classify(ray, [(1, chained)])[:2] == (
        "fatal",
        "rank 1: TrainingError: data ended early at step 7",
    )
    # a RayTaskError around a non-fatal error names the error the worker raised, not the wrapper
    assert _classify(ray, [(0, peer)])[1] == "rank 0: RuntimeError: [gloo] Connection reset by peer"
