"""Argument parsing shared by the key=value scripts (``scripts/export.py``, ``scripts/warmup_geometry.py``)."""

from __future__ import annotations

from omegaconf import OmegaConf


def parse_key_values(argv: list[str], keys: set[str], doc: str, required: tuple[str, ...] = ()) -> dict:
    """``key=value`` arguments -> dict (OmegaConf dot-list syntax, e.g. ``lora.rank=8``).

    Raises:
        SystemExit: an argument without ``=``, an unknown key or a missing required one (with ``doc``).
    """
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise SystemExit(f"arguments are key=value, got {bad}\n\n{doc}")
    args = OmegaConf.to_container(OmegaConf.from_dotlist(argv))
    unknown = sorted(set(args) - keys)
    if unknown:
        raise SystemExit(f"unknown arguments {unknown}; valid: {sorted(keys)}\n\n{doc}")
    for key in required:
        if not args.get(key):
            raise SystemExit(f"{key}=... is required\n\n{doc}")
    return args
