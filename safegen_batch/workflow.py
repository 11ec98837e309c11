"""API-format workflows and how a prompt row's fields are written into node inputs.

The default rule (applied per field; an explicit ``--set`` for a field replaces it):

* **sampling nodes**: the *generation* samplers (nodes with a linked ``latent_image``:
  KSampler, KSamplerAdvanced, SamplerCustom, SamplerCustomAdvanced) and the nodes linked straight
  into them (CFGGuider, SLD Guider, RandomNoise, ...). A sampler counts as a generation sampler
  when a save / preview / safety-check node is reachable downstream without passing through a
  trainer node (so in a train-then-generate pipeline the sampler that only makes training
  images is left alone); if none qualifies, every sampler counts. Trainer nodes never count.
* **prompt** -> the text of the *positive* prompt: from each sampling node's ``positive``
  input the runner walks up the links, breadth-first, through nodes without text
  (ConditioningCombine, ConditioningSetArea, ...; linked inputs in the order the node lists
  them); the first node with a literal string input ``text`` (CLIPTextEncode, Safe Text
  Encoder, ...), ``prompt`` (SAFREE Prompt Filter) or ``text_g``/``text_l``
  (CLIPTextEncodeSDXL: both) is the target (one per sampler; so in ConditioningCombine(prompt,
  style) only the first). Without any sampler, a workflow with exactly one CLIPTextEncode uses
  that one. Anything else is an error asking for ``--set NODE.text=prompt``.
* **seed** -> every literal ``seed`` / ``noise_seed`` input of the sampling nodes, when the row
  (or ``--seeds``/``--repeat``) gives a seed.
* **guidance** -> every literal numeric ``cfg`` input of the sampling nodes, when the row gives
  a guidance value.

``--set NODE.INPUT=FIELD`` maps a field (``prompt``, ``seed``/``evaluation_seed``,
``guidance``/``evaluation_guidance``, ``categories``, ``id`` or any CSV column) into a node input;
values are converted to the type of the input's current literal value. ``--const
NODE.INPUT=JSON`` sets a literal value for the whole batch (e.g. ``--const 5.width=64``,
``--const '1.ckpt_name="tiny.safetensors"'``; a bare word that is not JSON is taken as a string).
Both are part of the workflow hash, so they are part of every row's key.
"""
from __future__ import annotations

import copy
import json
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from safegen_batch.prompts import sha

PROMPT_INPUTS = ("text", "prompt", "text_g", "text_l")
SEED_INPUTS = ("seed", "noise_seed")
CFG_INPUTS = ("cfg",)
SAFETY_NODE = "SafeGen_NudeNetSafetyCheck"
FIELD_ALIASES = {"prompt": "prompt", "seed": "seed", "evaluation_seed": "seed",
                 "guidance": "guidance", "evaluation_guidance": "guidance"}


class WorkflowError(ValueError):
    """The workflow or a mapping is unusable (names the node/input)."""


