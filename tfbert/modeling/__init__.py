"""The BERT model: building blocks (`layers/`), the encoder (`networks/`), what gets trained
(`models/`) and the losses."""
