"""Backends: each computes the operator's forward and backward on 2-D tensors.

``dispatch.select`` returns one of these modules for a call; ``ops`` runs it through
``verification``. What a backend module exposes (``pytorch`` documents the arguments):

``NAME``
    Its user-facing name: "reference" (``pytorch``), "triton", "cuda".
``forward(x, weight, bias, lora_a, lora_b_eff, scaling, dropout) -> (y, p)``
    Every backend. ``weight``: a dense (N, K) tensor or a ``quantized.Packed4bit`` (not "cuda",
    which ``select`` never gives a 4-bit weight).
``backward(grad_y, x, p, weight, lora_a, lora_b, scaling, dropout, *, latent, need_x, need_a,
need_b, need_latent, need_bias) -> (dx, da, db, dr, dbias)``
    Every backend.
``dora_forward(x, weight, bias, lora_a, lora_b_eff, scaling, dropout, c, *, need_z)
-> (y, p, z)`` and ``dora_backward(grad_y, x, p, z, weight, lora_a, lora_b, latent, scaling,
dropout, c, norm, *, need_x, need_a, need_b, need_latent, need_bias, need_m, z_is_output)
-> (dx, da, db, dr, dbias, dm)``
    DoRA (a column scale c): "reference" and "triton" ("cuda" has no DoRA kernels: ``select``
    sends its DoRA calls to Triton).
``dropout_keep_mask(dropout, shape, device) -> bool tensor``
    Every backend: the keep-mask it derives from ``dropout.seed`` (the same bits on all).
``config_key() -> hashable`` and ``describe_config(direction, device, shape) -> str``
    The backends the first-use check covers ("triton", "cuda"): what else decides which kernel
    code runs (part of the check's key), and the chosen configs, for a failed check's warning.
"""
