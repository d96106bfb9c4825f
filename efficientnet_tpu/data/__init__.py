"""Input data: sources, validation, preprocessing, batching.

Modules, each importing only those listed before it (no import cycle):

* `stream`: the resumable training stream (epoch orders, element seeds).
* `augment`, then `preprocessing`: per-image crop, resize, flip and
  augmentation on the host; `preprocessing.normalize` runs on device.
* `mixing`: mixup and CutMix of a replica's normalized batch, on device
  in the train step (stateless draws; soft labels for
  `losses.soft_cross_entropy`).
* `checks`: payload / label / pixel validation and skipping of bad records.
* `dataset_info`: `dataset_info.json`, a TFRecord data set's description
  of itself (counts per split and file, classes, label base).
* `eval_shards`: which eval files each pipeline reads when eval is sharded
  by file.
* `contract`: what every source returns, the typed inputs `TrainInput`
  (with the skip counts) and `EvalInput` (with its eval steps) around an
  `InputFn`; the element spec; `num_eval_steps` and the masked eval padding
  `batch_eval_examples`.
* `tfrecord`: TFRecord files: listing, record counts (dataset_info.json or
  cached), reading.
* `tfds`: the tensorflow-datasets source.
* `synthetic`: the synthetic source and its input function.
* `pipeline`: the entry points `make_input` (dispatch on the source),
  `build_input` (the real-data pipeline: source, record map, batching) and
  `check_data_files`.

Nothing is re-exported here: import the module you need, e.g.
`from efficientnet_tpu.data import pipeline`.
"""
