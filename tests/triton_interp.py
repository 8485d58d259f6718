"""Run Triton kernels on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1).

Import this module before triton.  It also fixes one interpreter incompatibility with
numpy >= 2.4: scalars are 1-element arrays there, and `int(array([n]))` now raises, which
breaks `tl.range(lo, hi)` with program-id-derived bounds.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

from triton.runtime import interpreter as _interp  # noqa: E402

if not getattr(_interp, "_fa3_index_fix", False):
    _orig_patch = _interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        _orig_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_lang_tensor
    _interp._fa3_index_fix = True

    # The interpreter stores bf16 as raw uint16 bits and multiplies those bits in tl.dot;
    # widen bf16 operands to fp32 first (exact) so bf16 kernels can be checked on CPU.
    import numpy as _np

    _orig_dot = _interp.InterpreterBuilder.create_dot

    def _bf16_to_f32(h):
        if h.dtype == _interp.tl.bfloat16:
            return _interp.TensorHandle((h.data.astype(_np.uint32) << 16).view(_np.float32), _interp.tl.float32)
        return h

    def create_dot(self, a, b, d, *args):
        return _orig_dot(self, _bf16_to_f32(a), _bf16_to_f32(b), d, *args)

    _interp.InterpreterBuilder.create_dot = create_dot
