"""How clips are sampled and bucketed: one validated settings object."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from crepa.align.grids import valid_frame_counts_near


class SamplingConfig(BaseModel):
    """Frame sampling and buckets. Invalid values raise ``ValueError`` naming the field.

    target_fps: resample clips to this frame rate (None: keep the source's frames).
    frame_buckets: allowed frame counts, each 1 + temporal_ratio * m; a clip gets the largest it
    can supply and is skipped when it is too short for the smallest.
    resolution_buckets: allowed (H, W); a clip gets the one closest to its aspect ratio and is
    resized to cover it, then centre-cropped.
    stride: keep every stride-th resampled frame; start: seconds skipped at the clip's beginning.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    target_fps: float | None = Field(default=None, gt=0)
    frame_buckets: tuple[int, ...] = (49,)
    resolution_buckets: tuple[tuple[int, int], ...] = ((480, 720),)
    temporal_ratio: int = Field(default=4, ge=1)
    stride: int = Field(default=1, ge=1)
    start: float = Field(default=0.0, ge=0)

    @field_validator("frame_buckets")
    @classmethod
    def _sorted_counts(cls, buckets: tuple[int, ...]) -> tuple[int, ...]:
        if not buckets or min(buckets) < 1:
            raise ValueError(f"need at least one frame count >= 1, got {buckets}")
        return tuple(sorted(set(buckets)))

    @field_validator("resolution_buckets")
    @classmethod
    def _positive_sizes(cls, buckets: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
        if not buckets or any(height < 1 or width < 1 for height, width in buckets):
            raise ValueError(f"need at least one (H, W) with positive sides, got {buckets}")
        return buckets

    @model_validator(mode="after")
    def _counts_fit_the_vae(self) -> SamplingConfig:
        for count in self.frame_buckets:
            if (count - 1) % self.temporal_ratio:
                near = " or ".join(map(str, valid_frame_counts_near(count, self.temporal_ratio)))
                raise ValueError(
                    f"frame_buckets: {count} frames is not 1 + {self.temporal_ratio}*m "
                    f"(temporal_ratio {self.temporal_ratio}); nearest valid: {near}"
                )
        return self
