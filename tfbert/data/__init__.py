"""Pretraining data: raw text -> TFRecords (`create_pretraining_data`), TFRecords -> batches
(`pretraining_dataset`), and the sample corpus shipped with tfbert (`sample`)."""
