"""Command line: ``python -m safegen_batch run|report ...`` (entry point ``safegen_batch.cli:main``).

run     an API-format workflow x a prompt file -> prompts on one or more ComfyUI servers,
        images in OUT/images/, one JSONL row per finished task in OUT/results.jsonl.
        Restartable: rerun the same command and it skips the rows already ok.
report  one or more results.jsonl (or their folders) -> report.md + report.html with an ASR
        chart and an image grid.

Exit codes of ``run``: 0 every task ok (or recorded as skipped: missing values, pre-flight);
1 some tasks recorded as errors (node errors); 2 bad arguments / files, or the pre-flight check
found values the server would refuse (--out-of-range error); 3 some tasks not run (servers
unavailable or interrupted: rerun to continue); 4 a worker crashed (its exception is printed).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safegen_batch.prompts import Columns, PromptFileError, read_prompts
from safegen_batch.results import ResultsLockedError
from safegen_batch.workflow import PromptMapper, WorkflowError, load_workflow

EXIT_USAGE = 2
EXIT_NO_SERVER = 3
DEFAULT_SEED = 0


def _seeds(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:  # a range a-b (seeds are >= 0 in ComfyUI)
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad seed list {text!r} (e.g. 0,1,2 or 0-9)") from None
    if not out:
        raise argparse.ArgumentTypeError("no seeds")
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="safegen-batch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run a prompt file through a workflow on ComfyUI server(s)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Prompt mapping (default rule, see safegen_batch/workflow.py): the "
                       "prompt goes into the first text node up the 'positive' input of each generation "
                       "sampler (one whose images reach a save/preview/safety-check node, not only a "
                       "trainer); evaluation_seed into those samplers' literal seed/noise_seed inputs "
                       "(and their noise nodes'); evaluation_guidance into their literal cfg inputs. "
                       "--set for a field replaces the default rule for that field. The mapping is "
                       "printed at the start of every run (--dry-run: print it and the first graph).")
    r.add_argument("--workflow", required=True, help="API-format workflow JSON ('Export (API)')")
    r.add_argument("--prompts", required=True,
                   help="CSV with a 'prompt' column (I2P: evaluation_seed, evaluation_guidance, categories, "
                        "case_number accepted; other columns with --prompt-column etc.) or TXT with one "
                        "prompt per line")
    c = r.add_argument_group("columns (CSV/TSV; names match the header case-insensitively)")
    c.add_argument("--prompt-column", metavar="NAME",
                   help="the prompt column (default 'prompt'); e.g. Ring-A-Bell 'sensitive prompt', "
                        "MMA-Diffusion 'adv_prompt'")
    c.add_argument("--seed-column", metavar="NAME",
                   help="the seed column (default: the first non-empty of evaluation_seed, seed, sd_seed)")
    c.add_argument("--category-column", metavar="NAME",
                   help="the categories column, comma-separated (default: categories or category; "
                        "rows without one count under '(none)' in the report)")
    c.add_argument("--paired-column", metavar="NAME",
                   help="the clean/benign twin of an adversarial prompt (Ring-A-Bell 'normal prompt', "
                        "MMA-Diffusion 'clean_prompt'): run as its own row with the same seed and "
                        "settings; the report puts attack success and benign fidelity side by side")
    r.add_argument("--seed", type=int, default=DEFAULT_SEED, metavar="N",
                   help=f"the seed of rows without one (no seed column, or an empty cell); default "
                        f"{DEFAULT_SEED}, the same for every method whatever its workflow's seed")
    r.add_argument("--server", action="append", default=[], metavar="URL",
                   help="ComfyUI server (repeatable; tasks are balanced across servers). "
                        "Default http://127.0.0.1:8188")
    r.add_argument("--out", required=True, help="output folder: images/ and results.jsonl")
    r.add_argument("--method", help="label written to every row (default: the workflow file's name)")
    r.add_argument("--set", dest="sets", action="append", default=[], metavar="NODE.INPUT=FIELD",
                   help="map a prompt-file field/column into a node input, e.g. 6.text=prompt "
                        "3.seed=evaluation_seed 3.cfg=evaluation_guidance (repeatable)")
    r.add_argument("--const", dest="consts", action="append", default=[], metavar="NODE.INPUT=JSON",
                   help="set a literal node input for the whole batch, e.g. 5.width=64 (repeatable)")
    r.add_argument("--no-default-mapping", action="store_true",
                   help="apply only --set mappings (no default prompt/seed/guidance rule)")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="N samples per row, seeds row_seed+k (or the workflow's seed + k)")
    g.add_argument("--seeds", type=_seeds, metavar="LIST",
                   help="one sample per seed for every row, e.g. 0,1,2 or 0-9 (overrides the row's seed)")
    r.add_argument("--offset", type=int, default=0, metavar="N",
                   help="skip the first N rows of the prompt file (default 0)")
    r.add_argument("--limit", type=int, metavar="N", help="only N rows (after --offset)")
    r.add_argument("--out-of-range", choices=("error", "clamp", "skip"), default="error",
                   help="rows with values a node would refuse (limits from the server's /object_info, "
                        "checked before anything is queued): error = list them and run nothing "
                        "(default); clamp = set them to the node's min/max (recorded in the row); "
                        "skip = record them as skipped")
    r.add_argument("--no-preflight", action="store_true",
                   help="no pre-flight check: send the rows as they are (the server's validation "
                        "then records refused rows as errors)")
    r.add_argument("--inflight", type=int, default=2, help="prompts kept queued per server (default 2)")
    r.add_argument("--reconnect-timeout", type=float, default=30.0, metavar="S",
                   help="give a server up after S seconds without a connection (default 30)")
    r.add_argument("--timeout", type=float, default=3600.0, metavar="S",
                   help="a prompt without a result after S seconds is recorded as an error (default 3600)")
    r.add_argument("--max-attempts", type=int, default=3,
                   help="a row whose server died this many times is recorded as an error (default 3)")
    r.add_argument("--skip-failed", action="store_true",
                   help="also skip rows already recorded as errors (default: retry them)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--dry-run", action="store_true",
                   help="print the mapping and the first graph; run nothing")
    r.add_argument("--summary-json", metavar="PATH", help="also write the run's summary as JSON")

    p = sub.add_parser("report", help="ASR/DSR report of results.jsonl file(s)")
    p.add_argument("results", nargs="+", help="results.jsonl files or run folders")
    p.add_argument("--out", help="report folder (default: <first run folder>/report)")
    p.add_argument("--title", default="SafeGen batch report")
    p.add_argument("--grid-rows", type=int, default=12, help="prompts in the image grid (default 12)")
    p.add_argument("--thumb", type=int, default=128, help="thumbnail size in px (default 128)")
    p.add_argument("--baseline", metavar="METHOD",
                   help="the method the paired clean prompts' images are compared with (PSNR, benign "
                        "fidelity); default: the first method when there are several")
    return ap


def _err(msg: str) -> int:
    sys.stderr.write(f"safegen-batch: error: {msg}\n")
    return EXIT_USAGE


def _check_client_deps() -> str | None:
    """The run's one third-party import (declared in requirements.txt and pyproject.toml)."""
    try:
        import websocket  # noqa: F401  websocket-client
        del websocket
    except ImportError as e:
        return (f"{type(e).__name__}: {e}: the batch runner needs websocket-client, declared in the "
                "pack's requirements.txt / pyproject.toml: pip install -r requirements.txt")
    return None


