"""``python -m madness_ppl`` runs the command line."""

from madness_ppl.cli import main

main()
