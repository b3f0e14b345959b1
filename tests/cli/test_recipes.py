"""``sgdph recipes list|copy`` and ``sgdph train NAME`` (in process; one real process for the exit code)."""

from __future__ import annotations

from sgdph_tools.errors import UserError
from tests.cli.helpers import invoke, user_error


def test_list_copy_and_train_by_name(tmp_path):
    listed = invoke("recipes", "list")
    assert listed.exit_code == 0, listed.output
    assert "quickstart" in listed.output and "cifar100_vgg19_nobn_sgdph_wn" in listed.output
    assert "Table 4" in listed.output
    copied = invoke("recipes", "copy", "quickstart", "mine.yaml", cwd=tmp_path)
    assert copied.exit_code == 0 and (tmp_path / "mine.yaml").is_file()
    dry = invoke("train", "quickstart", "trainer.epochs=1", "--dry-run", cwd=tmp_path)
    assert dry.exit_code == 0, dry.output
    assert "quickstart.yaml resolved with 1 override(s); valid" in dry.output and "epochs: 1" in dry.output


def test_unknown_names_are_one_line_errors(tmp_path):
    assert "did you mean the packaged recipe 'quickstart'" in user_error("train", "quikstart", cwd=tmp_path)
    assert invoke("recipes", "copy", "quickstart", cwd=tmp_path).exit_code == 0
    again = invoke("recipes", "copy", "quickstart", cwd=tmp_path)
    assert isinstance(again.exception, UserError) and "--force" in str(again.exception)
