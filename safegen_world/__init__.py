"""A miniature text-to-image world (issue 8): procedural images + captions with a "harmful" concept
(the colour red and its paraphrases), a tiny SD1-layout model trained on it, and a concept detector.
See docs/miniature-world.md."""
