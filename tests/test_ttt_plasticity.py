"""Acceptance of the plasticity pipeline: ``configs/ttt_verify_synthetic.yaml`` on CPU writes the table, heatmap,
bucket chart and report, and Retrieval tokens' update norms (inner-gradient norms) are non-zero and differ from
Syntax ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.stats import mannwhitneyu

from src.analysis.plasticity import read_tables
from src.cli import main
from src.telemetry import read_events
from tests.conftest import CONFIGS


def test_verify_synthetic_writes_the_analysis(run_root: Path) -> None:
    main(["fit", "--config", str(CONFIGS / "ttt_verify_synthetic.yaml"), "--run.root", str(run_root),
          "--trainer.enable_progress_bar", "false"])  # fmt: skip
    run_dir = run_root / "ttt_verify_synthetic" / "v0"
    for stage, captures in (("train", 10), ("val", 2)):
        out = run_dir / "plasticity" / stage
        tables = sorted(p for p in out.glob("step*.parquet") if not p.name.endswith(".minibatch.parquet"))
        assert len(tables) == captures
        for name in ("heatmap_update_norm.png", "buckets_update_norm.png"):
            with Image.open(out / name) as image:
                assert image.size[0] > 300 and np.asarray(image.convert("L")).std() > 5  # a real, non-blank plot
        report = json.loads((out / "report.json").read_text())
        assert report["rq1"]["verdict"] in ("supported", "contradicted", "inconclusive")
        assert (out / "report.md").read_text().startswith("# Plasticity report")

    tokens, minibatches = read_tables(sorted((run_dir / "plasticity" / "val").glob("step*[0-9].parquet")))
    assert minibatches is not None and (minibatches["delta_w_norm"] > 0).all()
    per_token = tokens.groupby(["sequence", "position", "layer", "bucket"], as_index=False)["update_norm"].mean()
    retrieval = per_token.loc[per_token.bucket == "Retrieval", "update_norm"].to_numpy()
    syntax = per_token.loc[per_token.bucket == "Syntax", "update_norm"].to_numpy()
    assert len(retrieval) > 50 and len(syntax) > 50
    assert (retrieval > 0).all()
    assert mannwhitneyu(retrieval, syntax).pvalue < 0.01

    events = list(read_events(run_dir / "telemetry.jsonl"))
    layered = [e for e in events if e["metric"].startswith("ttt/") and "layer" in e]
    assert {e["layer"] for e in layered} == {0, 1, 2}
    assert {"ttt/update_norm", "ttt/g_norm", "ttt/delta_w_norm"} <= {e["metric"] for e in layered}
