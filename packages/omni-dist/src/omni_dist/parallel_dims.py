"""Parallel degrees of a job: validated arithmetic, no communication.

The world is laid out as (dp_replicate, dp_shard, sp) with sp innermost, so the ranks of one sequence-
parallel group are neighbours (same node when possible). Expert parallelism re-factors the
dp_shard x sp block of one replica as (ep_fsdp, ep): ep groups are contiguous blocks of ep ranks, and
expert parameters are FSDP-sharded over ep_fsdp and replicated over dp_replicate. Tensor and pipeline
parallelism, when they arrive, are one more innermost / outermost axis.
"""

from __future__ import annotations

from dataclasses import dataclass


class ParallelConfigError(ValueError):
    """An impossible combination of parallel degrees (raised before any collective)."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_sp_heads(sp: int, num_heads: int | None, num_kv_heads: int | None = None) -> None:
    """Ulysses gives each SP rank heads/sp query heads; kv heads are split or repeated to match."""
    if num_heads is not None and num_heads % sp:
        raise ParallelConfigError(
            f"sp ({sp}) must divide the number of attention heads ({num_heads}): Ulysses gives each SP "
            f"rank heads/sp heads. Valid sp values: {_divisors(num_heads)}."
        )
    if num_kv_heads is not None and sp > 1 and num_kv_heads % sp and sp % num_kv_heads:
        raise ParallelConfigError(
            f"with {num_kv_heads} key/value heads, sp ({sp}) must divide them or be a multiple of them "
            "(kv heads are repeated when sp exceeds them)."
        )


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of parallelism for `world_size` ranks; `dp_shard=-1` infers it from the others."""

    world_size: int
    dp_replicate: int = 1
    dp_shard: int = -1
    sp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.world_size, int) or self.world_size < 1:
            raise ParallelConfigError(f"world_size must be a positive integer, got {self.world_size!r}.")
        self.check_degrees(self.dp_replicate, self.dp_shard, self.sp, self.ep)
        outer = self.dp_replicate * self.sp
        if self.dp_shard == -1:
            if self.world_size % outer:
                raise ParallelConfigError(
                    f"cannot infer dp_shard: world size {self.world_size} is not divisible by "
                    f"dp_replicate ({self.dp_replicate}) x sp ({self.sp}) = {outer}. Choose dp_replicate and sp "
                    f"whose product divides {self.world_size} (divisors: {_divisors(self.world_size)})."
                )
            object.__setattr__(self, "dp_shard", self.world_size // outer)
        product = outer * self.dp_shard
        if product != self.world_size:
            hint = (
                f" Set dp_shard=-1 to infer it (it would be {self.world_size // outer})."
                if self.world_size % outer == 0
                else f" dp_replicate x sp must divide {self.world_size} (divisors: {_divisors(self.world_size)})."
            )
            raise ParallelConfigError(
                f"dp_replicate ({self.dp_replicate}) x dp_shard ({self.dp_shard}) x sp ({self.sp}) = {product}, "
                f"but the world size is {self.world_size}: the product must equal the world size.{hint}"
            )
        if self.shard_group_size % self.ep:
            raise ParallelConfigError(
                f"ep ({self.ep}) must divide dp_shard x sp = {self.shard_group_size}: experts are sharded within "
                f"one data-parallel replica. Valid ep values here: {_divisors(self.shard_group_size)}."
            )

    @staticmethod
    def check_degrees(dp_replicate: int = 1, dp_shard: int = -1, sp: int = 1, ep: int = 1) -> None:
        """The checks that need no world size (a recipe is validated before it has one)."""
        for name, value in (("dp_replicate", dp_replicate), ("sp", sp), ("ep", ep)):
            if not isinstance(value, int) or value < 1:
                raise ParallelConfigError(f"parallel.{name} must be a positive integer, got {value!r}.")
        if not isinstance(dp_shard, int) or (dp_shard < 1 and dp_shard != -1):
            raise ParallelConfigError(
                f"parallel.dp_shard must be a positive integer or -1 (infer), got {dp_shard!r}."
            )

    @property
    def shard_group_size(self) -> int:
        """Ranks that hold one replica of the model between them (dp_shard x sp)."""
        return self.dp_shard * self.sp

    @property
    def dp(self) -> int:
        """Ranks that read different data (SP ranks share their samples)."""
        return self.dp_replicate * self.dp_shard

    @property
    def ep_fsdp(self) -> int:
        """Ranks over which each expert shard is FSDP-sharded inside one replica."""
        return self.shard_group_size // self.ep

    @property
    def sp_enabled(self) -> bool:
        return self.sp > 1

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    def check_model(
        self,
        num_attention_heads: int | None = None,
        num_key_value_heads: int | None = None,
        num_experts: int | None = None,
        ep_async: int = 1,
    ) -> None:
        """Fail early when the model's shape (or ParallelizeConfig.ep_async) does not fit these degrees.
        `num_experts`: 0 for a model without experts, None when unknown (not checked)."""
        check_sp_heads(self.sp, num_attention_heads, num_key_value_heads)
        if self.ep > 1 and num_experts is not None and (not num_experts or num_experts % self.ep):
            valid = (
                [d for d in _divisors(num_experts) if self.shard_group_size % d == 0] if num_experts else [1]
            )
            raise ParallelConfigError(
                f"parallel.ep={self.ep} must divide the model's experts ({num_experts or 'none'}). "
                f"Valid parallel.ep values: {valid}."
            )
        if self.ep == 1 and ep_async > 1:
            raise ParallelConfigError(
                f"parallel.ep_async={ep_async} overlaps the EP dispatch, but parallel.ep=1; "
                "set parallel.ep_async=1 or parallel.ep > 1."
            )

    def __str__(self) -> str:
        return (
            f"world={self.world_size} = dp_replicate {self.dp_replicate} x dp_shard {self.dp_shard} x sp {self.sp}"
            + (f" (ep {self.ep} x ep_fsdp {self.ep_fsdp} inside each replica)" if self.ep > 1 else "")
        )
