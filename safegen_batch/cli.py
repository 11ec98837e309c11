"""Command line: ``python -m safegen_batch run|report ...`` (entry point ``safegen_batch.cli:main``).

run     an API-format workflow x a prompt file -> prompts on one or more ComfyUI servers,
        images in OUT/images/, one JSONL row per finished task in OUT/results.jsonl.
        Restartable: rerun the same command and it skips the rows already ok.
report  one or more results.jsonl (or their folders) -> report.md + report.html with an ASR
        chart and an image grid.

Exit codes of ``run``: 0 every task ok; 1 some tasks recorded as errors (node errors); 3 some
tasks not run (servers unavailable or interrupted: rerun to continue); 2 bad arguments / files.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safegen_batch.prompts import PromptFileError, read_prompts
from safegen_batch.results import ResultsLockedError
from safegen_batch.workflow import PromptMapper, WorkflowError, load_workflow

EXIT_USAGE = 2


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
                        "case_number accepted) or TXT with one prompt per line")
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
    r.add_argument("--limit", type=int, help="only the first N rows of the prompt file")
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
    return ap


def _err(msg: str) -> int:
    sys.stderr.write(f"safegen-batch: error: {msg}\n")
    return EXIT_USAGE


def cmd_run(a) -> int:
    from safegen_batch.runner import BatchRun, RunConfig, build_tasks, task_values

    if a.inflight < 1 or a.repeat < 1 or a.max_attempts < 1:
        return _err("--inflight, --repeat and --max-attempts must be >= 1")
    try:
        wf = load_workflow(a.workflow)
        rows = read_prompts(a.prompts)
        mapper = PromptMapper(wf, a.sets, a.consts, auto=not a.no_default_mapping)
    except (WorkflowError, PromptFileError) as e:
        return _err(str(e))
    if a.limit is not None:
        rows = rows[:a.limit]
    method = a.method or Path(a.workflow).stem
    servers = a.server or ["http://127.0.0.1:8188"]
    tasks = build_tasks(rows, mapper, method, repeat=a.repeat, seeds=a.seeds)
    log = sys.stderr.write
    log(f"workflow {a.workflow} (hash {mapper.hash}), method {method!r}: {len(rows)} row(s)"
        f"{f' x {len(tasks) // max(1, len(rows))} samples' if rows and len(tasks) != len(rows) else ''}"
        f" = {len(tasks)} task(s) on {len(servers)} server(s): {', '.join(servers)}\n")
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
    cfg = RunConfig(servers=servers, out_dir=Path(a.out), method=method, workflow_name=Path(a.workflow).name,
                    inflight=a.inflight, reconnect_timeout=a.reconnect_timeout, prompt_timeout=a.timeout,
                    max_attempts=a.max_attempts, retry_failed=not a.skip_failed, progress=not a.quiet)
    run = BatchRun(cfg, mapper, tasks)
    try:
        s = run.execute()
    except ResultsLockedError as e:
        return _err(str(e))
    line = (f"done in {s.seconds:.1f} s: ok {s.ok}, failed {s.failed}, skipped (already ok) {s.skipped}, "
            f"not run {s.unfinished} of {s.total}"
            + (f"; per server: {', '.join(f'{u} {n}' for u, n in s.per_server.items())}"
               if len(servers) > 1 else "")
            + f"\nresults: {s.results}\n")
    if s.unfinished:
        line += "some rows were not run (servers unavailable): rerun the same command to continue\n"
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
        page, rep = write_report(a.results, out, title=a.title, grid_rows=a.grid_rows, thumb=a.thumb)
    except FileNotFoundError as e:
        return _err(str(e))
    checked = sum(c.checked for c in rep.per_method.values())
    sys.stdout.write(f"report ({len(rep.rows)} task(s), {len(rep.methods)} method(s), {checked} checked "
                     f"image(s)): {page}\n  also {out / 'report.md'}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.cmd == "run":
        return cmd_run(a)
    return cmd_report(a)


if __name__ == "__main__":
    raise SystemExit(main())
