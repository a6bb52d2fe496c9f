"""Bad input reaches the user as a named error with a fix in the message, never a deep traceback."""

from __future__ import annotations

import pytest
import torch

import mossvl_lab as ml
from mossvl_lab.visibility import ModelInputError, PlaceholderMismatchError


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ml.build_model(ml.config.preset("video-preview-tiny")).eval()


def test_pixel_tensor_of_the_wrong_rank(model):
    ids = torch.tensor([[1, model.config.tokens.image_token_id, 5]])
    with pytest.raises(ModelInputError, match=r"\[batch, frame, tile, channel, height, width\]"):
        model(ids, pixel_values=torch.randn(1, 3, 56, 56))


def test_more_placeholders_than_images(model):
    image = model.config.tokens.image_token_id
    ids = torch.tensor([[1, image, 5, image, 6]])
    with pytest.raises(PlaceholderMismatchError, match="more placeholders than frames"):
        model(ids, pixel_values=torch.randn(1, 1, 1, 3, 56, 56))


def test_placeholders_without_any_pixels(model):
    ids = torch.tensor([[1, model.config.tokens.image_token_id, 5]])
    with pytest.raises(PlaceholderMismatchError, match="no pixel_values"):
        model(ids)


def test_fewer_placeholders_than_images(model):
    ids = torch.tensor([[1, model.config.tokens.image_token_id, 5]])
    with pytest.raises(PlaceholderMismatchError, match="fewer placeholders"):
        model(ids, pixel_values=torch.randn(1, 2, 1, 3, 56, 56))


def test_token_ids_outside_the_vocabulary(model):
    with pytest.raises(ModelInputError, match="outside the embedding table"):
        model(torch.tensor([[1, 10_000]]))


def test_attention_mask_of_the_wrong_length(model):
    with pytest.raises(ModelInputError, match="attention_mask"):
        model(torch.tensor([[1, 5, 6]]), attention_mask=torch.ones(1, 7))


def test_errors_leave_the_cache_usable(model):
    """A rejected step must not poison the caches a session keeps using."""
    state = ml.StreamState()
    with torch.no_grad():
        model(torch.tensor([[1, 5, 6]]), state=state)
        length = state.text.length
        with pytest.raises(PlaceholderMismatchError):
            model(torch.tensor([[model.config.tokens.image_token_id]]), state=state)
        assert state.text.length == length
        model(torch.tensor([[7]]), state=state)
    assert state.text.length == length + 1
