"""`cnnlab` command line: thin — parses, calls the library, prints."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

EXAMPLES = """examples:
  cnnlab train recipes/demo.yaml                       train the demo recipe
  cnnlab train recipes/demo.yaml optim.lr=0.01 train.epochs=5 --out runs/fast
  cnnlab train - data.source=folder:~/photos model.name=resnet18   (defaults + overrides)
  cnnlab eval runs/demo                                re-evaluate on the saved test split
  cnnlab predict runs/demo photos/ cat.png --top-k 3   classify files and folders
  cnnlab export runs/demo                              ONNX model + parity check (then: predict … --onnx)
  cnnlab explain runs/demo photos/cat.png              where the model looked (Grad-CAM figure)
  cnnlab tune recipes/harahap2024-tune.yaml --jobs 2   search settings, re-validate the winner
  cnnlab lr-find recipes/demo.yaml                     the learning-rate range test
  cnnlab config recipes/demo.yaml                      show the fully resolved config
  cnnlab config --keys                                 every key, its default and meaning
  cnnlab track runs/demo --mlflow default              a run, study or tune → MLflow (also: --tensorboard)
  cnnlab datasets | cnnlab models
"""


def _resolve_config(arg: str | None):
    """A path, a bare recipe name found in ./recipes, or '-' / None for the defaults."""
    if arg in (None, "-"):
        return None
    from .config import ConfigError, find_recipe

    path = find_recipe(arg)
    if path is None:
        raise ConfigError(f"config file not found: {arg}")
    return path


def _launch_processes(a) -> int:
    """`cnnlab train … --nproc N`: the same command as N processes under torchrun (one machine, gloo on the
    CPU, NCCL on GPUs); for several machines, start `torchrun … -m cnnlab train …` on each yourself."""
    import subprocess

    from .hardware import cores_each

    rest, skip = [], False
    for arg in a._argv:
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        rest.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.nproc}",
           "-m", "cnnlab", *rest]
    from .proc import die_with_parent

    env = {**os.environ, "OMP_NUM_THREADS": str(cores_each(a.nproc))}
    # torchrun ends with this process (and its workers with it: proc.follow_parent)
    return subprocess.run(cmd, env=env, preexec_fn=die_with_parent if sys.platform.startswith("linux") else None
                          ).returncode


def _cmd_train(a) -> int:
    from .api import train

    if a.nproc is not None:
        from .training.distributed import launched

        if a.nproc > 1 and not launched():
            return _launch_processes(a)

    overrides = list(a.overrides)
    config = a.config
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides.insert(0, config)  # `cnnlab train --resume RUN key=value`: no config, an override
        config = None
    if a.resume is None and config is None:
        from .config import ConfigError

        raise ConfigError("give a CONFIG (a YAML file, a recipe name or '-'), or --resume RUN_DIR")
    force = [k.strip() for item in a.force for k in item.split(",") if k.strip()]
    train(_resolve_config(config) if config is not None else None, overrides, out=a.out, runs_root=a.runs_root,
          progress=a.progress, quiet=a.quiet, report=not a.no_report, resume=a.resume, force=force)
    return 0


def _print_metrics(m: dict) -> None:
    from .display import printable as P  # class names are folder names: never print their control codes raw
    from .stats import chance_of, format_p

    lo, hi = m["accuracy_ci95"]
    print(f"evaluated on: {P(m['evaluated_on'])} ({m['n']} images)")
    print(f"loss {m['loss']:.4f}   accuracy {m['accuracy']:.4f}  (95% Wilson CI {lo:.4f}–{hi:.4f})")
    ch, k = m["chance"], len(m["classes"])
    print(f"chance level {chance_of(m):.4f}: the better of always answering "
          f"{ch.get('majority_of', 'the training split')}'s most frequent class '{P(ch['majority_class'])}' "
          f"({ch['accuracy']:.4f} of these images) and 1/{k} classes; accuracy above it: "
          f"{format_p(ch.get('p_value_above_chance'))}")
    print(f"{'class':<16}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}")
    for c, r in m["per_class"].items():
        print(f"{P(c):<16}{r['precision']:>10.4f}{r['recall']:>10.4f}{r['f1']:>10.4f}{r['support']:>9}")
    for avg in ("macro", "weighted"):
        print(f"{avg + ' avg':<16}{m['precision_' + avg]:>10.4f}{m['recall_' + avg]:>10.4f}{m['f1_' + avg]:>10.4f}")
    if m.get("caution"):
        print(f"caution: {m['caution']}")


def _cmd_eval(a) -> int:
    from .api import evaluate

    m = evaluate(a.run, data=a.data, device=a.device)
    if a.json:
        print(json.dumps(m, indent=2))
    else:
        _print_metrics(m)
    return 0


def _cmd_predict(a) -> int:
    from .api import predict

    if a.onnx is not None:  # ONNX Runtime with the .onnx file alone (default RUN/model.onnx); no PyTorch model
        from .export import ONNX_FILE, ExportError, predict_onnx

        path = Path(a.onnx) if a.onnx else Path(a.run) / ONNX_FILE
        if a.device != "cpu":
            raise ExportError("--onnx runs on the CPU (ONNX Runtime's CPUExecutionProvider): drop --device")
        if not a.onnx and not path.is_file():
            raise ExportError(f"{path} does not exist: export the run first (cnnlab export {a.run}), "
                              "or give the file: --onnx FILE")
        results = predict_onnx(path, a.paths, top_k=a.top_k)
    else:
        results = predict(a.run, a.paths, top_k=a.top_k, device=a.device)
    return _print_file_results(results, a, aligned=True)


def _print_file_results(results: list[dict], a, aligned: bool = False, after=lambda r: "") -> int:
    """predict's and explain's output: a line per file (its top classes, or its error) or the JSON.
    2: no image files; 1: some file failed; 0: all done."""
    from .display import printable as P

    if not results:
        print("no image files found in: " + " ".join(a.paths), file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(results, indent=2))
    width = min(60, max(len(P(r["file"])) for r in results)) if aligned else 0
    for r in results if not a.json else []:
        if "error" in r:
            print(f"{P(r['file']):<{width}}  ERROR: {P(r['error'])}")
        else:
            tops = "   ".join(f"{P(t['class'])} {t['probability']:.3f}" for t in r["top"])
            print(f"{P(r['file']):<{width}}  {tops}{after(r)}")
    return 1 if any("error" in r for r in results) else 0


def _cmd_export(a) -> int:
    """0: exported, parity proven; 1: the ONNX model failed its parity check (export.json says how); 2: errors."""
    from .export import TOLERANCE, ParityError, export_run, format_report

    try:
        r = export_run(a.run, a.out, fmt=a.format, opset=a.opset,
                       tolerance=TOLERANCE if a.tolerance is None else a.tolerance)
    except ParityError as e:
        print(json.dumps(e.report, indent=2) if a.json else "\n".join(format_report(e.report, a.run)))
        _error(f"cnnlab: error: {e}")
        return 1
    lines = format_report(r, a.run) + [f"wrote {Path(a.run) / 'export.json'}"]
    print(json.dumps(r, indent=2) if a.json else "\n".join(lines))
    return 0


def _cmd_explain(a) -> int:
    from .display import printable as P
    from .explain import explain_files
    from .runs import load_run

    results = explain_files(load_run(a.run), a.paths, out_dir=a.out, top_k=a.top_k, target=getattr(a, "cls", None))
    return _print_file_results(results, a, after=lambda r: f"  → {P(r['figure'])}")


def _cmd_datasets(a) -> int:
    from .data import list_datasets

    if a.action == "inspect":
        from .config import ConfigError
        from .data.inspect import format_inspection, inspect_folder

        if not a.source or not a.source.startswith("folder:"):
            raise ConfigError("usage: cnnlab datasets inspect folder:PATH [--image-size N] [--channels 1|3] [--json]")
        report = inspect_folder(Path(os.path.expanduser(a.source[len("folder:"):])), a.image_size,
                                channels=a.channels, progress=sys.stderr.isatty())
        print(json.dumps(report, indent=1) if a.json else format_inspection(report))
        return 0

    for name, doc in list_datasets().items():
        print(f"{name:<18}{doc}")
    return 0


def _cmd_models(a) -> int:
    from .models import MODELS, create_model, describe_model, list_models
    from .models.weights import imagenet_offline, imagenet_source

    print(f"{'name':<20}{'parameters':>12}  {'input':>5}  {'ImageNet weights':<18}description")
    for name in list_models():
        info = MODELS.info[name]
        size = info.get("input_size")
        params = sum(p.numel() for p in create_model(name, 10, 3, size or 64).parameters())
        src = imagenet_source(name)
        weights = "—" if src is None else "offline here" if imagenet_offline(name) else (
            "pip package" if src[0] == "package" else "download (once)")
        print(f"{name:<20}{params:>12,}  {size or 'any':>5}  {weights:<18}{describe_model(name)}")
    print("parameters: 10 classes, RGB, at the input size (64 px where any); input: the size its ImageNet "
          "weights expect (model.weights=imagenet uses it unless data.image_size is set)")
    return 0


def _executor(a):
    """The executor of `compare` / `tune`: None for the local one (run_study / run_tune make it from --jobs)."""
    if a.executor != "ray":
        if a.address:
            raise ValueError("--address is the Ray cluster's: give it with --executor ray")
        return None
    from .study.ray_executor import RayExecutor

    return RayExecutor(address=a.address, cpus_per_run=a.cpus_per_run, jobs=a.jobs)


def _cmd_compare(a) -> int:
    """0 when every run finished, 1 when some failed (they are retried by running the same command again)."""
    from .study.runner import failed_runs, resolve_study, run_study

    executor = _executor(a)
    try:
        study_dir = run_study(resolve_study(a.study), jobs=1 if a.jobs is None else a.jobs, out=a.out,
                              overrides=a.overrides, executor=executor)
    finally:
        if executor is not None:
            executor.close()
    failed = failed_runs(study_dir)
    if failed:
        print(f"cnnlab: {failed} run(s) failed; see summary.json and the runs' .log files "
              "(run the same command again to retry them)", file=sys.stderr)
        return 1
    return 0


def _cmd_lr_find(a) -> int:
    from .lrfind import check_settings, lr_find

    check_settings(a.start, a.end, a.steps, names={"start_lr": "--start", "end_lr": "--end", "steps": "--steps"})
    r = lr_find(_resolve_config(a.config), a.overrides, start_lr=a.start, end_lr=a.end, steps=a.steps, out=a.out,
                progress=sys.stderr.isatty())
    print(f"{r['steps_taken']} of {a.steps} steps, rate {a.start:.1e} → {r['last_lr']:.1e}"
          + (f"; stopped early: {r['stopped_early']}" if r["stopped_early"] else ""))
    if r["suggested_lr"] is not None:
        print(f"suggested learning rate: {r['suggested_lr']:.2e}  (steepest descent of the smoothed loss)")
    else:
        print("suggested learning rate: none (the loss did not fall; try a lower --start, more --steps, or check "
              "the data)")
    if r["min_loss_lr"] is not None:
        print(f"rate at the minimum smoothed loss: {r['min_loss_lr']:.2e}")
    print(f"wrote: {r['csv']}, {r['json']}, {r['png']}")
    if r["override"]:
        print(f"to use it: {r['override']}")
    return 0


def _cmd_tune(a) -> int:
    """0 when the search is settled (and re-validated), 1 when trials are still to run (the time budget ran out
    first: rerun to go on)."""
    from .tune.runner import run_tune

    executor = _executor(a)
    try:
        tune_dir = run_tune(a.tune, trials=a.trials, jobs=1 if a.jobs is None else a.jobs, storage=a.storage,
                            out=a.out, timeout=a.timeout, executor=executor, revalidate=not a.no_revalidate)
    finally:
        if executor is not None:
            executor.close()
    from .runs import read_json

    summary = read_json(tune_dir / "summary.json")
    c = summary["counts"]
    return 0 if c["complete"] + c["pruned"] + c["fail"] >= summary["trials_asked"] else 1


def _cmd_report(a) -> int:
    if (Path(a.folder) / "tune.json").is_file():  # a tune folder: its own page
        from .tune.report import write_tune_report

        print(f"report: {write_tune_report(a.folder)}")  # as for a run or a study
        return 0
    from .report import main_report

    return main_report(a)


def _cmd_track(a) -> int:
    """0 when every tracker took the folder, 1 when one failed (its warning line says why; run it again later)."""
    from .tracking import TrackingError, track_folder

    if not a.mlflow and not a.tensorboard:
        raise TrackingError("nothing to do: give --mlflow URI (or --mlflow default) and/or --tensorboard")
    _, result = track_folder(a.folder, a.mlflow, a.experiment, a.tensorboard, info=print)
    return 1 if any(isinstance(v, dict) and "error" in v for v in result.values()) else 0


def _cmd_config(a) -> int:
    from .config import describe_keys, dump_config, load_config

    if a.keys:
        rows = describe_keys()
        kw, dw = (max(len(r[i]) for r in rows) + 2 for i in (0, 1))  # columns as wide as the longest entry
        for key, default, meaning in rows:
            print(f"{key:<{kw}}{default:<{dw}}{meaning}")
        return 0
    print(dump_config(load_config(_resolve_config(a.config), a.overrides)), end="")
    return 0


def _error(text: str) -> None:
    """An error line on stderr; names and paths in it shown escaped (no raw terminal control codes)."""
    from .display import printable_lines

    print(printable_lines(text), file=sys.stderr)


def _executor_options(p: argparse.ArgumentParser) -> None:
    """Where `compare` / `tune` runs go: child processes here, or Ray tasks on a cluster."""
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: child processes here (default); ray: Ray tasks on a cluster (pip install "
                   "'cnnlab[ray]'; the output folder must be on storage every node shares)")
    p.add_argument("--address", metavar="HOST:PORT", help="the Ray cluster's head (as `ray start --head` prints it, "
                   "or auto); default with --executor ray: a local Ray started for this command")
    p.add_argument("--cpus-per-run", type=float, default=1, metavar="N",
                   help="with --executor ray: CPUs Ray reserves for each run, and its train.threads (default 1)")


def _at_least_one(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"a whole number ≥ 1 is needed; got {text!r}")
    return n


def _run_and_images(p: argparse.ArgumentParser, json_help: str) -> None:
    """The arguments `predict` and `explain` share: the run folder, the images, top-k and --json."""
    p.add_argument("run", help="run folder")
    p.add_argument("paths", nargs="+", help="image files or folders")
    p.add_argument("-k", "--top-k", type=_at_least_one, default=3, help="how many classes to show per image (default 3)")
    p.add_argument("--json", action="store_true", help=json_help)


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    p = argparse.ArgumentParser(prog="cnnlab", description="Run, compare and report CNN image-classification "
                                "experiments from one YAML config.", epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"cnnlab {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train one experiment and write its run folder",
                       description="Train CONFIG (a YAML file, a recipe name in ./recipes, or '-' for the "
                       "defaults) with key=value overrides; writes config.yaml, split.json, history.csv, "
                       "metrics.json, model.safetensors and env.json to the run folder.",
                       epilog="overrides use dotted keys: data.source=folder:PATH data.image_size=64 "
                       "model.name=mlp optim.name=sgd optim.lr=0.1 train.epochs=20 train.seed=1 "
                       "train.early_stopping.patience=5 (see `cnnlab config --keys`)")
    t.add_argument("config", nargs="?", help="YAML config, recipe name, or '-' (not needed with --resume)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    t.add_argument("--out", help="run folder to create (must be new or empty); default runs/<name>[-N]")
    t.add_argument("--runs-root", default="runs", help="parent of auto-named run folders (default: runs)")
    t.add_argument("--progress", choices=["auto", "bar", "plain", "none"], help="progress display")
    t.add_argument("-q", "--quiet", action="store_true", help="print nothing")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its checkpoint")
    t.add_argument("--force", action="append", default=[], metavar="KEYS",
                   help="with --resume: config keys allowed to differ, comma-separated (e.g. train.epochs), or all")
    t.add_argument("--no-report", action="store_true", help="skip plots/ and report.html (`cnnlab report` later)")
    t.add_argument("--nproc", type=_at_least_one, metavar="N", help="train this one run with N processes (data parallel, "
                   "torchrun: gloo on the CPU, one GPU each on CUDA); data.batch_size is the global batch")
    t.set_defaults(fn=_cmd_train)

    e = sub.add_parser("eval", help="re-evaluate a saved model",
                       description="Evaluate RUN's best model on its saved test split (reproducing "
                       "metrics.json), or on every image of --data (class names must match).")
    e.add_argument("run", help="run folder")
    e.add_argument("--data", help="another source, e.g. folder:PATH")
    e.add_argument("--device", default="cpu")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    e.set_defaults(fn=_cmd_eval)

    pr = sub.add_parser("predict", help="classify image files or folders with a saved model",
                        description="Top-k classes with probabilities for each image; folders are searched "
                        "recursively. Unreadable files are reported, not fatal (exit code 1).")
    _run_and_images(pr, "print JSON instead of a table")
    pr.add_argument("--device", default="cpu")
    pr.add_argument("--onnx", nargs="?", const="", metavar="FILE", help="classify with ONNX Runtime from an "
                    "exported model (default RUN/model.onnx; see `cnnlab export`); put it after the paths")
    pr.set_defaults(fn=_cmd_predict)

    ex = sub.add_parser("export", help="export a run's model to ONNX, with a parity check against PyTorch",
                        description="Export RUN's model (eval, float32, fused blocks off; input: the normalised "
                        "(N, C, H, W) tensor, dynamic batch; classes, size and normalisation in the file's "
                        "metadata) with torch.onnx.export(dynamo=True), falling back to the TorchScript exporter "
                        "only if that fails. Then ONNX Runtime and PyTorch classify the run's whole test split "
                        "(validation when it had none): the file is written only when every probability agrees "
                        "within the tolerance and the top-1 class on ≥ 99.9 % of the images; RUN/export.json "
                        "records the numbers. Needs pip install 'cnnlab[onnx]'.")
    ex.add_argument("run", help="run folder")
    ex.add_argument("--format", choices=["onnx"], default="onnx", help="onnx (the only one)")
    ex.add_argument("--out", metavar="FILE", help="the ONNX file to write (default RUN/model.onnx)")
    ex.add_argument("--tolerance", type=float, metavar="P", help="largest allowed difference of a softmax "
                    "probability between ONNX Runtime and PyTorch (default 1e-4)")
    ex.add_argument("--opset", type=int, metavar="N", help="ONNX opset (default: the exporter's own)")
    ex.add_argument("--json", action="store_true", help="print export.json's content")
    ex.set_defaults(fn=_cmd_export)

    x = sub.add_parser("explain", help="Grad-CAM heatmaps: where the model looked, for image files",
                       description="For each image: the top classes and a figure (the image, and the image under "
                       "the Grad-CAM heatmap of the predicted class, from the model's last convolution layer).")
    _run_and_images(x, "print JSON")
    x.add_argument("--out", help="folder for the figures (default RUN/explain)")
    x.add_argument("--class", dest="cls", metavar="NAME", help="explain this class instead of the predicted one")
    x.set_defaults(fn=_cmd_explain)

    d = sub.add_parser("datasets", help="list the data sources, or inspect a folder before training",
                       description="Without arguments: the built-in sources. `inspect folder:PATH`: classes, "
                       "counts, image sizes, imbalance, duplicates (label conflicts, train/test leaks) and "
                       "bad files, before any training.")
    d.add_argument("action", nargs="?", choices=["inspect"])
    d.add_argument("source", nargs="?", help="folder:PATH")
    d.add_argument("--image-size", type=int, help="size to check the memory budget at (default 64)")
    d.add_argument("--channels", type=int, choices=[1, 3], help="channels for the memory estimate")
    d.add_argument("--json", action="store_true", help="print JSON")
    d.set_defaults(fn=_cmd_datasets)
    m = sub.add_parser("models", help="list the registered models")
    m.set_defaults(fn=_cmd_models)

    s = sub.add_parser("compare", help="run a study: variants × seeds, each its own run; table, tests, figures",
                       description="Run STUDY.yaml (a base config, a grid and/or named variants, seeds): every "
                       "run is a normal run folder in its own process; finished runs are skipped on a rerun. "
                       "Writes the comparison table (Markdown, CSV, LaTeX), paired tests, figures and report.html.")
    s.add_argument("study", help="study YAML, or a recipe name in ./recipes")
    s.add_argument("overrides", nargs="*", metavar="key=value",
                   help="settings for every run, over the study's own (e.g. data.source=folder:~/photos)")
    s.add_argument("--jobs", "-j", type=int, help="runs at once (default 1; with --executor ray: the cluster's "
                   "CPUs / --cpus-per-run)")
    s.add_argument("--out", help="study folder (default studies/<study file name without .yaml>)")
    _executor_options(s)
    s.set_defaults(fn=_cmd_compare)

    lf = sub.add_parser("lr-find", help="learning-rate range test: suggest optim.lr for a config",
                        description="Train CONFIG's model on its training data for --steps steps while the "
                        "learning rate grows exponentially from --start to --end (stopping once the smoothed loss "
                        "diverges), then suggest a rate: the steepest descent of the smoothed loss. The weights "
                        "are not kept. Writes lr_find.csv, lr_find.json and lr_find.png to --out.")
    lf.add_argument("config", help="YAML config, recipe name, or '-' for the defaults")
    lf.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    lf.add_argument("--start", type=float, default=1e-7, help="first learning rate (default 1e-7)")
    lf.add_argument("--end", type=float, default=10.0, help="last learning rate (default 10)")
    lf.add_argument("--steps", type=int, default=100, help="optimiser steps, at least 10 (default 100)")
    lf.add_argument("--out", help="folder for the results (default lr-find/<config name>)")
    lf.set_defaults(fn=_cmd_lr_find)

    tu = sub.add_parser("tune", help="search a config's settings (Optuna), then re-validate the best on fresh seeds",
                        description="Run TUNE.yaml: a base run config, a search space over config keys, a trial "
                        "budget and an objective on the validation split (trials never see the test split). Every "
                        "trial is an ordinary run folder; kill it at any time and run the same command again to go "
                        "on. When every trial is settled, the best few are re-trained on fresh seeds and compared "
                        "with the base config on the test split (McNemar, paired t-test, Holm-corrected); the "
                        "verdict says whether tuning really helped. Writes summary.json, best.yaml, report.html.")
    tu.add_argument("tune", help="tune YAML, or a recipe name in ./recipes")
    tu.add_argument("--trials", type=int, help="number of trials (over the file's `trials`)")
    tu.add_argument("--timeout", help="start no trial after this long: 600, 20m, 2h (over the file's)")
    tu.add_argument("--jobs", "-j", type=int, help="trials at once in this process (default 1; with --executor "
                    "ray: the cluster's CPUs / --cpus-per-run)")
    tu.add_argument("--storage", help="Optuna storage shared by workers: postgresql://USER@HOST/DB, sqlite:///F, "
                    "journal:FILE (default journal:TUNE_DIR/optuna.journal)")
    tu.add_argument("--out", help="tune folder (default tunes/<name>)")
    tu.add_argument("--no-revalidate", action="store_true", help="search only (another worker re-validates)")
    _executor_options(tu)
    tu.set_defaults(fn=_cmd_tune)

    r = sub.add_parser("report", help="write report.html (and figures) for a run or study folder",
                       description="One self-contained HTML page (images embedded, no network) with the config, "
                       "history, metrics, table, figures and the statistical statements.")
    r.add_argument("folder", help="run or study folder")
    r.add_argument("--replot", action="store_true", help="redraw the figures even if up to date")
    r.set_defaults(fn=_cmd_report)

    tr = sub.add_parser("track", help="upload a run, study or tune folder made earlier to MLflow / TensorBoard",
                        description="Read FOLDER (a run: config.yaml + metrics.json; a study: plan.json; a tune: "
                        "tune.json) and log it: MLflow params (the config), per-epoch metrics, test metrics, tags "
                        "and the folder's files as artifacts (a study / tune: a parent run, each run a child); "
                        "TensorBoard event files in each RUN/tensorboard/. Tracking a folder again reuses what it "
                        "uploaded before (FOLDER/tracking.json). Needs pip install 'cnnlab[mlflow]' / "
                        "'cnnlab[tensorboard]'.")
    tr.add_argument("folder", help="run, study or tune folder")
    tr.add_argument("--mlflow", metavar="URI", help="tracking URI: sqlite:///PATH.db, http(s)://HOST:PORT, … or "
                    "default (sqlite:///<the folder's parent>/mlflow.db)")
    tr.add_argument("--experiment", metavar="NAME", help="MLflow experiment (default: the run's config name, or "
                    "the study's / tune's name)")
    tr.add_argument("--tensorboard", action="store_true", help="also write TensorBoard event files (RUN/tensorboard/)")
    tr.set_defaults(fn=_cmd_track)

    c = sub.add_parser("config", help="print a resolved config, or every key with --keys")
    c.add_argument("config", nargs="?", help="YAML config or recipe name (default: the defaults)")
    c.add_argument("overrides", nargs="*", metavar="key=value")
    c.add_argument("--keys", action="store_true", help="list every key with its default and meaning")
    c.set_defaults(fn=_cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    from .proc import follow_parent

    follow_parent()  # a study's child run ends with the study (SIGTERM: a clean stop with a checkpoint)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)
    if extra:  # key=value overrides after an option (`cnnlab train - --out X train.epochs=1`)
        if hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "fn", None):
        parser.print_help()
        return 0
    from .config import ConfigError
    from .data import DataError
    from .models.weights import WeightsError
    from .runs import RunError
    from .training.checkpoint import CheckpointError
    from .training.loop import TrainingDiverged, TrainingInterrupted

    try:
        return args.fn(args)
    except TrainingDiverged as e:
        _error(f"cnnlab: training diverged: {e}")
        return 3
    except TrainingInterrupted as e:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a late second Ctrl-C must not turn a clean stop into a crash
        _error(f"cnnlab: {e}")
        return 130
    except CheckpointError as e:
        _error(f"cnnlab: error: {e}")
        return 2
    except BrokenPipeError:  # `cnnlab … | head`
        sys.stderr.close()
        return 0
    except OSError as e:  # disk full, unwritable folder, …: nothing already saved is touched
        if os.environ.get("CNNLAB_DEBUG"):
            raise
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        _error(f"cnnlab: error: cannot read or write{where}: {e.strerror or e}")
        return 2
    except (ConfigError, DataError, RunError, WeightsError, ValueError, FileNotFoundError, RuntimeError) as e:
        if os.environ.get("CNNLAB_DEBUG"):
            raise
        _error(f"cnnlab: error: {e}")
        return 2
    except KeyboardInterrupt:
        print("cnnlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
