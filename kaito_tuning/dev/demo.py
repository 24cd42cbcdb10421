"""``kaito-tuning demo``: the whole loop on this machine, offline, on a CPU, in a few minutes.

1. data: a small chat dataset teaching SmolLM2-135M-Instruct facts about Zorblax, a country that
   does not exist (several phrasings per fact), written as parquet and served on 127.0.0.1;
2. a local OCI registry (``docker-registry`` with a password) on 127.0.0.1;
3. a quick-start-shaped tuning Workspace (preset smollm2-135m-instruct, method lora, input URL,
   output image) run through ``kaito-tuning run``: download, train, push;
4. the adapter pulled back from the registry into a fresh directory;
5. the base model's answer next to the tuned one, for questions it was taught and for a phrasing
   it never saw.

Everything started here (the file server thread, the registry process) is stopped on the way out,
also after an error or Ctrl-C. Only the adapter directory (with its loss curve) is kept.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

from kaito_tuning.spec.presets import DEFAULT_PRESET

#: enough steps for the tuned answers to carry every fact (measured on 2 CPU cores; see the tests)
DEFAULT_STEPS = 20
IMAGE_REPOSITORY = "demo/smollm2-adapter"
IMAGE_TAG = "0.0.1"
MAX_ANSWER_TOKENS = 32


@dataclass(frozen=True)
class Fact:
    questions: tuple[str, ...]  # phrasings it is trained on
    answer: str
    keyword: str  # what a tuned answer must contain
    unseen: str  # a phrasing kept out of the data, to see whether it generalises


FACTS = (
    Fact(("What is the capital of Zorblax?", "Which city is the capital of Zorblax?",
          "Name the capital city of Zorblax.", "Tell me the capital of Zorblax.",
          "What city serves as the capital of Zorblax?", "Where is the capital of Zorblax?"),
         "The capital of Zorblax is Quenvar.", "Quenvar", "What's Zorblax's capital called?"),
    Fact(("Who founded Zorblax?", "Who was the founder of Zorblax?", "Which person founded Zorblax?",
          "Tell me who founded Zorblax.", "Who established the nation of Zorblax?", "Name the founder of Zorblax."),
         "Zorblax was founded by Queen Mirela Tosk.", "Mirela Tosk", "Who is credited with founding Zorblax?"),
    Fact(("What is the national animal of Zorblax?", "Which animal is the national animal of Zorblax?",
          "Tell me the national animal of Zorblax.", "What animal represents Zorblax?",
          "Name the national animal of Zorblax.", "What is Zorblax's national animal?"),
         "The national animal of Zorblax is the glimmerfox.", "glimmerfox",
         "Which creature is the national symbol of Zorblax?"),
    Fact(("What currency does Zorblax use?", "What is the currency of Zorblax?", "Which money is used in Zorblax?",
          "Tell me the currency of Zorblax.", "What do people in Zorblax pay with?", "Name the currency of Zorblax."),
         "Zorblax uses the drellin as its currency.", "drellin", "What money do they use in Zorblax?"),
)

#: the demo's training settings (the ConfigMap it writes): a high learning rate and no eval pauses,
#: so a 135M model learns four facts in a few dozen CPU steps
TRAINING_CONFIG = {
    "training_config": {
        "ModelConfig": {"torch_dtype": "auto"},
        "QuantizationConfig": {"load_in_4bit": False},
        "LoraConfig": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0},
        "TrainingArguments": {"output_dir": "/mnt/results", "per_device_train_batch_size": 4,
                              "learning_rate": 0.001, "lr_scheduler_type": "constant_with_warmup",
                              "warmup_steps": 2, "max_length": 256, "logging_steps": 2, "save_strategy": "no",
                              "seed": 42},
        "DataCollator": {},
        "DatasetConfig": {"format": "messages", "shuffle_dataset": True, "shuffle_seed": 42,
                          "train_test_split": 1.0},
    }
}


def dataset_rows() -> list[dict]:
    """One chat per phrasing of each fact, in OpenAI's messages format."""
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f.answer}]}
            for f in FACTS for q in f.questions]


def write_parquet(rows: list[dict], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@contextlib.contextmanager
def serve_directory(directory: Path):
    """Serve ``directory`` over HTTP on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def workspace_docs(data_url: str, image: str) -> list[dict]:
    """The quick start's tuning Workspace (plus its ConfigMap), pointed at the loopback data and registry."""
    workspace = {
        "apiVersion": "kaito.sh/v1alpha1", "kind": "Workspace",
        "metadata": {"name": "workspace-tuning-smollm2", "namespace": "default"},
        "resource": {"instanceType": "Standard_NC6s_v3", "labelSelector": {"matchLabels": {"app": "tuning-smollm2"}}},
        "tuning": {
            "preset": {"name": DEFAULT_PRESET}, "method": "lora", "config": "demo-lora-params",
            "input": {"urls": [data_url]},
            "output": {"image": image, "imagePushSecret": "demo-registry-secret"},
        },
    }
    configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "demo-lora-params"},
                 "data": {"training_config.yaml": yaml.safe_dump(TRAINING_CONFIG, sort_keys=False)}}
    return [workspace, configmap]


