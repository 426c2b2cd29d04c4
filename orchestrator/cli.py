"""The `rlgrad` command line.

    rlgrad run search_spaces/quickstart.yaml            # embedded local Ray, offline
    rlgrad run SPEC --address auto --results s3://bucket/rlgrad
    rlgrad validate SPEC                                # check a file, list its trials
    rlgrad validate --resolved SPEC                     # every trial's complete config, as YAML
    rlgrad config [WORKLOAD]                            # workloads, or one's config fields
    rlgrad status [SWEEP]                               # sweeps, or one sweep's trials
    rlgrad report SWEEP                                 # re-aggregate, rebuild report.html
    rlgrad query "SELECT ... FROM inputs ..."           # DuckDB SQL over the Parquet tables
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import json
import os
import sys
import textwrap

from .spec import SpecError, grid_points, load_spec, resolved_trials_yaml

EXAMPLES = """examples:
  rlgrad config                       # the workloads a stage can run
  rlgrad config extract               # extract's config fields: type, default, meaning
  rlgrad validate --resolved search_spaces/quickstart.yaml
  rlgrad run search_spaces/quickstart.yaml
  rlgrad run search_spaces/quickstart.yaml --address auto --results s3://my-bucket/rlgrad
  rlgrad status quickstart
  rlgrad report quickstart
  rlgrad query "SELECT trial, avg(reward_std) AS std, avg(grad_norm) AS g FROM inputs GROUP BY trial"
  rlgrad import sft_vs_rft_mlp_mnist_finetune_experiments_plan.json -o search_spaces/mine.yaml

tables (one row per ...): samples (input, sample), inputs (input), metrics (step, metric, split), trials (trial).
Every row carries sweep, stage, trial and config_hash.
"""


def _error(message: str, code: int = 2) -> int:
    print(f"rlgrad: error: {message}", file=sys.stderr)
    return code


def _cmd_run(args) -> int:
    from .console import Console, set_console
    from .driver import SweepError

    con = set_console(Console(verbose=args.verbose))
    try:
        return _run(args, con)
    except SweepError as e:
        con.release()
        return _error(str(e), 1)
    except KeyboardInterrupt:
        con.release()
        print("\n[rlgrad] interrupted: run the same command again to continue; finished trials are skipped",
              file=sys.stderr)
        return 130
    finally:
        con.release()  # Ray's output back on fds 1 and 2; errors raised from here print as `rlgrad: error:`


def _run(args, con) -> int:
    from .aggregate import AggregationError, aggregate_sweep
    from .driver import run_sweep
    from .report import build_report

    spec, _ = load_spec(args.spec)
    results = args.results or spec.results
    outcome = run_sweep(spec, results, address=args.address, show_progress=args.verbose and not args.quiet,
                        max_concurrent=args.max_concurrent, num_cpus=args.num_cpus, capture_logs=True,
                        wait_for_nodes_s=args.wait_for_nodes)
    try:
        summary = aggregate_sweep(results, spec.sweep)
    except AggregationError as e:
        con.release()
        return _error(f"aggregating {outcome.sweep_dir}: {e}", 1)
    report = build_report(results, spec.sweep)
    if summary.path:
        con.line(f"per-input table: {summary.path} ({summary.num_inputs} input rows from {summary.num_samples} samples)")
    con.line(f"report: {report}")
    con.line(f"query it: rlgrad query --results {results} --sweep {spec.sweep} \"SELECT * FROM inputs LIMIT 5\"")
    if con.log_dir:
        con.line(f"Ray's and the workers' logs: {con.log_dir}" + ("" if con.verbose else " (driver.log)"))
    if outcome.failed:
        con.line(f"{len(outcome.failed)} trial(s) failed: " + ", ".join(o.trial.trial_id for o in outcome.failed),
                 error=True)
        return 1
    return 0


def _cmd_validate(args) -> int:
    spec, _ = load_spec(args.spec)
    if args.resolved:
        sys.stdout.write(resolved_trials_yaml(spec, args.spec))
        return 0
    print(f"{args.spec}: OK -- sweep {spec.sweep!r}, {len(spec.stages)} stage(s)")
    for stage in spec.stages:
        if stage.search.optuna:
            n = f"{stage.search.optuna.num_samples} Optuna trials"
        else:
            n = f"{len(grid_points(stage))} trial(s)"
        per = f" per finished trial of {stage.from_stage!r}" if stage.from_stage else ""
        s = stage.scaling
        base = f"; config from {stage.config_from!r}" if stage.config_from else ""
        print(f"  {stage.name}: {stage.workload}, {n}{per}; {s.num_workers} worker(s) x {s.resources_per_worker()}{base}")
    return 0


TERMINAL_WIDTH = 100


def _summary(config_cls) -> str:
    """The first line of a config's docstring: what the workload does."""
    return (inspect.getdoc(config_cls) or "").strip().splitlines()[0] if config_cls.__doc__ else ""


