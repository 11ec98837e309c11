"""Pre-flight check: every row's values against the limits the server's nodes declare.

Before anything is queued the runner asks a server for ``/object_info/<class>`` of each node
class in the workflow (the limits are the server's, never hard-coded here) and checks what
ComfyUI's prompt validation would refuse:

* **the workflow** (literal inputs and ``--const`` values, the same in every row; node classes
  the server does not have): a problem here fails every row, so it is always an error;
* **each task's mapped values** (prompt, seed, cfg, ``--set`` columns): INT/FLOAT against the
  input's ``min``/``max``, COMBO values against its list, values that do not convert.

What happens to a row with a problem is ``--out-of-range``: ``error`` (default: list the rows,
run nothing), ``clamp`` (a value beyond min/max is set to the limit and the row records the
change under ``adjusted``; a problem that has no limit to clamp to, e.g. a value not in a list,
skips the row), ``skip`` (the row is recorded as ``status: skipped`` with the reason and runs
not). ``--no-preflight`` sends the rows as they are (the server's validation then records the
refused ones as errors).
"""
from __future__ import annotations

import time
import urllib.parse
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Mapping

from safegen_batch.workflow import PromptMapper, WorkflowError

MODES = ("error", "clamp", "skip")
CLAMPABLE = ("below_min", "above_max")


@dataclass(frozen=True)
class Problem:
    key: str            # "node.input" ("node" alone for an unknown class)
    node: str
    class_type: str
    input: str
    value: Any
    kind: str           # below_min | above_max | not_in_list | bad_value | unknown_class
    limit: Any = None
    message: str = ""

    @property
    def clampable(self) -> bool:
        return self.kind in CLAMPABLE

    def clamped(self) -> Any:
        if not self.clampable:
            raise ValueError(f"{self.message}: nothing to clamp to")
        return int(self.limit) if isinstance(self.value, int) and not isinstance(self.value, bool) \
            else float(self.limit)

    def as_dict(self) -> dict:
        return asdict(self)


def _fmt(v: Any) -> str:
    return repr(v) if isinstance(v, str) else f"{v}"


def input_spec(info: Mapping[str, Any], input_name: str) -> tuple[Any, dict] | None:
    """(type, options) of one input from a class's object_info entry, or None."""
    inputs = info.get("input") or {}
    for section in ("required", "optional"):
        spec = (inputs.get(section) or {}).get(input_name)
        if spec is not None:
            if not isinstance(spec, (list, tuple)) or not spec:
                return None
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], Mapping) else {}
            return spec[0], dict(opts)
    return None


def check_value(node: str, class_type: str, input_name: str, value: Any,
                spec: tuple[Any, dict] | None) -> Problem | None:
    """The problem ComfyUI's validation would raise for ``value``, or None."""
    if spec is None or value is None:
        return None
    typ, opts = spec
    key = f"{node}.{input_name}"
    where = f"node {node} ({class_type}) input {input_name!r}"
    if typ in ("INT", "FLOAT"):
        try:
            v = int(value) if typ == "INT" else float(value)
        except (TypeError, ValueError):
            return Problem(key, node, class_type, input_name, value, "bad_value", None,
                           f"{where}: {_fmt(value)} is not {'an integer' if typ == 'INT' else 'a number'}")
        lo, hi = opts.get("min"), opts.get("max")
        if isinstance(lo, (int, float)) and v < lo:
            return Problem(key, node, class_type, input_name, value, "below_min", lo,
                           f"{where}: {_fmt(value)} smaller than min of {lo}")
        if isinstance(hi, (int, float)) and v > hi:
            return Problem(key, node, class_type, input_name, value, "above_max", hi,
                           f"{where}: {_fmt(value)} bigger than max of {hi}")
        return None
    options = typ if isinstance(typ, (list, tuple)) else (opts.get("options") if typ == "COMBO" else None)
    if isinstance(options, (list, tuple)) and options:
        vals = value if opts.get("multiselect") and isinstance(value, list) else [value]
        bad = [x for x in vals if x not in options]
        if bad:
            shown = ", ".join(_fmt(o) for o in list(options)[:8]) + (", ..." if len(options) > 8 else "")
            return Problem(key, node, class_type, input_name, value, "not_in_list", None,
                           f"{where}: {_fmt(bad[0])} not in the server's list ({shown})")
    return None


def check_inputs(mapper: PromptMapper, values: Mapping[str, Any],
                 object_info: Mapping[str, Any]) -> list[Problem]:
    out = []
    for key, v in values.items():
        node, _, inp = key.partition(".")
        ct = str(mapper.workflow[node].get("class_type", "?"))
        info = object_info.get(ct)
        if not info:
            continue  # reported once by check_workflow
        p = check_value(node, ct, inp, v, input_spec(info, inp))
        if p:
            out.append(p)
    return out


