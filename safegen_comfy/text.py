"""Text encoding with in-memory embedding vectors, equal to stock ``embedding:NAME``.

The vectors are handed to ComfyUI's own tokenizer as an ordinary embedding file (see
:func:`compat.embedding_file_in_reach`), so chunking, padding and ``(embedding:x:1.3)`` weights
are ComfyUI's. For training, a prompt is tokenized once with placeholder rows; each step the
trainable vectors are spliced into those token lists at the placeholder positions — token
lists holding tensors are what ``CLIP.encode_from_tokens`` takes — so gradients reach them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import folder_paths

from . import compat

MARKER = "{}"
REF = "safegen_vectors"  # stands for the in-memory vectors in a prompt: embedding:safegen_vectors


def encoders(clip) -> dict[str, object]:
    return compat.encoder_tokenizers(clip)


def embedding_widths(clip) -> dict[str, int]:
    return {k: compat.embedding_width(t) for k, t in encoders(clip).items()}


def prompt_with_embedding(text: str, strength: float = 1.0, ref: str = REF) -> str:
    """``text`` with ``embedding:<ref>`` where ``{}`` is (prepended when there is none)."""
    emb = f"embedding:{ref}" if strength == 1.0 else f"(embedding:{ref}:{strength:g})"
    text = text or MARKER
    if MARKER not in text:
        text = MARKER + ", " + text if text.strip() else MARKER
    return text.replace(MARKER, f" {emb} ").strip()


def _placeholders(vectors: dict[str, torch.Tensor], seed: int = 0x5AFE) -> dict[str, torch.Tensor]:
    """Rows no real embedding has (random, fixed seed), one per vector, to find them in token lists."""
    g = torch.Generator().manual_seed(seed)
    return {e: torch.randn(v.shape[-2] if v.ndim > 1 else 1, v.shape[-1], generator=g) * 1e3
            for e, v in vectors.items()}


@dataclass
class SplicedTokens:
    """Token lists of one prompt with the positions of each embedding row: {enc: [(chunk, pos, row)]}."""
    tokens: dict
    slots: dict

    def with_vectors(self, vectors: dict[str, torch.Tensor]) -> dict:
        out = {e: [list(c) for c in chunks] for e, chunks in self.tokens.items()}
        for e, slots in self.slots.items():
            v = vectors[e].reshape(-1, vectors[e].shape[-1])
            for ci, pi, row in slots:
                tok = out[e][ci][pi]
                out[e][ci][pi] = (v[row],) + tuple(tok[1:])
        return out


def tokenize_with_vectors(clip, text: str, vectors: dict[str, torch.Tensor]) -> SplicedTokens:
    """Tokenize ``text`` with ``vectors`` ({'l': [n, 768], 'g': [n, 1280]}) where it says
    ``embedding:safegen_vectors`` (see :func:`prompt_with_embedding`)."""
    toks = encoders(clip)
    missing = [e for e in toks if e not in vectors]
    if missing:
        raise ValueError(f"embedding has no vectors for clip_{missing[0]}")
    ph = _placeholders({e: vectors[e] for e in toks})
    file_tensors = {compat.embedding_key(t): ph[e] for e, t in toks.items()}
    with compat.embedding_file_in_reach(clip, file_tensors, folder_paths.get_folder_paths("embeddings")) as name:
        tokens = clip.tokenize(text.replace(f"embedding:{REF}", f"embedding:{name}"))
    slots = {}
    for e in toks:
        rows = ph[e]
        found = []
        for ci, chunk in enumerate(tokens[e]):
            for pi, tok in enumerate(chunk):
                t = tok[0]
                if isinstance(t, torch.Tensor) and t.shape == rows.shape[-1:]:
                    hit = (rows == t.to(rows.dtype)).all(dim=-1).nonzero()
                    if len(hit):
                        found.append((ci, pi, int(hit[0])))
        if f"embedding:{REF}" in text and not found:
            raise ValueError(f"the embedding vectors did not reach the clip_{e} tokenizer "
                             f"(width {rows.shape[-1]} expected by it)")
        slots[e] = found
    return SplicedTokens(tokens, slots)


def tokens_with_vectors(clip, text: str, vectors: dict[str, torch.Tensor]) -> dict:
    return tokenize_with_vectors(clip, text, vectors).with_vectors(vectors)


def encode(clip, text: str, vectors: dict[str, torch.Tensor] | None = None):
    """[[cond, {"pooled_output": …}]] like CLIPTextEncode; ``embedding:safegen_vectors`` in ``text``
    (see :func:`prompt_with_embedding`) is ``vectors``."""
    tokens = clip.tokenize(text) if vectors is None else tokens_with_vectors(clip, text, vectors)
    return clip.encode_from_tokens_scheduled(tokens)


def encode_tokens(clip, tokens: dict):
    """(cond, pooled) of token lists (autograd flows from spliced tensors)."""
    return clip.encode_from_tokens(tokens, return_pooled=True)


def token_ids(clip, enc: str, text: str) -> list[int]:
    """Ids of the real tokens of ``text`` for encoder ``enc`` (no start/end/pad)."""
    tok = encoders(clip)[enc]
    special = set(compat.special_tokens(tok))
    return [int(t[0]) for chunk in compat.tokenize_chunks(tok, text)[:1] for t in chunk
            if isinstance(t[0], int) and t[0] not in special]
