"""Teacher input size from the student's token grid: the teacher's patch grid equals the student's.

Rule (version :data:`TEACHER_SIZE_RULE`, recorded in the cache keys of teacher grids): the teacher
sees frames of (H' * p * multiple, W' * p * multiple) pixels, so its patch grid is the student's
token grid (H', W') (times ``multiple``), never coarser, unless ``teacher.max_pixels`` caps it; a
cap that forces a coarser grid warns with both grids and the memory the full grid would need.
"""

from __future__ import annotations

import math
import warnings

TEACHER_SIZE_RULE = 2
"""Bump when :func:`teacher_input_size` picks other sizes for the same inputs (1: a 630x420 pixel
budget by default; 2: no default budget, the full student grid)."""


class CoarseTeacherGridWarning(UserWarning):
    """``teacher.max_pixels`` gives the teacher a coarser patch grid than the student's token grid."""


def teacher_memory_bytes(tokens: int, dim: int, frames: int = 1) -> int:
    """Rough fp32 peak of one teacher forward over ``frames`` frames of ``tokens`` patches each.

    A ViT layer keeps about 6 (tokens, dim) activations alive (input, q, k, v, 4x-wide MLP hidden
    counted as 2 more) plus, with eager attention, the (heads, tokens, tokens) scores with 64-wide
    heads (DINOv2, CLIP and SigLIP all use 64). Fused attention kernels need far less for the scores.
    """
    heads = max(1, dim // 64)
    return frames * 4 * (6 * tokens * dim + heads * tokens * tokens)


def teacher_input_size(
    student_grid: tuple[int, int],
    patch_size: int = 14,
    max_pixels: int | None = None,
    multiple: int = 1,
    *,
    teacher_dim: int = 1536,
    chunk_size: int = 1,
) -> tuple[int, int]:
    """(H, W) pixel size for the teacher, whose (H/p, W/p) patch grid matches the student grid (H', W').

    The teacher grid is the student grid times ``multiple`` (e.g. 30x45 tokens, p = 14 -> 420x630;
    Wan 480x832 -> 30x52 -> 420x728) when H * W <= ``max_pixels`` (None: no cap, the default).
    Otherwise it is the largest grid with exactly the student's aspect that fits, a * (H'/g, W'/g)
    with g = gcd(H', W') (e.g. 28x42, ..., 2x3 for 30x45); if not even the smallest fits, the largest
    grid of the nearest aspect that does. A capped grid warns (:class:`CoarseTeacherGridWarning`)
    naming both grids and the memory of the full grid (``teacher_dim`` wide, ``chunk_size`` frames
    per forward; see :func:`teacher_memory_bytes`); the teacher's grid is then brought to the
    student's with :func:`crepa.align.resample_grid` (upsampled, so the targets are blurred).
    """
    rows, cols = student_grid
    if rows < 1 or cols < 1 or patch_size < 1 or multiple < 1:
        raise ValueError(
            f"student_grid, patch_size and multiple must be positive, got {student_grid}, {patch_size}, {multiple}"
        )
    budget = math.inf if max_pixels is None else max_pixels // (patch_size * patch_size)
    if budget < 1:
        raise ValueError(f"max_pixels={max_pixels} is smaller than one {patch_size}x{patch_size} patch")
    full = (rows * multiple, cols * multiple)
    if full[0] * full[1] <= budget:
        return full[0] * patch_size, full[1] * patch_size
    common = math.gcd(rows, cols)
    base_rows, base_cols = rows // common, cols // common
    scale = math.isqrt(int(budget) // (base_rows * base_cols))
    if scale >= 1:
        grid = (base_rows * scale, base_cols * scale)
    else:
        grid_rows = max(1, math.isqrt(int(budget) * rows // cols))
        grid = (grid_rows, max(1, min(round(grid_rows * cols / rows), int(budget) // grid_rows)))
    full_pixels = full[0] * full[1] * patch_size * patch_size
    memory = teacher_memory_bytes(full[0] * full[1], teacher_dim, chunk_size) / 2**30
    warnings.warn(
        f"teacher.max_pixels = {max_pixels} caps the teacher's patch grid at {grid[0]}x{grid[1]} for the "
        f"student's {rows}x{cols} token grid, so the alignment targets are upsampled (blurred). The full "
        f"{full[0]}x{full[1]} grid needs {full[0] * patch_size}x{full[1] * patch_size} input pixels "
        f"(teacher.max_pixels >= {full_pixels}) and about {memory:.2g} GiB per teacher forward of "
        f"{chunk_size} frame(s) ({teacher_dim}-d, fp32, eager attention; lower teacher.chunk_size to fit).",
        CoarseTeacherGridWarning,
        stacklevel=2,
    )
    return grid[0] * patch_size, grid[1] * patch_size
