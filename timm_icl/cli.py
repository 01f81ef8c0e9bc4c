"""The ``timm-icl`` command: evaluate robustness, list layers, draw distortions, compare runs, push to the Hub.

    timm-icl eval MODEL --dataset fashion-mnist        # top-1/top-5 clean and under each noise/blur condition
    timm-icl layers MODEL                              # candidate pre-activation layers, default preset marked
    timm-icl distort IMAGE -o grid.png                 # the paper's ten conditions on a real image
    timm-icl compare a.json b.json                     # one table, 95% intervals, McNemar paired tests
    timm-icl push RUN_DIR user/name                    # upload an exported model (card re-rendered)

MODEL is a timm name (``resnet50.a1_in1k``), ``hf-hub:org/name``, ``local-dir:/path`` or a recipe run folder
(its exported model is ``RUN/model``). Errors are one line; set ``TIMM_ICL_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .utils.errors import first_line
from .utils.jsonio import json_safe

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``timm-icl eval: error: ...``) instead of usage + error."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown once: not appended where the help already says its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        skip = "default" in text.lower() or action.default is None or action.default is False or action.default == []
        if skip or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


# ---------------------------------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------------------------------
def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from .eval import format_corruption_table, format_table, load_results, plot_accuracy_vs_sigma, save_results
    from .eval.evaluate import evaluate_robustness

    try:
        from .data import create_loader, is_fashion_mnist
    except ImportError:
        raise ValueError("timm_icl.data is not available in this installation; cannot read datasets") from None
    from .data.flags import image_size_of, resolve_data_args
    from .data.preprocess import resolve_preprocessing
    from .distortions import parse_distortions

    resolve_data_args(args)
    run = _run_defaults(args.model)
    said = []  # what came from the run, said on stderr
    if args.distortions is None:
        args.distortions = run.get("distortions") or "paper"
        if run.get("distortions"):
            said.append(f"distortions {args.distortions!r} (the run's own, {run['distortions_from']})")
    if args.dataset is None:
        if not run.get("dataset"):
            raise ValueError("no dataset: pass --dataset NAME (fashion-mnist, a Hub id, hfds/...) or a data DIR")
        args.dataset = run["dataset"]
        said.append(f"dataset {args.dataset} ({run['dataset_from']})")
    if args.val_split is None and run.get("val_split") and args.dataset == run.get("dataset"):
        args.val_split = run["val_split"]
        said.append(f"split {args.val_split} (the run's validation split)")
    distortions = parse_distortions(args.distortions)  # fail on a typo before loading model and data
    baseline = load_results(args.baseline) if args.baseline else None  # and on a missing baseline file
    from .loading import create_model

    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    model = create_model(args.model, pretrained=not args.no_pretrained, **kwargs)
    # the model's own eval view (an exported model: what its training used, from config.json), overridable
    data_config = resolve_preprocessing(
        model,
        image_size=image_size_of(args),
        crop_pct=args.crop_pct,
        interpolation=args.interpolation,
        mean=args.mean,
        std=args.std,
    )
    accelerator = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under `accelerate launch` / torchrun: shard, sum counts
        from accelerate import Accelerator

        # without GPUs accelerate only sets up gloo across processes when told cpu=True (as in the recipe)
        accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank = accelerator.process_index if accelerator else 0
    world = accelerator.num_processes if accelerator else 1
    loader_kwargs = dict(
        data_config=data_config,
        batch_size=args.batch_size,
        num_workers=args.num_workers or 0,
        max_samples=args.max_samples,
        image_column=args.image_column,
        label_column=args.label_column,
        streaming=args.streaming,
        rank=rank,
        world_size=world,
    )
    split = args.val_split
    if split is None:  # validation when the dataset has one (ImageNet's test split has no labels), else test
        split = "test" if is_fashion_mnist(args.dataset) else "validation"
        try:
            loader, info = create_loader(args.dataset, split, **loader_kwargs)
        except ValueError as e:
            if "has no split" not in str(e):
                raise
            split = "test"
            loader, info = create_loader(args.dataset, split, **loader_kwargs)
    else:
        loader, info = create_loader(args.dataset, split, **loader_kwargs)
    if rank == 0:
        size = "x".join(str(s) for s in data_config["input_size"][1:])
        crop_from = " (the model's config.json: the crops its training used)" if run.get("is_export") else ""
        for line in said:
            print(f"{line}; pass the flag to change it", file=sys.stderr)
        print(
            f"split {info['split']}; crop {size}, crop_pct {data_config['crop_pct']:g}, "
            f"{data_config['interpolation']}, {data_config['crop_mode']}{crop_from}",
            file=sys.stderr,
        )
    if info.get("num_classes") and info["num_classes"] > model.num_classes:
        raise ValueError(
            f"the dataset has {info['num_classes']} classes but the model predicts {model.num_classes}; "
            "evaluate a model fine-tuned on this dataset (or pass --num-classes with --no-pretrained)"
        )
    if accelerator is not None:
        device = accelerator.device
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    results = evaluate_robustness(
        model,
        loader,
        distortions,
        mean=data_config["mean"],
        std=data_config["std"],
        seed=args.seed,
        device=device,
        accelerator=accelerator,
        progress=not args.quiet and rank == 0,
    )
    if accelerator is not None:
        # tear the process group down before exit: a live gloo group at interpreter exit can abort the process
        accelerator.end_training()
    if rank != 0:
        return 0
    name = args.name or _display_name(args.model)
    results.update(model=args.model, name=name, dataset=args.dataset, split=info["split"])
    results["preprocessing"] = json_safe(data_config)
    if baseline is not None or set(distortions.kinds()) - {"noise", "blur"}:
        # camera corruptions: one row per corruption (mean top-1 over its severities), CE and mCE with --baseline
        print(format_corruption_table({name: results}, baseline))
        if baseline is not None:
            from .eval import mean_corruption_error

            results["corruption_error"] = mean_corruption_error(results, baseline)
            results["corruption_error"]["baseline"] = baseline.get("name") or str(args.baseline)
    else:
        print(format_table({name: results}))
    if args.output:
        save_results(results, args.output)
        print(f"results: {args.output}", file=sys.stderr)
    if args.plot:
        # the --baseline model drawn too (dashed), so the plot shows what the corruption errors are relative to
        base_name = f"{baseline.get('name') or Path(args.baseline).stem} (baseline)" if baseline is not None else ""
        dataset = Path(args.dataset).name if Path(args.dataset).is_dir() else args.dataset  # no local path
        where = f" on {dataset} {info['split']}" if args.dataset else ""
        plot_accuracy_vs_sigma(
            {name: results}, args.plot, title=f"{name}{where}", reference=baseline, reference_name=base_name
        )
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0


def _run_defaults(model: str) -> dict:
    """What a run folder or exported folder says about how it was trained: ``distortions`` (validation's, else
    training's), ``dataset`` and ``val_split`` (config.yaml of a run folder; config.json records a Hub or
    Fashion-MNIST dataset, never a local path), with where each came from. Empty for a timm name."""
    import yaml

    path = Path(model.split(":", 1)[1] if model.startswith("local-dir:") else model)
    if not path.is_dir():
        return {}
    out: dict = {}
    for folder in (path, path / "model"):
        if (folder / "config.json").is_file():
            icl = json.loads((folder / "config.json").read_text()).get("icl") or {}
            out["is_export"] = True
            if icl.get("distortions"):
                out.update(distortions=icl["distortions"], distortions_from=f"{folder / 'config.json'}")
            if icl.get("dataset") and icl.get("dataset_source", "hub") in ("hub", "fashion-mnist"):
                out.update(dataset=icl["dataset"], dataset_from=f"{folder / 'config.json'}")
            break
    for folder in (path, path.parent):
        config_path = folder / "config.yaml"
        if config_path.is_file():
            config = yaml.safe_load(config_path.read_text()) or {}
            chosen = config.get("val_distortions") or config.get("distortions")
            if chosen:
                out.update(distortions=chosen, distortions_from=str(config_path))
            if config.get("dataset"):
                out.update(dataset=config["dataset"], dataset_from=str(config_path))
            if config.get("val_split") and str(config["val_split"]).lower() != "none":
                out["val_split"] = config["val_split"]
            break
    return out


def _display_name(model: str) -> str:
    path = Path(model.split(":", 1)[-1])
    if path.name == "model" and path.parent.name:
        return path.parent.name
    return path.name or model


# ---------------------------------------------------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------------------------------------------------
def _cmd_layers(args: argparse.Namespace) -> int:
    from .layers import candidate_layers
    from .loading import create_model

    model = create_model(args.model, pretrained=args.pretrained)
    input_size = tuple(args.input_size) if args.input_size else None
    rows = candidate_layers(model, input_size=input_size)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    width = max([len("layer")] + [len(r["layer"]) for r in rows])
    print(f"  {'layer':<{width}}  {'shape':<18} {'units':>9}")
    for r in rows:
        mark = "*" if r["default"] else " "
        print(f"{mark} {r['layer']:<{width}}  {str(list(r['shape'])):<18} {r['units']:>9}")
    defaults = [r["layer"] for r in rows if r["default"]]
    if defaults:
        # the recipe's form (recipes/train_icl.py --layers takes one comma-separated value)
        print(f"\n* default preset ({type(model).__name__}): --layers {','.join(defaults)}")
    else:
        print(f"\nno preset for {type(model).__name__}: choose deep layers above and pass them as --layers a,b")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# distort
# ---------------------------------------------------------------------------------------------------------------------
def _load_image(path: str, size: int, crop_pct: float = 1.0, interpolation: str = "bicubic"):
    """``[1, 3, size, size]`` float in [0, 1]: timm's eval crop (:mod:`timm_icl.data.preprocess`) of an image file."""
    from PIL import UnidentifiedImageError

    from .data.preprocess import preprocess_image, resolve_preprocessing, to_unit_float

    config = resolve_preprocessing(None, image_size=size, crop_pct=crop_pct, interpolation=interpolation)
    try:
        crop = preprocess_image(path, config=config)
    except FileNotFoundError:
        raise ValueError(f"no such image file: {path}") from None
    except UnidentifiedImageError:
        raise ValueError(f"{path} is not an image PIL can read") from None
    return to_unit_float(crop).unsqueeze(0)


