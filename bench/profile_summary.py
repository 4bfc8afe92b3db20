"""Summarise a ``py-spy record --format raw`` file of a Rotator worker: where the samples went.

Usage::

    .venv/bin/python bench/profile_summary.py bench/results/profile-prefork-2-....txt

Prints, as shares of all samples: per process role (the Celery parent vs the pool children),
inclusive time of the parts of a delivery (claim, send, record, commits, kombu publishes, task
events, ...), and the top leaf functions. Shares overlap (a commit inside ``claim`` counts in
both); each line answers "how much of the time was spent under this".
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

# (label, frame substrings; a sample counts when any frame of its stack contains one of them)
PARTS: list[tuple[str, tuple[str, ...]]] = [
    ("task: workers.deliveries.attempt", ("attempt (workers/deliveries.py",)),
    ("  claim (models/delivery.py)", ("claim (models/delivery.py",)),
    ("  Sender.post (httpx)", ("Sender.post (workers/http.py",)),
    ("  record (models/delivery.py)", ("record (models/delivery.py",)),
    ("  Session.commit", ("Session.commit (sqlalchemy",)),
    ("  Session.close / connection return", ("Session.close (sqlalchemy",)),
    ("  pool checkout incl. pre-ping", ("_ConnectionFairy._checkout (sqlalchemy",)),
    ("  psycopg execute (round trips)", ("Cursor.execute (psycopg",)),
    ("  sqlalchemy ORM flush", ("Session.flush (sqlalchemy",)),
    ("  signing (receiver/signing.py)", ("signature_headers (receiver/signing.py",)),
    ("  decrypt (models/crypto.py)", ("SecretBox.decrypt (models/crypto.py",)),
    ("  kombu publish after commit", ("publish (workers/enqueue.py",)),
    ("celery task events (dispatcher.send)", ("EventDispatcher.send (celery/events",)),
    ("celery trace (around the task)", ("trace_task (celery/app/trace.py",)),
    ("kombu consume / parent loop", ("Hub.create_loop (kombu",)),
    ("billiard IPC (children)", ("Worker._do_receive", "Worker.workloop (billiard")),
    ("logging", ("(logging/__init__.py",)),
]

_PROCESS = re.compile(r"^process \d+:")


def parse(path: Path) -> Iterable[tuple[list[str], int]]:
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        yield stack.split(";"), int(count)


def summarise(path: Path, top: int) -> str:
    roles: Counter[str] = Counter()
    parts: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for frames, count in parse(path):
        total += count
        processes = [frame for frame in frames if _PROCESS.match(frame)]
        code = [frame for frame in frames if not _PROCESS.match(frame)]
        roles["pool child" if len(processes) > 1 else "main process"] += count
        for label, needles in PARTS:
            if any(needle in frame for frame in code for needle in needles):
                parts[label] += count
        if code:
            leaves[code[-1]] += count
    if total == 0:
        return f"{path}: no samples"
    lines = [f"{path}: {total} samples"]
    lines.append("by process:")
    lines += [f"  {share(n, total)}  {role}" for role, n in roles.most_common()]
    lines.append("inclusive, by part of the work:")
    lines += [f"  {share(parts[label], total)}  {label}" for label, _ in PARTS]
    lines.append(f"top {top} leaf frames:")
    lines += [f"  {share(n, total)}  {frame}" for frame, n in leaves.most_common(top)]
    return "\n".join(lines)


def share(count: int, total: int) -> str:
    return f"{100.0 * count / total:5.1f}%"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    for path in args.files:
        print(summarise(path, args.top))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
