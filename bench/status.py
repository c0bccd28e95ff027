"""`mmbalance status DIR`: one line per run under DIR, read from the store's status files."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pandas as pd

from bench.store import RunDir


def find_runs(path: Path) -> list[RunDir]:
    """Run directories at `path` itself, one level down (a group) or two (the store root)."""
    for depth in ("", "*/", "*/*/"):
        found = sorted(path.glob(f"{depth}config.yaml"))
        if found:
            return [RunDir(p.parent) for p in found]
    return []


def shown_state(status: dict[str, Any]) -> str:
    """The recorded state, with 'running' marked stale when its process on this host is gone
    (a killed job cannot record its own end; running it again resumes it)."""
    state = status["state"]
    if state == "running" and status.get("host") == socket.gethostname() and not pid_alive(status.get("pid")):
        return "running (stale: process gone)"
    return state


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def status_table(path: Path) -> str:
    if not path.exists():
        return f"{path}: no such directory"
    runs = find_runs(path)
    if not runs:
        return f"{path}: no runs (no */config.yaml below it)"
    rows = []
    for rd in runs:
        st, cfg = rd.status(), rd.read_config()
        history = rd.read_metrics()
        best = max(history, key=lambda r: r["val"]["acc"]) if history else None
        rows.append({
            "run": f"{rd.path.parent.name}/{rd.run_id}",
            "label": cfg.get("label") or cfg["method"]["name"],
            "seed": cfg["train"]["seed"],
            "state": shown_state(st),
            "epoch": f"{len(history)}/{cfg['train']['epochs']}",
            "best val acc": f"{best['val']['acc']:.3f}" if best else "–",
            "test acc @ best val": f"{best['test']['acc']:.3f}" if best else "–",
            "updated": st.get("updated", "–"),
            "error": st.get("error", ""),
        })
    table = pd.DataFrame(rows)
    counts = table["state"].value_counts().to_dict()
    return table.to_markdown(index=False) + "\n\n" + ", ".join(f"{n} {s}" for s, n in counts.items())
