"""``kaito-tuning``: one command line for the whole pipeline.

Each subcommand's arguments are declared here; its work lives in the module named for its stage
(``target``), imported only when that subcommand runs, so ``validate`` never pays for torch.
Every target is ``main(args) -> exit code``. Errors we expect (``KaitoError``) print one line
and exit with the error's code; nothing prints a traceback unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from kaito_tuning import __version__
from kaito_tuning.errors import KaitoError


def _validate(p):
    p.add_argument("files", nargs="+", metavar="FILE", help="YAML files (multi-document; '-' for stdin)")
    p.add_argument("--deny-private-urls", action="store_true",
                   help="refuse dataset URLs on private, loopback or link-local addresses (as the operator can)")


def _render(p):
    p.add_argument("file", metavar="FILE", help="a Workspace YAML (and optionally its ConfigMap)")
    p.add_argument("--namespace", "-n", default=None, help="namespace (default: the workspace's, else 'default')")
    p.add_argument("--tuner-image", default=None, help="tuner image (default: the operator's default)")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _run(p):
    p.add_argument("file", metavar="WORKSPACE.yaml", help="a tuning Workspace, and optionally its ConfigMap")
    p.add_argument("--output-dir", default=None, help="where the adapter is written (default ./<workspace-name>-adapter)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps")
    p.add_argument("--model-dir", default=None,
                   help="use base-model weights from this directory (before any weights image)")
    p.add_argument("--weights-image", default=None, metavar="IMAGE",
                   help="pull the base-model weights from this image (Kaito's model artifact or a model image; "
                        "default: the workspace's presetOptions.image)")
    p.add_argument("--auth-file", default=None, help="docker config.json with credentials for output.image")
    p.add_argument("--plain-http", action="store_true", help="talk plain HTTP to the registry (local registries)")
    p.add_argument("--no-push", action="store_true", help="do not push to output.image even if it is set")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--nproc", type=_positive, default=1,
                   help="training processes on this machine (torch.distributed; gloo on CPUs, one per GPU)")
    p.add_argument("--allow-private-urls", action="store_true",
                   help="allow dataset URLs on loopback/private addresses (refused by default, as in the Job)")


def _job(p):
    p.add_argument("step", choices=["download", "train", "push"],
                   help="the Job step to run (reads the workspace from $KAITO_WORKSPACE)")
    g = p.add_argument_group("several training processes (train step; torchrun)")
    g.add_argument("--nproc-per-node", type=_positive, default=1, help="processes on this node: one per GPU")
    g.add_argument("--nnodes", type=_positive, default=1, help="nodes in the gang")
    g.add_argument("--node-rank", type=int, default=0, help="this node's index (the Indexed Job's completion index)")
    g.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT", help="node 0's rendezvous address")
    g.add_argument("--rdzv-id", default="kaito-tuning", help="the gang's rendezvous id")


def _push(p):
    p.add_argument("dir", metavar="DIR", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("image", metavar="IMAGE", help="registry/repository:tag")
    p.add_argument("--auth-file", default=None, help="docker config.json or a dockerconfigjson secret's content")
    p.add_argument("--plain-http", action="store_true", help="plain HTTP (only for local registries)")
    p.add_argument("--annotation", action="append", default=[], metavar="KEY=VALUE", help="extra manifest annotation")


def _pull(p):
    p.add_argument("image", metavar="IMAGE", help="registry/repository:tag or @digest")
    p.add_argument("dir", metavar="DIR", help="directory to write the adapter to")
    p.add_argument("--auth-file", default=None,
                   help="docker config.json, or a folder of them (several pull secrets: the first entry per registry wins)")
    p.add_argument("--plain-http", action="store_true", help="plain HTTP (only for local registries)")


def _adapters(p):
    p.add_argument("--preset", default=None, help="preset model (default: smollm2-135m-instruct)")
    p.add_argument("--adapter", action="append", default=[], metavar="IMAGE_OR_DIR[=STRENGTH]",
                   help="adapter directory or image (registry/repository:tag), strength 0.0-1.0 (default 1.0); "
                        "each adapter is served as its own model, named after its directory or repository; "
                        "repeat for several (at most 10)")
    p.add_argument("--adapters-dir", default=None, metavar="DIR",
                   help="also serve every adapter directory under DIR (Kaito's /mnt/adapter layout; strength from "
                        "the environment variable named like the adapter)")
    p.add_argument("--auth-file", default=None, help="docker config.json for adapter images")
    p.add_argument("--plain-http", action="store_true", help="plain HTTP for adapter images")
    p.add_argument("--model-dir", default=None,
                   help="use base-model weights from this directory (before any weights image)")
    p.add_argument("--weights-image", default=None, metavar="IMAGE",
                   help="pull the base-model weights from this image (Kaito's model artifact or a model image); "
                        "--auth-file and --plain-http apply to it too")


def _chat(p):
    _adapters(p)
    p.add_argument("prompt", help="what to ask")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy, the same answer every time")
    p.add_argument("--compare", action="store_true", help="also print the base model's answer")


def _serve(p):
    from kaito_tuning.contract import SERVER_PORT

    _adapters(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a pod)")
    p.add_argument("--port", type=int, default=SERVER_PORT)
    p.add_argument("--max-queue", type=int, default=8, metavar="N",
                   help="requests generating or waiting to (one generates at a time); more get 503 (default 8)")
    p.add_argument("--idle-timeout", type=int, default=15, metavar="SECONDS",
                   help="close a connection that sends no complete request for this long (default 15)")
    p.add_argument("--max-connections", type=int, default=256, metavar="N",
                   help="open connections at most; more get 503 (default 256)")


def _demo(p):
    p.add_argument("--steps", type=int, default=None, help="training steps (default: enough to learn the facts)")
    p.add_argument("--workdir", default=None, help="keep files here (default: a temporary directory, removed)")


def _operator(p):
    p.add_argument("--namespace", "-n", action="append", default=[], help="watch only these namespaces")
    p.add_argument("--standalone", action="store_true", help="no peering (one operator replica)")
    p.add_argument("--liveness", default=None, help="liveness endpoint, e.g. http://0.0.0.0:8080/healthz")


def _none(p):
    pass


#: name -> (module, help, add_arguments)
COMMANDS = {
    "validate": ("kaito_tuning.spec.check", "check Workspace and ConfigMap YAML files", _validate),
    "render": ("kaito_tuning.controller.render", "print the manifests the operator would create for a workspace", _render),
    "run": ("kaito_tuning.tuner.cli", "run a tuning workspace on this machine: download, train, push", _run),
    "job": ("kaito_tuning.tuner.cli", "one step of the tuning Job (inside the tuner container)", _job),
    "push": ("kaito_tuning.artifacts.cli", "push an adapter directory as an OCI image", _push),
    "pull": ("kaito_tuning.artifacts.cli", "pull an adapter image into a directory", _pull),
    "chat": ("kaito_tuning.serving.cli", "ask a preset model (with adapters) one question", _chat),
    "serve": ("kaito_tuning.serving.cli", "serve a preset model with adapters over HTTP (/chat, /v1/chat/completions)", _serve),
    "demo": ("kaito_tuning.dev.demo", "the whole loop offline on SmolLM2: data, train, push, pull, compare answers", _demo),
    "operator": ("kaito_tuning.controller.handlers", "run the operator (kopf)", _operator),
    "crd": ("kaito_tuning.spec.info", "print the Workspace CRD", _none),
    "presets": ("kaito_tuning.spec.info", "list preset models", _none),
    "instances": ("kaito_tuning.spec.info", "list GPU instance types", _none),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kaito-tuning", description="Kubernetes-native LoRA/QLoRA fine-tuning.")
    parser.add_argument("--version", action="version", version=f"kaito-tuning {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text, add) in COMMANDS.items():
        add(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    entry = getattr(module, f"cli_{args.command}", None) or module.main
    try:
        return int(entry(args) or 0)
    except KaitoError as e:
        if args.debug:
            raise
        print(f"error: {e.one_line()}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `kaito-tuning presets | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
