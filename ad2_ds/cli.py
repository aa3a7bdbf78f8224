"""What every recipe's command line shares: the RunConfig flags, the launchers' flags, exit codes, one-line errors.

    parser = run_parser(__doc__)                     # every RunConfig flag + --deepspeed_config, --local_rank
    sys.exit(run_cli(lambda: config_from_args(parser.parse_args(argv))))

Exit codes: 0 done; 2 bad input (one ``error: ...`` line naming the flag); 3 the loss stayed non-finite; 128 + N a
signal N stopped the run after a checkpoint.
"""

import argparse
import logging
import sys
from typing import Callable, Sequence

from .config import ConfigError
from .flags import add_flags, flags_of, from_flags


def run_parser(doc: str) -> argparse.ArgumentParser:
    from .run_config import RunConfig

    p = argparse.ArgumentParser(description=doc.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_flags(p, RunConfig)
    p.add_argument("--deepspeed_config", metavar="PATH", help="DeepSpeed JSON (DeepSpeed's own flag)")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    return p


def config_from_args(args: argparse.Namespace, **overrides):
    """The RunConfig of parsed flags; ``--deepspeed`` and ``--deepspeed_config`` are one setting."""
    from .run_config import RunConfig

    if args.deepspeed and args.deepspeed_config and args.deepspeed != args.deepspeed_config:
        raise ConfigError("deepspeed", "and --deepspeed_config name different files: pass one")
    return from_flags(RunConfig, vars(args), deepspeed=args.deepspeed or args.deepspeed_config, **overrides)


def error_line(e: Exception) -> str:
    """``error: ...`` in the command line's words: a config field becomes its flag."""
    if isinstance(e, ConfigError):
        from .run_config import RunConfig

        return f"error: --{flags_of(RunConfig).get(e.field, e.field)} {e.detail}"
    return f"error: {e}"


def run_cli(make_config: Callable, callbacks: Sequence = ()) -> int:
    """Build the config, run it, print the summary table; the exit code (see the module docstring)."""
    from .data.assets import AssetError
    from .run import run_distillation, summary_table
    from .trainer import NonFiniteLossError, TrainingInterrupted

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        results = run_distillation(make_config(), callbacks)
    except TrainingInterrupted as e:
        print(str(e), file=sys.stderr)
        return 128 + e.signum
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError, AssetError) as e:
        print(error_line(e), file=sys.stderr)
        return 2
    if results is not None:
        print(summary_table(None, results))  # own data has no registered task: results name it
    return 0
