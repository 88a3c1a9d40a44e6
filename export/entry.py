"""Console entry points of the export stage (pyproject.toml's [project.scripts])."""

from satseg.cli.entry import engine_command

export = engine_command("sat-export", "satseg_export.build_repo")
import_sat = engine_command("sat-import", "satseg_export.import_sat")
