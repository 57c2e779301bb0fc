"""Benchmarks that print JSON: ``python -m jobs.benchmark {model,loader,embed,serve,evaluate,predict,text-prior,gpu-suite}``.

Each subcommand measures one thing against a baseline measured in the same run, on the same machine, and
prints one JSON object (what each measures: its module's docstring, ``--help``, ``docs/benchmarks.md``):

* ``model``: train img/s of the full model against the backbone alone (:mod:`jobs.benchmarks.model`);
* ``loader``: the training loader from shards against per-file and reference-style loaders
  (:mod:`jobs.benchmarks.loader`);
* ``embed``: the embedding job's img/s against a bare CLIP forward (:mod:`jobs.benchmarks.embed`);
* ``serve``: Ray Serve requests/s and latency, batching on and off (:mod:`jobs.benchmarks.serve`);
* ``evaluate``: test-protocol pairs/s against reference-style and our per-pair loops, with the same PCK
  (:mod:`jobs.benchmarks.evaluate`);
* ``predict``: single-image latency and batched throughput of ``Predictor`` with PyTorch against ONNX
  (onnxruntime), on the same inputs, and how far apart their points are (:mod:`jobs.benchmarks.predict`);
* ``text-prior``: how the packaged language priors and the random tiny CLIP embed the synthetic set's class
  prompts and keypoint names, and at what speed (:mod:`jobs.benchmarks.text_prior`);
* ``gpu-suite``: the model, a short training run and every CUDA path, in one run
  (:mod:`jobs.benchmarks.gpu`).

This module only parses, dispatches and prints.
"""

from __future__ import annotations

import argparse
import json

from capenext.cli import run_main
from jobs.benchmarks import embed, evaluate, gpu, loader, model, predict, serve, text_prior

# subcommand → (module, one-line help); each module has add_arguments(parser) and run(args) -> dict
COMMANDS = {
    "model": (model, "train img/s of the full model vs the backbone alone"),
    "loader": (loader, "training loader from shards vs per-file pycocotools + PIL"),
    "embed": (embed, "embedding job img/s vs a bare CLIP forward"),
    "serve": (serve, "Ray Serve requests/s and latency, batching on vs off"),
    "evaluate": (evaluate, "test-protocol pairs/s: ours vs the per-pair loops, same numbers"),
    "predict": (predict, "Predictor latency and batched queries/s: PyTorch vs ONNX, same points"),
    "text-prior": (text_prior, "text encoders on the synthetic names and prompts: kinship, spread, texts/s"),
    "gpu-suite": (gpu, "the GPU suite: model, a short training run, every CUDA path"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.benchmark",
                                     description="Benchmarks; each prints one JSON object.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(json.dumps(args.func(args), indent=2), flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
