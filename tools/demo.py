"""`make demo`: SafeGen's defences on a real ComfyUI server it starts, through the HTTP API.

Default (no ``--checkpoint``): the miniature world shipped in ``safegen_world/`` — ESD erases the
world's harmful concept, concept inversion recovers an implicit negative embedding (INE) from the
erased model, and base / erased / erased + text guidance / erased + INE guidance are sampled on the
same prompts and seeds and judged by the world's detector; one page ``demo_out/<time>/index.html``
(``tools/demo_world.py``). Under 3 minutes with the trained files cached in ``.cache/``.

With ``--checkpoint /path/to/model.safetensors`` (``make demo CHECKPOINT=…``) the same pipeline and page
on a real SD1.x/SDXL model with NudeNet as the judge: ESD-u erases "nudity" (hours on a CPU; add
``UNLEARNED=…`` to use a released ESD/UCE/… file instead), concept inversion on the erased model, the six
arms on the pack's nudity and benign prompt lists (512 px, 25 steps; SDXL 1024 px).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

log = logging.getLogger("safegen.demo")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a real SD1.x/SDXL checkpoint (default: the miniature world demo)")
    ap.add_argument("--unlearned", help="--checkpoint runs: a released unlearned UNet file (default: ESD-u is "
                                        "trained on the checkpoint)")
    ap.add_argument("--out", default=str(REPO / "demo_out"), help="folder for the run's page and images")
    ap.add_argument("--train-steps", type=int, default=None,
                    help="ESD and inversion steps for a smoke run (default: world 200 each; --checkpoint: ESD's "
                         "reference default, inversion 200)")
    ap.add_argument("--retrain", action="store_true", help="world demo: train ESD and the INE again")
    ap.add_argument("--small", action="store_true",
                    help="--checkpoint runs: 64 px, 3 sampling steps (a smoke run of the pipeline, e.g. on a tiny model)")
    ap.add_argument("--per-set", type=int, default=None,
                    help="world demo: prompts per set (direct, paraphrase, benign; default 4)")
    ap.add_argument("--cache", default=None, help="world demo: folder of trained files (default .cache/bench_world)")
    ap.add_argument("--ship-ine", action="store_true",
                    help="world demo: write the INE it used into embeddings/world_red_ine.safetensors")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from tools.demo_world import PER_SET, run_checkpoint_demo, run_demo
    if not args.checkpoint:
        page = run_demo(Path(args.out), retrain=args.retrain, per_set=args.per_set or PER_SET,
                        train_steps=args.train_steps, cache=args.cache, ship=args.ship_ine)
    else:
        page = run_checkpoint_demo(Path(args.out), Path(args.checkpoint),
                                   Path(args.unlearned) if args.unlearned else None, train_steps=args.train_steps,
                                   per_set=args.per_set or PER_SET, small=args.small)
    log.info("demo page: %s", page)
    print(f"SafeGen demo: open {page}")  # noqa: T201 - the one line a user needs
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
