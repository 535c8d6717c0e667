"""Which hosts and device slots a launch uses: DeepSpeed's hostfile and ``--include/--exclude``.

A hostfile has one ``HOST slots=N`` line per node (``#`` starts a comment). A resource string is
``NODE_SPEC[@NODE_SPEC ...]`` with ``NODE_SPEC = HOST[:SLOT[,SLOT ...]]``; a host without slots
means all of its slots. These are DeepSpeed's formats, so a user's existing files and flags keep
their meaning; the functions here are pure (text in, ``{host: [slot, ...]}`` out).
"""

from __future__ import annotations

import re
from pathlib import Path

from fzero.errors import LauncherError

LOCAL_HOSTS = ("localhost", "127.0.0.1")
_HOSTFILE_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*$")

Pool = dict[str, list[int]]


def read_hostfile(path: str) -> Pool:
    """``{host: [0, ..., slots - 1]}`` in the file's order."""
    file = Path(path)
    if not file.is_file():
        raise LauncherError(f"--hostfile {path}: no such file (each line: 'HOST slots=N')")
    pool: Pool = {}
    for number, raw in enumerate(file.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _HOSTFILE_LINE.match(line)
        if match is None:
            raise LauncherError(
                f"--hostfile {path} line {number}: {raw.strip()!r} is not 'HOST slots=N'"
            )
        host, slots = match.group(1), int(match.group(2))
        if host in pool:
            raise LauncherError(f"--hostfile {path} line {number}: host {host!r} is listed twice")
        pool[host] = list(range(slots))
    if not pool:
        raise LauncherError(f"--hostfile {path} lists no host (each line: 'HOST slots=N')")
    return pool


def parse_resources(text: str, flag: str) -> dict[str, list[int]]:
    """``"worker-0@worker-1:0,2"`` -> ``{"worker-0": [], "worker-1": [0, 2]}`` ([] = all slots)."""
    parsed: dict[str, list[int]] = {}
    for spec in text.split("@"):
        host, _, slots = spec.partition(":")
        if not host:
            raise LauncherError(f"{flag} {text!r}: empty host name (format: HOST[:SLOT,SLOT]@...)")
        try:
            numbers = [int(slot) for slot in slots.split(",")] if slots else []
        except ValueError:
            raise LauncherError(
                f"{flag} {text!r}: slots of {host!r} must be integers, e.g. {host}:0,1"
            ) from None
        parsed.setdefault(host, [])
        parsed[host] = sorted(set(parsed[host] + numbers))
    return parsed


def filter_pool(pool: Pool, include: str, exclude: str) -> Pool:
    """The pool restricted by ``--include`` or reduced by ``--exclude`` (not both), in the
    pool's host order; hosts left without slots are dropped. ``localhost`` names the one host
    of a pool built without a hostfile."""
    if include and exclude:
        raise LauncherError("--include and --exclude cannot be combined; use one of them")
    if not include and not exclude:
        return {host: list(slots) for host, slots in pool.items()}
    flag, text = ("--include", include) if include else ("--exclude", exclude)
    chosen = parse_resources(text, flag)
    for host, slots in chosen.items():
        if host not in pool:
            known = ", ".join(pool)
            raise LauncherError(f"{flag}: host {host!r} is not in the pool (hosts: {known})")
        missing = [slot for slot in slots if slot not in pool[host]]
        if missing:
            raise LauncherError(
                f"{flag}: host {host!r} has no slot {missing[0]} (slots {pool[host]})"
            )
    result: Pool = {}
    for host, slots in pool.items():
        if include:
            kept = (chosen[host] or list(slots)) if host in chosen else []
        elif host in chosen:
            kept = [slot for slot in slots if chosen[host] and slot not in chosen[host]]
        else:
            kept = list(slots)
        if kept:
            result[host] = kept
    if not result:
        raise LauncherError(f"{flag} {text!r} leaves no device to run on")
    return result
