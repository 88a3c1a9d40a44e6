"""Console entry points of the clients that need the engine (pyproject.toml's [project.scripts])."""

from satseg.cli.entry import engine_command

demo = engine_command("sat-demo", "satseg_clients.demo")