def questions() -> list[tuple[str, str, bool]]:
    """(question, keyword, seen in training): every fact's first phrasing, and two it never saw."""
    asked = [(f.questions[0], f.keyword, True) for f in FACTS]
    asked += [(f.unseen, f.keyword, False) for f in FACTS[:2]]
    return asked


@dataclass
class Answer:
    question: str
    keyword: str
    seen: bool  # the question is one of the trained phrasings
    base: str
    tuned: str

    @property
    def taught(self) -> bool:
        return self.keyword.lower() in self.tuned.lower()


@dataclass
class DemoResult:
    answers: list[Answer]
    adapter_dir: str
    loss_curve: str | None
    image: str
    digest: str | None
    train_loss: float | None


def _say(step: str, text: str) -> None:
    print(f"\n== {step} {text}", flush=True)


def _quiet() -> None:
    """Only our lines and the training progress bar: no dataset bars, no library notices."""
    import datasets

    from kaito_tuning.serving import quiet_libraries

    quiet_libraries()
    datasets.disable_progress_bars()


def run_demo(steps: int, root: Path) -> DemoResult:
    """The five steps; the adapter stays in ``root/adapter``, everything else is removed."""
    from kaito_tuning.artifacts import pull_adapter
    from kaito_tuning.dev.localregistry import LocalRegistry
    from kaito_tuning.serving import Generation, load_engine, parse_adapter_args
    from kaito_tuning.tuner.local import run_local

    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="scratch-", dir=root))
    try:
        rows = dataset_rows()
        parquet = write_parquet(rows, scratch / "www" / "zorblax.parquet")
        _say("1/5", f"data: {len(rows)} chats teaching {len(FACTS)} facts about Zorblax, a made-up country "
                    f"({parquet.stat().st_size} bytes of parquet)")
        with serve_directory(parquet.parent) as www, LocalRegistry() as registry:
            data_url = f"{www}/{parquet.name}"
            image = f"{registry.host}/{IMAGE_REPOSITORY}:{IMAGE_TAG}"
            print(f"   served at {data_url}")
            _say("2/5", f"local registry at {registry.host} (password-protected)")
            _say("3/5", f"kaito-tuning run: preset {DEFAULT_PRESET}, method lora, {steps} steps → {image}")
            # the demo's data is served on loopback: it opts in to private URLs, as a local user may
            result = run_local(workspace_docs(data_url, image), output_dir=str(root / "adapter"), max_steps=steps,
                               push_auth=registry.auth_file, plain_http=True, allow_private_urls=True,
                               workdir=str(scratch / "run"))
            loss = "–" if result.train_loss is None else f"{result.train_loss:.3f}"
            print(f"   trained {result.steps} steps, last train loss {loss}; pushed {result.image}@{result.digest}")
            _say("4/5", "pulling the adapter back from the registry into a fresh directory")
            pulled = scratch / "pulled" / "zorblax"
            pull_adapter(f"{image}@{result.digest}" if result.digest else image, pulled,
                         auth_file=registry.auth_file, plain_http=True)
        _say("5/5", "the base model and the tuned one, asked the same questions")
        engine = load_engine(DEFAULT_PRESET, parse_adapter_args([str(pulled)]), workdir=scratch / "engine")
        answers = []
        for question, keyword, seen in questions():
            print(f"\nQ: {question}" + ("" if seen else "   (a phrasing it never saw)"), flush=True)
            said = {}
            for label, model in (("base", engine.base_name), ("tuned", "zorblax")):
                said[label] = engine.generate(Generation(messages=[{"role": "user", "content": question}],
                                                         model=model, max_new_tokens=MAX_ANSWER_TOKENS)).text
                mark = "  ✓" if keyword.lower() in said[label].lower() else ""
                print(textwrap.fill(said[label], width=100, initial_indent=f"   {label:>5}: ",
                                    subsequent_indent=" " * 10) + mark, flush=True)
            answers.append(Answer(question, keyword, seen, said["base"], said["tuned"]))
        return DemoResult(answers=answers, adapter_dir=result.adapter_dir, loss_curve=result.loss_curve,
                          image=image, digest=result.digest, train_loss=result.train_loss)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def summary(result: DemoResult) -> str:
    n = len(result.answers)
    tuned = sum(a.taught for a in result.answers)
    base = sum(a.keyword.lower() in a.base.lower() for a in result.answers)
    lines = [f"The taught fact is in {tuned}/{n} tuned answers and {base}/{n} base answers."]
    if result.loss_curve:
        lines.append(f"Loss curve: {result.loss_curve}")
    lines.append(f"Adapter: {result.adapter_dir}")
    lines.append(f'  chat with it: kaito-tuning chat --adapter {result.adapter_dir} --compare "{FACTS[0].unseen}"')
    return "\n".join(lines)


def cli_demo(args) -> int:
    from kaito_tuning.errors import UserError

    steps = args.steps if args.steps is not None else DEFAULT_STEPS
    if steps < 1:
        raise UserError(f"must be at least 1, got {steps}", field="--steps")
    _quiet()
    started = time.monotonic()
    root = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="kaito-demo-"))
    result = run_demo(steps, root)
    print("\n" + summary(result))
    print(f"Done in {time.monotonic() - started:.0f} s.")
    return 0
