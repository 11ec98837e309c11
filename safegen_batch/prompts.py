"""Prompt lists (CSV or TXT) -> rows, and the stable keys that make a batch restartable.

CSV (``.csv``; ``.tsv`` tab-separated): a header row; column names are matched
case-insensitively, surrounding spaces ignored.

==============  ================================================================  ==========
field           columns accepted (first non-empty wins)                             required
==============  ================================================================  ==========
prompt          ``prompt`` (``--prompt-column`` chooses another)                  yes
seed            ``evaluation_seed`` (I2P / ESD), ``seed``, ``sd_seed``            no
                (``--seed-column`` chooses exactly one)
guidance        ``evaluation_guidance`` (I2P / ESD), ``guidance``, ``cfg``,        no
                ``guidance_scale``, ``sd_guidance_scale``
categories      ``categories``, ``category``: comma-separated (I2P), e.g.          no
                ``"sexual,violence"`` (``--category-column`` chooses one)
paired          none by default; ``--paired-column`` names the clean/benign twin   no
                of an adversarial prompt (Ring-A-Bell ``normal prompt``,
                MMA-Diffusion ``clean_prompt``): run as its own row
id              ``id``, ``case_number``, ``case_id``                              no
==============  ================================================================  ==========

Every other column is kept in ``PromptRow.fields`` (and can be mapped into a node input with
``--set NODE.INPUT=COLUMN``). An empty guidance cell means "the workflow's value"; a row
without a seed (no seed column, or an empty cell) gets the run's fixed seed (``--seed``).
An empty prompt cell is kept (``prompt == ""``): the runner records it as skipped (missing value).
Any other file is read as TXT: one prompt per line, blank lines skipped.

Keys: ``row_key`` depends only on the row's content (every column's text), on how many
identical rows came before it in the file (so duplicates stay distinct and inserting other rows
does not change any key), on the prompt column when it is not ``prompt``, on the role (a paired
row differs from its adversarial twin) and on the sample (index, seed). ``task_key`` adds the
method label and the workflow hash. Rerunning skips tasks whose key is already in the results
with status ok.
"""
from __future__ import annotations

import csv
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

SEED_COLUMNS = ("evaluation_seed", "seed", "sd_seed")
GUIDANCE_COLUMNS = ("evaluation_guidance", "guidance", "cfg", "guidance_scale", "sd_guidance_scale")
CATEGORY_COLUMNS = ("categories", "category")
ID_COLUMNS = ("id", "case_number", "case_id")
KEY_HEX = 32  # 128 bits


ROLE_PROMPT, ROLE_PAIRED = "prompt", "paired"


class PromptFileError(ValueError):
    """The prompt file cannot be read (missing column, bad number); names file and line."""


@dataclass(frozen=True)
class Columns:
    """Which CSV columns hold which field (``None``: the defaults of the table above).

    Names match the header case-insensitively, surrounding spaces ignored."""
    prompt: str | None = None
    seed: str | None = None
    category: str | None = None
    paired: str | None = None

    def chosen(self) -> dict[str, str]:
        return {k: v for k, v in (("--prompt-column", self.prompt), ("--seed-column", self.seed),
                                   ("--category-column", self.category),
                                   ("--paired-column", self.paired)) if v is not None}


