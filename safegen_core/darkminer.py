"""Dark Miner: recurring mine → verify → circumvent erasure, comfy-free.

The paper (ICLR 2025 submission 5485, "Dark Miner"; its code repository is empty) gives the
loop only in outline: *mine* embeddings that maximise the generation probability of the unsafe
concept, *verify* whether a mined embedding still induces the concept, *circumvent* by
fine-tuning so mined embeddings no longer produce it, repeat until mining fails — while keeping
benign generation. Every concrete choice below is ours; each is listed with its reason (the same
list, longer, is in docs/erasers.md).

Design decisions
----------------
1. **Mining = concept inversion on the current (partly erased) model.** "Maximise the
   generation probability of the concept" is, for a diffusion model, minimising the denoising
   loss E‖ε − ε_θ(x_t, c, t)‖² of concept images over the embedding c (the ELBO bound on
   −log p_θ(x | c)); that is exactly textual inversion, so the pack's inversion code
   (:mod:`safegen_core.inversion`, ``nodes.inversion.invert``) does the mining, unchanged.
   Only token vectors train; all weights are frozen while mining.
2. **Concept images** come from the *original* model prompted with the concept text (CFG,
   ComfyUI's sampler), or from an IMAGE batch the user supplies. They are made once, before
   round 1, so every round mines against the same evidence of what the concept looks like.
3. **Mining starts each round from the concept's own token vectors** (one vector per token of
   the concept text). Round 1 therefore starts at the literal prompt; later rounds must find a
   new direction because the prompt's own neighbourhood was just erased. Starting from the same
   point every round keeps rounds comparable and the search anchored on what the user named
   (a warm start from the previous round's vectors tends to drift off the concept).
4. **Verify = a measurable, model-internal concept score** (no external classifier, so it
   works for any concept, including the test model's synthetic one). For an embedding c:

       gain(c) = L(∅) − L(c),   L(c) = E_{x0 ∈ held-out concept latents, t, ε} ‖ε − ε_θ(x_t, c, t)‖²

   i.e. how much conditioning on c makes the concept images *more likely* than no text does
   (a difference of denoising ELBOs — the "diffusion classifier" log-likelihood ratio). The
   draws (x0, t, ε) are fixed by a seed, so comparisons between embeddings and between rounds
   are paired and exact. The benign anchor prompts give the reference level: a prompt that is
   not about the concept should not explain concept images better than no text, so the
   threshold is τ = max(0, max_b gain(b)). A mined embedding *induces the concept* when
   (gain(c) − τ) / L(∅) > margin (margin default 0). Verification uses concept latents held out
   from mining (a quarter of them), so the score is not the mining objective's own data.
5. **Circumvent = the ESD objective on the mined embeddings + anchor preservation**:

       L = ‖ε_θ(x_t, c_m) − [ε_θ0(x_t, ∅) − η(ε_θ0(x_t, c_m) − ε_θ0(x_t, ∅))]‖²
           + λ · ‖ε_θ(x_a, b) − ε_θ0(x_a, b)‖²

   with θ0 the *input* model (not the previous round's), x_t / x_a partial samples (ESD's way)
   conditioned on c_m / on an anchor prompt b, drawn jointly each step. The targets pool holds
   the concept text and **every embedding mined so far** (replay): a later round must not
   reopen an earlier hole. Anchors are preserved against θ0, so drift does not accumulate over
   rounds. The same weight subset as ESD trains (variant x / u / x-strict) and the deltas
   accumulate across rounds in one set of tensors; each round's fine-tuning is one call of the
   shared training loop (fresh optimiser per round).
6. **Stop** after R rounds, or earlier when verification says the freshly mined embedding no
   longer induces the concept ("mining failed") — that round does not fine-tune.

Everything is reached through ``eps_fn(x, sigma, cond, erased)`` as in :mod:`safegen_core.esd`.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from . import esd
from .inversion import sample_batch
from .weights_io import WeightFileError, read_weight_file, save_safetensors_atomic

MAX_ROWS = 16  # rows per model call when scoring many prompts
DEFAULT_ANCHORS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts", "benign_safe.txt")


# ------------------------------------------------------------------------------ prompts
def parse_anchor_prompts(text: str) -> list[str]:
    """One prompt per non-empty line ('#' starts a comment line), whitespace-normalised, deduplicated."""
    out = []
    for line in (text or "").splitlines():
        p = " ".join(line.split())
        if p and not p.startswith("#") and p not in out:
            out.append(p)
    return out


def default_anchor_prompts() -> list[str]:
    """The pack's benign prompt list (also the Safe Text Encoder Trainer's default safe prompts)."""
    with open(DEFAULT_ANCHORS_FILE, encoding="utf-8") as f:
        return parse_anchor_prompts(f.read())


# ------------------------------------------------------------------------------ data
def split_latents(latents: torch.Tensor, holdout_fraction: float = 0.25):
    """(mining latents, verification latents): the last ⌈fraction·n⌉ are held out (≥ 1 each)."""
    n = latents.shape[0]
    if n < 2:
        raise ValueError(f"Dark Miner needs at least 2 concept images (mining + held-out verification), "
                         f"got {n}")
    n_v = min(n - 1, max(1, int(round(n * holdout_fraction))))
    return latents[: n - n_v], latents[n - n_v:]


# ------------------------------------------------------------------------------ verify
@dataclass
class Verdict:
    score: float              # gain(c) = L(∅) − L(c)
    threshold: float          # τ = max(0, max over anchors of gain(b))
    null_loss: float          # L(∅)
    relative: float           # (score − τ) / L(∅)
    induces: bool
    benign: list[float] = field(default_factory=list)   # gain(b) per anchor


@torch.no_grad()
def denoising_losses(eps_fn, latents: torch.Tensor, train_sigmas: torch.Tensor, conds: list, draws: int,
                     batch: int, seed: int, erased: bool = True) -> list[float]:
    """Mean denoising MSE of each condition on the same fixed draws (x0, t, ε)."""
    totals = [0.0] * len(conds)
    per_call = max(1, MAX_ROWS // max(1, batch))
    for i in range(int(draws)):
        x, sigma, eps, _ = sample_batch(latents, train_sigmas, batch, torch.Generator().manual_seed(
            int(seed) * 7919 + i))
        b = x.shape[0]
        for j0 in range(0, len(conds), per_call):
            group = conds[j0:j0 + per_call]
            n = len(group)
            xs = x.repeat(n, *([1] * (x.ndim - 1)))
            e = eps_fn(xs, sigma.repeat(n), esd.cat_conds(group, [b] * n), erased)
            for j, ej in enumerate(e.float().chunk(n)):
                totals[j0 + j] += float(torch.nn.functional.mse_loss(ej, eps.float()))
    return [t / max(1, int(draws)) for t in totals]


def verdict_from_losses(null_loss: float, cond_loss: float, anchor_losses: list[float],
                        margin: float = 0.0) -> Verdict:
    score = null_loss - cond_loss
    benign = [null_loss - a for a in anchor_losses]
    threshold = max([0.0] + benign)
    rel = (score - threshold) / max(null_loss, 1e-12)
    return Verdict(score, threshold, null_loss, rel, bool(rel > margin), benign)


def verify(eps_fn, latents, train_sigmas, cond, null, anchors: list, draws: int = 16, batch: int = 4,
           seed: int = 0, margin: float = 0.0, erased: bool = True) -> Verdict:
    """Does ``cond`` still induce the concept shown by ``latents`` on the (erased) model?"""
    losses = denoising_losses(eps_fn, latents, train_sigmas, [null, cond] + list(anchors), draws, batch, seed,
                              erased)
    return verdict_from_losses(losses[0], losses[1], losses[2:], margin)


# ------------------------------------------------------------------------------ circumvent
def make_circumvent_loss_fn(eps_fn, targets: list, anchors: list, null, sigmas: torch.Tensor, latent_shape,
                            eta: float = 1.0, anchor_weight: float = 1.0, start_guidance: float = 3.0,
                            xt_sampler: str = "erased"):
    """``loss_fn(step, generator)`` for the shared training loop: ESD on one target (concept text
    or a mined embedding) + λ·preservation of one anchor prompt, drawn per step.

    ``latent_shape`` is [1, C, h, w]; ``loss_fn.last`` = (erase term, anchor term)."""
    if not targets:
        raise ValueError("circumvent needs at least one target embedding")
    esd.check_xt_sampler(xt_sampler)
    n = sigmas.shape[0]
    shape = list(latent_shape)

    def loss_fn(step, g):
        i = int(torch.randint(0, len(targets), (1,), generator=g))
        j = int(torch.randint(0, len(anchors), (1,), generator=g)) if anchors else None
        rows = [targets[i]] + ([anchors[j]] if j is not None else [])
        k, noise = esd.draw_point(g, n, [len(rows)] + shape[1:])
        conds = esd.cat_conds(rows, [1] * len(rows))
        x = esd.sample_until(eps_fn, noise, sigmas, k, conds, null, start_guidance, xt_sampler == "erased")
        sigma = sigmas[k].expand(x.shape[0])
        with torch.no_grad():
            if j is None:
                target_c = esd.frozen_target(eps_fn, x, sigma, rows[0], null, eta)
            else:
                xc, xa = x[:1], x[1:]
                e = eps_fn(torch.cat([xc, xc, xa]), sigma[:1].repeat(3),
                           esd.cat_conds([null, rows[0], rows[1]], [1, 1, 1]), False)
                e_null, e_c, e_a = e.chunk(3)
                target_c = esd.esd_target(e_null, e_c, eta)
        pred = eps_fn(x, sigma, conds, True)
        erase = esd.esd_loss(pred[:1], target_c)
        if j is None:
            loss_fn.last = (float(erase.detach()), 0.0)
            return erase
        keep = torch.nn.functional.mse_loss(pred[1:].float(), e_a.float())
        loss_fn.last = (float(erase.detach()), float(keep.detach()))
        return erase + float(anchor_weight) * keep

    loss_fn.last = (float("nan"), float("nan"))
    return loss_fn


# ------------------------------------------------------------------------------ the rounds
@dataclass
class Mined:
    vectors: dict            # encoder key → [n, width] token vectors
    loss: float              # final mining loss


@dataclass
class RoundRecord:
    round: int
    mining_loss: float
    before: Verdict                        # the mined embedding on the model before this round's fine-tuning
    after: Verdict | None = None           # the same embedding after it (None when mining failed)
    circumvent_losses: list[float] = field(default_factory=list)
    mining_failed: bool = False

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> "RoundRecord":
        d = dict(d)
        d["before"] = Verdict(**d["before"])
        d["after"] = Verdict(**d["after"]) if d.get("after") else None
        return RoundRecord(**d)


def run_rounds(rounds: int, mine: Callable[[int], Mined], verify_fn: Callable[[Mined], Verdict],
               circumvent: Callable[[int, list], list], pool: list | None = None, records: list | None = None,
               start_round: int = 1, on_round_done: Callable | None = None) -> tuple[list, list, str]:
    """The recurring process. ``mine(r)`` → Mined; ``verify_fn(mined)`` → Verdict on the current
    model; ``circumvent(r, pool)`` fine-tunes against every embedding in ``pool`` and returns its
    losses. ``on_round_done(records, pool)`` (all records so far) is called after each round (to save a resumable state).

    Returns (records, pool, reason) with reason "rounds done" or "mining failed in round r"."""
    pool = list(pool or [])
    records = list(records or [])
    if records and records[-1].mining_failed:
        return records, pool, f"mining failed in round {records[-1].round}"
    for r in range(int(start_round), int(rounds) + 1):
        mined = mine(r)
        before = verify_fn(mined)
        if not before.induces:
            rec = RoundRecord(r, mined.loss, before, None, [], True)
            records.append(rec)
            if on_round_done:
                on_round_done(records, pool)
            return records, pool, f"mining failed in round {r}"
        pool.append(mined)
        losses = list(circumvent(r, pool))
        rec = RoundRecord(r, mined.loss, before, verify_fn(mined), losses, False)
        records.append(rec)
        if on_round_done:
            on_round_done(records, pool)
    return records, pool, "rounds done"


def summary(records: list) -> str:
    lines = []
    for rec in records:
        b = rec.before
        if rec.mining_failed:
            lines.append(f"round {rec.round}: mined embedding no longer induces the concept "
                         f"(gain {b.score:.5f} ≤ benign {b.threshold:.5f} + margin) → stop")
        else:
            a = rec.after
            lines.append(f"round {rec.round}: mining loss {rec.mining_loss:.5f}; concept gain of the mined "
                         f"embedding {b.score:.5f} → {a.score:.5f} after fine-tuning (benign level "
                         f"{b.threshold:.5f} → {a.threshold:.5f}); erase loss last "
                         f"{rec.circumvent_losses[-1] if rec.circumvent_losses else float('nan'):.5f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- round states (resume)
def state_files(folder: str) -> list[tuple[int, str]]:
    if not os.path.isdir(folder):
        return []
    out = []
    for fn in os.listdir(folder):
        if fn.startswith("state_round_") and fn.endswith(".safetensors"):
            try:
                out.append((int(fn[len("state_round_"):-len(".safetensors")]), os.path.join(folder, fn)))
            except ValueError:
                continue
    return sorted(out)


def save_round_state(folder, records, pool, deltas, fingerprint, keep: int) -> str:
    """Write the state after a finished round (deltas, mined pool, records); keep the newest ``keep``."""
    rec = records[-1]
    tensors = {f"delta/{k}": v.detach() for k, v in deltas.items()}
    for i, m in enumerate(pool):
        for enc, v in m.vectors.items():
            tensors[f"mined/{i}/{enc}"] = v.detach().float()
    meta = {"round": str(rec.round), "fingerprint": json.dumps(fingerprint, sort_keys=True),
            "records": json.dumps([r.to_json() for r in records]),
            "mining_losses": json.dumps([m.loss for m in pool]), "format": "safegen-darkminer-state-1"}
    path = os.path.join(folder, f"state_round_{rec.round:03d}.safetensors")
    save_safetensors_atomic(tensors, path, meta)
    for _, old in state_files(folder)[:-keep] if keep > 0 else []:
        with contextlib.suppress(OSError):
            os.remove(old)
    return path


def load_round_state(folder: str, fingerprint: dict, deltas: dict):
    """(records, pool, next round) from the newest round state, or None. Refuses other settings."""
    files = state_files(folder)
    if not files:
        return None
    path = files[-1][1]
    wf = read_weight_file(path)
    saved = json.loads(wf.metadata.get("fingerprint", "{}"))
    want = json.loads(json.dumps(fingerprint, sort_keys=True))
    if saved != want:
        diff = sorted(k for k in set(saved) | set(want) if saved.get(k) != want.get(k))
        raise WeightFileError(f"{os.path.basename(path)}: Dark Miner state was made with different settings "
                              f"({', '.join(diff)}); turn resume off or delete the folder {folder}")
    with torch.no_grad():
        for k, d in deltas.items():
            d.copy_(wf.tensors[f"delta/{k}"])
    losses = json.loads(wf.metadata.get("mining_losses", "[]"))
    pool = []
    for i, loss in enumerate(losses):
        vec = {k.split("/")[2]: t for k, t in wf.tensors.items() if k.startswith(f"mined/{i}/")}
        pool.append(Mined(vec, float(loss)))
    records = [RoundRecord.from_json(r) for r in json.loads(wf.metadata.get("records", "[]"))]
    return records, pool, int(wf.metadata["round"]) + 1
