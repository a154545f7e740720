"""Container entry points: ``python -m jobs.<stage> [options]`` runs one stage.

Each entry is the matching ``trackb`` command, so a Job's args read like the CLI, and
exits with that command's code (see ``trackb_core.errors`` for the reserved ones).
"""