def check_workflow(mapper: PromptMapper, object_info: Mapping[str, Any]) -> list[Problem]:
    """Problems of the workflow itself: unknown classes, literal inputs / --const out of range."""
    out = []
    for nid, n in mapper.workflow.items():
        ct = str(n.get("class_type", "?"))
        if not object_info.get(ct):
            out.append(Problem(nid, nid, ct, "", None, "unknown_class", None,
                               f"node {nid}: class {ct!r} is not installed on the server"))
    return out + check_inputs(mapper, mapper.literal_inputs(), object_info)


# ------------------------------------------------------------------------------ the server's limits
def fetch_object_info(client_factory: Callable[[str], Any], servers: list[str], classes: Iterable[str],
                      wait: float = 30.0, log: Callable[[str], None] | None = None
                      ) -> tuple[dict | None, str | None, dict[str, str]]:
    """``/object_info/<class>`` of each class from the first server that answers, retrying for
    ``wait`` seconds. Returns (class -> info (missing = not installed), url, server -> reason)."""
    classes = sorted(set(classes))
    reasons: dict[str, str] = {}
    deadline = time.monotonic() + wait
    while True:
        for url in servers:
            c = client_factory(url)
            try:
                info: dict[str, Any] = {}
                for ct in classes:
                    body = c.get(f"/object_info/{urllib.parse.quote(ct)}", timeout=60)
                    if isinstance(body, Mapping) and isinstance(body.get(ct), Mapping):
                        info[ct] = body[ct]
                return info, url, reasons
            except Exception as e:  # noqa: BLE001 - any failure: try the next server
                reasons[url] = f"{type(e).__name__}: {e}"[:300]
        if time.monotonic() >= deadline:
            return None, None, reasons
        if log:
            why = "; ".join(f"{u}: {r}" for u, r in reasons.items())
            log(f"pre-flight: no server answered /object_info yet ({why}); retrying")
        time.sleep(1.0)


# ------------------------------------------------------------------------------ the rows
@dataclass
class PreflightReport:
    url: str
    workflow: list[Problem]
    by_task: dict[str, list[Problem]]   # task key -> problems (tasks without any are absent)
    tasks: dict[str, Any]               # task key -> Task (those with problems)

    def lines(self, limit: int = 200) -> list[str]:
        out = []
        for key, probs in self.by_task.items():
            t = self.tasks[key]
            who = (f"row {t.row.index} (line {t.row.line}{', paired' if t.row.role == 'paired' else ''}"
                   f"{f', sample {t.sample}' if t.sample else ''})")
            for p in probs:
                out.append(f"{who}: {p.message}")
        if len(out) > limit:
            out = out[:limit] + [f"... and {len(out) - limit} more"]
        return out


def check_tasks(tasks: list, mapper: PromptMapper, object_info: Mapping[str, Any], url: str,
                values_of: Callable[[Any], Mapping[str, Any]]) -> PreflightReport:
    """Check every task not already skipped (``task.skip``); ``values_of(task)`` -> row values."""
    by_task: dict[str, list[Problem]] = {}
    keep: dict[str, Any] = {}
    for t in tasks:
        if t.skip:
            continue
        try:
            applied = mapper.values_for(values_of(t))
        except WorkflowError as e:
            probs = [Problem("", "", "", "", None, "bad_value", None, str(e))]
        else:
            probs = check_inputs(mapper, applied, object_info)
        if probs:
            by_task[t.key] = probs
            keep[t.key] = t
    return PreflightReport(url, check_workflow(mapper, object_info), by_task, keep)


def apply_mode(report: PreflightReport, mode: str) -> tuple[int, int]:
    """``clamp``/``skip``: set ``overrides``/``adjusted`` or ``skip`` on the flagged tasks.
    Returns (clamped, skipped)."""
    if mode not in MODES:
        raise ValueError(f"--out-of-range {mode!r}: one of {', '.join(MODES)}")
    clamped = skipped = 0
    if mode == "error":
        return 0, 0
    for key, probs in report.by_task.items():
        t = report.tasks[key]
        if mode == "clamp" and all(p.clampable for p in probs):
            t.overrides = {p.key: p.clamped() for p in probs}
            t.adjusted = [{"input": p.key, "from": p.value, "to": p.clamped(), "reason": p.message}
                          for p in probs]
            clamped += 1
            continue
        why = "; ".join(p.message for p in probs)
        t.skip = {"reason": "out_of_range",
                  "message": (why if mode == "skip" else f"cannot clamp: {why}"),
                  "problems": [p.as_dict() for p in probs], "object_info_from": report.url}
        skipped += 1
    return clamped, skipped