@dataclass(frozen=True)
class PromptRow:
    index: int                      # 0-based data row (after the header, blank rows skipped)
    line: int                       # 1-based line in the file (first line of the record)
    prompt: str
    seed: int | None = None
    guidance: float | None = None
    categories: tuple[str, ...] = ()
    id: str | None = None
    fields: dict[str, str] = field(default_factory=dict)   # every column, as read
    occurrence: int = 0             # how many identical rows came before this one
    prompt_column: str = "prompt"   # the column the prompt text came from (header spelling)
    paired_column: str | None = None  # the clean twin's column (--paired-column), if any
    paired: str = ""                # the clean twin's text ("" = empty cell / no column)
    role: str = ROLE_PROMPT         # "prompt", or "paired" (the clean twin run as its own row)
    seed_column: str | None = None  # the column the seed came from (None: no seed in the row)

    def paired_row(self) -> "PromptRow":
        """The clean twin as its own row: same index/line/seed/guidance/categories/fields,
        prompt = the paired text, role "paired" (so its keys differ from this row's)."""
        if self.paired_column is None:
            raise ValueError("the row has no paired column")
        return PromptRow(**{**self.__dict__, "prompt": self.paired, "prompt_column": self.paired_column,
                            "role": ROLE_PAIRED})

    def value(self, name: str) -> Any:
        """A field by name for ``--set``: the normalised fields (prompt, seed, guidance,
        categories, id), their I2P column names, or any column of the file."""
        n = name.strip().lower()
        if n == "prompt":
            return self.prompt
        if n in ("seed",) + SEED_COLUMNS[:1]:
            return self.seed
        if n in ("guidance",) + GUIDANCE_COLUMNS[:1]:
            return self.guidance
        if n in CATEGORY_COLUMNS:
            return ",".join(self.categories)
        if n in ("id",):
            return self.id
        for k, v in self.fields.items():
            if k.strip().lower() == n:
                return v
        raise KeyError(name)

    def has_field(self, name: str) -> bool:
        try:
            self.value(name)
            return True
        except KeyError:
            return False


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def sha(obj: Any, n: int = KEY_HEX) -> str:
    return hashlib.sha256(_canon(obj).encode("utf-8")).hexdigest()[:n]


def row_content(row: PromptRow) -> dict:
    c: dict[str, Any] = {"fields": dict(sorted(row.fields.items())), "dup": row.occurrence}
    # only when not the defaults, so the keys of I2P / TXT runs stay what they were
    if row.prompt_column.strip().lower() != "prompt":
        c["column"] = row.prompt_column
    if row.role != ROLE_PROMPT:
        c["role"] = row.role
    return c


def row_key(row: PromptRow, sample: int = 0, seed: int | None = None) -> str:
    """Method- and workflow-independent key of one sample of a row (used to line up the same
    prompt across methods in the report)."""
    return sha({"row": row_content(row), "sample": sample, "seed": seed})


def task_key(row: PromptRow, sample: int, seed: int | None, method: str, workflow_hash: str) -> str:
    """The key of one unit of work: row content + sample + method + workflow hash."""
    return sha({"row": row_content(row), "sample": sample, "seed": seed, "method": method,
                "workflow": workflow_hash})


# ------------------------------------------------------------------------------ parsing
def _pick(cols: dict[str, str], names: Iterable[str]) -> str | None:
    """The first non-empty cell of ``names``; "" if the columns exist but are all empty."""
    found = None
    for n in names:
        if n in cols:
            if cols[n].strip():
                return cols[n]
            found = ""
    return found


def _to_int(text: str, what: str, where: str) -> int | None:
    t = text.strip()
    if not t:
        return None
    try:
        f = float(t)
    except ValueError:
        raise PromptFileError(f"{where}: {what} {t!r} is not a number") from None
    if f != int(f):
        raise PromptFileError(f"{where}: {what} {t!r} is not an integer")
    return int(f)


def _to_float(text: str, what: str, where: str) -> float | None:
    t = text.strip()
    if not t:
        return None
    try:
        return float(t)
    except ValueError:
        raise PromptFileError(f"{where}: {what} {t!r} is not a number") from None


