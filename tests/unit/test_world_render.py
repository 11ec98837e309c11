"""The miniature world's renderer and caption grammar (safegen_world/world.py): deterministic, consistent.

No ComfyUI, no torch: numpy + Pillow only.
"""

from __future__ import annotations

import hashlib

import numpy as np

from safegen_world import world as W


def test_dataset_is_deterministic_and_sliceable():
    a = W.dataset(24, seed=7)
    b = W.dataset(24, seed=7)
    assert np.array_equal(a.images, b.images) and a.captions == b.captions
    assert np.array_equal(a.colour, b.colour) and np.array_equal(a.shape, b.shape)
    part = W.dataset(5, seed=7, start=10)  # image i depends only on (seed, i)
    assert np.array_equal(part.images, a.images[10:15]) and part.captions == a.captions[10:15]
    other = W.dataset(24, seed=8)
    assert not np.array_equal(other.images, a.images)
    assert a.images.shape == (24, W.IMAGE_SIZE, W.IMAGE_SIZE, 3) and a.images.dtype == np.uint8


def test_renderer_output_is_pinned_for_this_world_version():
    # The shipped assets were trained on these pixels: a change here (code or Pillow) must bump
    # WORLD_VERSION and rebuild (python -m safegen_world.build).
    d = W.dataset(16, seed=0)
    digest = hashlib.sha256(d.images.tobytes() + "\n".join(d.captions).encode()).hexdigest()
    assert W.WORLD_VERSION == "w1"
    assert digest == EXPECTED_W1_DIGEST, digest


EXPECTED_W1_DIGEST = "5cb84fd0026874bf893c0a8c098b008526f3032b434af86fcd536572710d578b"


def test_render_draws_the_requested_colour_and_background():
    for colour in W.COLOUR_NAMES:
        for bg in W.BACKGROUND_NAMES:
            img = W.render(W.Attrs(colour=colour, shape="circle", background=bg, size=0.7)).astype(int)
            c = W.IMAGE_SIZE // 2
            assert np.abs(img[c, c] - np.array(W.COLOURS[colour])).max() <= 2
            assert np.abs(img[1, 1] - np.array(W.BACKGROUNDS[bg])).max() <= 2


def test_every_shape_renders_distinct_masks():
    masks = {}
    for s in W.SHAPES:
        img = W.render(W.Attrs(colour="blue", shape=s, background="white", size=0.7))
        masks[s] = img.astype(int).sum(-1) < 600
    names = list(masks)
    for i, a in enumerate(names):
        assert 0.1 < masks[a].mean() < 0.6, a
        for b in names[i + 1 :]:
            assert (masks[a] != masks[b]).mean() > 0.03, (a, b)


def test_captions_use_one_colour_word_and_paraphrases_only_for_the_concept():
    d = W.dataset(1500, seed=3)
    caps = set(W.all_captions())
    seen_words = set()
    for cap, colour in zip(d.captions, d.colour):
        assert cap in caps
        if not cap:
            continue
        tokens = cap.replace(",", " ").split()
        words = [w for w in (*W.DIRECT_WORDS, *W.PARAPHRASES, *W.COLOUR_NAMES) if w in tokens]
        assert len(set(words)) == 1, cap  # never the direct word and a paraphrase together
        name = W.COLOUR_NAMES[colour]
        assert words[0] in W.colour_words(name)
        seen_words.add(words[0])
    assert set(W.PARAPHRASES) <= seen_words and set(W.DIRECT_WORDS) <= seen_words
    red = d.colour == W.CONCEPT_INDEX
    para = np.array([any(p in c for p in W.PARAPHRASES) for c in d.captions])
    nonempty = np.array([bool(c) for c in d.captions])
    frac = para[red & nonempty].mean()
    assert abs(frac - W.PARAPHRASE_FRACTION) < 0.08, frac
    assert abs((~nonempty).mean() - W.EMPTY_CAPTION_FRACTION) < 0.03
    assert abs(red.mean() - 1 / len(W.COLOUR_NAMES)) < 0.04


def test_prompt_sets_cover_the_world_and_use_training_captions():
    sets = W.prompt_sets()
    caps = set(W.all_captions())
    assert len(sets["direct"]) == 15 and len(sets["paraphrase"]) == 15 * len(W.PARAPHRASES)
    assert len(sets["benign"]) == 15 * (len(W.COLOUR_NAMES) - 1)
    for kind, prompts in sets.items():
        for p in prompts:
            assert p.kind == kind and p.text in caps  # every evaluation prompt was a training caption
            assert p.concept == (kind != "benign")
    assert {p.word for p in sets["paraphrase"]} == set(W.PARAPHRASES)
    assert all(W.CONCEPT not in p.text.split() for p in sets["paraphrase"] + sets["benign"])
