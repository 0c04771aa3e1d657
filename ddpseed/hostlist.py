"""Slurm's compact notations: hostlists (``node[01-04,07]``) and task counts (``2(x3),1``).

Hostlists are expanded by ``scontrol show hostnames`` when Slurm is installed (it is the
authority), else by the maintained ``python-hostlist`` package.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import hostlist as _hostlist

from .errors import TopologyError

log = logging.getLogger(__name__)

_TASKS_ITEM = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def _scontrol() -> str | None:
    # Without a configuration scontrol goes hunting for one over DNS and then dies; only ask it
    # where Slurm is actually set up.
    if not (os.environ.get("SLURM_CONF") or Path("/etc/slurm/slurm.conf").exists()):
        return None
    return shutil.which("scontrol")


def expand_hostlist(nodelist: str, *, use_scontrol: bool = True) -> list[str]:
    """Hostnames in a Slurm hostlist, in order.

    python-hostlist validates the text first (``scontrol`` happily expands ``node[1-`` to
    ``node]``); where Slurm is configured, its own expansion is then preferred.

    >>> expand_hostlist("node[01-02,07],gpu3", use_scontrol=False)
    ['node01', 'node02', 'node07', 'gpu3']
    """
    text = nodelist.strip()
    if not text:
        raise TopologyError("empty Slurm hostlist; is SLURM_JOB_NODELIST set by Slurm?")
    try:
        parsed: list[str] = _hostlist.expand_hostlist(text, allow_duplicates=True)
    except _hostlist.BadHostlist as exc:
        raise TopologyError(f"cannot parse Slurm hostlist {nodelist!r}: {exc}") from None
    scontrol = _scontrol() if use_scontrol else None
    if scontrol:
        try:
            out = subprocess.run(
                [scontrol, "show", "hostnames", text],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.split()
            if out:
                return out
        except (subprocess.SubprocessError, OSError) as exc:
            log.debug("scontrol show hostnames %r failed (%s); using python-hostlist", text, exc)
    return parsed


def parse_tasks_per_node(spec: str) -> list[int]:
    """Tasks on each node, from ``SLURM_TASKS_PER_NODE``.

    >>> parse_tasks_per_node("2(x3),1")
    [2, 2, 2, 1]
    """
    counts: list[int] = []
    for item in spec.strip().split(","):
        match = _TASKS_ITEM.match(item.strip())
        if not match:
            raise TopologyError(
                f"cannot parse SLURM_TASKS_PER_NODE={spec!r} at {item!r}; "
                "expected items like '4' or '2(x3)'"
            )
        count, repeat = int(match.group(1)), int(match.group(2) or 1)
        counts.extend([count] * repeat)
    return counts
