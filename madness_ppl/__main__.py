"""``python -m madness_ppl`` runs the command line."""

from madness_ppl.cli import app

app(prog_name="madness-ppl")
