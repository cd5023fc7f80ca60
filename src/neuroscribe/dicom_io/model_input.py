"""The model's input, built from a CT series exactly as training and the service both build it.

Torch-free and free of the training package, so the inference engine (which the running service
imports) and the trainer share this one function: identical inputs at training and serving.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neuroscribe.dicom_io.volume import (
    MODEL_WINDOWS,
    Window,
    build_volume,
    resample,
    windowed_channels,
)
from neuroscribe.errors import NeuroScribeError

__all__ = ["DEFAULT_GRID", "ModelGrid", "ModelGridError", "series_files", "series_to_input"]

#: Files in a series folder that are not slices.
NOT_SLICES = frozenset({"DICOMDIR"})


class ModelGridError(NeuroScribeError, ValueError):
    """A model grid description is invalid; the message names the field."""


@dataclass(frozen=True)
class ModelGrid:
    """The model's input spec: ``(slices, len(windows), height, width)`` float32 in [0, 1].

    Each series is resampled to ``height x width`` in-plane and ``slices`` along the slice normal,
    covering the whole acquired extent (so the voxel size follows the field of view and the
    coverage), then windowed into one channel per window. The model checkpoint and the ONNX
    bundle record it through :meth:`to_dict`.
    """

    slices: int = 24  # about the synth "small" slice count and BrainGPT's 24-slice stacks
    height: int = 128
    width: int = 128
    windows: tuple[Window, ...] = MODEL_WINDOWS  # brain, subdural, bone

    def __post_init__(self) -> None:
        """Check sizes and windows so that a grid is always usable."""
        for name in ("slices", "height", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModelGridError(f"ModelGrid.{name} must be a positive int, got {value!r}")
        windows = tuple(self.windows)
        if not windows or not all(isinstance(w, Window) for w in windows):
            raise ModelGridError(f"ModelGrid.windows must be a non-empty sequence of Window, "
                               f"got {self.windows!r}")
        object.__setattr__(self, "windows", windows)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(slices, channels, height, width) of one model input."""
        return (self.slices, len(self.windows), self.height, self.width)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (for the index, the checkpoint and the bundle manifest)."""
        return {
            "slices": self.slices,
            "height": self.height,
            "width": self.width,
            "windows": [{"center": w.center, "width": w.width} for w in self.windows],
            "layout": "slices,channels,height,width",
            "range": [0.0, 1.0],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelGrid:
        """The grid :meth:`to_dict` described."""
        try:
            windows = tuple(Window(float(w["center"]), float(w["width"])) for w in data["windows"])
            return cls(int(data["slices"]), int(data["height"]), int(data["width"]), windows)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelGridError(f"not a ModelGrid description: {data!r}") from exc


#: The default model input: 24 slices of 128 x 128 in the brain, subdural and bone windows.
DEFAULT_GRID = ModelGrid()


def series_files(directory: Path | str) -> list[Path]:
    """The candidate slice files of a series folder: its regular files, not hidden, no DICOMDIR.

    Sub-folders are not searched: one folder is one series. Sorted by name (the volume builder
    sorts slices by position anyway).
    """
    directory = Path(directory)
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name not in NOT_SLICES)


def _as_paths(paths_or_dir: Path | str | Sequence[Path | str]) -> list[Path]:
    if isinstance(paths_or_dir, str | os.PathLike):
        path = Path(paths_or_dir)
        return series_files(path) if path.is_dir() else [path]
    return [Path(p) for p in paths_or_dir]


def series_to_input(
    paths_or_dir: Path | str | Sequence[Path | str], grid: ModelGrid = DEFAULT_GRID
) -> np.ndarray:
    """Turn one CT series into the model input, exactly as the service does.

    ``build_volume(paths, in_plane_shape=(height, width))`` (checks, sorting, tilt correction,
    in-plane resampling while decoding, so memory stays near the output size), then
    ``resample(shape=(slices, height, width))`` along z, then ``windowed_channels`` with the
    grid's windows.

    Parameters
    ----------
    paths_or_dir
        A series folder (its :func:`series_files`) or the series' files in any order.
    grid
        The model input spec.

    Returns
    -------
    numpy.ndarray
        float32 ``grid.shape``, values in [0, 1].

    Raises
    ------
    VolumeCheckError
        The series failed a volume check; ``reason`` says which.
    """
    paths = _as_paths(paths_or_dir)
    volume = build_volume(paths, in_plane_shape=(grid.height, grid.width))
    volume = resample(volume, shape=(grid.slices, grid.height, grid.width))
    out = windowed_channels(volume.hu, grid.windows)  # (slices, channels, height, width)
    assert out.shape == grid.shape, f"model input {out.shape} != grid {grid.shape}"
    return out