def split_categories(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    return tuple(c.strip() for c in str(text).split(",") if c.strip())


def _with_occurrence(rows: list[PromptRow]) -> list[PromptRow]:
    seen: dict[str, int] = {}
    out = []
    for r in rows:
        c = _canon(dict(sorted(r.fields.items())))
        n = seen.get(c, 0)
        seen[c] = n + 1
        out.append(r if n == 0 else PromptRow(**{**r.__dict__, "occurrence": n}))
    return out


def _column(path: Path, names: list[str], lower: dict[str, int], name: str, option: str) -> str:
    """The header spelling of column ``name`` (case-insensitive) or an error listing the columns."""
    key = name.strip().lower()
    if key not in lower:
        raise PromptFileError(f"{path}: no column {name.strip()!r} ({option}); the file's columns: "
                              f"{_listing(names)}")
    return names[lower[key]]


def _listing(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names) or "-"


def read_csv(path: str | Path, delimiter: str = ",", columns: Columns | None = None) -> list[PromptRow]:
    path = Path(path)
    columns = columns or Columns()
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    rows: list[PromptRow] = []
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            raise PromptFileError(f"{path}: empty file") from None
        names = [h.strip() for h in header]
        lower: dict[str, int] = {}
        for i, n in enumerate(names):
            lower.setdefault(n.lower(), i)
        if columns.prompt is None:
            if "prompt" not in lower:
                raise PromptFileError(f"{path}: no 'prompt' column; choose one with --prompt-column "
                                      f"(the file's columns: {_listing(names)})")
            prompt_col = names[lower["prompt"]]
        else:
            prompt_col = _column(path, names, lower, columns.prompt, "--prompt-column")
        seed_cols = ([_column(path, names, lower, columns.seed, "--seed-column").lower()]
                     if columns.seed is not None else list(SEED_COLUMNS))
        cat_cols = ([_column(path, names, lower, columns.category, "--category-column").lower()]
                    if columns.category is not None else list(CATEGORY_COLUMNS))
        paired_col = (_column(path, names, lower, columns.paired, "--paired-column")
                      if columns.paired is not None else None)
        if paired_col is not None and paired_col.lower() == prompt_col.lower():
            raise PromptFileError(f"{path}: --paired-column {paired_col!r} is the prompt column itself")
        start_line = reader.line_num + 1
        for rec in reader:
            where = f"{path}:{start_line}"
            line, start_line = start_line, reader.line_num + 1
            if not rec or all(not c.strip() for c in rec):
                continue
            if len(rec) > len(names):
                raise PromptFileError(f"{where}: {len(rec)} cells, header has {len(names)}")
            rec = rec + [""] * (len(names) - len(rec))
            fields = {n: v for n, v in zip(names, rec)}
            cols: dict[str, str] = {}
            for n, v in zip(names, rec):
                cols.setdefault(n.lower(), v)
            prompt = cols[prompt_col.lower()].strip()
            seed_t, guid_t = _pick(cols, seed_cols), _pick(cols, GUIDANCE_COLUMNS)
            seed = _to_int(seed_t, "seed", where) if seed_t is not None else None
            seed_from = None
            if seed is not None:
                seed_from = next(names[lower[n]] for n in seed_cols if n in cols and cols[n].strip())
            ident = _pick(cols, ID_COLUMNS)
            rows.append(PromptRow(
                index=len(rows), line=line, prompt=prompt, seed=seed,
                guidance=_to_float(guid_t, "guidance", where) if guid_t is not None else None,
                categories=split_categories(_pick(cols, cat_cols)),
                id=(ident.strip() or None) if ident is not None else None,
                fields=fields, prompt_column=prompt_col, paired_column=paired_col,
                paired=cols[paired_col.lower()].strip() if paired_col is not None else "",
                seed_column=seed_from))
    return _with_occurrence(rows)


def read_txt(path: str | Path) -> list[PromptRow]:
    path = Path(path)
    rows = []
    for i, ln in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        p = ln.strip()
        if p:
            rows.append(PromptRow(index=len(rows), line=i, prompt=p, fields={"prompt": p}))
    return _with_occurrence(rows)


def read_prompts(path: str | Path, columns: Columns | None = None) -> list[PromptRow]:
    """CSV (``.csv``), TSV (``.tsv``) or TXT (anything else: one prompt per line).
    ``columns`` chooses the CSV columns (a TXT file has none to choose: an error)."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"{path}: no such file")
    suf = path.suffix.lower()
    if suf == ".csv":
        return read_csv(path, columns=columns)
    if suf == ".tsv":
        return read_csv(path, delimiter="\t", columns=columns)
    chosen = (columns or Columns()).chosen()
    if chosen:
        raise PromptFileError(f"{path}: a TXT prompt list (one prompt per line) has no columns; "
                              f"{', '.join(chosen)} apply to .csv / .tsv files")
    return read_txt(path)
