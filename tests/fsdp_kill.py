"""torchrun script of tests/test_fsdp.py: `mmalign train ARGS` whose process 1 dies (os._exit)
while saving the sharded checkpoint of step STEP, after its model shards are written and before
its optimizer shards are: `torchrun ... tests/fsdp_kill.py STEP train CONFIG ...`."""

import os
import sys

from mmalign.cli import main
from mmalign.train import sharded_checkpoint

STEP = int(sys.argv[1])
_write = sharded_checkpoint._write


def _write_then_die(state, folder):
    _write(state, folder)
    dying = folder.name == sharded_checkpoint.MODEL_DIR and folder.parent.name == f".step_{STEP:08d}.tmp"
    if dying and os.environ["RANK"] == "1":
        os._exit(3)


sharded_checkpoint._write = _write_then_die
sys.exit(main(sys.argv[2:]))
