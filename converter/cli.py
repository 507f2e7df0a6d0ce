"""``litefed-convert``: Keras model -> trainable, builtin-only ``.tflite`` + manifest."""

from __future__ import annotations

import argparse
import os
import sys
import time

LOSS_CHOICES = ("sparse_categorical_crossentropy", "binary_crossentropy", "mean_squared_error")

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
  model.keras               a saved Keras model (its compiled loss/optimizer are the defaults)
  path/to/file.py:build     a function in a file that returns a keras.Model
  package.module:build      the same, from an importable module

examples:
  litefed-convert converter.zoo:mnist_cnn -o build/mnist.tflite --batch-size 32
  litefed-convert my_model.keras -o model.tflite --batch-size 16 --optimizer adam --learning-rate 1e-3
  litefed-convert net.py:build -o net.tflite --batch-size 8 --loss binary_crossentropy --from-logits
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="litefed-convert",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("spec", metavar="SPEC", help="the Keras model: a .keras file, file.py:function or module:function")
    p.add_argument("-o", "--output", required=True, metavar="OUT.tflite", help="where to write the model")
    p.add_argument("--batch-size", type=int, required=True, metavar="N", help="fixed training batch size (static)")
    g = p.add_argument_group("training (defaults: the model's compiled loss and optimizer, else SGD 0.01)")
    g.add_argument("--loss", choices=LOSS_CHOICES, help="loss the train signature minimises")
    g.add_argument(
        "--from-logits",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the model outputs logits (no final softmax/sigmoid)",
    )
    g.add_argument("--optimizer", choices=("sgd", "adam"), help="on-device optimizer")
    g.add_argument("--learning-rate", type=float, metavar="LR", help="default learning rate (train also takes lr)")
    g.add_argument("--momentum", type=float, metavar="M", help="SGD momentum")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None, help="Nesterov momentum")
    v = p.add_argument_group("verification")
    v.add_argument("--no-verify", action="store_true", help="skip the comparison against TensorFlow")
    v.add_argument("--verify-steps", type=int, default=3, metavar="N", help="train steps compared (default 3)")
    v.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed |LiteRT - TF| (default 1e-4)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported
    start = time.perf_counter()
    log(f"loading {args.spec} (importing TensorFlow)")

    from converter.api import ConvertConfig, convert
    from converter.errors import ConverterError
    from edge_client.errors import EdgeClientError

    try:
        config = ConvertConfig(
            batch_size=args.batch_size,
            loss=args.loss,
            from_logits=args.from_logits,
            optimizer=args.optimizer,
            learning_rate=args.learning_rate,
            momentum=args.momentum,
            nesterov=args.nesterov,
            verify=not args.no_verify,
            verify_steps=args.verify_steps,
            tolerance=args.tolerance,
        )
        convert(args.spec, args.output, config, log=log)
    except (ConverterError, EdgeClientError) as exc:
        print(f"litefed-convert: error: {exc}", file=sys.stderr)
        return 1
    log(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
