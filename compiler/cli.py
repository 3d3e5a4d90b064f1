"""The `kiln` command line: argument parsing only; the work is in driver/api.

Exit codes: 0 success, 1 a user error (one clear line, plus a hint), 2 bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

from compiler.errors import KilnError

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args)
    except KilnError as err:
        _report(err, args, internal=False)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("kiln: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except Exception as err:  # a bug in kiln: still one line unless --debug
        _report(err, args, internal=True)
        return EXIT_ERROR


def _report(err: BaseException, args: argparse.Namespace, internal: bool) -> None:
    if getattr(args, "debug", False):
        traceback.print_exception(err)
    if internal:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"kiln: internal error: {type(err).__name__}: {first}", file=sys.stderr)
        if not getattr(args, "debug", False):
            print("  hint: rerun with --debug for a traceback, and report it", file=sys.stderr)
        return
    print(f"kiln: error: {err}", file=sys.stderr)
    hint = getattr(err, "hint", None)
    if hint:
        for i, line in enumerate(hint.splitlines()):
            print(f"  {'hint: ' if i == 0 else '      '}{line}", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    common.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")

    parser = argparse.ArgumentParser(
        prog="kiln", description="Compile trained models into deployable artifacts.", parents=[common]
    )
    parser.add_argument("--version", action="version", version=f"kiln {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("compile", parents=[common], help="compile a model into an artifact folder")
    c.add_argument("model", help="model file (.onnx)")
    c.add_argument("--target", "-t", default="x86_64-linux-gnu", help="target triple or preset (see `kiln targets`)")
    c.add_argument("--device", help="cpu (default), cuda[:sm_XX], opencl, vulkan, metal, webgpu")
    c.add_argument("--emit", default="onnx", help="artifact format (default onnx)")
    c.add_argument("-O", dest="opt_level", type=int, default=1, choices=[0, 1, 2, 3], help="optimization level (default 1)")
    c.add_argument("--passes", help="pass pipeline; replaces the -O pipeline (see `kiln passes`)")
    c.add_argument("-o", "--output", required=True, help="artifact folder to create (replaced atomically)")
    c.add_argument("--dump-ir", metavar="DIR", help="write the IR after each pass into DIR")
    c.add_argument("--no-verify", dest="verify", action="store_false", help="skip running the artifact against the model")
    c.add_argument("--seed", type=int, default=0, help="seed of the verification inputs")
    c.add_argument("-v", "--verbose", action="store_true", help="print per-pass timings")
    q = c.add_argument_group("quantization")
    q.add_argument("--quantize", metavar="SCHEME",
                   help="w8, w4, int8, int8-dynamic, fp16, bf16, gptq-w4, awq-w4; options as w4{block-size=64}")
    q.add_argument("--calibration", metavar="PATH",
                   help=".npz of inputs (samples along axis 0), a folder of .npz/.npy files, or a folder of images; "
                        "for --emit gguf from an LLM checkpoint: text (a file or folder of .txt) for an importance matrix")
    q.add_argument("--calibration-preprocess", metavar="SPEC",
                   help="image preparation: imagenet|unit|symmetric|raw[,resize=N,crop=N,scale=X,mean=A:B:C,std=A:B:C]")
    q.add_argument("--accuracy-budget", metavar="EXPR",
                   help="e.g. cosine>=0.99, top1-agreement>=0.98, sqnr>=30: keep sensitive layers in float until it holds")
    q.add_argument("--keep-float", metavar="NODES", default="", help="comma-separated node names never quantized")
    pr = c.add_argument_group("pruning")
    pr.add_argument("--prune", metavar="SPEC",
                    help="structured pruning, e.g. channels=0.3,heads=0.25,ffn=0.2,hidden=0.2,criterion=l2 (see README)")
    pr.add_argument("--prune-recover", metavar="METHOD", help="lstsq: refit the layers after each cut on --calibration")
    b = c.add_argument_group("--emit tvm")
    b.add_argument("--params", choices=["embedded", "external"],
                   help="weights inside lib.so (default) or in a params/ tensor cache beside it")
    b.add_argument("--tune-trials", type=int, metavar="N", help="MetaSchedule trials for the slowest kernels (default 0)")
    b.add_argument("--tuning-db", metavar="DIR", help="keep MetaSchedule records in DIR and reuse them across compiles")
    b.add_argument("--static-dim", action="append", default=[], metavar="NAME=N",
                   help="fix a symbolic dim (e.g. batch=1) so its kernels can be tuned")
    c.set_defaults(func=_cmd_compile)

    r = sub.add_parser("run", parents=[common], help="run an artifact (or an .onnx model) on this host")
    r.add_argument("artifact", help="artifact folder or .onnx model")
    r.add_argument("--inputs", "-i", help=".npz of inputs keyed by tensor name (default: seeded random)")
    r.add_argument("--output", "-o", help="write outputs to this .npz, keyed by tensor name")
    r.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    r.add_argument("--dim", action="append", default=[], metavar="NAME=N", help="size of a symbolic dimension for random inputs")
    r.add_argument("--emulate", action="store_true", help="run an artifact for another architecture under qemu (tvm)")
    r.add_argument("--rpc", metavar="HOST:PORT", help="run on a device through TVM's RPC server (tvm)")
    r.set_defaults(func=_cmd_run)

    g = sub.add_parser("generate", parents=[common], help="greedy text generation with an LLM package (--emit mlc)")
    g.add_argument("artifact", help="an --emit mlc artifact folder compiled from an LLM checkpoint")
    g.add_argument("--prompt", "-p", required=True, help="the prompt text")
    g.add_argument("--max-tokens", "-n", type=int, default=32, help="new tokens at most (default 32)")
    g.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-sequence token")
    g.set_defaults(func=_cmd_generate)

    i = sub.add_parser("inspect", parents=[common], help="describe a model file or an artifact folder")
    i.add_argument("path")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=_cmd_inspect)

    t = sub.add_parser("targets", parents=[common], help="list target triples, devices, presets and emit formats")
    t.add_argument("--json", action="store_true", help="print JSON")
    t.set_defaults(func=_cmd_targets)

    p = sub.add_parser("passes", parents=[common], help="list passes, their options and the -O pipelines")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_passes)
    return parser


def _version() -> str:
    from compiler import __version__

    return __version__


def _cmd_compile(args: argparse.Namespace) -> int:
    from compiler.driver import CompileOptions, compile_model

    options = CompileOptions(
        target=args.target, device=args.device, emit=args.emit, opt_level=args.opt_level,
        passes=args.passes, verify=args.verify, dump_ir=args.dump_ir, seed=args.seed, quiet=args.quiet,
        quantize=args.quantize, calibration=args.calibration, calibration_preprocess=args.calibration_preprocess,
        accuracy_budget=args.accuracy_budget, keep_float=tuple(n for n in args.keep_float.split(",") if n),
        prune=args.prune, prune_recover=args.prune_recover,
        emit_options=_emit_options(args),
    )
    log = (lambda msg: print(f"kiln: {msg}", file=sys.stderr)) if args.verbose and not args.quiet else None
    result = compile_model(args.model, args.output, options, log=log)
    if result.pruning is not None and not args.quiet and not args.verbose:
        for line in result.pruning.summary():
            print(f"kiln: {line}", file=sys.stderr)
    if result.quantization is not None:
        for line in result.quantization.warnings:
            print(f"kiln: warning: {line}", file=sys.stderr)
        if not args.quiet and not args.verbose:
            for line in result.quantization.summary():
                print(f"kiln: {line}", file=sys.stderr)
    if args.verbose and not args.quiet:
        print(f"{'pass':<40} {'ms':>9}  modified", file=sys.stderr)
        for rec in result.report.records:
            print(f"{rec.spec:<40} {rec.seconds * 1000:>9.2f}  {'yes' if rec.modified else 'no'}", file=sys.stderr)
    if not args.quiet:
        ver = result.manifest["verification"]
        runtime = "llama.cpp" if result.manifest["emit"] == "gguf" else "onnxruntime"
        check = (f"verified against {runtime} (max abs error {ver['max_abs_error']:.3g})"
                 if ver.get("passed") else f"not verified: {ver.get('skipped')}")
        total = sum(f["bytes"] for f in result.manifest["files"])
        print(f"{result.path}: {result.manifest['emit']} for {result.manifest['target']['name']}, "
              f"{total:,} bytes, {check}")
        for note in result.manifest.get("backend", {}).get("notes", []):
            print(f"kiln: note: {note}", file=sys.stderr)
    return EXIT_OK


def _emit_options(args: argparse.Namespace) -> dict:
    """Backend options given on the command line (only the ones set)."""
    given = {"params": args.params, "tune_trials": args.tune_trials, "tuning_db": args.tuning_db,
             "static_dims": _parse_dims(args.static_dim) or None}
    options = {k: v for k, v in given.items() if v is not None}
    if options and args.emit != "tvm":
        flags = ", ".join("--" + k.replace("_", "-") for k in options)
        raise KilnError(f"{flags} apply to --emit tvm, not --emit {args.emit}")
    return options


def _parse_dims(items: list[str]) -> dict[str, int]:
    dims = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or not value.strip().isdigit():
            raise KilnError(f"--dim {item!r}: expected NAME=N")
        dims[name.strip()] = int(value)
    return dims


def _cmd_run(args: argparse.Namespace) -> int:
    import numpy as np

    from compiler.signature import check_inputs, random_inputs

    runner, signature, where = _open_runnable(Path(args.artifact), emulate=args.emulate, rpc=args.rpc)
    if args.inputs:
        inputs = _load_npz(Path(args.inputs))
        inputs = check_inputs(inputs, signature["inputs"], args.inputs)
    else:
        inputs = random_inputs(signature["inputs"], seed=args.seed, dims=_parse_dims(args.dim))
    outputs = runner.run(inputs)
    if args.output:
        _save_npz(Path(args.output), outputs)
    if not args.quiet:
        for name, value in outputs.items():
            value = np.asarray(value)
            stats = ""
            if value.dtype.kind in "fiub" and value.size:
                v = value.astype(np.float64)
                stats = f" min {v.min():.6g} max {v.max():.6g} mean {v.mean():.6g}"
            print(f"{name}: {value.dtype} {list(value.shape)}{stats}")
        if args.output:
            print(f"wrote {args.output}", file=sys.stderr)
    return EXIT_OK


def _open_runnable(path: Path, emulate: bool = False, rpc: str | None = None):
    """An artifact folder runs with its backend; a bare .onnx model runs with onnxruntime."""
    if path.is_dir():
        from compiler.api import load_artifact

        art = load_artifact(path)
        art.check()
        if emulate or rpc:
            from targets import get_backend

            backend = get_backend(art.manifest["emit"])
            if not set(getattr(backend, "RUN_OPTIONS", ())) >= {"emulate", "rpc"}:
                raise KilnError(f"--emulate and --rpc apply to tvm artifacts, not {art.manifest['emit']}")
            return backend.load(path, art.manifest, emulate=emulate, rpc=rpc), art.manifest["signature"], str(path)
        if "emulate" in getattr(_backend_of(art.manifest), "RUN_OPTIONS", ()):
            return _backend_of(art.manifest).load(path, art.manifest, emulate=False), art.manifest["signature"], str(path)
        return art._runner, art.manifest["signature"], str(path)
    if emulate or rpc:
        raise KilnError("--emulate and --rpc apply to tvm artifact folders, not to a bare model")
    from compiler.importers.onnx_file import import_onnx
    from compiler.signature import signature
    from targets.onnx.run import OrtRunner

    model, _ = import_onnx(path)
    return OrtRunner(path), signature(model), str(path)


def _backend_of(manifest: dict):
    from targets import get_backend

    return get_backend(manifest["emit"])


def _load_npz(path: Path) -> dict:
    import numpy as np

    if not path.is_file():
        raise KilnError(f"{path}: no such inputs file")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as err:
        raise KilnError(f"{path}: not a readable .npz of arrays ({type(err).__name__}: {err})") from None


def _save_npz(path: Path, outputs: dict) -> None:
    import numpy as np

    path = Path(os.path.abspath(path))
    if not path.parent.is_dir():
        raise KilnError(f"{path.parent}: no such folder for the outputs file")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **outputs)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _cmd_generate(args: argparse.Namespace) -> int:
    from targets.mlc.generate import generate_text

    result = generate_text(Path(args.artifact), args.prompt, args.max_tokens, ignore_eos=args.ignore_eos)
    print(result.text)
    if not args.quiet:
        g = result.generation
        print(f"kiln: {len(g.prompt)} prompt tokens in {g.prefill_seconds * 1000:.1f} ms, {len(g.tokens)} generated "
              f"({g.decode_tokens_per_second:.1f} tokens/s decoding)", file=sys.stderr)
    return EXIT_OK


def _cmd_inspect(args: argparse.Namespace) -> int:
    from compiler.inspect_model import format_summary, inspect_path, to_json

    info, title = inspect_path(Path(args.path))
    print(to_json(info) if args.json else format_summary(info, title))
    return EXIT_OK


def _cmd_targets(args: argparse.Namespace) -> int:
    from targets import available_emits
    from targets.triple import format_targets_table, list_targets

    rows = list_targets()
    emits = set(available_emits())
    for row in rows:  # show only the formats whose backend is installed
        row["emit"] = {dev: [e for e in fmts if e in emits] for dev, fmts in row["emit"].items()}
    print(json.dumps(rows, indent=2) if args.json else format_targets_table(rows, emits=emits))
    return EXIT_OK


def _cmd_passes(args: argparse.Namespace) -> int:
    from compiler.passes import OPT_LEVELS, pass_options, registry
    from passes.quantize.schemes import scheme_table

    passes = registry()
    if args.json:
        out = {
            "passes": {
                name: {"summary": cls.summary, "options": [{"name": n, "type": t, "default": d} for n, t, d in pass_options(cls)]}
                for name, cls in passes.items()
            },
            "opt_levels": {f"O{k}": v for k, v in OPT_LEVELS.items()},
            "quantization_schemes": scheme_table(),
        }
        print(json.dumps(out, indent=2))
        return EXIT_OK
    print("passes:")
    for name, cls in passes.items():
        print(f"  {name:<24} {cls.summary}")
        for opt, typ, default in pass_options(cls):
            print(f"  {'':<24}   {opt}={typ} (default {default})")
    print("\noptimization levels (-O3 as on a CPU target whose runtime has onnxruntime contrib ops):")
    for level, pipeline in OPT_LEVELS.items():
        print(f"  -O{level}  {pipeline or '(no passes)'}")
    print("\npipeline syntax: name{opt=value,...},name,...; fixpoint(a,b){max-iterations=N} repeats until nothing changes")
    print("\nquantization schemes (--quantize NAME or NAME{option=value,...}):")
    for row in scheme_table():
        needs = " [needs --calibration]" if row["calibration"] else ""
        print(f"  {row['name']:<24} {row['summary']}{needs}")
        for opt, default in row["options"].items():
            print(f"  {'':<24}   {opt} (default {str(default).lower() if isinstance(default, bool) else default})")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
