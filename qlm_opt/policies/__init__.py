"""Scheduling policies, looked up by name."""

from __future__ import annotations

from qlm_opt.errors import ConfigError

# name -> "module:Class"; imported lazily so that the CLI starts fast.
_REGISTRY: dict[str, str] = {
    "fcfs": "qlm_opt.policies.baselines:FCFSPolicy",
    "edf": "qlm_opt.policies.baselines:EDFPolicy",
    "priority": "qlm_opt.policies.baselines:PriorityPolicy",
    "shepherd": "qlm_opt.policies.baselines:ShepherdPolicy",
    "qlm-rwt": "qlm_opt.policies.qlm_rwt:QLMRWTPolicy",
    "qlm": "qlm_opt.policies.qlm:QLMPolicy",
    "qlm-true-lengths": "qlm_opt.policies.qlm:TrueLengthsPolicy",
}


def register(name: str, target: str) -> None:
    _REGISTRY[name] = target


def policy_names() -> list[str]:
    return list(_REGISTRY)


def make_policy(name: str, **context):
    """Build a policy by name. ``context`` (workload, fleet, ...) goes to policies that take
    it through a ``from_context`` classmethod; plain policies ignore it."""
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown policy '{name}' (known: {', '.join(_REGISTRY)})"
        ) from None
    import importlib

    mod, cls_name = target.split(":")
    cls = getattr(importlib.import_module(mod), cls_name)
    if hasattr(cls, "from_context"):
        try:
            return cls.from_context(**context)
        except (TypeError, ValueError) as e:  # a bad option: name it, one line
            raise ConfigError(f"policy '{name}': bad policy_options: {e}") from None
    return cls()
