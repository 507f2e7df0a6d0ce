"""``litefed-convert``: Keras model -> trainable, builtin-only ``.tflite`` + manifest.

Only the standard library is imported up front, so ``--help`` and argument
errors are instant and work without TensorFlow. TensorFlow's start-up and
conversion chatter (C++ logs on file descriptor 2, absl warnings, LiteRT's
delegate notice) is kept aside and shown only if the conversion crashes;
``--verbose`` lets it through as it comes.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import importlib.util
import logging
import os
import sys
import tempfile
import time
from typing import IO

from converter.errors import ConverterError, MissingExtraError
from edge_client.cli_support import EXIT_INTERRUPTED, EXIT_OK, command, fail, new_parser
from edge_client.errors import EdgeClientError

PROG = "litefed-convert"

# converter.losses.LOSSES and converter.optimizers.OPTIMIZERS, without importing TensorFlow for --help.
LOSS_CHOICES = (
    "sparse_categorical_crossentropy",
    "categorical_crossentropy",
    "binary_crossentropy",
    "mean_squared_error",
    "mean_absolute_error",
    "huber",
)
OPTIMIZER_CHOICES = ("sgd", "adam", "adamw", "rmsprop", "adagrad")

DESCRIPTION = """\
Convert a Keras model into a TensorFlow Lite (LiteRT) model that can be
trained on a device with the plain ai-edge-litert interpreter: builtin ops
only, no Flex, no TensorFlow on the device.

The model gets five signatures: train, infer, evaluate, get_weights and
set_weights, all with a fixed batch size. The manifest OUT.json is written
beside OUT.tflite. Before writing, the converter checks that only builtin
ops are present and that a LiteRT train step matches TensorFlow's.
"""

EPILOG = """\
SPEC is one of:
  model.keras               a saved Keras model (its compiled loss/optimizer are the defaults;
                            a flag replaces what the model was compiled with)
  path/to/file.py:build     a function in a file that returns a keras.Model
  package.module:build      the same, from an importable module

examples:
  litefed-convert converter.zoo:mnist_cnn -o build/mnist.tflite --batch-size 32
  litefed-convert my_model.keras -o model.tflite --batch-size 16 --optimizer adam --learning-rate 1e-3
  litefed-convert net.py:build -o net.tflite --batch-size 8 --loss binary_crossentropy --from-logits