def _cmd_config(args) -> int:
    from workloads import WORKLOADS
    from workloads.core.config import describe_fields

    if args.workload is None:
        print("workloads (a stage's `workload:`; `rlgrad config WORKLOAD` lists its config fields):")
        width = max(map(len, WORKLOADS))
        for name, workload in WORKLOADS.items():
            line = f"  {name:<{width}}  {_summary(workload.config)}"
            print(line if len(line) <= TERMINAL_WIDTH else line[:TERMINAL_WIDTH - 3] + "...")
        return 0
    if args.workload not in WORKLOADS:
        close = difflib.get_close_matches(args.workload, list(WORKLOADS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return _error(f"unknown workload {args.workload!r}{hint}; allowed: {', '.join(sorted(WORKLOADS))}")
    config_cls = WORKLOADS[args.workload].config
    doc = inspect.getdoc(config_cls) or ""
    print(f"{args.workload}: {config_cls.__name__}")
    for paragraph in doc.split("\n\n"):
        print(textwrap.fill(" ".join(paragraph.split()), TERMINAL_WIDTH, initial_indent="  ", subsequent_indent="  "))
    checkpoint_field = getattr(config_cls, "checkpoint_field", None)
    if checkpoint_field:
        print(f"  `from_stage:` fills {checkpoint_field!r} with an earlier stage's checkpoint.")
    if getattr(config_cls, "produces_checkpoint", False):
        print("  Writes a checkpoint that a later stage can start from (`from_stage:`).")
    rows = describe_fields(config_cls)
    name_width = max(len(name) for name, *_ in rows)
    print("\nfields (keys of a stage's `config:`; dotted names reach nested configs, e.g. in `search:`):\n")
    for name, type_name, default, description in rows:
        head = f"{name:<{name_width}}  {type_name}"
        head = f"{head} = {default}" if len(head) + len(default) + 3 <= TERMINAL_WIDTH else f"{head}\n    = {default}"
        print(head)
        print(textwrap.fill(description, TERMINAL_WIDTH, initial_indent="    ", subsequent_indent="    "))
    return 0


def _cmd_report(args) -> int:
    from .aggregate import aggregate_sweep
    from .query import list_sweeps
    from .report import build_report

    if args.sweep not in list_sweeps(args.results):
        return _error(f"no sweep named {args.sweep!r} under {args.results}; sweeps there: "
                      f"{', '.join(list_sweeps(args.results)) or 'none'}")
    summary = aggregate_sweep(args.results, args.sweep)
    if summary.path:
        print(f"per-input table: {summary.path} ({summary.num_inputs} rows)")
    print(f"report: {build_report(args.results, args.sweep)}")
    return 0


def _cmd_query(args) -> int:
    from .query import run_query

    table = run_query(args.results, args.sql, args.sweep or None)
    if table is None:
        return 0
    if args.output:
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        if args.output.endswith(".parquet"):
            pq.write_table(table, args.output)
        else:
            pacsv.write_csv(table, args.output)
        print(f"{table.num_rows} rows written to {args.output}")
        return 0
    if args.format == "json":
        for row in table.to_pylist():
            print(json.dumps(row, default=str))
    elif args.format == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, sys.stdout.buffer)
    else:
        import pandas as pd

        with pd.option_context("display.max_rows", args.max_rows, "display.max_columns", 50,
                               "display.width", 200, "display.max_colwidth", 60):
            print(table.to_pandas().to_string(max_rows=args.max_rows, index=False))
    return 0


def _cmd_status(args) -> int:
    from .query import list_sweeps, run_query

    sweeps = list_sweeps(args.results)
    if not args.sweep:
        if not sweeps:
            print(f"no sweeps under {args.results}")
            return 0
        table = run_query(args.results, "SELECT sweep, count(*) AS trials, "
                                        "count(*) FILTER (WHERE status = 'ERROR') AS failed FROM trials GROUP BY sweep ORDER BY sweep")
        done = {r["sweep"]: r for r in table.to_pylist()}
        for s in sweeps:
            r = done.get(s, {"trials": 0, "failed": 0})
            print(f"{s}: {r['trials']} trial(s) recorded, {r['failed']} failed")
        return 0
    if args.sweep not in sweeps:
        return _error(f"no sweep named {args.sweep!r} under {args.results}; sweeps there: {', '.join(sweeps) or 'none'}")
    table = run_query(args.results, "SELECT stage, trial, status, params, metrics FROM trials ORDER BY stage, trial",
                      [args.sweep])
    for row in table.to_pylist():
        metrics = json.loads(row["metrics"] or "{}")
        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float) and not k.startswith(("time", "timestamp")))
        print(f"{row['stage']:<12} {row['trial']:<24} {row['status']:<10} params={row['params']}  {shown[:160]}")
    return 0


