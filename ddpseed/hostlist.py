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

from .errors import TopologyError, shown

log = logging.getLogger(__name__)

_TASKS_ITEM = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def _scontrol() -> str | None:
    # Without a configuration scontrol goes hunting for one over DNS and then dies; only ask it
    # where Slurm is actually set up.
    if not (os.environ.get("SLURM_CONF") or Path("/etc/slurm/slurm.conf").exists()):
        return None
    return shutil.which("scontrol")


def expand_hostlist(
    nodelist: str, *, use_scontrol: bool = True, var: str | None = None
) -> list[str]:
    """Hostnames in a Slurm hostlist, in order; :class:`TopologyError` if it is malformed.

    python-hostlist validates the text first (``scontrol`` happily expands ``node[1-`` to
    ``node]``); where Slurm is configured, its own expansion is then preferred. ``var`` names
    the variable the text came from, for the error message.

    >>> expand_hostlist("node[01-02,07],gpu3", use_scontrol=False)
    ['node01', 'node02', 'node07', 'gpu3']
    """
    text = nodelist.strip()
    parsed = _parse(text, nodelist, var)
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


def _parse(text: str, nodelist: str, var: str | None) -> list[str]:
    """python-hostlist's expansion of ``text``, checked; raises TopologyError naming ``var``."""

    def bad(problem: str) -> TopologyError:
        what = f"{var}={shown(nodelist)}" if var else f"Slurm hostlist {shown(nodelist)}"
        return TopologyError(
            f"{what} is not a valid Slurm hostlist: {problem}. Launch with srun or sbatch so "
            "that Slurm sets it, or set it to names like node[01-04],gpu7"
        )

    if not text:
        raise bad("it is empty")
    if any(not item.strip() for item in _top_level_items(text)):
        raise bad("it has an empty item (a stray comma)")
    try:
        hosts: list[str] = _hostlist.expand_hostlist(text, allow_duplicates=True)
    except _hostlist.BadHostlist as exc:
        raise bad(str(exc)) from None
    except Exception as exc:  # python-hostlist has raised IndexError on odd input
        raise bad(f"{type(exc).__name__}: {exc}") from None
    if not hosts:
        raise bad("it names no host")
    for host in hosts:
        if not host or not host.isprintable() or any(c.isspace() or c in "[]," for c in host):
            raise bad(
                f"host name {shown(host)} is empty or holds spaces, brackets or control characters"
            )
    return hosts


def _top_level_items(text: str) -> list[str]:
    """``text`` split at the commas outside brackets.

    >>> _top_level_items("a[1,2],b,,c")
    ['a[1,2]', 'b', '', 'c']
    """
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char == "[") - (char == "]")
        if char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return items


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
