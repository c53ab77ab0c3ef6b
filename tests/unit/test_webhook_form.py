"""The admin form's side of saving a webhook, as pure logic: a blank stored header goes as its
mask (which ``notifier.webhooks`` reads as "keep"), and an error is shown beside the field its
path names."""

from __future__ import annotations

import pytest

from notifier.errors import InvalidInput
from notifier.ui import forms


def test_a_blank_value_of_a_stored_header_is_sent_as_its_mask() -> None:
    form = forms.read_form([("name", "h"), ("headerKey", "Authorization"), ("headerValue", ""),
                            ("headerKey", "X-New"), ("headerValue", "typed")],
                           masks={"Authorization": "****5678"})

    assert forms.body_of(form)["webHookHeaders"] == {"Authorization": "****5678",
                                                     "X-New": "typed"}


@pytest.mark.parametrize(("error", "shown"), [
    (InvalidInput("slaInSeconds", "must be at most 9"), {"slaInSeconds": "must be at most 9"}),
    (InvalidInput(("webHookHeaders", "X.Key"), "must be a string"),
     {"webHookHeaders": "X.Key: must be a string"}),
    (InvalidInput(("customerIdentifiersToBeEnriched", 2), "unknown source"),
     {"customerIdentifiersToBeEnriched": "[2]: unknown source"}),
])
def test_an_error_is_shown_beside_the_field_its_path_starts_with(
        error: InvalidInput, shown: dict[str, str]) -> None:
    assert forms.errors_of(error) == shown


def test_an_error_path_is_data_and_its_field_the_joined_path() -> None:
    error = InvalidInput(("events", 2, "data"), "bad")

    assert (error.path, error.field, str(error)) == (("events", 2, "data"), "events[2].data",
                                                     "events[2].data: bad")
