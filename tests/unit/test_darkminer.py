"""Dark Miner's verify score, circumvent loss and round driver (no ComfyUI).

The verify score is checked against an oracle denoiser whose conditioning says how much of the
concept pattern P it "knows": ε̂ = (x − m·P)/σ for a condition with value m. On x = P + σε
the denoising loss is (1−m)²‖P‖²/σ², so the concept gain L(∅) − L(c) is known in closed form.
"""
import pytest
import torch

from safegen_core import darkminer as DM
from safegen_core import esd as ESD

SIGMAS = torch.linspace(0.5, 5.0, 100)
P = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))


def cond(m):
    return (torch.full((1, 3, 8), float(m)), None)


def oracle(x, sigma, c, erased):
    m = c[0][:, 0, 0].view(-1, 1, 1, 1)
    return (x - m * P) / sigma.view(-1, 1, 1, 1)


def test_anchor_prompts():
    assert DM.parse_anchor_prompts("# c\n a  cat \n\na cat\na dog") == ["a cat", "a dog"]
    d = DM.default_anchor_prompts()
    assert len(d) >= 5 and all(p and not p.startswith("#") for p in d)


def test_split_latents():
    a, b = DM.split_latents(torch.zeros(8, 4, 2, 2))
    assert a.shape[0] == 6 and b.shape[0] == 2
    a, b = DM.split_latents(torch.zeros(2, 4, 2, 2))
    assert a.shape[0] == 1 and b.shape[0] == 1
    with pytest.raises(ValueError, match="at least 2"):
        DM.split_latents(torch.zeros(1, 4, 2, 2))


def test_verify_score_matches_closed_form():
    lat = P.repeat(3, 1, 1, 1)
    L = DM.denoising_losses(oracle, lat, SIGMAS, [cond(0), cond(1), cond(0.5)], draws=6, batch=2, seed=3)
    assert L[1] == pytest.approx(0.0, abs=1e-10)
    assert L[2] == pytest.approx(0.25 * L[0], rel=1e-5)   # (1 − 0.5)² of the null loss
    v = DM.verify(oracle, lat, SIGMAS, cond(1), cond(0), [cond(0), cond(0.2)], draws=6, batch=2, seed=3)
    assert v.induces and v.score == pytest.approx(L[0], rel=1e-6)
    assert v.threshold == pytest.approx(L[0] * (1 - 0.8 ** 2), rel=1e-5)   # best benign anchor (m = 0.2)
    assert v.relative == pytest.approx(0.8 ** 2, rel=1e-5)
    # an embedding no better than a benign prompt does not induce the concept
    assert not DM.verify(oracle, lat, SIGMAS, cond(0.2), cond(0), [cond(0.2)], draws=6, batch=2,
                         seed=3).induces
    # the margin is relative to L(∅)
    assert not DM.verify(oracle, lat, SIGMAS, cond(0.5), cond(0), [], draws=6, batch=2, seed=3,
                         margin=0.8).induces
    # many anchors are scored in groups: same numbers
    many = DM.denoising_losses(oracle, lat, SIGMAS, [cond(i / 10) for i in range(11)], draws=2, batch=4,
                               seed=1)
    few = DM.denoising_losses(oracle, lat, SIGMAS, [cond(0.3)], draws=2, batch=4, seed=1)
    assert many[3] == pytest.approx(few[0], rel=1e-6)


def test_circumvent_loss_is_esd_plus_anchor_term():
    delta = 0.25

    def eps(x, sigma, c, erased):   # frozen: ε = cond value; erased: cond value + delta
        v = c[0][:, 0, 0].view(-1, 1, 1, 1).expand_as(x)
        return v + delta if erased else v.clone()

    sig = ESD.ddim_sigmas(SIGMAS, 4)
    fn = DM.make_circumvent_loss_fn(eps, [cond(2.0)], [cond(-1.0)], cond(0.5), sig, [1, 4, 2, 2], eta=1.5,
                                    anchor_weight=3.0, start_guidance=3.0)
    loss = fn(1, torch.Generator().manual_seed(0))
    target = 0.5 - 1.5 * (2.0 - 0.5)
    assert fn.last[0] == pytest.approx((2.0 + delta - target) ** 2)
    assert fn.last[1] == pytest.approx(delta ** 2)
    assert float(loss) == pytest.approx(fn.last[0] + 3.0 * fn.last[1])
    no_anchor = DM.make_circumvent_loss_fn(eps, [cond(2.0)], [], cond(0.5), sig, [1, 4, 2, 2], eta=1.5)
    assert float(no_anchor(1, torch.Generator().manual_seed(0))) == pytest.approx((2.0 + delta - target) ** 2)
    with pytest.raises(ValueError, match="xt_sampler"):
        DM.make_circumvent_loss_fn(eps, [cond(1)], [], cond(0), sig, [1, 4, 2, 2], xt_sampler="nope")


def _verdict(ok, score=1.0):
    return DM.Verdict(score, 0.0, 2.0, score / 2.0 if ok else -0.1, ok, [0.0])


def test_rounds_stop_when_mining_fails_and_resume_continues():
    calls = []
    induces = {1: True, 2: True, 3: False}

    def mine(r):
        return DM.Mined({"l": torch.full((1, 8), float(r))}, 0.1 * r)

    def verify_fn(m):
        r = int(m.vectors["l"][0, 0])
        after = any(c[0] == r for c in calls)   # verified again after its round's fine-tuning
        return _verdict(induces[r] and not after, 0.1 if after else 1.0)

    def circumvent(r, pool):
        calls.append((r, len(pool)))
        return [1.0, 0.5]

    saved = []
    recs, pool, reason = DM.run_rounds(5, mine, verify_fn, circumvent,
                                       on_round_done=lambda rs, p: saved.append((len(rs), len(p))))
    assert calls == [(1, 1), (2, 2)] and reason == "mining failed in round 3"
    assert [r.round for r in recs] == [1, 2, 3] and recs[2].mining_failed and recs[2].after is None
    assert recs[0].before.score == 1.0 and recs[0].after.score == 0.1
    assert saved == [(1, 1), (2, 2), (3, 2)]
    # JSON round trip of a record (round states store them)
    assert DM.RoundRecord.from_json(recs[0].to_json()) == recs[0]
    # resume after round 1: continues at round 2 with the saved pool
    calls.clear()
    calls.append((1, 1))
    recs2, pool2, reason2 = DM.run_rounds(2, mine, verify_fn, circumvent, pool=pool[:1], records=recs[:1],
                                          start_round=2)
    assert calls == [(1, 1), (2, 2)] and reason2 == "rounds done" and len(recs2) == 2 and len(pool2) == 2
    # a finished-by-failure state stays finished
    assert DM.run_rounds(9, mine, verify_fn, circumvent, pool=pool, records=recs, start_round=4)[2] == reason
    assert "round 3" in DM.summary(recs)