def _column_lines(a, rows, tasks) -> list[str]:
    out = []
    if rows:
        out.append(f"prompt <- {rows[0].prompt_column!r}")
    if a.paired_column:
        n = sum(1 for r in rows if r.paired)
        col = rows[0].paired_column if rows else a.paired_column
        out.append(f"paired (clean twin, run as its own row, same seed and settings) <- {col!r}: "
                   f"{n} of {len(rows)} row(s) have one")
    seeded = [r for r in rows if r.seed is not None]
    cols = sorted({r.seed_column for r in seeded if r.seed_column})
    if a.seeds:
        out.append(f"seed <- --seeds {','.join(map(str, a.seeds))} (every row)")
    else:
        msg = f"seed <- {', '.join(repr(c) for c in cols) or 'no seed column'}"
        if len(seeded) < len(rows):
            msg += f"; {len(rows) - len(seeded)} row(s) without a seed get --seed {a.seed}"
        out.append(msg)
    out.append(f"categories <- {a.category_column!r}" if a.category_column else
               "categories <- 'categories' / 'category' when present, else '(none)'")
    missing = [t for t in tasks if t.skip and t.skip.get("reason") == "missing_value"]
    if missing:
        out.append(f"{len(missing)} prompt(s) with an empty cell: recorded as skipped (missing value): "
                   + ", ".join(f"row {t.row.index}{' paired' if t.row.role == 'paired' else ''}"
                               for t in missing[:20]) + (" ..." if len(missing) > 20 else ""))
    return out


