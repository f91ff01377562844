"""Gathers a ZeRO run's per-rank optimizer-state shards, and a tensor-parallel run's model
parts, into one ordinary checkpoint.

    python -m tfbert.tools.gather_checkpoint --run_dir=runs/zero --output_dir=runs/gathered

The result (`<output_dir>/ckpt-<step>` with whole weights and whole `<name>/adam_m` and
`/adam_v`, plus the run's config and tokenizer) resumes on any number of ranks, with or without
ZeRO or tensor parallelism (`--output_dir=<output_dir>`), and `--init_checkpoint` reads it. It
holds the whole model and optimizer state in host memory while it writes (12 bytes per
parameter).
"""

from __future__ import annotations

import sys

from absl import app, flags

flags.DEFINE_string("run_dir", None, "The ZeRO or tensor-parallel run's output directory.")
flags.DEFINE_string("output_dir", None, "A new directory for the gathered checkpoint.")
flags.DEFINE_integer("step", None, "The checkpoint's step (default: the newest).")
flags.mark_flags_as_required(["run_dir", "output_dir"])


def main(argv) -> int:
    del argv
    import tfbert  # noqa: F401  (sets TensorFlow's environment before it loads)
    from tfbert.checkpoints import CheckpointError
    from tfbert.checkpoints.sharded import gather

    fv = flags.FLAGS
    try:
        print(gather(fv.run_dir, fv.output_dir, fv.step))
    except CheckpointError as e:
        print(f"tfbert.tools.gather_checkpoint: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


def run():
    app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
    run()
