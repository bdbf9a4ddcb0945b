"""Teacher input size from the student's token grid: same aspect, same grid when affordable."""

from __future__ import annotations

import math


def teacher_input_size(
    student_grid: tuple[int, int], patch_size: int = 14, max_pixels: int | None = None, multiple: int = 1
) -> tuple[int, int]:
    """(H, W) pixel size for the teacher, whose (H/p, W/p) patch grid matches the student grid (H', W').

    The teacher grid is the student grid times ``multiple`` (e.g. 30x45 tokens, p = 14 -> 420x630)
    when H * W <= ``max_pixels`` (None: no limit). Otherwise it is the largest grid with exactly the
    student's aspect that fits, a * (H'/g, W'/g) with g = gcd(H', W') (e.g. 28x42, ..., 2x3 for
    30x45); if not even the smallest fits, the largest grid of the nearest aspect that does. The
    teacher's grid is then brought to the student's with :func:`crepa.align.resample_grid`.
    """
    rows, cols = student_grid
    if rows < 1 or cols < 1 or patch_size < 1 or multiple < 1:
        raise ValueError(
            f"student_grid, patch_size and multiple must be positive, got {student_grid}, {patch_size}, {multiple}"
        )
    budget = math.inf if max_pixels is None else max_pixels // (patch_size * patch_size)
    if budget < 1:
        raise ValueError(f"max_pixels={max_pixels} is smaller than one {patch_size}x{patch_size} patch")
    common = math.gcd(rows, cols)
    base_rows, base_cols = rows // common, cols // common
    scale = common * multiple
    if budget < rows * cols * multiple * multiple:
        scale = math.isqrt(int(budget) // (base_rows * base_cols))
    if scale >= 1:
        return base_rows * scale * patch_size, base_cols * scale * patch_size
    grid_rows = max(1, math.isqrt(int(budget) * rows // cols))
    grid_cols = max(1, min(round(grid_rows * cols / rows), int(budget) // grid_rows))
    return grid_rows * patch_size, grid_cols * patch_size
