"""Runs flagfiles for 2 steps each on a tiny model, one after another in this process.

    horovodrun -np 1 -H localhost:1 --gloo python tests/flagfile_worker.py RESULTS.json OUT_DIR F...

Started by tests/test_flagfiles.py under horovodrun, because most setups use Horovod's fp16
compression. Writes {flagfile name: {"status": "ok" | "config_error", ...}} to RESULTS.json.

Several workers may share OUT_DIR and the list of flagfiles: each takes the next flagfile no
worker has taken yet (so they finish together). A flagfile whose config (at the tiny size, the
output directory aside) is one that a worker already trains is the same run: it is not trained
again, and its outcome says {"status": "ok", "same_as": that flagfile, "config": ...}.
"""

import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from tfbert.training.xla import request_cpu_autoclustering  # noqa: E402

request_cpu_autoclustering()  # before TensorFlow is imported, for the --xla=auto setups

import tensorflow as tf  # noqa: E402
from absl import flags  # noqa: E402

from tfbert import run  # noqa: E402
from tfbert.config import ConfigError  # noqa: E402
from tfbert.distributed import create_group  # noqa: E402

# The size override for a CPU: every setup keeps its switches, on the tiny model with one layer
# (tracing the step is most of a setup's time, and it grows with the layers).
TINY = ["--model=tiny", "--num_hidden_layers=1", "--max_seq_length=32",
        "--max_predictions_per_seq=5", "--train_batch_size=4", "--num_train_steps=2",
        "--log_every_n_steps=1"]


def claim(output_root, kind, key, owner) -> str | None:
    """Takes `key` for `owner` if no worker has; returns the owner that has it, or None."""
    folder = os.path.join(output_root, kind)
    os.makedirs(folder, exist_ok=True)
    note = os.path.join(folder, f".{key}.{os.getpid()}")
    with open(note, "w") as f:
        f.write(owner)
    try:
        os.link(note, os.path.join(folder, key))  # atomic, and the name comes with its owner
    except FileExistsError:
        with open(os.path.join(folder, key)) as f:
            return f.read()
    finally:
        os.remove(note)
    return None


def main(results_path, output_root, flagfiles):
    results = {}
    for path in flagfiles:
        name = os.path.basename(path)
        if claim(output_root, "flagfiles", name, name) is not None:
            continue  # another worker runs it
        flag_values = flags.FlagValues()
        run.define_flags(flag_values)
        flag_values(run.expand_flagfiles(
            ["tfbert.run", f"--flagfile={path}", *TINY,
             f"--output_dir={os.path.join(output_root, name)}"]))
        group = create_group(flag_values.hvd_fp16_compression, flag_values.sparse_as_dense)
        try:
            config, tokenizer = run.build_config(flag_values, group)
        except ConfigError as e:
            results[name] = dict(status="config_error", message=str(e))
            continue
        settings = config.to_dict()
        del settings["runtime"]["output_dir"]
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
        same_as = claim(output_root, "configs", key, name)
        if same_as is not None:
            results[name] = dict(status="ok", same_as=same_as, config=config.to_dict())
            continue
        run.train(config, tokenizer, group)
        with open(os.path.join(config.runtime.output_dir, "summary.json")) as f:
            results[name] = dict(status="ok", config=config.to_dict(), summary=json.load(f))
        tf.keras.backend.clear_session()
    with open(results_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
