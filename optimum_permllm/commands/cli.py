"""The `permllm` command line (also `optimum-cli permllm`): prune, eval, export-dense, info, push, demo.

Nothing here imports torch or transformers before the arguments are parsed (each command imports what it
runs), so `--help` answers at once (tests/commands/test_cli.py checks it with `python -X importtime`).
Expected failures (bad input, a missing file, a refused upload) print one line on stderr and exit with 1;
bad usage exits with 2.
Output folders are written into a temporary folder beside the target and renamed at the end, so an
interrupted run never leaves a folder that looks complete.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import textwrap
from pathlib import Path

PROG = "permllm"
EXPECTED_ERRORS = (ValueError, TypeError, OSError, ImportError)
DTYPES = ("float32", "bfloat16", "float16")

DESCRIPTION = """\
Make Hugging Face causal LMs N:M (2:4) sparse with channel permutations, evaluate them, and share them.

A pruned model is saved as an ordinary transformers folder; load it in Python with
    import optimum_permllm
    model = AutoModelForCausalLM.from_pretrained("my-model-2of4")

Run `{prog} COMMAND --help` for the options and examples of a command.
"""

EXAMPLES = {
    "prune": """\
        permllm prune HuggingFaceTB/SmolLM2-135M --output smollm2-2of4
        permllm prune ./my-dense-model --metric sparsegpt --permutation learned --num-samples 64 --output out
        permllm prune --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --metric magnitude --permutation none --output out""",
    "eval": """\
        permllm eval smollm2-2of4                          # perplexity + zero-shot (200 rows per task)
        permllm eval smollm2-2of4 --tasks piqa,boolq --limit 100 --output-json results.json
        permllm eval smollm2-2of4 --tasks none             # perplexity only""",
    "export-dense": """\
        permllm export-dense smollm2-2of4 --output smollm2-2of4-dense""",
    "info": """\
        permllm info smollm2-2of4
        permllm info smollm2-2of4 --json""",
    "push": """\
        permllm push smollm2-2of4 me/SmolLM2-135M-2of4 --base-model HuggingFaceTB/SmolLM2-135M --results results.json""",
}


class CLIError(Exception):
    """An expected failure: printed as one line, exit status 1."""


class UsageError(CLIError):
    """Bad usage that argparse cannot see: exit status 2."""


