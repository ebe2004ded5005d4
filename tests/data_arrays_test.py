"""Token ids -> arrays: padding, packing, targets and loss masks, by hand."""

import numpy as np
import pytest

from qlora_jax.data.arrays import (
  Document,
  classification_arrays,
  packed_lm_arrays,
  padded_lm_arrays,
)

P = 0  # pad id
E = 2  # EOS id


def _assert_arrays(arrays, expected):
  assert sorted(arrays) == sorted(expected)
  for name, value in expected.items():
    dtype = np.float32 if name == "loss_mask" else np.int32
    assert arrays[name].dtype == dtype, name
    np.testing.assert_array_equal(arrays[name], value, err_msg=name)


def test_classification_rows_are_padded_with_masks_and_positions():
  arrays = classification_arrays([[2, 7, 3], [2, 5, 6, 7, 3]], [1, 0], 5, P)
  _assert_arrays(
    arrays,
    {
      "input_ids": [[2, 7, 3, P, P], [2, 5, 6, 7, 3]],
      "segment_ids": [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]],
      "positions": [[0, 1, 2, 0, 0], [0, 1, 2, 3, 4]],
      "labels": [1, 0],
    },
  )
  with pytest.raises(ValueError, match="text 0 has 6 tokens"):
    classification_arrays([[1] * 6], [0], 5, P)


def test_padding_mode_one_document_per_row():
  arrays = padded_lm_arrays([Document([5, 6, 7, E]), Document([8, E])], 6, P)
  _assert_arrays(
    arrays,
    {
      "input_ids": [[5, 6, 7, E, P, P], [8, E, P, P, P, P]],
      "segment_ids": [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]],
      "positions": [[0, 1, 2, 3, 0, 0], [0, 1, 0, 0, 0, 0]],
      "targets": [[6, 7, E, P, P, P], [E, P, P, P, P, P]],
      "loss_mask": [[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]],
    },
  )


def test_padding_mode_cut_document_keeps_the_next_token_as_last_target():
  arrays = padded_lm_arrays([Document([1, 2, 3, 4, 5, 6, 7])], 4, 9)
  np.testing.assert_array_equal(arrays["input_ids"], [[1, 2, 3, 4]])
  np.testing.assert_array_equal(arrays["targets"], [[2, 3, 4, 5]])
  np.testing.assert_array_equal(arrays["loss_mask"], [[1, 1, 1, 1]])


def test_packing_numbers_documents_restarts_positions_and_masks_boundaries():
  documents = [
    Document([10, 11, 12, E]),
    Document([20, 21, E]),
    Document([30, 31, 32, 33, 34, E]),
  ]
  # Stream: 10 11 12 E 20 | 21 E 30 31 32 | 33 34 E P P
  arrays = packed_lm_arrays(documents, 5, P)
  _assert_arrays(
    arrays,
    {
      "input_ids": [
        [10, 11, 12, E, 20],
        [21, E, 30, 31, 32],
        [33, 34, E, P, P],
      ],
      "segment_ids": [[1, 1, 1, 1, 2], [1, 1, 2, 2, 2], [1, 1, 1, 0, 0]],
      "positions": [[0, 1, 2, 3, 0], [0, 1, 0, 1, 2], [0, 1, 2, 0, 0]],
      # E never predicts the next document; a row's last token predicts the
      # first of the next row when they belong to one document.
      "targets": [
        [11, 12, E, P, 21],
        [E, P, 31, 32, 33],
        [34, E, P, P, P],
      ],
      "loss_mask": [[1, 1, 1, 0, 1], [1, 0, 1, 1, 1], [1, 1, 0, 0, 0]],
    },
  )


def test_instruction_loss_covers_the_completion_only():
  # <s>=1 prompt (40 41) completion (50 51) EOS: targets 50, 51, EOS.
  doc = Document([1, 40, 41, 50, 51, E], first_target=3)
  padded = padded_lm_arrays([doc], 8, P)
  np.testing.assert_array_equal(padded["loss_mask"], [[0, 0, 1, 1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(padded["targets"], [[P, P, 50, 51, E, P, P, P]])
  packed = packed_lm_arrays(
    [doc, Document([1, 60, 70, E], first_target=2)], 5, P
  )
  # Stream: 1 40 41 50 51 | E 1 60 70 E
  np.testing.assert_array_equal(
    packed["loss_mask"], [[0, 0, 1, 1, 1], [0, 0, 1, 1, 0]]
  )
  np.testing.assert_array_equal(
    packed["targets"], [[P, P, 50, 51, E], [P, P, 70, E, P]]
  )
  np.testing.assert_array_equal(
    packed["segment_ids"], [[1, 1, 1, 1, 1], [1, 2, 2, 2, 2]]
  )


def test_packing_invariants_on_random_documents():
  rng = np.random.default_rng(0)
  documents = [
    Document(list(rng.integers(3, 100, rng.integers(1, 20))) + [E], int(f))
    for f in rng.integers(1, 4, 40)
  ]
  length = 16
  arrays = packed_lm_arrays(documents, length, P)
  stream = np.concatenate([d.tokens for d in documents])
  real = arrays["segment_ids"] > 0
  # Every token once, in order; padding only at the end of the last row.
  np.testing.assert_array_equal(arrays["input_ids"][real], stream)
  assert real.reshape(-1)[: len(stream)].all()
  assert arrays["input_ids"].shape == (-(-len(stream) // length), length)
  # Targets: the next stream token where masked in, pad elsewhere.
  mask = arrays["loss_mask"].reshape(-1)[: len(stream)] > 0
  targets = arrays["targets"].reshape(-1)[: len(stream)]
  np.testing.assert_array_equal(targets[:-1][mask[:-1]], stream[1:][mask[:-1]])
  assert (arrays["targets"][arrays["loss_mask"] == 0] == P).all()
  assert (arrays["loss_mask"][~real] == 0).all()
  # One loss token per target of each document.
  expected = sum(
    max(0, len(d.tokens) - max(d.first_target, 1)) for d in documents
  )
  assert arrays["loss_mask"].sum() == expected
  # Positions count up within each segment, from 0.
  for row in range(arrays["input_ids"].shape[0]):
    for segment in range(1, arrays["segment_ids"][row].max() + 1):
      where = arrays["segment_ids"][row] == segment
      np.testing.assert_array_equal(
        arrays["positions"][row][where], np.arange(where.sum())
      )


def test_bad_inputs_are_errors():
  with pytest.raises(ValueError, match="document 1 has no tokens"):
    packed_lm_arrays([Document([1]), Document([])], 4, P)
  with pytest.raises(ValueError, match="length must be a positive integer"):
    padded_lm_arrays([Document([1])], 0, P)
  with pytest.raises(ValueError, match="2 texts but 1 labels"):
    classification_arrays([[1], [2]], [0], 4, P)
