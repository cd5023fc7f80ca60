"""ONNX Runtime execution providers: which to ask for, and whether a session got them.

ONNX Runtime falls back to the CPU *silently* when the CUDA provider cannot start (no GPU visible,
CUDA or cuDNN libraries missing or of the wrong major version): the session is created, runs, and
only ``session.get_providers()`` tells (STACK.md section 1). :func:`fallback_reason` turns that
comparison into a sentence the engine logs once, keeps as ``Engine.fallback_reason`` and
``neuroscribe doctor --model`` prints.

Device rules (:func:`plan_providers`):

* ``"cpu"``: the CPU provider only.
* ``"auto"``: CUDA first when the onnxruntime build has it, else the CPU. A session that then lands
  on the CPU is a *fallback*: it runs, and the reason is reported.
* ``"cuda"`` or ``"cuda:N"``: CUDA or nothing. A build without the CUDA provider, or a session that
  falls back, raises :class:`ProviderError` (an explicit request that cannot be met is a setup error).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from neuroscribe.errors import NeuroScribeError

__all__ = [
    "CPU",
    "CUDA",
    "DEVICES",
    "ProviderError",
    "ProviderPlan",
    "available_providers",
    "describe",
    "fallback_reason",
    "plan_providers",
]

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
#: Values of ``device`` (``cuda:N`` picks GPU N).
DEVICES = ("auto", "cpu", "cuda")


class ProviderError(NeuroScribeError):
    """The requested device cannot be used; the message says what is missing."""


@dataclass(frozen=True)
class ProviderPlan:
    """What to pass to ``InferenceSession(providers=...)`` and whether CUDA is wanted, and how hard."""

    providers: tuple[str | tuple[str, dict[str, Any]], ...]
    wants_cuda: bool
    strict: bool  # True for device "cuda": a fallback is an error, not a warning
    device_id: int = 0
    note: str | None = None  # why CUDA is not even tried under "auto" (a CPU-only build)

    @property
    def names(self) -> tuple[str, ...]:
        """The provider names, without options."""
        return tuple(p if isinstance(p, str) else p[0] for p in self.providers)


def available_providers() -> list[str]:
    """The providers this onnxruntime build contains (not proof that they can start)."""
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def _parse_device(device: str) -> tuple[str, int]:
    kind, _, index = device.partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise ProviderError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N")
    return kind, int(index or 0)


def plan_providers(device: str, available: Sequence[str]) -> ProviderPlan:
    """The providers to request for ``device`` given the build's ``available`` providers.

    Raises
    ------
    ProviderError
        ``device`` is malformed, or names CUDA and the build has no CUDA provider.
    """
    kind, device_id = _parse_device(device)
    if kind == "cpu":
        return ProviderPlan((CPU,), wants_cuda=False, strict=False)
    if CUDA not in available:
        if kind == "cuda":
            raise ProviderError(f"device {device!r}: this onnxruntime build has no {CUDA} (it has "
                                f"{list(available)}); install the 'gpu' extra (onnxruntime-gpu) instead of "
                                "'cpu'")
        return ProviderPlan((CPU,), wants_cuda=False, strict=False,
                            note=f"onnxruntime build without {CUDA}: CPU by design")
    cuda = (CUDA, {"device_id": device_id})
    return ProviderPlan((cuda, CPU), wants_cuda=True, strict=kind == "cuda", device_id=device_id)


def fallback_reason(plan: ProviderPlan, active: Sequence[str]) -> str | None:
    """Why a session that wanted CUDA runs without it, or None when it got what the plan asked for.

    ``active`` is ``session.get_providers()``.
    """
    if not plan.wants_cuda or CUDA in active:
        return None
    return (f"{CUDA} was requested but the session runs on {list(active)}: no usable GPU, or the "
            "CUDA/cuDNN libraries onnxruntime-gpu needs are missing or of another major version "
            "(onnxruntime names the library it could not load on stderr)")


def describe() -> dict[str, Any]:
    """The onnxruntime build as ``neuroscribe doctor`` reports it: version, providers, CUDA status.

    Whether CUDA really starts is only known once a session is created; ``doctor --model BUNDLE``
    loads a bundle to find out.
    """
    if importlib.util.find_spec("onnxruntime") is None:
        return {"installed": False, "detail": "onnxruntime is not installed (extra 'cpu' or 'gpu')"}
    import onnxruntime

    available = available_providers()
    cuda = CUDA in available
    detail = (f"onnxruntime {onnxruntime.__version__}, providers {available}; "
              + ("CUDA in the build (whether it starts shows when a session loads)" if cuda
                 else "no CUDA in this build: inference runs on the CPU"))
    return {"installed": True, "version": onnxruntime.__version__, "available": available,
            "cuda_in_build": cuda, "detail": detail}
