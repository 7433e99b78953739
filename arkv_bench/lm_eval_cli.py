"""`arkv-lm-eval` / `python -m arkv_bench.lm_eval_cli`: lm-eval's own command line with `--model arkv`.

lm-eval 0.4.13 resolves `--model` only against models imported into its registry, so this
wrapper imports arkv-bench's plugin first and then hands every argument to lm-eval unchanged:

    arkv-lm-eval --model arkv --model_args pretrained=smollm2-135m,quant_type=mix,cache_size=1024 \
        --tasks gsm8k --include_path my_tasks/

It runs inside arkv-bench's error boundary: `--model_args` of `--model arkv` are checked before
anything loads, and a bad argument or an unknown task is one line and exit code 2.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from typing import Any


def _evaluate() -> None:
    import arkv_bench.lm_eval_model  # noqa: F401  (registers the `arkv` model)
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    from arkv_bench.lm_eval_model import check_model_args
    from arkv_bench.options import UsageError

    setup_logging()
    parser = HarnessCLI()
    try:
        args = _parse(parser)
        if getattr(args, "model", None) == "arkv":
            check_model_args(dict(args.model_args or {}))
        parser.execute(args)
    except ValueError as e:  # lm-eval and the arkv model report bad arguments and unknown tasks as ValueError
        raise UsageError(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from e


def _parse(parser: Any) -> Any:
    """lm-eval's argument parsing, its usage error as one line (argparse prints the usage, then the error)."""
    from arkv_bench.options import UsageError

    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            return parser.parse_args()
    except SystemExit as e:
        if e.code in (0, None):
            sys.stderr.write(printed.getvalue())
            raise
        lines = [line for line in printed.getvalue().splitlines() if line.strip()]
        raise UsageError((lines[-1] if lines else "bad arguments") + " (see arkv-lm-eval --help)") from None


def main(argv: list[str] | None = None) -> None:
    import click
    import typer

    from arkv_bench.cli import error_boundary

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        error_boundary(_evaluate, debug=os.environ.get("ARKV_BENCH_DEBUG", "") not in ("", "0"))
    except (click.exceptions.Exit, typer.Exit) as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
