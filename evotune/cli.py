"""Command line: thin parsing that dispatches to plain functions; exit code = result."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

EXIT_USER_ERROR = 2
EXIT_FAILURE = 1
EXIT_BROKEN_PIPE = 141


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evotune",
        description="Train Hugging Face causal LMs on InternEvo tokenized (ftdp) data.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train from a config file")
    train.add_argument("config", help="Python config file (XTuner style)")
    train.add_argument("--work-dir", help="output folder (default ./work_dirs/<config stem>)")
    train.add_argument(
        "--cfg-options",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override settings, e.g. max_length=2048 lr=1e-5 train_dataset.seed=7",
    )
    train.add_argument("--seed", type=int, help="shortcut for --cfg-options seed=N")
    train.add_argument(
        "--resume",
        metavar="auto|PATH",
        help="continue from the newest complete checkpoint in the work dir (auto) or from PATH",
    )
    train.add_argument(
        "--deepspeed",
        metavar="NAME_OR_JSON",
        help="deepspeed_zero1|2|3, deepspeed_zero2_offload, deepspeed_zero3_offload or a JSON file",
    )
    train.add_argument(
        "--fsdp",
        action="store_true",
        help="shortcut for --cfg-options engine=fsdp2 (PyTorch FSDP2; resumable on another layout)",
    )
    train.add_argument(
        "--launcher",
        choices=["none", "pytorch", "slurm"],
        default="none",
        help="slurm: one process per srun task; otherwise torchrun via NPROC_PER_NODE/NNODES",
    )
    train.add_argument(
        "--allow-unverified-model",
        action="store_true",
        help="train a model type evotune has not verified (shortcut for "
        "--cfg-options allow_unverified_model=True)",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in a work dir that holds an earlier run's checkpoints (deletes them)",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")

    export = commands.add_parser(
        "export", help="copy a checkpoint's Hugging Face folder (verified against its manifest)"
    )
    export.add_argument(
        "checkpoint",
        help="WORK_DIR/checkpoint-<step> (padded or not), or WORK_DIR for its newest intact one",
    )
    export.add_argument("--step", type=int, help="with a WORK_DIR: the checkpoint of this step")
    export.add_argument("-o", "--output", required=True, help="new folder for the HF model")
    export.add_argument(
        "--format",
        choices=["llama", "internlm2"],
        default="llama",
        help="llama: the HF folder as trained; internlm2: InternLM2's layout (fused wqkv, "
        "its config.json and remote code) for a model trained from an InternLM2 folder",
    )

    plot = commands.add_parser("plot", help="loss, LR, grad norm, tokens/s of work dirs -> PNG")
    plot.add_argument("work_dirs", nargs="+", metavar="WORK_DIR", help="one curve set per run")
    plot.add_argument("-o", "--output", default="curves.png", help="image file (.png/.pdf/.svg)")
    plot.add_argument(
        "--smooth", type=int, metavar="STEPS", help="EMA span (default: about 1/25 of the run)"
    )
    plot.add_argument("--x", choices=["step", "tokens"], default="step", help="x axis")

    report = commands.add_parser("report", help="one-screen summary of a finished or running run")
    report.add_argument("work_dir")
    report.add_argument("--json", action="store_true", help="print JSON instead of text")
    report.add_argument(
        "--verify",
        action="store_true",
        help="check every checkpoint's files against its manifest (reads them all)",
    )

    convert = commands.add_parser(
        "convert", help="migrate InternEvo and XTuner configs and InternEvo checkpoints"
    )
    convert_commands = convert.add_subparsers(dest="convert_command", required=True, metavar="WHAT")
    ckpt = convert_commands.add_parser(
        "internevo-ckpt",
        help="InternEvo checkpoint step folder (InternLM, InternLM2, Llama2) -> HF Llama",
    )
    ckpt.add_argument("checkpoint", help="save_ckpt_folder/<step> with model_tp*_pp*.pt")
    ckpt.add_argument("-o", "--output", required=True)
    ckpt.add_argument("--model-type", choices=["INTERNLM", "INTERNLM2_PUBLIC", "LLAMA2"])
    internlm2 = convert_commands.add_parser(
        "internlm2-to-llama", help="remote-code InternLM2 HF folder -> native Llama folder"
    )
    internlm2.add_argument("folder")
    internlm2.add_argument("-o", "--output", required=True)
    config = convert_commands.add_parser(
        "internevo-config", help="InternEvo config file -> evotune config file"
    )
    config.add_argument("config", help="an InternEvo config (.py)")
    config.add_argument("-o", "--output", required=True)
    config.add_argument("--world-size", type=int, default=8, help="GPUs of the InternEvo run")
    config.add_argument(
        "--internevo-root", help="InternEvo source tree, for configs._base_ imports"
    )
    config.add_argument("--model", help="HF model folder to train (e.g. from internevo-ckpt)")
    config.add_argument(
        "--allow-approximate",
        action="store_true",
        help="write the config even when a setting that changes the math cannot be honoured",
    )

    xtuner = convert_commands.add_parser(
        "xtuner-config", help="XTuner v0.1 config file -> evotune config file"
    )
    xtuner.add_argument("config", help="an XTuner config (.py); it is read, not run")
    xtuner.add_argument("-o", "--output", required=True)
    xtuner.add_argument(
        "--tokenized-dir",
        help="where 'evotune data tokenize' puts JSON/untokenized data (default: next to -o)",
    )
    xtuner.add_argument(
        "--allow-approximate",
        action="store_true",
        help="write the config even when a setting that changes the math cannot be honoured",
    )

    data = commands.add_parser("data", help="ftdp dataset tools")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="TOOL")
    order = data_commands.add_parser("order", help="write a data-order file for a folder")
    order.add_argument("folder")
    order.add_argument("-o", "--output", required=True)
    order.add_argument("--file-type", default=".bin")

    inspect = data_commands.add_parser("inspect", help="statistics of an ftdp folder")
    inspect.add_argument("folder")
    inspect.add_argument("--packed-length", type=int, default=4096)
    inspect.add_argument("--file-type", default=".bin")
    inspect.add_argument(
        "--meta-only",
        action="store_true",
        help="read only the .meta files (no per-line checks, no trainable share)",
    )
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.add_argument("--plot", metavar="PNG", help="write a histogram of sample lengths")

    check = data_commands.add_parser(
        "check", help="read every line of every shard: JSON, ids < vocab size, .meta vs file"
    )
    check.add_argument("folder")
    check.add_argument(
        "--vocab-size", type=int, required=True, help="the model's vocab size: abs(id) < N"
    )
    check.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
    check.add_argument("--file-type", default=".bin")
    check.add_argument("--json", action="store_true", help="print JSON instead of lines")

    tokenize = data_commands.add_parser(
        "tokenize", help="JSONL text or chat messages -> ftdp shards (non-assistant tokens negated)"
    )
    tokenize.add_argument("inputs", nargs="+", help="JSONL files, one sample per line")
    tokenize.add_argument("-o", "--output", required=True, help="ftdp folder to write")
    tokenize.add_argument("--tokenizer", required=True, help="HF tokenizer folder or hub id")
    tokenize.add_argument("--type", default="en", help="top-level type folder (default en)")
    tokenize.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    tokenize.add_argument("--text-key", default="text")
    tokenize.add_argument("--messages-key", default="messages")
    tokenize.add_argument(
        "--trained-roles", nargs="+", default=["assistant"], help="roles whose tokens carry loss"
    )
    tokenize.add_argument(
        "--format",
        choices=["jsonl", "xtuner", "internevo-untokenized"],
        default="jsonl",
        help="jsonl: {text}/{messages} lines; xtuner: XTuner {conversation}/{messages} records "
        "(.json list or .jsonl); internevo-untokenized: folders of .json message-list lines",
    )
    tokenize.add_argument(
        "--prompt-template",
        metavar="NAME",
        help="xtuner formats: an XTuner template (internlm2_chat, llama3_chat, qwen_chat, "
        "mistral, ...), 'tokenizer' (its chat template) or 'none'",
    )
    tokenize.add_argument(
        "--max-length", type=int, help="xtuner formats: cut each sample to N tokens as XTuner does"
    )
    tokenize.add_argument(
        "--file-type", default=".json", help="internevo-untokenized: input file suffix"
    )
    tokenize.add_argument(
        "--overwrite", action="store_true", help="replace shards that already exist"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        code = _dispatch(args, argv)
        sys.stdout.flush()  # a reader that left (`| head`) shows here, not at interpreter exit
    except BrokenPipeError:
        return _reader_gone()
    except KeyboardInterrupt:
        print("evotune: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # the one place that turns errors into exit codes
        return _report(error)
    return code


def _dispatch(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if args.command == "train":
        return _train(args, argv)
    if args.command == "data":
        return _data(args)
    if args.command == "export":
        return _export(args)
    if args.command == "convert":
        return _convert(args)
    if args.command == "plot":
        return _plot(args)
    if args.command == "report":
        return _run_report(args)
    return EXIT_FAILURE


def _reader_gone() -> int:
    """Stop quietly when stdout's reader closed the pipe, as unix tools do (exit 128 + SIGPIPE)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # the exit-time flush of what is left goes nowhere
    return EXIT_BROKEN_PIPE