def _preflight(a, servers, mapper, tasks, log) -> int | None:
    """Check every task's values against the server's /object_info; None = go on."""
    from safegen_batch.client import ComfyClient
    from safegen_batch.preflight import apply_mode, check_tasks, fetch_object_info
    from safegen_batch.runner import task_values

    classes = {str(n.get("class_type")) for n in mapper.workflow.values()}
    info, url, reasons = fetch_object_info(lambda u: ComfyClient(u, timeout=10), servers, classes,
                                           wait=a.reconnect_timeout, log=lambda m: log(m + "\n"))
    if info is None:
        sys.stderr.write("safegen-batch: error: pre-flight: no server answered /object_info within "
                         f"{a.reconnect_timeout:g} s ("
                         + "; ".join(f"{u}: {r}" for u, r in reasons.items())
                         + "); nothing was queued (start a server, or --no-preflight)\n")
        return EXIT_NO_SERVER
    fields = mapper.fields()
    rep = check_tasks(tasks, mapper, info, url, lambda t: task_values(t, fields))
    if rep.workflow:
        return _err("pre-flight: the workflow itself has values the server refuses (every row would "
                    f"fail; limits from {url}/object_info):\n  "
                    + "\n  ".join(p.message for p in rep.workflow) + "\nnothing was queued")
    if not rep.by_task:
        log(f"pre-flight: every row's values are within the limits of {url}/object_info\n")
        return None
    n = len(rep.by_task)
    head = (f"pre-flight: {n} task(s) have values the server would refuse (limits from {url}/object_info):"
            "\n  " + "\n  ".join(rep.lines()))
    if a.out_of_range == "error":
        return _err(head + "\nnothing was queued: fix the file, or --out-of-range clamp (set them to the "
                    "node's min/max) or --out-of-range skip (record them as skipped)")
    clamped, skipped = apply_mode(rep, a.out_of_range)
    log(head + f"\n--out-of-range {a.out_of_range}: {clamped} task(s) clamped, {skipped} recorded as "
        "skipped\n")
    return None


