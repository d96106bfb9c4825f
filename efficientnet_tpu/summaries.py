"""TensorBoard summaries: which metric goes under which tag.

The train writer writes model_dir/train, the eval writer model_dir/eval
(`distribute.writer_roles`). Tags name what they measure, so that the
training loss with label smoothing and L2 is not taken for the plain cross
entropy the eval loss is. The metric dicts keep their keys ('loss' etc.,
as logged and returned); only these tags are written.
"""

from __future__ import annotations

from typing import Dict

import numpy as np
import tensorflow as tf

# Trainer.train_loop metric -> tag.
TRAIN_TAGS = {
    'loss': 'train/total_loss',
    'cross_entropy': 'train/cross_entropy',
    'top_1_accuracy': 'train/top_1_accuracy',
    'learning_rate': 'train/learning_rate',
    'images_per_second': 'train/images_per_second',
    'images_per_second_per_replica': 'train/images_per_second_per_replica',
    'skipped_records': 'train/skipped_records',
}

# Evaluator.evaluate metric -> tag.
EVAL_TAGS = {
    'loss': 'eval/cross_entropy',
    'top_1_accuracy': 'eval/top_1_accuracy',
    'top_5_accuracy': 'eval/top_5_accuracy',
}

INPUT_IMAGES_TAG = 'train/input_images'


def write_scalars(writer, metrics: Dict[str, float], step: int,
                  tags: Dict[str, str]) -> None:
  """Writes `metrics[k]` under `tags[k]` at `step` and flushes.

  Metrics without a tag are not written (they are in the log and the
  history); a tag without its metric (skipped_records without
  skip_corrupt) is left out.
  """
  with writer.as_default(step=step):
    for name, tag in tags.items():
      if name in metrics:
        tf.summary.scalar(tag, metrics[name])
  writer.flush()


def image_grid(images: np.ndarray, columns: int) -> np.ndarray:
  """Tiles images [N, H, W, C] row by row into one [rows*H, columns*W, C].

  Cells after the N-th image of the last row are black.

  Raises:
    ValueError: images is not a non-empty 4-D batch, or columns < 1.
  """
  images = np.asarray(images)
  if images.ndim != 4 or not len(images):
    raise ValueError(f'images: expected a non-empty [N, H, W, C] batch, got '
                     f'shape {images.shape}')
  if columns < 1:
    raise ValueError(f'columns: expected an integer >= 1, got {columns}')
  n, h, w, c = images.shape
  columns = min(columns, n)
  rows = -(-n // columns)
  padded = np.zeros((rows * columns, h, w, c), images.dtype)
  padded[:n] = images
  return (padded.reshape(rows, columns, h, w, c).transpose(0, 2, 1, 3, 4)
          .reshape(rows * h, columns * w, c))


def write_image_grid(writer, images: np.ndarray, step: int,
                     columns: int = 4, tag: str = INPUT_IMAGES_TAG) -> None:
  """Writes `images` (uint8 RGB, [N, H, W, 3]) as one grid image; flushes.

  The input pipeline's batches are uint8 RGB before normalization
  (`data.contract`), so they show as they are: nothing to denormalize.
  """
  grid = image_grid(images, columns)
  with writer.as_default(step=step):
    tf.summary.image(tag, grid[np.newaxis], max_outputs=1)
  writer.flush()


# Characters that markdown (Python-Markdown with the tables extension, as
# TensorBoard's text plugin renders it) takes for emphasis, links, code or
# tables: escaped with a backslash. `<` and `&` (HTML) become entities.
_MARKDOWN_SPECIAL = frozenset('\\`*_{}[]()>#+-.!|')
_HTML_ENTITIES = {'<': '&lt;', '&': '&amp;'}


def escape_markdown(text: str) -> str:
  """`text` as markdown that renders as exactly these characters."""
  return ''.join('\\' + c if c in _MARKDOWN_SPECIAL else
                 _HTML_ENTITIES.get(c, c) for c in text)


def startup_markdown(summary: str) -> str:
  """The start-up block (`Key: value` lines) as a markdown list.

  TensorBoard renders text summaries as markdown, where single newlines
  join lines into one paragraph and a path's underscores turn into
  emphasis: each line becomes a list item with its key in bold, the rest
  escaped.
  """
  items = []
  for line in summary.splitlines():
    key, sep, value = line.partition(': ')
    if sep and key and ' ' not in key.strip():
      items.append(f'- **{escape_markdown(key)}**: '
                   f'{escape_markdown(value)}')
    else:
      items.append(f'- {escape_markdown(line)}')
  return '\n'.join(items)