def _report(error: BaseException) -> int:
    from .errors import UserError
    from .launch import record_failure

    if isinstance(error, UserError):
        code, cause = error.exit_code, str(error)
    else:
        traceback.print_exc()
        code, cause = EXIT_FAILURE, f"{type(error).__name__}: {error}"
    cause = " ".join(cause.split())  # one line, whatever the exception held
    print(f"evotune: error: {cause}", file=sys.stderr)
    record_failure(code, cause)
    return code


def _train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from . import launch
    from .train.run import run_training

    overrides = list(args.cfg_options)
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.deepspeed is not None:
        overrides.append(f"deepspeed={args.deepspeed}")
    if args.allow_unverified_model:
        overrides.append("allow_unverified_model=True")
    if args.fsdp:
        overrides.append("engine=fsdp2")
    if args.launcher == "slurm":
        launch.apply_slurm_environment()
    elif launch.wants_relaunch():
        launch.preflight(Path(args.config), overrides)  # a mistake costs a second, not N ranks
        return launch.relaunch(argv)
    return run_training(
        config_path=Path(args.config),
        overrides=overrides,
        work_dir=args.work_dir,
        resume=args.resume,
        overwrite=args.overwrite,
        show_progress=(not args.no_progress and sys.stderr.isatty())
        or os.environ.get("EVOTUNE_PROGRESS") == "1",
    )


