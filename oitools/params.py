"""Compose conf/ into params.yaml (what DVC runs the stages with) and validate it: `make params`.

python -m oitools.params [-o FILE] [OVERRIDE ...]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from oipipe.core.config import PROJECT_ROOT, write_params
from oipipe.core.errors import ConfigError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m oitools.params",
        description="Compose conf/ into params.yaml (what DVC runs the stages with) and validate "
        "it. The file is written only when the composition is valid. `make params` "
        "runs this after conf/ was edited; tests fail while the two differ.",
        epilog="Overrides use Hydra's grammar, as `dvc exp run -S` does: train.epochs=5, "
        "model=resnet18, data=animals7, 'data.classes=[Cat,Dog]', "
        "'++tracking.tags.note=x' (a new key). Exit codes: 0 written, 2 invalid.",
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=PROJECT_ROOT / "params.yaml",
        help="where to write (default: the project's params.yaml)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="OVERRIDE",
        help="Hydra overrides applied to conf/ before writing",
    )
    args = parser.parse_args(argv)
    try:
        write_params(args.output, args.overrides)
    except ConfigError as e:
        print(f"oitools.params: {args.output} not written: {e}", file=sys.stderr)
        return 2
    print(f"oitools.params: wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
