"""fa3_inductor: a torch.compile backend ("fa3") that finds attention in any model and
runs it with our own Hopper attention kernels.  See README.md."""
from . import config  # noqa: F401
from .spec import AttentionSpec  # noqa: F401
# The function shadows its module's name on the package on purpose: fa3_inductor.explain(...).
from .explain import explain  # noqa: F401,E402
# Registers torch.ops.fa3.attention_fwd / attention_bwd (needs only torch; kernels load lazily).
from .ops import attention_op as _attention_op  # noqa: F401,E402

__version__ = "0.1.0"


def __getattr__(name):
    # Heavier pieces load on first use, so `import fa3_inductor` stays cheap.
    if name == "backend":
        from .backend import fa3_backend
        return fa3_backend
    raise AttributeError(f"module 'fa3_inductor' has no attribute {name!r}")