# ------------------------------------------------------------------ parser
def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The full parser: one sub-parser per command, each with examples in its --help."""
    parser = argparse.ArgumentParser(prog=prog)
    add_subcommands(parser)
    return parser


def add_subcommands(parser: argparse.ArgumentParser) -> None:
    """Add the description and sub-commands to `parser` (also used by the optimum-cli registration)."""
    parser.description = DESCRIPTION.format(prog=parser.prog)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="permllm_command", metavar="COMMAND")
    prog = parser.prog
    _prune_arguments(_command(sub, prog, "prune", "prune a dense model to N:M sparsity and save it"))
    _eval_arguments(_command(sub, prog, "eval", "measure perplexity and zero-shot accuracy"))
    _export_arguments(_command(sub, prog, "export-dense", "save a permllm checkpoint as a plain dense model"))
    _info_arguments(_command(sub, prog, "info", "check a permllm checkpoint and show what it holds"))
    _push_arguments(_command(sub, prog, "push", "upload a checkpoint with a generated model card to the Hub"))
    demo = sub.add_parser("demo", help="prune, evaluate, save, reload and generate on SmolLM2-135M-Instruct",
                          add_help=False, prefix_chars="+")  # every option, --help included, goes to the demo
    demo.add_argument("demo_args", nargs="*")
    demo.set_defaults(permllm_run=run_demo, permllm_prog=f"{prog} demo")


def _command(sub, prog: str, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".",
                            epilog=_epilog(prog, name), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(permllm_run=RUNNERS[name])
    return parser


def _epilog(prog: str, name: str) -> str:
    """The examples of a command, written with the program name in use (permllm or optimum-cli permllm)."""
    examples = textwrap.dedent(EXAMPLES[name]).replace(f"{PROG} ", f"{prog} ")
    return "examples:\n" + textwrap.indent(examples, "  ")


def _device_and_dtype(parser: argparse.ArgumentParser, dtype_default: str = "float32") -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", default=dtype_default, choices=DTYPES, help=f"model dtype (default: {dtype_default})")


def _prune_arguments(parser: argparse.ArgumentParser) -> None:
    from ..options import LEARNERS, METRICS, PERMUTATIONS, SCOPES

    parser.add_argument("model", nargs="?", help="Hub id or folder of the dense model (or use --gguf-file)")
    parser.add_argument("--gguf-file", help="prune a GGUF file instead (dequantized to --dtype first)")
    parser.add_argument("--output", "-o", required=True, help="folder to write the sparse checkpoint to")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--sparsity", default="2:4", help="N:M pattern, e.g. 2:4 (GPU sparse tensor cores), 4:8, 1:4")
    parser.add_argument("--metric", default="wanda", choices=METRICS, help="which weights to keep (default: wanda)")
    parser.add_argument("--permutation", default="heuristic", choices=PERMUTATIONS,
                        help="channel permutation before pruning (default: heuristic)")
    # the learned permutation's settings default to None here: their defaults live in LearningSettings
    parser.add_argument("--learner", default=None, choices=LEARNERS,
                        help="for --permutation learned: sinkhorn (PermLLM, the default) or ot")
    parser.add_argument("--scope", default=None, choices=SCOPES,
                        help="for --permutation learned: layer (each group alone, the default) or model (every "
                             "group of the learned layers together, PermLLM as published)")
    parser.add_argument("--block-size", type=int, default=None, help="channels per learned permutation block (64)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimisation steps of the learned permutation (default: the scope's)")
    parser.add_argument("--learned-layers", type=int, default=None,
                        help="only the last N decoder layers learn their permutation (default: all)")
    parser.add_argument("--damp", type=float, default=0.01,
                        help="SparseGPT and lsq dampening (default: 0.01; raise it if the Hessian is not positive definite)")
    parser.add_argument("--dataset", default=None,
                        help="calibration text: a Hub dataset name, a text file (default: offline Wikipedia)")
    parser.add_argument("--num-samples", type=int, default=128, help="calibration sequences (default: 128)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per calibration sequence (default: 2048)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", default=None, help="tokenizer id or folder (default: the model's)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    _device_and_dtype(parser)


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="permllm checkpoint folder or Hub id (dense models work too)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer id or folder (default: the model's)")
    parser.add_argument("--tasks", default="default",
                        help="comma-separated zero-shot tasks, 'default' (all seven), or 'none' (perplexity only)")
    parser.add_argument("--limit", type=int, default=200, help="rows per zero-shot task (default: 200; 0 = all)")
    parser.add_argument("--text", default=None,
                        help="perplexity text: a text file or 'wikitext2' (default: held-out offline Wikipedia)")
    parser.add_argument("--seq-len", type=int, default=512, help="perplexity window in tokens (default: 512)")
    parser.add_argument("--max-windows", type=int, default=None, help="score at most this many windows")
    parser.add_argument("--no-perplexity", action="store_true", help="skip perplexity")
    parser.add_argument("--batch-size", type=int, default=8, help="zero-shot batch size (default: 8)")
    parser.add_argument("--output-json", default=None, help="also write the results here (input of `permllm push`)")
    _device_and_dtype(parser)


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="permllm checkpoint folder or Hub id")
    parser.add_argument("--output", "-o", required=True, help="folder for the dense model")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--dtype", default=None, choices=DTYPES, help="dtype of the dense weights (default: as stored)")


def _info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Show what a permllm checkpoint holds, after checking it as loading does: tensors present "
                          "and of the right shapes for the config's sparsity, permutations that are bijections, masks "
                          "that keep exactly N of every M. Every problem is listed and the exit status is 1 when "
                          "there is one.")
    parser.add_argument("checkpoint", help="permllm checkpoint folder or Hub id")
    parser.add_argument("--json", action="store_true", help="print the full per-layer report as JSON")


def _push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="permllm checkpoint folder")
    parser.add_argument("repo_id", help="target repo, 'name' or 'namespace/name'")
    parser.add_argument("--base-model", default=None, help="Hub id of the dense model it was pruned from")
    parser.add_argument("--license", default=None, help="licence id (default: read from the base model's card)")
    parser.add_argument("--results", default=None, help="results JSON written by `permllm eval --output-json`")
    parser.add_argument("--token", default=None, help="Hub token (default: the one saved by `huggingface-cli login`)")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--commit-message", default=None)


# ------------------------------------------------------------------ commands
def run_prune(args) -> int:
    if bool(args.model) == bool(args.gguf_file):
        raise UsageError("give either a model id/folder or --gguf-file (exactly one)")
    output = _check_output(args.output, args.overwrite)
    _device(args.device)  # an unavailable device is refused before any work
    from ..config import PermLLMConfig
    from ..saving import save_pretrained
    from ..sparsifier import PermLLMSparsifier

    learning = {name: getattr(args, name) for name in ("learner", "scope", "block_size", "steps", "learned_layers")
                if getattr(args, name) is not None}
    config = PermLLMConfig(sparsity=args.sparsity, metric=args.metric, permutation=args.permutation,
                           damp=args.damp, dataset=args.dataset, num_samples=args.num_samples, seq_len=args.seq_len,
                           seed=args.seed, **learning)
    model, tokenizer = _load_dense(args)
    PermLLMSparsifier(config).sparsify_model(model, tokenizer, progress=not args.quiet)
    if not args.quiet:
        print(f"saving to {output} ...", file=sys.stderr, flush=True)
    save_pretrained(model, output, tokenizer, overwrite=args.overwrite)
    _print_summary(model, f"saved the {config.sparsity} sparse model to {output}")
    return 0


def run_eval(args) -> int:
    from ..data.calibration import get_evaluation_text
    from ..evaluation.perplexity import perplexity
    from ..evaluation.zeroshot import DEFAULT_TASKS, zero_shot

    tasks = _tasks(args.tasks, DEFAULT_TASKS)
    if args.no_perplexity and not tasks:
        raise UsageError("nothing to evaluate: --no-perplexity with --tasks none")
    if args.output_json:
        _check_output_file(Path(args.output_json), "--output-json")
    _device(args.device)
    model, tokenizer = _load_model(args.model, args.tokenizer, args.device, args.dtype)
    results = {"evaluation": _evaluation_note(args)}
    if not args.no_perplexity:
        results["perplexity"] = perplexity(model, tokenizer, text=get_evaluation_text(args.text), seq_len=args.seq_len,
                                           max_windows=args.max_windows, progress=True)
        print(f"perplexity: {results['perplexity']:.3f}", flush=True)
    if tasks:
        results["zero_shot"] = zero_shot(model, tokenizer, tasks, limit=args.limit or None, batch_size=args.batch_size)
        for task, score in results["zero_shot"].items():
            print(f"{task:>14}: {score:.4f}")
    if args.output_json:
        _write_text_atomically(Path(args.output_json), json.dumps(results, indent=2))
    return 0


def run_export_dense(args) -> int:
    output = _check_output(args.output, args.overwrite)
    model, tokenizer = _load_model(args.checkpoint, None, "cpu", args.dtype, need_tokenizer=False)
    if not getattr(model, "is_quantized", False):
        raise CLIError(f"{args.checkpoint} is not a permllm checkpoint (its config has no quantization_config)")
    from ..saving import save_pretrained

    save_pretrained(model.dequantize(), output, tokenizer, overwrite=args.overwrite)
    print(f"saved a dense copy to {output} (pruned weights are zeros; load it without optimum_permllm)")
    return 0


def run_info(args) -> int:
    from ..nn.validation import CheckpointError
    from ..sparsifier import sparsity_report

    try:
        model, _ = _load_model(args.checkpoint, None, "cpu", None, need_tokenizer=False, progress=False)
    except CheckpointError as error:
        print(f"{args.checkpoint}: {len(error.problems)} problem(s) found, the checkpoint does not load:", file=sys.stderr)
        for problem in error.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    report = sparsity_report(model)
    if not report:
        raise CLIError(f"{args.checkpoint} holds no sparse layers: it is not a permllm checkpoint")
    config = model.config.quantization_config
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    if args.json:
        layers = {name: {**entry, "shape": list(entry["shape"])} for name, entry in report.items()}
        print(json.dumps({"config": config, "layers": layers}, indent=2, default=str))
        return 0
    print(f"checkpoint: {args.checkpoint}")
    print(f"method: {config.get('metric')} pruning, permutation={config.get('permutation')}, "
          f"sparsity={config.get('sparsity')}, format version {config.get('format_version')}")
    _print_layers(report)
    print("checked: every permutation is a bijection, every mask keeps exactly "
          f"{config.get('sparsity')} and matches its packed values")
    return 0


def run_push(args) -> int:
    from ..integrations import hub

    hub.check_repo_id(args.repo_id)
    token = hub.resolve_token(args.token)
    results = json.loads(Path(args.results).read_text()) if args.results else None
    model, tokenizer = _load_model(args.checkpoint, None, "cpu", None, need_tokenizer=False)
    commit = hub.push_to_hub(model, tokenizer, args.repo_id, token=token, private=args.private,
                             commit_message=args.commit_message, results=results, base_model=args.base_model,
                             license=args.license)
    print(f"uploaded {args.checkpoint} to {args.repo_id}: {getattr(commit, 'commit_url', commit)}")
    return 0


def run_demo(args) -> int:
    from .demo import main as demo_main

    demo_main(args.demo_args, prog=args.permllm_prog)
    return 0


RUNNERS = {"prune": run_prune, "eval": run_eval, "export-dense": run_export_dense, "info": run_info,
           "push": run_push, "demo": run_demo}


# ------------------------------------------------------------------ entry points
def main(argv: list[str] | None = None) -> int:
    """Entry point of the `permllm` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return dispatch(args, parser)


