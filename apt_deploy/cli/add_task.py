"""``apt-deploy add-task``: add APT tasks to a multi-task artifact by rewriting only its prompt bank + manifest."""

from __future__ import annotations

import argparse

NAME = "add-task"
HELP = ("add tasks (NAME=PROMPT_DIR) to a multi-task artifact: appends bank rows, keeps model.onnx and any "
        "engine built from it")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", metavar="ARTIFACT_DIR", help="a multi-task artifact (export --prompts NAME=DIR ...)")
    parser.add_argument("tasks", nargs="+", metavar="NAME=PROMPT_DIR", help="the new tasks' APT checkpoints")
    parser.add_argument("--model", default=None, metavar="MODEL_DIR",
                        help="base model directory (default: the one the artifact was exported from)")


def run(args: argparse.Namespace) -> int:
    from apt_deploy.cli.export import task_pairs
    from apt_deploy.errors import ConfigError

    pairs = task_pairs(args.tasks)
    if pairs is None:
        raise ConfigError(f"add-task {' '.join(args.tasks)}", "NAME=PROMPT_DIR pairs", "name each task, e.g. colors=runs/colors")
    from apt_deploy.serving.tasks import add_tasks

    names = add_tasks(args.artifact, pairs, args.model)
    print(f"{args.artifact}: {len(names)} tasks ({', '.join(names)})")
    return 0
