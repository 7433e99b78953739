"""`arkv-lm-eval` / `python -m arkv_bench.lm_eval_cli`: lm-eval's own command line with `--model arkv`.

lm-eval 0.4.13 resolves `--model` only against models imported into its registry, so this
wrapper imports arkv-bench's plugin first and then hands every argument to lm-eval unchanged:

    arkv-lm-eval --model arkv --model_args pretrained=smollm2-135m,quant_type=mix,cache_size=1024 \
        --tasks gsm8k --include_path my_tasks/
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    import arkv_bench.lm_eval_model  # noqa: F401  (registers the `arkv` model)
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
