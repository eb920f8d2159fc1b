"""
The op's registration, as pytorch/extension-cpp keeps it: the schema is in csrc/qkv_rotary.cpp

    qkv_rotary(Tensor x, Tensor weight, Tensor cos, Tensor sin, int start_pos, int n_rotary, str path="default")
    qkv_rotary_backward(Tensor grad, Tensor x, Tensor weight, Tensor cos, Tensor sin, int start_pos, int n_rotary,
                        bool[2] output_mask, str path="default") -> (Tensor, Tensor)
    qkv_rotary_paths(Tensor x, Tensor weight, int n_rotary) -> str[]

with kernels per dispatch key (CPU in qkv_rotary.cpp, CUDA in qkv_rotary_cuda.cu); here the fake (meta)
implementations torch.compile traces with, and the autograd formula: the backward is its own op.
"""

import torch


def register():
    """What torch.compile (register_fake: shapes and dtypes) and autograd (register_autograd) need to know of the
    op. Called once, after the library is loaded (build.load_extension)."""
    def check(x, weight, cos, sin):  # the C++ checks, for fake tensors: shapes and dtypes
        torch._check(x.dim() == 3, lambda: f"crope::qkv_rotary: x must be (B, T, in_features), got {x.shape}")
        torch._check(weight.dim() == 3 and weight.size(2) == 2 and 2 * weight.size(1) == x.size(2),
                     lambda: f"crope::qkv_rotary: weight must be (out/2, in/2, 2) with in = {x.size(2)}, "
                             f"got {weight.shape}")
        torch._check(weight.dtype == x.dtype, lambda: f"crope::qkv_rotary: weight must have x's dtype {x.dtype}, "
                                                      f"got {weight.dtype}")
        torch._check(cos.dim() == 2 and sin.shape == cos.shape,
                     lambda: f"crope::qkv_rotary: cos and sin must be (positions, head_size/2), got {cos.shape} "
                             f"and {sin.shape}")
        for name, t in (("weight", weight), ("cos", cos), ("sin", sin)):
            torch._check(t.device == x.device, lambda: f"crope::qkv_rotary: {name} must be on x's device "
                                                       f"({x.device}), got {t.device}")

    @torch.library.register_fake("crope::qkv_rotary")
    def _(x, weight, cos, sin, start_pos, n_rotary, path="default"):
        check(x, weight, cos, sin)
        return x.new_empty(x.size(0), x.size(1), 2 * weight.size(0))

    @torch.library.register_fake("crope::qkv_rotary_backward")
    def _(grad, x, weight, cos, sin, start_pos, n_rotary, output_mask, path="default"):
        check(x, weight, cos, sin)
        torch._check(grad.dim() == 3 and grad.size(2) == 2 * weight.size(0),
                     lambda: f"crope::qkv_rotary_backward: grad must be (B, T, out), got {grad.shape}")
        torch._check(grad.device == x.device, lambda: f"crope::qkv_rotary_backward: grad must be on x's device "
                                                      f"({x.device}), got {grad.device}")
        return (x.new_empty(x.shape) if output_mask[0] else x.new_empty(0),
                weight.new_empty(weight.shape) if output_mask[1] else weight.new_empty(0))

    def setup_context(ctx, inputs, output):
        x, weight, cos, sin, start_pos, n_rotary = inputs[:6]
        ctx.save_for_backward(x, weight, cos, sin)
        ctx.start_pos, ctx.n_rotary, ctx.n_inputs = start_pos, n_rotary, len(inputs)

    def backward(ctx, grad):
        x, weight, cos, sin = ctx.saved_tensors
        need_x, need_weight = ctx.needs_input_grad[:2]
        grad_x, grad_weight = torch.ops.crope.qkv_rotary_backward(grad, x, weight, cos, sin, ctx.start_pos,
                                                                  ctx.n_rotary, [need_x, need_weight])
        return (grad_x if need_x else None, grad_weight if need_weight else None) + (None,) * (ctx.n_inputs - 2)

    torch.library.register_autograd("crope::qkv_rotary", backward, setup_context=setup_context)
