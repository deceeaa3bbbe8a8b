"""``python -m cliprail`` (what torchrun launches) is the ``cliprail`` command."""

import os
import sys

from cliprail.cli import main


def _exit_torchrun_worker(code: int) -> None:
    """End a torchrun worker without the interpreter's teardown.

    When :func:`main` returns, the run is over: every file is written (atomically) and closed,
    the process group destroyed. But torch.distributed objects outlive
    ``destroy_process_group`` (DTensor's global caches keep FSDP's device meshes, which hold the
    world group), so they are destroyed during the interpreter's teardown, where gloo's threads
    can be torn down out of order and the process aborts with SIGABRT ("terminate called without
    an active exception"): torchrun then reports a finished run as failed. Seen once in about 40
    two-rank ``--fsdp`` runs here (torch 2.13). A worker therefore flushes its output and leaves
    with ``os._exit``: its exit code is the run's. Outside torchrun nothing changes.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # set by torchrun for every worker it starts
        raise SystemExit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


_exit_torchrun_worker(main())
