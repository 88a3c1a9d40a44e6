"""Named tasks: versioned prompt sets (``tasks.json``), so scripted runs ask for the same structures every time."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from satseg.errors import SatInputError

TASKS_FILE = Path(__file__).with_name("tasks.json")


@dataclass(frozen=True)
class Task:
    """One named prompt set and the modality it is meant for."""

    name: str
    description: str
    modality: str
    prompts: tuple[str, ...]


def load_tasks(path: Path = TASKS_FILE) -> dict[str, Task]:
    """Every task of the task file, by name."""
    document = json.loads(path.read_text())
    return {
        name: Task(name, entry["description"], entry["modality"], tuple(entry["prompts"]))
        for name, entry in document["tasks"].items()
    }


def task(name: str) -> Task:
    """The task called ``name``; an unknown name is an error listing the known ones."""
    tasks = load_tasks()
    if name not in tasks:
        raise SatInputError(f"unknown task {name!r}; known tasks: {', '.join(sorted(tasks))}")
    return tasks[name]