def load_workflow(path: str | Path) -> dict[str, dict]:
    """An API-format workflow (``{"id": {"class_type", "inputs"}}``; a ``{"prompt": {...}}``
    wrapper is accepted). A UI-format file (``nodes``/``links``) is refused with a hint."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise WorkflowError(f"{path}: cannot read the workflow: {e}") from None
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise WorkflowError(f"{path}: this is a UI-format workflow; export it with 'Export (API)'")
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict) and "class_type" not in data["prompt"]:
        data = data["prompt"]
    if not isinstance(data, dict) or not data or not all(
            isinstance(v, dict) and "class_type" in v for v in data.values()):
        raise WorkflowError(f"{path}: not an API-format workflow "
                            "(expected {node_id: {class_type, inputs}})")
    return {str(k): v for k, v in data.items()}


def is_link(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and isinstance(v[0], (str, int)) and isinstance(v[1], int)


def normalise_field(name: str) -> str:
    n = name.strip()
    return FIELD_ALIASES.get(n.lower(), n)


def parse_assignment(text: str, what: str) -> tuple[str, str, str]:
    """'NODE.INPUT=VALUE' -> (node, input, value)."""
    target, eq, value = text.partition("=")
    node, dot, inp = target.strip().partition(".")
    if not eq or not dot or not node or not inp.strip():
        raise WorkflowError(f"{what} {text!r}: expected NODE.INPUT=VALUE (e.g. 6.text=prompt)")
    return node.strip(), inp.strip(), value.strip()


def _literal(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def convert(value: Any, like: Any, where: str) -> Any:
    """``value`` converted to the type of ``like`` (the input's current literal value)."""
    if value is None:
        return None
    try:
        if isinstance(like, bool):
            return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")
        if isinstance(like, int):
            f = float(value)
            if f != int(f):
                raise ValueError(f"{value!r} is not an integer")
            return int(f)
        if isinstance(like, float):
            return float(value)
        if isinstance(like, str):
            return str(value)
    except (TypeError, ValueError) as e:
        raise WorkflowError(f"{where}: cannot use {value!r} ({e})") from None
    return value


@dataclass(frozen=True)
class Binding:
    node: str
    input: str
    field: str      # normalised: prompt | seed | guidance | a column name
    auto: bool      # from the default rule (False: --set)

    def __str__(self) -> str:
        return f"{self.node}.{self.input} <- {self.field}{' (auto)' if self.auto else ''}"


def _linked_inputs(node: Mapping) -> list[str]:
    return [str(v[0]) for v in (node.get("inputs") or {}).values() if is_link(v)]


def _is_trainer(node: Mapping) -> bool:
    return "Trainer" in str(node.get("class_type", ""))


def _is_sink(node: Mapping) -> bool:
    ct = str(node.get("class_type", ""))
    return ct == SAFETY_NODE or "Save" in ct or "Preview" in ct


def sampling_nodes(wf: Mapping[str, dict]) -> list[str]:
    """The generation samplers and the nodes linked straight into them (guider, noise, ...).

    A sampler is a node with a linked ``latent_image`` input. A *generation* sampler has a
    path downstream to a save/preview/safety-check node that does not pass through a trainer
    node (so a sampler that only feeds training images, as in a train-then-generate
    pipeline, is not one); if no sampler qualifies, all samplers count. Trainer nodes are
    never sampling nodes (their ``seed`` is a training seed)."""
    samplers = [nid for nid, n in wf.items() if is_link((n.get("inputs") or {}).get("latent_image"))]
    consumers: dict[str, list[str]] = {}
    for nid, n in wf.items():
        for src in _linked_inputs(n):
            consumers.setdefault(src, []).append(nid)

    def reaches_sink(start: str) -> bool:
        seen, todo = set(), deque(consumers.get(start, []))
        while todo:
            nid = todo.popleft()
            if nid in seen or nid not in wf or _is_trainer(wf[nid]):
                continue
            seen.add(nid)
            if _is_sink(wf[nid]):
                return True
            todo.extend(consumers.get(nid, []))
        return False

    gen = [s for s in samplers if reaches_sink(s)] or samplers
    out = list(gen)
    for s in gen:
        for src in _linked_inputs(wf[s]):
            if src in wf and src not in out and not _is_trainer(wf[src]):
                out.append(src)
    return out


def positive_prompt_targets(wf: Mapping[str, dict]) -> list[tuple[str, str]]:
    """(node, input) pairs that hold the positive prompt text (the default rule above)."""
    nodes = sampling_nodes(wf)
    starts = [str(wf[n]["inputs"]["positive"][0]) for n in nodes
              if is_link((wf[n].get("inputs") or {}).get("positive"))]
    targets: list[tuple[str, str]] = []
    for s in starts:
        seen, todo = set(), deque([s])
        while todo:
            nid = todo.popleft()
            if nid in seen or nid not in wf:
                continue
            seen.add(nid)
            inputs = wf[nid].get("inputs") or {}
            found = [k for k in PROMPT_INPUTS if isinstance(inputs.get(k), str)]
            if found:
                for k in found:
                    if (nid, k) not in targets:
                        targets.append((nid, k))
                break  # the first text node of this sampler's positive
            todo.extend(_linked_inputs(wf[nid]))
    if not starts:
        enc = [nid for nid, n in wf.items() if n.get("class_type") == "CLIPTextEncode"
               and isinstance((n.get("inputs") or {}).get("text"), str)]
        if len(enc) == 1:
            targets.append((enc[0], "text"))
    return targets


def literal_targets(wf: Mapping[str, dict], names: tuple[str, ...]) -> list[tuple[str, str]]:
    """Literal numeric inputs ``names`` of the sampling nodes."""
    out = []
    for nid in sampling_nodes(wf):
        for k in names:
            v = (wf[nid].get("inputs") or {}).get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out.append((nid, k))
    return out


def strip_meta(wf: Mapping[str, dict]) -> dict:
    return {k: {kk: vv for kk, vv in v.items() if kk != "_meta"} for k, v in wf.items()}


class PromptMapper:
    """A workflow plus the rule that writes a row's values into it."""

    def __init__(self, workflow: Mapping[str, dict], sets: list[str] = (), consts: list[str] = (),
                 auto: bool = True):
        wf = copy.deepcopy(dict(workflow))
        self.consts: list[tuple[str, str, Any]] = []
        for c in consts:
            node, inp, val = parse_assignment(c, "--const")
            if node not in wf:
                raise WorkflowError(f"--const {c!r}: no node {node!r} in the workflow "
                                    f"(nodes: {', '.join(sorted(wf, key=_nk))})")
            wf[node].setdefault("inputs", {})[inp] = _literal(val)
            self.consts.append((node, inp, _literal(val)))
        self.workflow = wf
        explicit: list[Binding] = []
        for s in sets:
            node, inp, fld = parse_assignment(s, "--set")
            if node not in wf:
                raise WorkflowError(f"--set {s!r}: no node {node!r} in the workflow "
                                    f"(nodes: {', '.join(sorted(wf, key=_nk))})")
            if is_link((wf[node].get("inputs") or {}).get(inp)):
                raise WorkflowError(f"--set {s!r}: input {inp!r} of node {node} "
                                    f"({wf[node]['class_type']}) is a link, not a value")
            explicit.append(Binding(node, inp, normalise_field(fld), False))
        self.bindings: list[Binding] = list(explicit)
        set_fields = {b.field for b in explicit}
        if auto:
            if "prompt" not in set_fields:
                t = positive_prompt_targets(wf)
                if not t:
                    raise WorkflowError(
                        "cannot tell which node holds the positive prompt (no sampler 'positive' input "
                        "leads to a node with a text input); map it explicitly, e.g. --set 6.text=prompt")
                self.bindings += [Binding(n, k, "prompt", True) for n, k in t]
            if "seed" not in set_fields:
                self.bindings += [Binding(n, k, "seed", True) for n, k in literal_targets(wf, SEED_INPUTS)]
            if "guidance" not in set_fields:
                self.bindings += [Binding(n, k, "guidance", True) for n, k in literal_targets(wf, CFG_INPUTS)]
        self.hash = sha({"workflow": strip_meta(wf),
                         "bindings": sorted([b.node, b.input, b.field] for b in self.bindings)}, 16)

    # -- queries
    def fields(self) -> set[str]:
        return {b.field for b in self.bindings}

    def default_seed(self) -> int | None:
        for b in self.bindings:
            if b.field == "seed":
                v = self.workflow[b.node]["inputs"].get(b.input)
                if isinstance(v, int) and not isinstance(v, bool):
                    return v
        return None

    def has_safety_check(self) -> bool:
        return any(n.get("class_type") == SAFETY_NODE for n in self.workflow.values())

    def describe(self) -> list[str]:
        out = []
        for b in self.bindings:
            ct = self.workflow[b.node].get("class_type", "?")
            out.append(f"{b.node}.{b.input} ({ct}) <- {b.field}{'' if not b.auto else '  [default rule]'}")
        out += [f"{n}.{k} = {json.dumps(v)}  [--const]" for n, k, v in self.consts]
        return out

    # -- building
    def values_for(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """{"node.input": value} that ``graph_for(values)`` writes (converted to each input's
        type; ``None`` values keep the workflow's and are left out)."""
        applied: dict[str, Any] = {}
        for b in self.bindings:
            if b.field not in values:
                raise WorkflowError(f"--set {b.node}.{b.input}={b.field}: the prompt file has no field "
                                    f"{b.field!r}")
            v = values[b.field]
            if v is None:
                continue
            inputs = self.workflow[b.node].get("inputs") or {}
            applied[f"{b.node}.{b.input}"] = convert(v, inputs.get(b.input, v),
                                                     f"node {b.node} input {b.input!r}")
        return applied

    def graph_for(self, values: Mapping[str, Any],
                  overrides: Mapping[str, Any] | None = None) -> tuple[dict, dict[str, Any]]:
        """A copy of the workflow with ``values`` (field -> value; None = keep the workflow's)
        written into the bound inputs, then ``overrides`` ({"node.input": value}, e.g. a value
        clamped by the pre-flight check); also returns {"node.input": value} of what was set."""
        g = copy.deepcopy(self.workflow)
        applied = self.values_for(values)
        applied.update(overrides or {})
        for key, v in applied.items():
            node, _, inp = key.partition(".")
            g[node].setdefault("inputs", {})[inp] = v
        return g, applied

    def literal_inputs(self) -> dict[str, Any]:
        """{"node.input": value} of every literal (not linked) input of the workflow (with the
        --const values) that no binding overwrites: the same in every row."""
        bound = {f"{b.node}.{b.input}" for b in self.bindings}
        out = {}
        for nid in sorted(self.workflow, key=_nk):
            for k, v in (self.workflow[nid].get("inputs") or {}).items():
                if not is_link(v) and f"{nid}.{k}" not in bound:
                    out[f"{nid}.{k}"] = v
        return out


def _nk(k: str):
    return (0, int(k), "") if str(k).isdigit() else (1, 0, str(k))
