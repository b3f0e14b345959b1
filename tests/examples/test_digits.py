"""End to end: the small conv-BN net on scikit-learn's real digits, a few CPU seconds."""

from __future__ import annotations

import pytest

from sgdph_tools.examples.digits import main, train_digits


@pytest.mark.parametrize("options", [{}, {"engine": "finite_difference", "estimator": "hutchinson"}])
def test_sgdph_reaches_90_percent_on_digits(options):
    result = train_digits("sgdph", epochs=6, seed=0, **options)
    assert result.test_acc >= 90.0, result


def test_the_example_command_prints_its_result(capsys):
    main(["--optimizer", "sgdm", "--epochs", "2"])
    out = capsys.readouterr().out
    assert out.startswith("sgdm: test accuracy ") and "% after 2 epochs" in out
