"""Trains a tokenizer on raw text.

    python -m tfbert.train_tokenizer --tokenizer_type=sentencepiece \
        --input_files='corpus/*.txt' --vocab_size=32000 --output_dir=vocab/
        # -> vocab/spm.model (+ vocab/spm.vocab, a readable list of the pieces)
    python -m tfbert.train_tokenizer --tokenizer_type=wordpiece --do_lower_case \
        --input_files='corpus/*.txt' --vocab_size=30522 --output_dir=vocab/
        # -> vocab/vocab.txt

The special tokens [PAD] [UNK] [CLS] [SEP] [MASK] get ids 0..4. The directory also gets a
tokenizer_config.json (the kind and, for WordPiece, the casing), so `--vocab_file=vocab/`
(tfbert.run, tfbert.data.create_pretraining_data) and HuggingFace's
`BertTokenizer.from_pretrained("vocab/")` tokenize as the vocabulary was made.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    fv = dict(flag_values=flag_values)
    flags.DEFINE_enum("tokenizer_type", "sentencepiece", ["sentencepiece", "wordpiece"],
                      "Kind of tokenizer to train.", **fv)
    flags.DEFINE_list("input_files", [], "Comma-separated globs of raw text files (one sentence "
                                         "per line).", **fv)
    flags.DEFINE_integer("vocab_size", 32000, "Vocabulary size, special tokens included.", **fv)
    flags.DEFINE_string("output_dir", "", "Directory for spm.model (+ .vocab) or vocab.txt.",
                        **fv)
    flags.DEFINE_boolean("do_lower_case", True, "WordPiece: lower-case and strip accents first "
                                                "(BERT 'uncased').", **fv)
    flags.DEFINE_alias("lower_case", "do_lower_case", **fv)  # its former name


def main(argv) -> int:
    from tfbert import tokenization
    from tfbert.data.pretraining_dataset import DataError, resolve_input_files

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    fv = flags.FLAGS
    try:
        if not fv.output_dir:
            raise tokenization.TokenizerError("--output_dir is required")
        if fv.vocab_size <= len(tokenization.SPECIAL_TOKENS):
            raise tokenization.TokenizerError(f"--vocab_size={fv.vocab_size} must be larger than "
                                              f"the {len(tokenization.SPECIAL_TOKENS)} special "
                                              f"tokens")
        if fv.tokenizer_type == "sentencepiece" and fv["do_lower_case"].present:
            raise tokenization.TokenizerError(
                "--do_lower_case is a wordpiece option; sentencepiece learns the text as it is")
        input_files = resolve_input_files(fv.input_files)
        output = os.path.join(fv.output_dir, tokenization.default_filename(fv.tokenizer_type))
        logging.info("Training a %s tokenizer of %d tokens on %d files", fv.tokenizer_type,
                     fv.vocab_size, len(input_files))
        if fv.tokenizer_type == "sentencepiece":
            output = tokenization.train_sentencepiece(input_files, output[:-len(".model")],
                                                      fv.vocab_size)
        else:
            output = tokenization.train_wordpiece(input_files, output, fv.vocab_size,
                                                  do_lower_case=fv.do_lower_case)
        wordpiece = fv.tokenizer_type == "wordpiece"
        tokenizer = tokenization.load_tokenizer(
            fv.tokenizer_type, output, do_lower_case=fv.do_lower_case if wordpiece else None)
        # Rewrites the tokenizer file as it is and adds tokenizer_config.json.
        tokenizer.save_pretrained(fv.output_dir)
    except (DataError, tokenization.TokenizerError) as e:
        print(f"train_tokenizer: error: {e}", file=sys.stderr, flush=True)
        return 2
    logging.info("Wrote %s: %d tokens, special ids %s", output, tokenizer.vocab_size,
                 tokenizer.special_ids)
    print(f"train_tokenizer: wrote {output} ({tokenizer.tokenizer_type}, "
          f"{tokenizer.vocab_size} tokens)", flush=True)
    return 0


def run() -> None:
    """Console-script entry point."""
    define_flags()
    app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
    run()
