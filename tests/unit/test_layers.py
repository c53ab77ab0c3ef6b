"""The layers of setup.cfg's import-linter contracts (run by CI's ``lint-imports``) cover every
module of the domain: a module added to ``notifier/`` is a face named here, or it is checked."""

from __future__ import annotations

import configparser
import json
import os
import subprocess
import sys

from tests.conftest import REPO

# The faces (and the package itself): they may import the domain, Celery and each other.
FACES = {"notifier", "notifier.api", "notifier.ui", "notifier.cli", "notifier.client",
         "notifier.migrations"}
# The broker survey: the domain does not import it; it has a contract of its own (kombu only).
SURVEY = "notifier.consumers"


def contracts() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    return parser


def listed(contract: str) -> set[str]:
    return set(contracts()[f"importlinter:contract:{contract}"]["source_modules"].split())


def modules() -> set[str]:
    package = REPO / "notifier"
    found = {f"notifier.{path.stem}" for path in package.glob("*.py") if path.stem != "__init__"}
    found |= {f"notifier.{path.name}" for path in package.iterdir()
              if (path / "__init__.py").exists()}
    return found


def test_every_module_of_the_domain_is_held_by_the_contracts() -> None:
    domain = modules() - FACES - {SURVEY}
    assert domain and FACES - {"notifier"} <= modules()
    assert domain <= listed("domain"), sorted(domain - listed("domain"))
    assert domain <= listed("celery"), sorted(domain - listed("celery"))
    assert SURVEY in listed("domain") and listed("survey") == {SURVEY}
    # Nothing listed that is not there (a module renamed and left behind in the list).
    assert listed("domain") <= modules() and listed("celery") <= modules()


def test_the_domain_loaded_whole_loads_neither_celery_nor_kombu() -> None:
    domain = sorted(modules() - FACES - {SURVEY})
    code = (f"import importlib, json, sys\nfor name in {domain!r}: importlib.import_module(name)\n"
            "print(json.dumps(sorted(sys.modules)))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    loaded = {name.partition(".")[0] for name in json.loads(done.stdout.splitlines()[-1])}
    assert loaded.isdisjoint({"celery", "celery_batches", "billiard", "kombu"}), sorted(
        loaded & {"celery", "celery_batches", "billiard", "kombu"})
