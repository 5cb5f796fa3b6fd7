"""Backends: each computes the operator's forward and backward on 2-D tensors.

Every backend module exposes the same three functions (see ``pytorch`` for the contract):
``forward``, ``backward`` and ``dropout_keep_mask``.
"""
