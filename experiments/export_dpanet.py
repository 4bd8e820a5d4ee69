"""Write a weights-only copy of a trained DPANet checkpoint, for shipping.

  python experiments/export_dpanet.py --checkpoint=dpanet_runs/w8 --output_dir=OUT

The copy (`dpjax.dpanet.train.export_weights`) keeps the parameters alone, rounded to
bfloat16, in ~12% of a training checkpoint's size; `run_solver.py --method=dpanet`
and `dpanet.load_model` read it like any checkpoint, training cannot resume from it.
--checkpoint is a ckpt_<step>.npz (or .json) or a training folder (its latest).
"""

from __future__ import annotations

import sys

from absl import app, flags

from dpjax.dpanet import inference, train

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "A training checkpoint (.npz/.json) or folder.",
                    required=True)
flags.DEFINE_string("output_dir", None, "Folder for the copy (not the checkpoint's own).",
                    required=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        src = inference.resolve_checkpoint(FLAGS.checkpoint)
        out = train.export_weights(src, FLAGS.output_dir)
    except (inference.CheckpointError, ValueError, OSError) as e:
        print(f"export_dpanet: error: {e}", file=sys.stderr)
        return 2
    print(f"export_dpanet: {src} ({src.stat().st_size:,} bytes) -> {out} "
          f"({out.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
