"""Validation of fa3_inductor.config values and of torch.compile "fa3.*" options."""
from __future__ import annotations

from . import config

ALLOWED = {
    "kernel": ("auto", "triton", "cuda", "reference"),
    "sdpa_rewrite": ("measured", "always", "never"),
}
BOOLS = ("force_rewrite", "fp8", "fp8_training", "log_rewrites", "deterministic_backward",
         "speculate_mask_inputs", "gluon_forward", "gluon_backward")
NUMBERS = ("min_train_attention_flops",)   # non-negative numbers
PREFIX = "fa3."
# Read when the op runs, not carried by a compile's sites: not a torch.compile option.
RUNTIME_ONLY = ("gluon_forward", "gluon_backward")


def check_value(name: str, val) -> None:
    if name in ALLOWED:
        if val not in ALLOWED[name]:
            raise ValueError(f"fa3_inductor.config.{name}={val!r} is not allowed; choose one of {ALLOWED[name]}")
    elif name in BOOLS:
        if not isinstance(val, bool):
            raise ValueError(f"fa3_inductor.config.{name}={val!r} is not allowed; it takes True or False")
    elif name in NUMBERS:
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not val >= 0:
            raise ValueError(f"fa3_inductor.config.{name}={val!r} is not allowed; it takes a number >= 0")
    else:
        known = sorted(list(ALLOWED) + list(BOOLS) + list(NUMBERS))
        raise ValueError(f"unknown fa3 option {name!r}; known options: {known}")


def validate() -> None:
    for name in list(ALLOWED) + list(BOOLS) + list(NUMBERS):
        check_value(name, getattr(config, name))


def split_options(options: dict | None) -> tuple[dict, dict]:
    """Split torch.compile options into (ours without the prefix, Inductor's)."""
    ours, theirs = {}, {}
    for key, val in (options or {}).items():
        if key.startswith(PREFIX):
            name = key[len(PREFIX):]
            check_value(name, val)
            if name in RUNTIME_ONLY:
                raise ValueError(f"fa3 option {key!r} is read when the op runs, not per compile; set "
                                 f"fa3_inductor.config.{name} (or use fa3_inductor.config.patch) instead")
            ours[name] = val
        else:
            theirs[key] = val
    return ours, theirs
