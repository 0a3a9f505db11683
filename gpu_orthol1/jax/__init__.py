"""JAX integration: the orthogonality penalty on `jax.Array`s, inside `jit`, `grad`, `vmap` and `checkpoint`.

    from gpu_orthol1.jax import ortho_l1, ortho_l1_tree

    loss = task_loss + ortho_l1(w, beta=1e-3, mode="columns")          # one array (2-D or 3-D)
    loss = task_loss + ortho_l1_tree(params, 1e-3)                     # every matrix leaf of a pytree
    loss = ortho_l1_psum(w_local, 1e-3, "d")   # inside shard_map, rows split over mesh axis "d"

The core runs inside XLA through `jax.experimental.buffer_callback`: the callback gets XLA's own
buffers, so on the CPU the core's NumPy backend reads the input and writes the gradient in place
(zero copy). A `jax.custom_vjp` computes the loss AND the gradient in one core call in its forward
pass and saves the gradient; the backward only multiplies it by the cotangent. Without
differentiation the primal computes the loss alone.

GPU (UNVERIFIED: written for XLA's CUDA buffers, never run on a card yet): the buffers carry
`__cuda_array_interface__`, are wrapped as CuPy arrays without a copy, and the core's cuBLAS path runs
on XLA's stream (`ctx.stream`), with no host synchronization.

dtypes: float32, float16 (Gram and loss in float32) and float64 (with `jax_enable_x64`) in place;
bfloat16 has no NumPy/CuPy dtype the core computes, so a bfloat16 array is cast to float32 by XLA
before the call and its gradient cast back (one float32 copy of the array, as the torch layer does).
The loss is float64 for float64 input and float32 otherwise.

Conventions are the torch layer's (`gpu_orthol1.torch`): a 2-D x (l, n) is one matrix, "columns"
(the default) penalizes |x^T x - I| (n x n), "rows" |x x^T - I| (l x l), "auto" the smaller Gram; a 3-D
x holds slices along `axis`. For pytrees, Flax / Keras / Haiku layouts put the output features LAST:
Dense kernels (in, out), Conv kernels (kh, kw, in, out); `ortho_l1_tree` flattens a kernel of 3 or
more dims to (prod(other dims), out) by a reshape (free in XLA), `out_axis=0` for Equinox / PyTorch
layouts (out, in, kh, kw). With mode="columns" the Gram is then out x out: the output units'.
"""

from ._ops import MODES, THREE_D, ortho_l1  # noqa: F401 - MODES, THREE_D: read by gpu_orthol1.optax
from ._psum import ortho_l1_psum
from ._tree import ortho_l1_tree, tree_grads

__all__ = ["ortho_l1", "ortho_l1_psum", "ortho_l1_tree", "tree_grads"]
