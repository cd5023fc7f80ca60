"""Entry of the retraining subprocesses: ``python -m neuroscribe.daemon._child ARGS`` is ``neuroscribe ARGS``.

The difference is the systemd sandbox. The unit sets ``MemoryDenyWriteExecute=yes``, which the
subprocesses inherit: no memory may be writable and executable at once. oneDNN, which torch uses
for convolutions on the CPU, compiles its kernels at run time into such memory, so training fails
with ``RuntimeError: could not create a primitive``. When a writable+executable mapping is
refused, this entry switches oneDNN off before ``neuroscribe train`` runs; torch then uses its own
convolution (im2col and GEMM: the same results, slower). Everything else runs unchanged, and no
module outside the child imports torch.
"""

from __future__ import annotations

import mmap
import sys

from neuroscribe.cli import main


def write_execute_refused() -> bool:
    """True when the kernel refuses a writable and executable anonymous mapping (W^X enforced)."""
    try:
        area = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError:
        return True
    area.close()
    return False


def run(argv: list[str]) -> int:
    """``neuroscribe`` with ``argv``, oneDNN off for training where W^X is enforced."""
    if argv[:1] == ["train"] and write_execute_refused():
        import torch

        torch.backends.mkldnn.enabled = False
        print("W^X enforced (MemoryDenyWriteExecute): oneDNN off, torch's own CPU convolutions",
              file=sys.stderr, flush=True)
    return main(argv)


if __name__ == "__main__":
    raise SystemExit(run(sys.argv[1:]))
