"""Checking a part against its Protocol (omni_models.modality): the members the framework calls, each
with a signature the framework's call sites can call.

Structural and cheap (no forward, nothing allocated; fine on the meta device): data attributes by
presence; methods by being callable as the Protocol's signature says they are called: its
positional-only parameters by position (under any name), its keyword parameters by name (or through
`**kwargs`), and no further parameter required. Encoders, decoders and foundations are also
nn.Modules. `build_omni_model` checks every part it builds, so a registered class that lacks a member
fails at build, naming the part, the Protocol and what is missing.

    problems = contract_problems(encoder, Encoder)        # [] when it satisfies the Protocol
    check_contract(encoder, Encoder, "model.encoders.vision (qwen2_vl_vision)")  # raises ContractError
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any, Protocol

from torch import nn

from omni_models.modality import Decoder, Encoder, Foundation

MODULE_PROTOCOLS = (Encoder, Decoder, Foundation)  # these parts are also nn.Modules

_P = inspect.Parameter
_POSITIONAL = (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD)
_BY_NAME = (_P.POSITIONAL_OR_KEYWORD, _P.KEYWORD_ONLY)


class ContractError(TypeError):
    """A part that does not satisfy its Protocol; the message names the part and each problem."""


@cache
def protocol_members(protocol: type) -> tuple[tuple[str, ...], dict[str, inspect.Signature]]:
    """(data attributes, {method: signature without self}) that `protocol` declares, bases included."""
    data: list[str] = []
    methods: dict[str, inspect.Signature] = {}
    for base in reversed(protocol.__mro__):
        if base in (object, Protocol) or not getattr(base, "_is_protocol", False):
            continue
        for name in inspect.get_annotations(base):
            if not name.startswith("_") and name not in data:
                data.append(name)
        for name, value in base.__dict__.items():
            if not name.startswith("_") and inspect.isfunction(value):
                sig = inspect.signature(value)
                methods[name] = sig.replace(parameters=list(sig.parameters.values())[1:])
    return tuple(n for n in data if n not in methods), methods


def contract_problems(obj: Any, protocol: type) -> list[str]:
    """What keeps `obj` from satisfying `protocol`, one line per problem; [] when nothing does."""
    problems = []
    if protocol in MODULE_PROTOCOLS and not isinstance(obj, nn.Module):
        problems.append(f"not an nn.Module ({type(obj).__qualname__})")
    data, methods = protocol_members(protocol)
    for name in data:
        if not _has(obj, name):
            problems.append(f"missing attribute `{name}`")
    for name, want in methods.items():
        if not _has(obj, name):
            problems.append(f"missing method `{name}`")
            continue
        fn = getattr(obj, name)
        if not callable(fn):
            problems.append(f"`{name}` is {fn!r}, not a method")
            continue
        try:
            have = inspect.signature(fn)
        except (TypeError, ValueError):  # a builtin without a signature: nothing to compare
            continue
        reasons = _call_problems(want, have)
        if reasons:
            problems.append(
                f"`{name}{_plain(have)}` cannot be called as the Protocol's `{name}{_plain(want)}`: "
                + ", ".join(reasons)
            )
    return problems


def check_contract(obj: Any, protocol: type, where: str, error: type[Exception] = ContractError) -> None:
    """Raise `error` naming `where`, the Protocol and every problem when `obj` does not satisfy it."""
    problems = contract_problems(obj, protocol)
    if problems:
        raise error(
            f"{where}: {type(obj).__qualname__} does not satisfy the {protocol.__name__} Protocol "
            f"({protocol.__module__}.{protocol.__qualname__}): " + "; ".join(problems)
        )


def _has(obj: Any, name: str) -> bool:
    try:
        getattr(obj, name)
    except AttributeError:
        return False
    return True


def _call_problems(want: inspect.Signature, have: inspect.Signature) -> list[str]:
    """Why a function of signature `have` cannot take the calls that `want` describes."""
    wp, hp = list(want.parameters.values()), list(have.parameters.values())
    positional = [p for p in wp if p.kind in _POSITIONAL]
    by_name = {p.name for p in wp if p.kind in _BY_NAME}
    have_pos = [p for p in hp if p.kind in _POSITIONAL]
    var_pos = any(p.kind is _P.VAR_POSITIONAL for p in hp)
    var_kw = any(p.kind is _P.VAR_KEYWORD for p in hp)
    out = []
    if len(have_pos) < len(positional) and not var_pos:
        out.append(f"it takes {len(have_pos)} positional argument(s), the framework passes {len(positional)}")
    for i, p in enumerate(positional):  # passed by position or by name: the names must match too
        if p.kind is _P.POSITIONAL_OR_KEYWORD and i < len(have_pos) and have_pos[i].name != p.name:
            out.append(f"its argument {i + 1} is named `{have_pos[i].name}`, not `{p.name}`")
    unknown = [
        p.name
        for p in wp
        if p.kind is _P.KEYWORD_ONLY
        and not var_kw
        and getattr(have.parameters.get(p.name), "kind", None) not in _BY_NAME
    ]
    if unknown:
        out.append("it does not take the keyword(s) " + ", ".join(f"`{n}`" for n in unknown))
    for h in hp:
        required = h.default is _P.empty and h.kind not in (_P.VAR_POSITIONAL, _P.VAR_KEYWORD)
        given = (h.kind in _POSITIONAL and have_pos.index(h) < len(positional)) or (
            h.kind in _BY_NAME and h.name in by_name
        )
        if required and not given:
            out.append(f"it requires `{h.name}`, which the framework never passes")
    if any(p.kind is _P.VAR_POSITIONAL for p in wp) and not var_pos:
        out.append("it takes no *args")
    if any(p.kind is _P.VAR_KEYWORD for p in wp) and not var_kw:
        out.append("it takes no **kwargs")
    return out


def _plain(sig: inspect.Signature) -> str:
    """The signature without annotations: `(media, /)`."""
    return str(
        sig.replace(
            parameters=[p.replace(annotation=_P.empty) for p in sig.parameters.values()],
            return_annotation=inspect.Signature.empty,
        )
    )