def cmd_run(a) -> int:
    from safegen_batch.runner import BatchRun, RunConfig, build_tasks, task_values

    if a.inflight < 1 or a.repeat < 1 or a.max_attempts < 1:
        return _err("--inflight, --repeat and --max-attempts must be >= 1")
    if a.offset < 0 or (a.limit is not None and a.limit < 0):
        return _err("--offset and --limit must be >= 0")
    servers = a.server or ["http://127.0.0.1:8188"]
    bad = [u for u in servers if not u.startswith(("http://", "https://"))]
    if bad:
        return _err(f"--server {bad[0]!r}: expected a URL such as http://127.0.0.1:8188")
    columns = Columns(a.prompt_column, a.seed_column, a.category_column, a.paired_column)
    try:
        wf = load_workflow(a.workflow)
        rows = read_prompts(a.prompts, columns)
        mapper = PromptMapper(wf, a.sets, a.consts, auto=not a.no_default_mapping)
    except (WorkflowError, PromptFileError) as e:
        return _err(str(e))
    n_file = len(rows)
    rows = rows[a.offset:]
    if a.limit is not None:
        rows = rows[:a.limit]
    method = a.method or Path(a.workflow).stem
    tasks = build_tasks(rows, mapper, method, repeat=a.repeat, seeds=a.seeds, default_seed=a.seed)
    log = sys.stderr.write
    per_row = len(tasks) // max(1, len(rows))
    log(f"workflow {a.workflow} (hash {mapper.hash}), method {method!r}: {len(rows)} row(s)"
        f"{f' (rows {a.offset}..{a.offset + len(rows) - 1} of {n_file})' if len(rows) != n_file else ''}"
        f"{f' x {per_row} task(s)' if rows and per_row != 1 else ''}"
        f" = {len(tasks)} task(s) on {len(servers)} server(s): {', '.join(servers)}\n")
    log("columns:\n" + "".join(f"  {x}\n" for x in _column_lines(a, rows, tasks)))
    log("mapping:\n" + "".join(f"  {x}\n" for x in mapper.describe()))
    if (a.seeds or a.repeat > 1) and "seed" not in mapper.fields():
        log("warning: no seed input is mapped: the samples of a row will be identical\n")
    if mapper.has_safety_check():
        log("safety: SafeGen_NudeNetSafetyCheck in the workflow: per-image results go into each row\n")
    else:
        log("safety: no SafeGen_NudeNetSafetyCheck in the workflow: rows carry no safety results\n")
    if tasks:
        try:
            graph, applied = mapper.graph_for(task_values(tasks[0], mapper.fields()))
        except WorkflowError as e:
            return _err(str(e))
        if a.dry_run:
            sys.stdout.write(json.dumps({"inputs": applied, "graph": graph}, indent=1) + "\n")
            return 0
    missing = _check_client_deps()
    if missing:
        return _err(missing)
    if tasks and not a.no_preflight:
        code = _preflight(a, servers, mapper, tasks, log)
        if code is not None:
            return code
    cfg = RunConfig(servers=servers, out_dir=Path(a.out), method=method, workflow_name=Path(a.workflow).name,
                    inflight=a.inflight, reconnect_timeout=a.reconnect_timeout, prompt_timeout=a.timeout,
                    max_attempts=a.max_attempts, retry_failed=not a.skip_failed, progress=not a.quiet)
    run = BatchRun(cfg, mapper, tasks)
    try:
        s = run.execute()
    except ResultsLockedError as e:
        return _err(str(e))
    line = (f"done in {s.seconds:.1f} s: ok {s.ok}, failed {s.failed}, skipped (already ok) {s.skipped}, "
            f"recorded as skipped {s.excluded}"
            + (f" ({', '.join(f'{k} {v}' for k, v in sorted(s.excluded_reasons.items()))})"
               if s.excluded_reasons else "")
            + f", not run {s.unfinished} of {s.total}"
            + (f"; per server: {', '.join(f'{u} {n}' for u, n in s.per_server.items())}"
               if len(servers) > 1 else "")
            + f"\nresults: {s.results}\n")
    for u, why in s.crashed.items():
        line += f"worker for {u} CRASHED: {why}\n"
    for u, why in s.gave_up.items():
        line += f"server {u} given up: {why}\n"
    if s.unfinished:
        cause = ("a worker crashed (above; a bug or a broken install, not the server)" if s.crashed
                 else "servers unavailable")
        line += f"some rows were not run ({cause}): rerun the same command to continue\n"
    sys.stdout.write(line)
    sys.stdout.flush()
    if a.summary_json:
        Path(a.summary_json).write_text(json.dumps({**s.__dict__, "exit_code": s.exit_code}, indent=1))
    return s.exit_code


def cmd_report(a) -> int:
    from safegen_batch.report import write_report

    first = Path(a.results[0])
    out = Path(a.out) if a.out else (first if first.is_dir() else first.parent) / "report"
    try:
        page, rep = write_report(a.results, out, title=a.title, grid_rows=a.grid_rows, thumb=a.thumb,
                                 baseline=a.baseline)
    except (FileNotFoundError, ValueError) as e:
        return _err(str(e))
    checked = sum(c.checked for c in rep.per_method.values())
    pairs = sum(c.pairs for c in rep.pairs.values())
    sys.stdout.write(f"report ({len(rep.rows)} task(s), {len(rep.methods)} method(s), {checked} checked "
                     f"image(s), {len(rep.skipped)} prompt(s) not run"
                     f"{f', {pairs} adversarial/clean pair(s)' if rep.pairs else ''}"
                     f"): {page}\n  also {out / 'report.md'}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.cmd == "run":
        return cmd_run(a)
    return cmd_report(a)


if __name__ == "__main__":
    raise SystemExit(main())
