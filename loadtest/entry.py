"""Console entry points of the load tests (pyproject.toml's [project.scripts])."""

from satseg.cli.entry import engine_command

loadtest = engine_command("sat-loadtest", "satseg_loadtest.run")
loadtest_sweep = engine_command("sat-loadtest-sweep", "satseg_loadtest.sweep")
loadtest_dicom_node = engine_command("sat-loadtest-dicom-node", "satseg_loadtest.dicom_node")
