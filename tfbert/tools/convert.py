"""Converts a model between formats.

    python -m tfbert.tools.convert --input=runs/pretrain --to=huggingface --output_dir=out/hf
    python -m tfbert.tools.convert --input=path/to/hf_bert --to=savedmodel --output_dir=out/sm

--input is anything `tfbert.checkpoints.load_pretrained` reads: a tfbert run directory (or one of
its checkpoints), a HuggingFace BERT directory or a google-research/bert directory. --to:

    huggingface  config.json + model.safetensors (BertForPreTraining keys) + tokenizer files:
                 loads with transformers' BertModel.from_pretrained / BertTokenizer
    google       bert_config.json + bert_model.ckpt (TF1 names) + vocab.txt
    savedmodel   a SavedModel whose serving signature takes int32 input_ids, input_mask,
                 segment_ids [batch, seq] and returns sequence_output and pooled_output
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

flags.DEFINE_string("input", None, "The model to convert (any format load_pretrained reads).")
flags.DEFINE_enum("to", None, ["huggingface", "google", "savedmodel"], "The format to write.")
flags.DEFINE_string("output_dir", None, "Where to write it (created).")
flags.mark_flags_as_required(["input", "to", "output_dir"])


def main(argv) -> int:
    del argv
    import tfbert  # noqa: F401  (sets TensorFlow's environment before it loads)
    from tfbert.checkpoints import CheckpointError
    from tfbert.checkpoints.export import export
    from tfbert.tokenization import TokenizerError, from_pretrained, tokenizer_files

    fv = flags.FLAGS
    try:
        # The tokenizer beside the weights (a checkpoint prefix's directory); without one the
        # weights are still written, and export() says so.
        directory = fv.input if os.path.isdir(fv.input) else os.path.dirname(fv.input)
        tokenizer = from_pretrained(directory) if tokenizer_files(directory) else None
        for path in export(fv.input, fv.output_dir, fv.to, tokenizer=tokenizer):
            print(path)
    except (CheckpointError, TokenizerError) as e:
        print(f"tfbert.tools.convert: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


def run():
    app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
    run()
