"""What the op layer remembers per call signature: validations, implementation choices, Gluon
routes and launch plans.  Each is decided on a signature's first call and looked up after
(host time per call: ops/fast_launch.py says why it matters)."""
from __future__ import annotations


def tensor_key(t) -> tuple:
    """What a decision may read of a tensor without its data: shape, strides, dtype and the
    16-byte alignment of its data pointer (TMA and the JIT's pointer specialisation)."""
    return (t.shape, t.stride(), t.dtype, t.data_ptr() % 16)


class SignatureCache(dict):
    """A dict of at most `limit` entries.  When full it empties: signatures repeat (every step of
    a training loop makes the same calls), so a full cache means the shapes keep changing, and
    starting over costs one decision per new signature."""

    def __init__(self, limit: int = 4096):
        super().__init__()
        self.limit = limit

    def put(self, key, value):
        if len(self) >= self.limit:
            self.clear()
        self[key] = value
        return value

    def get_or_build(self, key, build):
        """The remembered value, else build() remembered (build must not return None)."""
        hit = self.get(key)
        return hit if hit is not None else self.put(key, build())
