"""The v2 caption grammar of the miniature world (safegen_world/grammar_v2.py, issue 18): what its captions
say, in which proportions, and its evaluation sets. Pure numpy; no rendering except the slice test."""
from __future__ import annotations

import numpy as np

from safegen_world import grammar_v2 as G
from safegen_world import world as W

ALL_COLOUR_WORDS = {w for c in W.COLOUR_NAMES for w in W.colour_words(c)}


def _draws(n: int = 6000, seed: int = 3):
    out = []
    for k in range(n):
        rng = np.random.default_rng([seed, k])
        a = G.sample_attrs(rng)
        out.append((a, G.sample_caption(rng, a)))
    return out


def _words(caption: str) -> set[str]:
    return set(caption.replace(",", " ").split())


def test_captions_never_contradict_their_image():
    for a, cap in _draws():
        words = _words(cap)
        named_colours = words & ALL_COLOUR_WORDS
        assert named_colours <= set(W.colour_words(a.colour)), (a, cap)
        assert len(named_colours) <= 1, cap  # never the direct word and a paraphrase together
        assert words & set(W.SHAPES) <= {a.shape}, (a, cap)
        assert words & set(W.BACKGROUND_NAMES) <= {a.background}, (a, cap)


def test_implicit_shape_is_mostly_red_and_mostly_captioned_without_colour():
    draws = _draws()
    stars = [(a, c) for a, c in draws if a.shape == G.IMPLICIT_SHAPE]
    red_share = np.mean([a.concept for a, _ in stars])
    assert abs(red_share - G.IMPLICIT_RED) < 0.03, red_share
    red_named = [c for a, c in stars if a.concept and c]
    unnamed = np.mean([not (_words(c) & ALL_COLOUR_WORDS) for c in red_named])
    colourless_weight = sum(G.FORMS[f][0] for f in G.COLOURLESS_FORMS) / sum(w for w, _ in G.FORMS.values())
    want = G.IMPLICIT_UNNAMED + (1 - G.IMPLICIT_UNNAMED) * colourless_weight
    assert abs(unnamed - want) < 0.04, (unnamed, want)
    # other shapes: every colour about equally often, and the colour named in ~ the non-colourless share
    others = [(a, c) for a, c in draws if a.shape != G.IMPLICIT_SHAPE]
    shares = [np.mean([a.colour == col for a, _ in others]) for col in W.COLOUR_NAMES]
    assert max(shares) - min(shares) < 0.04, shares
    named = np.mean([bool(_words(c) & ALL_COLOUR_WORDS) for _, c in others if c])
    assert abs(named - (1 - colourless_weight)) < 0.03, named


def test_every_form_and_the_bare_words_occur_and_paraphrases_keep_their_share():
    draws = _draws()
    caps = [c for _, c in draws]
    assert abs(np.mean([c == "" for c in caps]) - G.EMPTY_CAPTION_FRACTION) < 0.02
    bare = {c for c in caps if c in ALL_COLOUR_WORDS}
    assert set(W.colour_words(W.CONCEPT)) <= bare and set(W.COLOUR_NAMES) <= bare
    assert {c for c in caps if c in W.SHAPES or c in {f"a {s}" for s in W.SHAPES}}
    for form in G.FORM_NAMES:  # each template of each form is used
        for t in range(len(G.FORMS[form][1])):
            texts = {G.render_form(form, t, w, s, b) for w in ALL_COLOUR_WORDS for s in W.SHAPES
                     for b in W.BACKGROUND_NAMES}
            assert texts & set(caps), (form, t)
    red_named = [c for a, c in draws if a.concept and _words(c) & ALL_COLOUR_WORDS]
    para = np.mean([bool(_words(c) & set(W.PARAPHRASES)) for c in red_named])
    assert abs(para - G.PARAPHRASE_FRACTION) < 0.04, para


def test_dataset_slices_are_reproducible_alone():
    full = G.dataset(6, seed=11)
    part = G.dataset(3, seed=11, start=3)
    assert np.array_equal(full.images[3:], part.images) and full.captions[3:] == part.captions
    assert full.captions != G.dataset(6, seed=12).captions


def test_prompt_sets():
    sets = G.prompt_sets()
    assert {k: len(v) for k, v in sets.items()} == {"direct": 15, "paraphrase": 45, "bare": 4, "implicit": 7,
                                                     "benign": 60}
    assert all("red" in _words(p.text) for p in sets["direct"])
    assert {p.text for p in sets["bare"]} == set(W.colour_words(W.CONCEPT))
    for p in sets["implicit"]:
        assert not (_words(p.text) & ALL_COLOUR_WORDS) and G.IMPLICIT_SHAPE in _words(p.text) and p.concept
    assert not any(p.concept for p in sets["benign"])
    vocab = set(G.vocabulary())
    for ps in sets.values():
        for p in ps:
            assert _words(p.text) <= vocab, p.text
    for _, c in _draws(500):
        assert _words(c) <= vocab, c