def _convert(args: argparse.Namespace) -> int:
    if args.convert_command == "internevo-ckpt":
        from .convert.checkpoints import convert_internevo_checkpoint

        output = convert_internevo_checkpoint(
            Path(args.checkpoint), Path(args.output), args.model_type
        )
    elif args.convert_command == "internlm2-to-llama":
        from .convert.checkpoints import convert_internlm2_hf

        output = convert_internlm2_hf(Path(args.folder), Path(args.output))
    elif args.convert_command == "xtuner-config":
        from .convert.xtuner_config import convert_xtuner_config

        print(
            convert_xtuner_config(
                Path(args.config),
                Path(args.output),
                allow_approximate=args.allow_approximate,
                tokenized_dir=Path(args.tokenized_dir) if args.tokenized_dir else None,
            )
        )
        output = Path(args.output)
    else:
        from .convert.internevo_config import convert_internevo_config

        report = convert_internevo_config(
            Path(args.config),
            Path(args.output),
            world_size=args.world_size,
            internevo_root=args.internevo_root,
            model=args.model,
            allow_approximate=args.allow_approximate,
        )
        print(report)
        output = Path(args.output)
    print(f"wrote {output}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .train.checkpoint import export_hf, resolve_checkpoint

    checkpoint = resolve_checkpoint(args.checkpoint, args.step)
    if args.format == "internlm2":
        from .convert.checkpoints import export_checkpoint_as_internlm2

        output = export_checkpoint_as_internlm2(checkpoint, Path(args.output))
    else:
        output = export_hf(checkpoint, Path(args.output))
    print(f"exported {checkpoint} -> {output}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from .report.plot import plot_runs

    runs = plot_runs([Path(w) for w in args.work_dirs], Path(args.output), args.smooth, args.x)
    steps = ", ".join(str(run.train[-1]["step"]) for run in runs)
    print(f"wrote {args.output} (steps: {steps})")
    return 0


def _run_report(args: argparse.Namespace) -> int:
    import json

    from .report import format_summary, summarize

    summary = summarize(Path(args.work_dir), verify=args.verify)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def _data(args: argparse.Namespace) -> int:
    from .data import tools
    from .data.ftdp import write_data_order

    if args.data_command == "check":
        return _data_check(args)
    if args.data_command == "order":
        count = write_data_order(args.folder, args.output, args.file_type)
        print(f"wrote {count} shard paths to {args.output}")
    elif args.data_command == "inspect":
        report = tools.inspect_folder(
            args.folder, args.packed_length, args.file_type, read_tokens=not args.meta_only
        )
        print(tools.report_json(report) if args.json else tools.format_report(report))
        if args.plot:
            tools.plot_lengths(report, args.plot)
            print(f"wrote {args.plot}")
    elif args.data_command == "tokenize":
        results = tools.tokenize_files(
            args.inputs,
            args.output,
            args.tokenizer,
            args.type,
            args.workers,
            args.text_key,
            args.messages_key,
            args.trained_roles,
            input_format=args.format,
            prompt_template=args.prompt_template,
            max_length=args.max_length,
            file_type=args.file_type,
            overwrite=args.overwrite,
        )
        for row in results:
            dropped = f", {row['dropped']} dropped (no trained token)" if row["dropped"] else ""
            print(
                f"{row['shard']}: {row['samples']} samples, {row['tokens']} tokens, "
                f"{100 * row['trainable_share']:.1f}% trained{dropped} (verified)"
            )
            for warning in row["warnings"]:
                print(f"evotune: warning: {warning}", file=sys.stderr)
    return 0


def _data_check(args: argparse.Namespace) -> int:
    import json

    from .data.check import check_folder

    report = check_folder(
        args.folder,
        args.vocab_size,
        args.workers,
        args.file_type,
        emit=None if args.json else print,
    )
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        for note in report.notes:
            print(f"note: {note}")
        print(report.summary())
    return EXIT_USER_ERROR if report.problem_count else 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
