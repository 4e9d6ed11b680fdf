"""Fused ops: one file per op family, each with a backend registry (see :mod:`fastxmc.ops.registry`)."""
