"""File names and the ``sparsity_config`` entry of ``config.json``: building it and reading it back."""

from __future__ import annotations

from typing import Any

from ..errors import LLMPruneError
from ..patterns import Pattern, parse_pattern
from ..quant import parse_quant
from .codecs import layout_of

FORMATS = ("compressed", "dense")
FORMAT_VERSION = 1
CONFIG_KEY = "sparsity_config"
INDEX_NAME = "model.safetensors.index.json"
CRC_KEY = "llmprune_crc32"  # index metadata: stored tensor name -> crc32 of its bytes


def shard_name(i: int, total: int) -> str:
    """Hugging Face's shard naming, so ``from_pretrained`` finds dense checkpoints."""
    return f"model-{i:05d}-of-{total:05d}.safetensors"


def _entry(pattern: Pattern, fmt: str) -> dict[str, Any]:
    entry = {
        "pattern": str(pattern),
        "sparsity": pattern.sparsity,
        "granularity": pattern.granularity,
        "layout": layout_of(pattern) if fmt == "compressed" else "dense",
    }
    if pattern.quant is not None:  # the grid every kept weight lies on
        q = pattern.quant
        entry["quant"] = {"bits": q.bits, "group_size": q.group_size, "symmetric": q.symmetric}
    return entry


def build(fmt: str, targets: dict[str, Pattern], global_sparsity: float, extra: dict[str, Any] | None,
          experts: dict[str, dict[str, Any]] | None = None) -> dict:
    """The ``sparsity_config`` for ``targets`` (parameter name, or ``<tensor>[e]`` for an expert -> pattern);
    ``experts`` describes each fused expert tensor (``num_experts``, ``transposed``: stored input-first).

    One shared pattern is described at the top level; differing patterns set ``pattern`` to ``"mixed"`` and
    list each target under ``layers``. Caller keys (``ignore``, method details, ...) are kept, but never
    override what the writer measured.
    """
    distinct = set(targets.values())
    shared = next(iter(distinct)) if len(distinct) == 1 else None
    computed: dict[str, Any] = {"format": fmt, "format_version": FORMAT_VERSION}
    if shared is not None:
        computed.update(_entry(shared, fmt))
    else:
        computed.update(pattern="mixed" if targets else "none", sparsity=None, granularity=None, layout=None)
    computed.update(targets=list(targets), global_sparsity=global_sparsity)
    if experts:
        computed["experts"] = experts
    if shared is None and targets:
        computed["layers"] = {name: _entry(p, fmt) for name, p in targets.items()}
    return {"ignore": [], **(extra or {}), **computed}


def _pattern(entry: dict[str, Any], where: str, fmt: str) -> Pattern:
    try:
        q = entry.get("quant")
        quant = None if q is None else parse_quant(f"int{int(q['bits'])}", int(q["group_size"]), bool(q["symmetric"]))
        pattern = parse_pattern(str(entry["pattern"]), float(entry["sparsity"]), entry.get("granularity") or "row", quant)
    except (KeyError, TypeError, ValueError, LLMPruneError) as exc:
        raise LLMPruneError(f"config.json {CONFIG_KEY}: bad pattern entry for {where}: {exc}") from exc
    if entry.get("layout") != _entry(pattern, fmt)["layout"]:
        raise LLMPruneError(f"config.json {CONFIG_KEY}: layout {entry.get('layout')!r} of {where} does not match "
                            f"pattern {pattern} in the {fmt} format")
    return pattern


def declared_experts(sc: dict[str, Any], targets: dict[str, Pattern]) -> dict[str, tuple[int, bool]]:
    """Fused expert tensors: state key -> (experts, transposed), each expert a target."""
    out = {}
    for name, meta in (sc.get("experts") or {}).items():
        try:
            n, transposed = int(meta["num_experts"]), bool(meta["transposed"])
        except (KeyError, TypeError, ValueError) as exc:
            raise LLMPruneError(f"config.json {CONFIG_KEY}: bad experts entry for {name}: {exc}") from exc
        if missing := [e for e in range(n) if f"{name}[{e}]" not in targets]:
            raise LLMPruneError(f"config.json {CONFIG_KEY}: expert {missing[0]} of {name} is not a target")
        out[name] = (n, transposed)
    return out


def declared(sc: Any) -> tuple[str, dict[str, Pattern]]:
    """``(format, {target name: pattern})`` from a ``sparsity_config``, refusing what this reader can't trust."""
    if not isinstance(sc, dict):
        raise LLMPruneError(f"config.json has no {CONFIG_KEY}: not an llmprune checkpoint")
    fmt, version = sc.get("format"), sc.get("format_version")
    if fmt not in FORMATS:
        raise LLMPruneError(f"config.json {CONFIG_KEY}: unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise LLMPruneError(f"config.json {CONFIG_KEY}: format_version {version!r} is not supported "
                            f"(this llmprune reads up to {FORMAT_VERSION})")
    targets = sc.get("targets")
    if not isinstance(targets, list):
        raise LLMPruneError(f"config.json {CONFIG_KEY}: 'targets' must be a list of parameter names")
    layers = sc.get("layers")
    if layers is None:
        shared = _pattern(sc, "all targets", fmt) if targets else None
        return fmt, {name: shared for name in targets}
    missing = [name for name in targets if name not in layers]
    if missing:
        raise LLMPruneError(f"config.json {CONFIG_KEY}: no pattern under 'layers' for {missing[0]}")
    return fmt, {name: _pattern(layers[name], name, fmt) for name in targets}