def dispatch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run the chosen command; expected errors become one stderr line and an exit status."""
    run = getattr(args, "permllm_run", None)
    if run is None:
        parser.print_help()
        return 2
    try:
        return run(args)
    except UsageError as error:
        parser.error(f"{args.permllm_command}: {error}")
    except (CLIError, *EXPECTED_ERRORS) as error:
        if args.debug:
            raise
        print(f"{parser.prog} {args.permllm_command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


# ------------------------------------------------------------------ helpers
def _check_output(path: str, overwrite: bool) -> Path:
    """The output folder, refused before any work when it exists (unless --overwrite), is a file, or cannot be
    created there."""
    from ..saving import interrupted_backup

    output = Path(path)
    if output.exists() and (output.is_file() or not overwrite):
        raise CLIError(f"{output} already exists: choose another --output or pass --overwrite")
    backup = interrupted_backup(output)
    if backup is not None and not overwrite:  # the save would put it back first, then refuse
        raise CLIError(f"{output} already exists, moved aside to {backup} by an interrupted save (the next save "
                       "puts it back): choose another --output or pass --overwrite")
    _check_writable_place(output, "--output")
    return output


def _check_output_file(path: Path, option: str) -> None:
    """An output file, refused before any work when it is a folder or cannot be created there."""
    if path.is_dir():
        raise CLIError(f"{option} {path} is a folder: give a file name")
    _check_writable_place(path, option)


def _check_writable_place(path: Path, option: str) -> None:
    """Refuse `path` when its nearest existing parent is a file or a folder this user cannot write in, so that a
    long run does not fail only when it saves."""
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise CLIError(f"cannot create {option} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(f"cannot create {option} {path}: no permission to write in {parent}")


def _write_text_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


def _torch_dtype(name: str | None):
    import torch

    return None if name is None else getattr(torch, name)


def _device(name: str | None) -> str:
    """The --device to use (default: cuda when available, else cpu), refused when this machine does not have it."""
    import torch

    from ..pipeline.preflight import check_device

    return str(check_device(name)) if name else ("cuda" if torch.cuda.is_available() else "cpu")


def _load_model(source: str, tokenizer_source: str | None, device: str | None, dtype: str | None,
                need_tokenizer: bool = True, progress: bool = True):
    """Load a (sparse or dense) causal LM and its tokenizer; the tokenizer is None when optional and absent."""
    _check_source(source)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    kwargs = {"dtype": _torch_dtype(dtype)} if dtype else {}
    shown = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs).to(_device(device)).eval()
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source or source)
    except (OSError, ValueError, TypeError):
        if need_tokenizer:
            raise CLIError(f"no tokenizer found in {tokenizer_source or source}: pass --tokenizer")
        tokenizer = None
    return model, tokenizer


def _check_source(source: str) -> None:
    """A clear error for a model that is neither an existing folder nor shaped like a Hub id (namespace/name),
    before transformers tries the Hub with it."""
    if Path(source).expanduser().exists():
        return
    from ..saving import interrupted_backup

    backup = interrupted_backup(Path(source).expanduser())
    if backup is not None:
        raise CLIError(f"{source}: no such folder, but a save into it was interrupted and left the previous checkpoint "
                       f"in {backup}: rename it back (mv {backup} {source}), or save into {source} again, which "
                       "puts it back first")
    if source.startswith((".", "/", "~")) or source.count("/") != 1 or not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        raise CLIError(f"{source}: no such local folder (a Hub model id has the form namespace/name)")


def _load_dense(args):
    """The dense model to prune, from a Hub id/folder or a GGUF file (dequantized), with its tokenizer."""
    if not args.gguf_file:
        return _load_model(args.model, args.tokenizer, args.device, args.dtype)
    from ..data.assets import load_gguf

    model, tokenizer = load_gguf(args.gguf_file, _torch_dtype(args.dtype), args.tokenizer)
    return model.to(_device(args.device)).eval(), tokenizer


def _tasks(text: str, default: tuple[str, ...]) -> tuple[str, ...]:
    if text == "default":
        return tuple(default)
    if text in ("none", ""):
        return ()
    return tuple(task.strip() for task in text.split(",") if task.strip())


def _evaluation_note(args) -> str:
    text = args.text or "the held-out offline Wikipedia text"
    windows = f", first {args.max_windows} windows" if args.max_windows else ""
    limit = f"first {args.limit} validation rows per task" if args.limit else "full validation splits"
    return f"Perplexity on {text} ({args.seq_len}-token windows{windows}); zero-shot accuracy on the {limit}."


def _print_summary(model, headline: str) -> None:
    from ..sparsifier import sparsity_report

    report = sparsity_report(model)
    stored = sum(entry["bytes"] for entry in report.values())
    dense = sum(entry["dense_bytes"] for entry in report.values())
    print(f"{headline}: {len(report)} sparse layers, {stored / 2**20:.1f} MiB instead of {dense / 2**20:.1f} MiB dense")


def _print_layers(report: dict) -> None:
    width = max(len(name) for name in report)
    print(f"{'layer':<{width}}  {'shape':>12}  pattern  input order  {'bytes':>10}  {'dense':>10}")
    for name, entry in report.items():
        order = "permuted" if entry["permuted_input"] else "folded/none"
        shape = "x".join(map(str, entry["shape"]))
        print(f"{name:<{width}}  {shape:>12}  {entry['sparsity']:>7}  {order:>11}  {entry['bytes']:>10}  "
              f"{entry['dense_bytes']:>10}")
    stored = sum(entry["bytes"] for entry in report.values())
    dense = sum(entry["dense_bytes"] for entry in report.values())
    permuted = sum(entry["permuted_input"] for entry in report.values())
    print(f"{len(report)} sparse layers ({permuted} with a stored input permutation); "
          f"{stored} bytes stored vs {dense} dense ({100 * stored / dense:.0f}%)")


if __name__ == "__main__":
    sys.exit(main())