def _cmd_import(args) -> int:
    """An original apple/ml-rlgrad config -> a sweep file of ours, validated before it is written."""
    import yaml

    from .spec import parse_spec

    from .import_notes import notes_table, render

    try:
        if args.source.endswith(".json"):
            from .import_plan import import_plan_file_with_notes

            spec, notes = import_plan_file_with_notes(args.source, args.sweep, args.pretrain_plan)
        else:
            from .import_rl4lms import import_rl4lms_file_with_notes

            spec, notes = import_rl4lms_file_with_notes(args.source, args.sft_config)
            if args.sweep:
                spec["sweep"] = args.sweep
    except OSError as e:
        raise SpecError(f"{args.source}: cannot read it: {e.strerror}") from None
    text = render(spec, notes, args.source)
    _validate_imported(text, spec, args.output or "<imported>")
    sys.stderr.write(notes_table(notes))
    if args.output:
        if os.path.exists(args.output) and not args.force:
            raise SpecError(f"{args.output} exists; pass --force to overwrite it")
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {args.output}: sweep {spec['sweep']!r}, {len(spec['stages'])} stage(s)")
    else:
        sys.stdout.write(text)
    return 0


def _validate_imported(text: str, spec: dict, source: str) -> None:
    """Refuse to write what `rlgrad run` would refuse -- except what only the machine
    that runs the sweep must have (hub, datasets, WordNet), and the config of a stage
    whose workload is not registered yet (NLPO): its PPO part is validated, the rest
    deferred, and that is said."""
    import yaml

    from workloads import WORKLOADS, validate_config
    from workloads.core.availability import runtime_data_assumed

    from .import_rl4lms import NLPO_FIELDS
    from .spec import parse_spec

    with runtime_data_assumed():
        unregistered = [s for s in spec["stages"] if s["workload"] not in WORKLOADS]
        if not unregistered:
            parse_spec(text, source=source)
            return
        for stage in unregistered:
            if stage["workload"] != "nlpo":
                raise SpecError(f"{source}: stage {stage['name']!r}: unknown workload {stage['workload']!r}")
            ppo_part = {k: v for k, v in stage["config"].items() if k not in NLPO_FIELDS.values()}
            ppo_part.setdefault("model", "@sft/trial")  # from_stage fills it in
            try:
                validate_config("ppo", ppo_part)
            except Exception as error:  # pydantic's ValidationError: say which stage
                raise SpecError(f"{source}: stage {stage['name']!r} (PPO part): {error}") from None
        registered = {**spec, "stages": [s for s in spec["stages"] if s["workload"] in WORKLOADS]}
        if registered["stages"]:
            parse_spec(yaml.safe_dump(registered, sort_keys=False), source=source)
        names = ", ".join(repr(s["name"]) for s in unregistered)
        sys.stderr.write(f"rlgrad import: stage(s) {names} use workload 'nlpo', not registered yet: their PPO "
                         f"fields validated, the NLPO fields ({', '.join(NLPO_FIELDS.values())}) deferred "
                         "(docs/fidelity.md)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlgrad", description="Ray-distributed sweeps that measure (and fix) vanishing gradients in "
                                   "reinforcement finetuning of language models.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a sweep file on Ray (an embedded local cluster unless --address)",
                         description="Validate SPEC, run its stages as Ray Tune trials of Ray Train workers, "
                                     "aggregate the Parquet shards and write report.html. Rerunning the same "
                                     "file continues an interrupted sweep, skipping finished trials.")
    run.add_argument("spec", help="sweep file (YAML), e.g. search_spaces/quickstart.yaml")
    run.add_argument("--results", help="results root: a local directory or a URI such as s3://bucket/prefix "
                                       "(default: the file's `results`, else ./results)")
    run.add_argument("--address", help="Ray cluster to join: 'auto', an IP:port or ray://host:10001 "
                                       "(default: start an embedded local cluster)")
    run.add_argument("--max-concurrent", type=int, help="trials of a stage run at once (default: as many as the "
                                                         "cluster's CPUs/GPUs fit)")
    run.add_argument("--num-cpus", type=int, help="CPUs of the embedded cluster (default: all)")
    run.add_argument("--verbose", "-v", action="store_true",
                     help="show Ray's, Tune's and the workers' output (and their progress bars) on the console; "
                          "by default it goes to <results>/<sweep>/logs/driver.log")
    run.add_argument("--quiet", action="store_true", help="with --verbose: no per-worker progress bars")
    run.add_argument("--wait-for-nodes", type=float, default=900, metavar="SECONDS",
                     help="on an autoscaling cluster, how long a stage whose workers do not fit waits for new "
                          "nodes before the run fails (default 900); a cluster that cannot grow refuses such "
                          "a stage at once")
    run.set_defaults(func=_cmd_run)

    validate = sub.add_parser("validate", help="check a sweep file and list the trials it would run",
                              description="Check SPEC as `rlgrad run` would (nothing runs, nothing is written) "
                                          "and list its stages and trial counts.")
    validate.add_argument("spec", help="sweep file (YAML)")
    validate.add_argument("--resolved", action="store_true",
                          help="print every trial as YAML instead: stage, trial id, workload, parent trial, "
                               "searched values and the complete config with every default filled "
                               "(Optuna stages: the base config and the search space)")
    validate.set_defaults(func=_cmd_validate)

    config = sub.add_parser("config", help="list the workloads, or print one's config fields with types, "
                                           "defaults and descriptions",
                            description="Without WORKLOAD: the workloads a stage can name, each with what it does. "
                                        "With WORKLOAD: every field of its config -- dotted name (generation."
                                        "temperature; model[mlp].hidden_sizes for each member of a union), type, "
                                        "default and description -- i.e. every key a stage's `config:` accepts.")
    config.add_argument("workload", nargs="?", help="a workload name, e.g. extract")
    config.set_defaults(func=_cmd_config)

    status = sub.add_parser("status", help="list sweeps, or one sweep's trials with their state and metrics")
    status.add_argument("sweep", nargs="?")
    status.add_argument("--results", default="results", help="results root (default: ./results)")
    status.set_defaults(func=_cmd_status)

    report = sub.add_parser("report", help="re-aggregate a sweep's shards and rebuild its report.html")
    report.add_argument("sweep")
    report.add_argument("--results", default="results", help="results root (default: ./results)")
    report.set_defaults(func=_cmd_report)

    query = sub.add_parser("query", help="run SQL (DuckDB) over the tables samples, inputs, metrics, trials",
                           description="Run SQL over the sweeps' Parquet tables. Views: samples, inputs, metrics, "
                                       "trials; each is the union over the chosen sweeps.")
    query.add_argument("sql")
    query.add_argument("--results", default="results", help="results root (default: ./results)")
    query.add_argument("--sweep", action="append", help="limit to this sweep (repeatable; default: all)")
    query.add_argument("--format", choices=["table", "csv", "json"], default="table")
    query.add_argument("--output", help="write the result to a .parquet or .csv file instead")
    query.add_argument("--max-rows", type=int, default=50, help="rows shown in table format (default 50)")
    query.set_defaults(func=_cmd_query)

    imp = sub.add_parser("import", help="turn an original apple/ml-rlgrad config into a sweep file",
                         description="SOURCE is either a controlled-experiment plan (sft_vs_rft/experiment_plans/"
                                     "*.json: base_config + options grid) or an RL4LMs-style YAML "
                                     "(rl4lms_scripts/**.yml). The result is validated like `rlgrad run` would.")
    imp.add_argument("source")
    imp.add_argument("-o", "--output", help="write the sweep file here (default: print it)")
    imp.add_argument("--sweep", help="name of the sweep (default: task + algorithm + variant, e.g. "
                                     "rl4lms_common_gen_nlpo_on_supervised, controlled_mlp_mnist_finetune_sgd)")
    imp.add_argument("--pretrain-plan", help="plan JSON: the pretraining plan that a finetune plan starts from")
    imp.add_argument("--sft-config", help="RL4LMs *_supervised.yml for a *_on_supervised config (default: the "
                                          "<model>_supervised.yml beside it)")
    imp.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    imp.set_defaults(func=_cmd_import)
    return parser


def _show_deprecations() -> None:
    """An old config spelling that still loads is one line on stderr, once."""
    import warnings

    from workloads.core.config import RlgradDeprecation

    if getattr(warnings.showwarning, "shows_rlgrad_deprecations", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, RlgradDeprecation):
            print(f"rlgrad: deprecated: {message}", file=sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    original = warnings.showwarning
    show.shows_rlgrad_deprecations = True
    warnings.showwarning = show
    warnings.simplefilter("once", RlgradDeprecation)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _show_deprecations()
    try:
        return args.func(args)
    except (SpecError, ValueError) as e:
        return _error(str(e).splitlines()[0] if str(e) else type(e).__name__)


if __name__ == "__main__":
    sys.exit(main())