def _cmd_distort(args: argparse.Namespace) -> int:
    from .distortions import Distortion, parse_distortions
    from .eval.evaluate import distort
    from .eval.plots import at_imagenet_c_levels, distortion_grid_title, distortion_panel_title, kind_title
    from .eval.stats import registered_kinds

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("the grid needs matplotlib: pip install 'timm-icl[plot]'") from None
    distortions = parse_distortions(args.distortions)
    image = _load_image(args.image, args.size, args.crop_pct, args.interpolation)
    kinds = distortions.kinds()
    registry = registered_kinds()
    ncols = 1 + max(len(distortions.of_kind(k)) for k in kinds)
    fig, axes = plt.subplots(
        len(kinds), ncols, figsize=(1.9 * ncols, 2.1 * len(kinds) + 0.6), squeeze=False, layout="constrained"
    )
    index = {c.name: i + 1 for i, c in enumerate(distortions)}
    for row, kind in zip(axes, kinds):
        panels = [Distortion("clean")] + distortions.of_kind(kind)
        levels = at_imagenet_c_levels(kind, [c.sigma for c in panels[1:]])
        for ax in row:
            ax.axis("off")
        for ax, cond in zip(row, panels):
            out = distort(image, cond, seed=args.seed, condition_index=index.get(cond.name, 0))
            ax.imshow(out[0].permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_title(distortion_panel_title(cond, levels), fontsize=8)
        # the row's kind (and family) left of its clean image: axis('off') hides y labels, so it is a text
        family = registry[kind].family if kind in registry else kind
        label = kind_title(kind) + (f"\n({family})" if family not in kind else "")
        row[0].text(-0.08, 0.5, label, transform=row[0].transAxes, rotation=90, ha="right", va="center", fontsize=9)
    fig.suptitle(distortion_grid_title(Path(args.image).name, args.size, args.distortions, distortions), fontsize=10)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=100)
    plt.close(fig)
    print(args.output)
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------------------------------------------------
def _cmd_compare(args: argparse.Namespace) -> int:
    from .eval import format_comparison, format_table, load_results, plot_accuracy_vs_sigma

    results: dict[str, dict] = {}
    for spec in args.results:
        name, sep, path = spec.partition("=")
        if not sep:
            path = spec
            loaded = load_results(path)
            name = loaded.get("name") or Path(path).stem
        else:
            loaded = load_results(path)
        base, i = name, 2
        while name in results:  # two runs called the same: keep both
            name, i = f"{base}#{i}", i + 1
        results[name] = loaded
    if args.baseline is not None and args.baseline not in results:
        raise ValueError(f"--baseline {args.baseline!r} is not one of the runs: {', '.join(results)}")
    problem = _incomparable(results)
    if problem and not args.force:
        raise ValueError(f"{problem}: the numbers are not on the same images and conditions (--force to compare)")
    if problem:
        print(f"warning: {problem} (compared anyway: --force)", file=sys.stderr)
    text = (
        format_table(results)
        + "\n\n"
        + format_comparison(results, baseline=args.baseline, per_condition=args.per_condition)
    )
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    if args.plot:
        # the baseline dashed black, the other runs in colour
        base = args.baseline if args.baseline is not None else None
        others = {n: r for n, r in results.items() if n != base}
        if base is not None and others:
            plot_accuracy_vs_sigma(others, args.plot, reference=results[base], reference_name=f"{base} (baseline)")
        else:
            plot_accuracy_vs_sigma(results, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0


def _incomparable(results: dict[str, dict]) -> str | None:
    """Why these results cannot be compared image for image (another dataset, split, sample count or distortion set),
    or None. Another noise seed is allowed: the images and conditions are the same."""
    checks = (
        ("dataset", lambda r: r.get("dataset")),
        ("split", lambda r: r.get("split")),
        ("sample count", lambda r: r.get("num_samples")),
        ("distortion set", lambda r: ",".join(sorted(r.get("conditions", {})))),
    )
    for what, get in checks:
        values = {name: get(r) for name, r in results.items()}
        if len({json.dumps(v, sort_keys=True, default=str) for v in values.values()}) > 1:
            shown = ", ".join(f"{name}: {v}" for name, v in values.items())
            return f"the results differ in {what} ({shown})"[:400]
    return None


# ---------------------------------------------------------------------------------------------------------------------
# push
# ---------------------------------------------------------------------------------------------------------------------
def _cmd_push(args: argparse.Namespace) -> int:
    from .hub import push_to_hub

    url = push_to_hub(args.run_dir, args.repo_id, private=args.private, commit_message=args.commit_message)
    print(url)
    return 0


# ---------------------------------------------------------------------------------------------------------------------
def _add_import(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE (or a .py file) first: its register_distortion calls make your kinds usable here; "
        "installed packages use the 'timm_icl.distortions' entry-point group instead (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    from .data.flags import add_data_args

    parser = _Parser(prog="timm-icl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"timm-icl {__version__}")
    parser.add_argument(
        "--import",
        dest="imports_main",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE (or a .py file) first, e.g. one that registers distortions (repeatable)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser(
        "eval",
        help="top-1/top-5 on clean images and under each noise/blur condition",
        formatter_class=_Formatter,
        description="Evaluate a model on clean images and on every condition of a distortion set.\n\n"
        "examples:\n"
        "  timm-icl eval runs/icl --dataset fashion-mnist --distortions small -o icl.json\n"
        "  timm-icl eval hf-hub:me/vgg16-icl --dataset ILSVRC/imagenet-1k --split validation --streaming\n"
        "  timm-icl eval resnet50.a1_in1k --dataset /data/imagenet-val --distortions imagenet-c\n"
        "  timm-icl eval runs/icl --dataset fashion-mnist --distortions imagenet-c-10 --baseline plain.json",
    )
    p.add_argument("model", help="timm name, hf-hub:ORG/NAME, local-dir:PATH, or a recipe run folder")
    add_data_args(p, training=False)  # the recipe's data flags, the same words (timm_icl.data.flags)
    p.add_argument(
        "--baseline",
        default=None,
        metavar="RESULTS.json",
        help="a baseline model's results on the same set (-o of an earlier eval): print corruption errors and mCE",
    )
    p.add_argument("-b", "--batch-size", type=int, default=64)
    p.add_argument(
        "--max-samples", "--max-val-samples", type=int, default=None, help="evaluate only the first N images"
    )
    _add_import(p)
    p.add_argument("--seed", type=int, default=0, help="noise seed (same seed, same numbers)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--num-classes", type=int, default=None, help="head size for --no-pretrained models")
    p.add_argument("--no-pretrained", action="store_true", help="random weights (for smoke tests)")
    p.add_argument("--name", default=None, help="run name in tables (default: from MODEL)")
    p.add_argument("-o", "--output", default=None, help="write results JSON (with per-image correctness) here")
    p.add_argument("--plot", default=None, help="write a PNG of accuracy against sigma here")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "layers",
        help="candidate pre-activation layers of a model, default preset marked",
        formatter_class=_Formatter,
        description="List where pre-activations can be captured, with output shapes; '*' marks the default preset.\n\n"
        "examples:\n"
        "  timm-icl layers vgg16\n"
        "  timm-icl layers convnext_tiny --input-size 3 224 224\n"
        "  timm-icl layers runs/icl --json",
    )
    p.add_argument("model", help="timm name, hf-hub:..., local-dir:... or a run folder")
    p.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"), default=None)
    p.add_argument("--pretrained", action="store_true", help="load weights (not needed for shapes)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_layers)

    p = sub.add_parser(
        "distort",
        help="grid image of the distortion conditions on a real image",
        formatter_class=_Formatter,
        description="Draw clean + every condition of a distortion set (the paper's ten by default) on an image.\n\n"
        "examples:\n"
        "  timm-icl distort photo.jpg -o grid.png\n"
        "  timm-icl distort photo.jpg --distortions imagenet-c --size 160 -o grid_c.png",
    )
    p.add_argument("image", help="an image file (jpg, png, ...)")
    p.add_argument("-o", "--output", default="distortions.png")
    p.add_argument(
        "--distortions", default="paper", help="a named set or registered kinds with severities (default: 'paper')"
    )
    _add_import(p)
    p.add_argument("--size", type=int, default=224, help="resize shorter side and centre-crop to SIZE px")
    p.add_argument("--crop-pct", type=float, default=1.0, help="resize the shorter side to SIZE/CROP_PCT first")
    p.add_argument("--interpolation", default="bicubic")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_distort)

    p = sub.add_parser(
        "compare",
        help="one table over several runs, with 95%% intervals and McNemar paired tests",
        formatter_class=_Formatter,
        description="Compare evaluation results (from `timm-icl eval -o`) on the same images and seed.\n\n"
        "examples:\n"
        "  timm-icl compare finetune.json mse.json icl.json\n"
        "  timm-icl compare FT=runs/ft/results.json ICL=runs/icl/results.json --baseline FT -o table.md",
    )
    p.add_argument("results", nargs="+", help="RESULT.json or NAME=RESULT.json (or a run folder with results.json)")
    p.add_argument("--baseline", default=None, help="run the others are tested against (default: the first)")
    p.add_argument("--per-condition", action="store_true", help="also test each condition (McNemar)")
    p.add_argument("-o", "--output", default=None, help="also write the Markdown here")
    p.add_argument("--plot", default=None, help="write a PNG of accuracy against sigma, one line per run")
    p.add_argument(
        "--force", action="store_true", help="compare results of different datasets, splits, sizes or distortions"
    )
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser(
        "push",
        help="upload an exported model folder to the Hugging Face Hub",
        formatter_class=_Formatter,
        description="Push RUN_DIR/model (or an exported folder) to the Hub; the card is re-rendered on every push.\n"
        "The token comes from HF_TOKEN or `hf auth login` (never a command-line flag).\n\n"
        "examples:\n"
        "  timm-icl push runs/icl me/vgg16-icl\n"
        "  timm-icl push runs/icl/model me/vgg16-icl --private",
    )
    p.add_argument("run_dir", help="a recipe run folder or an exported model folder")
    p.add_argument("repo_id", help="USER/NAME on the Hub")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--commit-message", default=None)
    p.set_defaults(func=_cmd_push)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from .distortions.plugins import load_distortion_plugins
        from .utils.launch import cpu_launch_mismatch

        load_distortion_plugins([*args.imports_main, *getattr(args, "imports", [])])
        mismatch = cpu_launch_mismatch()
        if mismatch and int(os.environ.get("LOCAL_RANK", "0")) == 0:
            print(f"timm-icl: warning: {mismatch}", file=sys.stderr)
        return args.func(args)
    except KeyboardInterrupt:
        print("timm-icl: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for users; TIMM_ICL_DEBUG=1 shows the traceback
        if os.environ.get("TIMM_ICL_DEBUG"):
            raise
        kind = "" if isinstance(e, (ValueError, RuntimeError)) else f"{type(e).__name__}: "
        print(f"timm-icl {args.command}: error: {kind}{first_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
