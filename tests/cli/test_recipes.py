"""``sgdph recipes list|copy`` and ``sgdph train NAME`` through the real entry point."""

from __future__ import annotations

from tests.cli.helpers import sgdph


def test_list_copy_and_train_by_name(tmp_path):
    listed = sgdph("recipes", "list", env={"COLUMNS": "200"})
    assert listed.returncode == 0, listed.stderr
    assert (
        "quickstart" in listed.stdout and "cifar100_vgg19_nobn_sgdph_wn" in listed.stdout and "Table 4" in listed.stdout
    )
    copied = sgdph("recipes", "copy", "quickstart", "mine.yaml", cwd=tmp_path)
    assert copied.returncode == 0 and (tmp_path / "mine.yaml").is_file()
    dry = sgdph("train", "quickstart", "trainer.epochs=1", "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "quickstart.yaml resolved with 1 override(s); valid" in dry.stdout and "epochs: 1" in dry.stdout


def test_unknown_names_are_one_line_errors(tmp_path):
    result = sgdph("train", "quikstart", cwd=tmp_path)
    assert result.returncode == 2 and "did you mean the packaged recipe 'quickstart'" in result.stderr
    assert "Traceback" not in result.stderr
    result = sgdph("recipes", "copy", "quickstart", cwd=tmp_path)
    assert result.returncode == 0
    result = sgdph("recipes", "copy", "quickstart", cwd=tmp_path)
    assert result.returncode == 2 and "--force" in result.stderr
