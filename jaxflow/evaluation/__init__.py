"""Benchmark evaluation under truncation: a resumable runner, the cliff layer, summaries, figures.

    from jaxflow.evaluation import EvalConfig, run_evaluation, cliff_layer, cliff_figure
    res = run_evaluation(EvalConfig(dataset="pope", sweep="all", out="outputs/eval/pope"))
    print(res.summary["cliff_layer"])                        # per data set and model
    cliff_figure(["outputs/eval"], "outputs/eval/cliffs.png")  # all runs below a folder

The runner (``jaxflow.evaluation.runner``) batches a data set's items by prompt length, runs
``truncation_generate`` (every cut layer K in one pass) or plain ``generate``, and appends per-item
predictions to ``predictions.jsonl`` batch by batch (flushed and fsynced); re-running resumes.
``jaxflow.evaluation.records`` owns the run directory's files, ``jaxflow.evaluation.cliff`` the
cliff-layer definition, the summary and the figures. ``EvalConfig(mesh="data:N,model:M")`` shards the
model over this process's devices; after ``jax.distributed.initialize`` every process runs its share
of the batches into ``predictions.host{i}-of-{n}.jsonl`` and process 0 merges them
(``merge_predictions``). See docs/evaluation.md.
"""
from jaxflow.evaluation.cliff import (CLIFF_DEFINITION, build_summary, cliff_figure, cliff_layer, find_runs,
                                     load_summary, plot_curve, summary_csv, write_summary)
from jaxflow.evaluation.records import (CURVE_PNG, PREDICTIONS, RUN_JSON, SUMMARY_CSV, SUMMARY_JSON, EvaluationError,
                                        PredictionLog, host_predictions, merge_predictions, open_run_dir, read_records,
                                        repair_jsonl)
from jaxflow.evaluation.runner import (DATASETS, DEFAULT_MAX_NEW_TOKENS, EvalConfig, EvalResult, PreparedBatch,
                                       check_config, generate_batch, item_score, layout_rows, parse_sweep,
                                       plan_batches, prepare_batch, process_grid, prompt_lengths, rescore_run,
                                       resolve_layers, run_evaluation, score_run)

__all__ = [
    "EvalConfig", "EvalResult", "run_evaluation", "EvaluationError", "DATASETS", "DEFAULT_MAX_NEW_TOKENS",
    "check_config", "parse_sweep", "resolve_layers", "plan_batches", "layout_rows", "prepare_batch",
    "PreparedBatch", "prompt_lengths", "generate_batch", "item_score", "score_run", "rescore_run",
    "PredictionLog", "repair_jsonl", "read_records", "open_run_dir", "host_predictions", "merge_predictions",
    "process_grid",
    "PREDICTIONS", "RUN_JSON", "SUMMARY_JSON", "SUMMARY_CSV", "CURVE_PNG",
    "cliff_layer", "CLIFF_DEFINITION", "build_summary", "summary_csv", "write_summary", "load_summary",
    "plot_curve", "cliff_figure", "find_runs",
]
