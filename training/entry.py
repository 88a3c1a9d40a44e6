"""Console entry points of the training stage (pyproject.toml's [project.scripts])."""

from satseg.cli.entry import engine_command

mni152 = engine_command("sat-mni152", "satseg_training.data.mni152")
standardise = engine_command("sat-standardise", "satseg_training.data.standardise")
pretrain_text = engine_command("sat-pretrain-text", "satseg_training.pretrain_text")
train = engine_command("sat-train", "satseg_training.train")
evaluate = engine_command("sat-evaluate", "satseg_training.evaluate")
