import pytest
from typer.testing import CliRunner

from madness_ppl.cli import app

runner = CliRunner()


def _commands() -> list[str]:
    import typer.main

    group = typer.main.get_command(app)
    return sorted(group.commands)


def test_help_everywhere():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "simulate" in result.output
    for name in _commands():
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0, name
        assert "Usage" in result.output


def test_simulate_blends_with_plot(tmp_path):
    out = tmp_path / "blends"
    args = [
        "simulate",
        "blends",
        "--out",
        str(out),
        "--n",
        "2",
        "--field-size",
        "61",
        "--n-galaxies",
        "2:4",
        "--bands",
        "g,r,i",
        "--plot",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "preview.png").stat().st_size > 1000
    again = runner.invoke(app, args)
    assert again.exit_code == 2
    assert "already exists" in again.output and "--overwrite" in again.output
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--bands", "g,w"], "unknown band 'w'"),
        (["--field-size", "-3"], "field_size must be a positive integer"),
        (["--stamp-size", "-45"], "stamp_size must be a positive odd integer"),
        (["--n-galaxies", "a:b"], "--n-galaxies must look like"),
        (["--density", "-2"], "density must be"),
        (
            ["--n-galaxies", "300:300", "--min-separation", "3", "--field-size", "41"],
            "density too high",
        ),
    ],
)
def test_bad_input_messages(tmp_path, extra, message):
    result = runner.invoke(
        app, ["simulate", "blends", "--out", str(tmp_path / "x"), "--n", "1", *extra]
    )
    assert result.exit_code == 2
    assert message in result.output


def test_impossible_layout_writes_nothing(tmp_path):
    out = tmp_path / "x"
    args = [
        "simulate",
        "blends",
        "--out",
        str(out),
        "--n",
        "1",
        "--n-galaxies",
        "300",
        "--min-separation",
        "3",
        "--field-size",
        "41",
    ]
    assert runner.invoke(app, args).exit_code == 2
    assert not out.exists()
