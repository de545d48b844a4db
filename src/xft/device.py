"""The device a command runs on, chosen once at the entry point (library code follows the data).

`resolve_device("auto")` is the first CUDA GPU when torch sees one, else the
CPU; an explicit name is checked against what this torch build can use, so
`--device cuda` on a CPU-only build is a one-line error, not a traceback from
deep inside a model. `--threads` (every command that runs a model) is chosen
here too: torch's default of one thread per core slows down many-fold when
other processes share those cores.
"""

from __future__ import annotations

from xft.errors import UserError


def resolve_device(name: str | None, option: str = "--device") -> str:
    """`name` ("auto"/None, "cpu", "cuda", "cuda:1", "mps", ...) as a device this machine has; UserError if not."""
    import torch

    if name in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"{option} {name!r} is not a device name; expected auto, cpu, cuda, cuda:N, mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only PyTorch build" if torch.version.cuda is None else "no visible CUDA GPU"
            raise UserError(f"{option} {name}: this machine has {build}; use --device cpu "
                            "(or install the PyTorch build for your CUDA version)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"{option} {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UserError(f"{option} {name}: MPS is not available on this machine; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"{option} {name!r}: unsupported device type; expected auto, cpu, cuda, cuda:N or mps")
    return str(device)


THREADS_HELP = ("CPU threads for torch (default: one per core); on a machine busy with other work, "
                "--threads 1 is often several times faster")


def add_threads_option(parser, default: int | None = None, help: str = THREADS_HELP) -> None:
    """The `--threads N` option of a command that runs a model (`set_threads(args.threads)` applies it)."""
    parser.add_argument("--threads", type=int, default=default, metavar="N", help=help)


def set_threads(n: int | None) -> None:
    """Use `n` CPU threads in torch (None: torch's default, one per core); UserError if `n` < 1."""
    if n is None:
        return
    if n < 1:
        raise UserError(f"--threads must be at least 1, got {n}")
    import torch

    torch.set_num_threads(n)


def start_model_command(threads: int | None) -> None:
    """What every command that runs a model does once its arguments are checked: take `threads` CPU threads
    and keep its log readable (no per-file "Loading weights" / "Writing model shards" bars from transformers;
    training and generation bars stay)."""
    set_threads(threads)
    from transformers.utils import logging

    logging.disable_progress_bar()