"""


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(PROG, DESCRIPTION, EPILOG)
    p.add_argument("spec", metavar="SPEC", help="the Keras model: a .keras file, file.py:function or module:function")
    p.add_argument("-o", "--output", required=True, metavar="OUT.tflite", help="where to write the model")
    p.add_argument("--batch-size", type=int, required=True, metavar="N", help="fixed training batch size (static)")
    g = p.add_argument_group("training (defaults: the model's compiled loss and optimizer, else SGD 0.01)")
    g.add_argument("--loss", choices=LOSS_CHOICES, help="loss the train signature minimises; replaces the compiled one")
    g.add_argument(
        "--label-smoothing", type=float, metavar="S", help="label smoothing (categorical and binary cross-entropy)"
    )
    g.add_argument("--huber-delta", type=float, metavar="D", help="Huber loss delta (default 1.0)")
    g.add_argument(
        "--from-logits",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the model outputs logits (no final softmax/sigmoid)",
    )
    g.add_argument(
        "--optimizer",
        choices=OPTIMIZER_CHOICES,
        help="on-device optimizer; replaces the compiled one (Keras' defaults for what no flag sets)",
    )
    g.add_argument("--learning-rate", type=float, metavar="LR", help="default learning rate (train also takes lr)")
    g.add_argument("--momentum", type=float, metavar="M", help="SGD or RMSprop momentum")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None, help="Nesterov momentum")
    g.add_argument("--weight-decay", type=float, metavar="WD", help="decoupled weight decay (AdamW's, any optimizer)")
    clip = g.add_mutually_exclusive_group()
    clip.add_argument("--clipnorm", type=float, metavar="C", help="clip each gradient tensor to norm C")
    clip.add_argument("--global-clipnorm", type=float, metavar="C", help="clip all gradients to global norm C")
    clip.add_argument("--clipvalue", type=float, metavar="C", help="clip every gradient element to [-C, C]")
    v = p.add_argument_group("verification")
    v.add_argument("--no-verify", action="store_true", help="skip the comparison against TensorFlow")
    v.add_argument("--verify-steps", type=int, default=3, metavar="N", help="train steps compared (default 3)")
    v.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed |LiteRT - TF| (default 1e-4)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    p.add_argument("-v", "--verbose", action="store_true", help="also show TensorFlow's own log, unfiltered")
    return p


@command
def main(argv: list[str] | None = None) -> int:
    """Convert; return the exit status (only ``__main__`` calls ``sys.exit``)."""
    args = build_parser().parse_args(argv)
    log = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    if not _tensorflow_installed():
        return fail(PROG, MissingExtraError("the converter", "TensorFlow", "converter"))
    if not args.verbose:  # read by TensorFlow when it is imported; a user's own setting wins
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    start = time.perf_counter()
    log(f"loading {args.spec} (importing TensorFlow)")
    capture = _StderrCapture(enabled=not args.verbose)
    try:
        with capture:
            _convert(args, log)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ConverterError, EdgeClientError) as exc:  # what the user can fix: one line says how
        return fail(PROG, exc)
    except Exception:
        if capture.text:  # a crash: TensorFlow's log may explain it
            print(f"litefed-convert: TensorFlow's log before the error:\n{capture.text.rstrip()}", file=sys.stderr)
        raise
    log(f"done in {time.perf_counter() - start:.1f} s")
    return EXIT_OK


def _convert(args: argparse.Namespace, log) -> None:
    _import_tensorflow(quiet=not args.verbose)
    from converter.api import ConvertConfig, convert

    config = ConvertConfig(
        batch_size=args.batch_size,
        loss=args.loss,
        from_logits=args.from_logits,
        label_smoothing=args.label_smoothing,
        huber_delta=args.huber_delta,
        optimizer=args.optimizer,
        learning_rate=args.learning_rate,
        momentum=args.momentum,
        nesterov=args.nesterov,
        weight_decay=args.weight_decay,
        clipnorm=args.clipnorm,
        clipvalue=args.clipvalue,
        global_clipnorm=args.global_clipnorm,
        verify=not args.no_verify,
        verify_steps=args.verify_steps,
        tolerance=args.tolerance,
    )
    convert(args.spec, args.output, config, log=log)


def _tensorflow_installed() -> bool:
    try:
        return importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):  # ImportError: an import hook refuses it
        return False


def _import_tensorflow(quiet: bool) -> None:
    try:
        import tensorflow as tf
    except ImportError as exc:  # installed (checked before) but broken
        raise MissingExtraError(f"the converter ({exc})", "a working TensorFlow", "converter") from exc
    if quiet:  # Python-side warnings (absl's "not a valid tf.function parameter name" ...) are noise to a user
        tf.get_logger().setLevel(logging.ERROR)
        logging.getLogger("absl").setLevel(logging.ERROR)


class _StderrCapture:
    """Sends file descriptor 2 to a temporary file while active; keeps what arrived in :attr:`text`.

    TensorFlow and LiteRT log from C++ straight to fd 2, past ``sys.stderr``:
    only redirecting the descriptor silences them. A fatal signal's traceback
    (faulthandler) still goes to the real stderr.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.text = ""
        self._saved: int | None = None
        self._file: IO[bytes] | None = None
        self._faulthandler = False

    def __enter__(self) -> _StderrCapture:
        if not self.enabled:
            return self
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        if not faulthandler.is_enabled():  # leave a caller's (pytest's) handler alone
            faulthandler.enable(file=self._saved)
            self._faulthandler = True
        return self

    def __exit__(self, *exc_info) -> None:
        if self._saved is None:
            return
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        if self._faulthandler:
            faulthandler.disable()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._saved = None
        assert self._file is not None  # opened in __enter__, with _saved
        self._file.seek(0)
        self.text = self._file.read().decode("utf-8", errors="replace")
        self._file.close()


if __name__ == "__main__":
    sys.exit(main())
