"""Train a step-aware preference scorer for SPO (`spo.scorer: step_aware=OUT`).

Fine-tunes a CLIP preference model (e.g. PickScore_v1) with a timestep module on the x̂0
predictions of a frozen SD / SDXL model at random t (mmalign/scoring/train_step_aware.py has
the recipe and the equations). From the repository root:

    .venv/bin/python pipelines/train_step_aware_scorer.py \
        --pairs /data/pickapic_v2/data/train-*.parquet --diffusion /models/sdxl-base \
        --clip /models/PickScore_v1 --processor /models/CLIP-ViT-H-14 --out runs/spm_sdxl \
        --steps 4000 --batch-size 16 --lr 3e-6 --t-max 750 --save-every 500

Add --resume to continue a killed run from OUT/checkpoint. Ends with one summary line: train and
held-out pairwise accuracy at random t, before -> after.
"""

from __future__ import annotations

import sys

from mmalign.scoring.train_step_aware import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
